"""`wire_services(d)`: the single entry point that builds services and capabilities.

Called once from `Daemon.open()` after the root's infrastructure is set, and by tests
after constructing a `Daemon` by hand. Idempotent: anything already set (a stub a test
assigned) is kept.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from stoker.daemon.capabilities import (
    CapabilityHooks,
    DNSCapability,
    NATCapability,
    WorkDiskCapability,
)
from stoker.daemon.host_network import HostNetwork
from stoker.daemon.image_service import ImageService
from stoker.daemon.pool_service import PoolService
from stoker.daemon.portfwd import PortForwards
from stoker.daemon.vm_service import VMService
from stoker.daemon.workspace_service import WorkspaceSeams, WorkspaceService
from stoker.model.records import Image, VMRecord

if TYPE_CHECKING:
    from stoker.daemon.daemon import Daemon


def wire_services(d: Daemon) -> None:
    """Build HostNetwork, ImageService, WorkspaceService, VMService and capabilities."""
    assert d.store is not None and d.layout is not None and d.config is not None
    logger = d.logger or logging.getLogger("stoker")
    d.logger = logger

    if d.net is None:
        helper = None
        if os.geteuid() != 0:
            # Not root: bridge, taps, tap descriptors, rules and port 53 via stoker-helper.
            from stoker.daemon.hostnet.privileged import helper_tap_opener
            from stoker.daemon.vmm import confine
            from stoker.helper.client import HelperClient

            helper = HelperClient(Path(d.config.helper_socket))
            confine.TAP_OPENER = helper_tap_opener(helper)
        d.net = HostNetwork(d.config, d.runner, logger.getChild("net"), helper=helper)
    if d.images is None:
        d.images = ImageService(d.store, d.layout, d.config, d.runner, logger.getChild("images"))

    # Closures over `d`, resolved at call time, so WorkspaceService never holds a
    # VMService pointer and construction order cannot cycle.
    images = d.images

    async def vm_resolver(ref: str) -> VMRecord:
        assert d.vm is not None
        return d.vm.resolve(ref)

    async def alive_checker(vm: VMRecord) -> bool:
        assert d.vm is not None
        return await d.vm.is_alive(vm)

    def with_vm_lock_by_ref(ref: str):  # type: ignore[no-untyped-def]
        assert d.vm is not None
        return d.vm.with_vm_lock_by_ref(ref)

    async def image_resolver(name: str) -> Image:
        return await images.get_image(name)

    async def image_work_seed(im: Image) -> str | None:
        return im.work_seed

    if d.ws is None:
        d.ws = WorkspaceService(
            d.store,
            d.layout,
            d.config,
            d.runner,
            logger.getChild("workspace"),
            WorkspaceSeams(
                vm_resolver=vm_resolver,
                alive_checker=alive_checker,
                with_vm_lock_by_ref=with_vm_lock_by_ref,
                image_resolver=image_resolver,
                image_work_seed=image_work_seed,
            ),
        )
    if d.hooks is None:
        d.hooks = CapabilityHooks()
    if d.vm is None:
        d.vm = VMService(
            d.store,
            d.layout,
            d.config,
            d.runner,
            logger.getChild("vm"),
            d.net,
            d.images,
            d.ws,
            d.hooks,
        )
    if d.pool is None:
        d.pool = PoolService(d.vm, d.store, d.config, logger.getChild("pool"))
        before_delete = getattr(d.images, "before_delete", None)  # a test's stub may lack it
        if before_delete is not None:
            before_delete.append(d.pool.drain)  # deleting an image drains its pool
    d.vm.pool = d.pool
    # One SSH client (and its kept connections) for both services, so VMService can drop a
    # guest's connection whenever that VM stops.
    if type(d.ws.ssh) is type(d.vm.ssh):
        d.ws.ssh = d.vm.ssh
    if d.forwards is None:
        forwards = d.forwards = PortForwards(logger.getChild("portfwd"), d.net.netns)

        async def drop_port_forwards(vm: VMRecord) -> None:
            await forwards.remove(vm.id)

        d.hooks.cleanup.append(drop_port_forwards)  # stop, kill, delete, a crashed VMM
    if d.capabilities is None:
        d.capabilities = [
            WorkDiskCapability(
                vm=d.vm, ws=d.ws, store=d.store, default_image_name=d.config.default_image
            ),
            DNSCapability(net=d.net),
            NATCapability(vm=d.vm, net=d.net, logger=logger.getChild("nat")),
        ]
        for cap in d.capabilities:
            cap.register(d.hooks)
