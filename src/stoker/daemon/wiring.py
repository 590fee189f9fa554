"""`build_services`: the one place services and capabilities are built and connected.

`Daemon.__init__` calls it with the root's infrastructure; a test that wants a stub
service (or a `HostNetwork` inside its own namespace, a fake `GuestSSH`) passes it to
`Daemon(...)` and everything else is built around it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.daemon.capabilities import (
    Capability,
    CapabilityHooks,
    DNSCapability,
    NATCapability,
    WorkDiskCapability,
)
from stoker.daemon.guestssh import GuestSSH, GuestSSHLike
from stoker.daemon.host_network import HostNetwork
from stoker.daemon.image_service import ImageService
from stoker.daemon.pool_service import PoolService
from stoker.daemon.portfwd import PortForwards
from stoker.daemon.vm_service import VMService
from stoker.daemon.workspace_service import WorkspaceSeams, WorkspaceService
from stoker.model.records import VMRecord

if TYPE_CHECKING:
    from stoker.config import Config
    from stoker.layout import Layout
    from stoker.runner import Runner
    from stoker.store import Store


@dataclass
class Services:
    """Everything `build_services` made (or kept from the presets)."""

    net: HostNetwork
    images: ImageService
    ws: WorkspaceService
    vm: VMService
    ssh: GuestSSHLike
    hooks: CapabilityHooks
    forwards: PortForwards
    capabilities: list[Capability]
    pool: PoolService


def build_services(
    layout: Layout,
    config: Config,
    store: Store,
    runner: Runner,
    logger: logging.Logger,
    *,
    net: HostNetwork | None = None,
    images: ImageService | None = None,
    ws: WorkspaceService | None = None,
    vm: VMService | None = None,
    ssh: GuestSSHLike | None = None,
    capabilities: list[Capability] | None = None,
    pool: PoolService | None = None,
) -> Services:
    """HostNetwork, ImageService, WorkspaceService, VMService, port forwards and the
    capabilities; a preset (a test's stub) is used instead of building that one."""
    if net is None:
        helper = None
        if os.geteuid() != 0:
            # Not root: bridge, taps, tap descriptors, rules and port 53 via stoker-helper.
            from stoker.daemon.hostnet.privileged import helper_tap_opener
            from stoker.daemon.vmm import confine
            from stoker.helper.client import HelperClient

            helper = HelperClient(Path(config.helper_socket))
            confine.TAP_OPENER = helper_tap_opener(helper)
        net = HostNetwork(config, runner, logger.getChild("net"), helper=helper)
    own_images = images is None  # a preset stub is a test's: nothing is hooked into it
    if images is None:
        images = ImageService(store, layout, config, runner, logger.getChild("images"))
    # One SSH client (and its kept connections) for both services, so VMService can drop a
    # guest's connection whenever that VM stops.
    if ssh is None:
        ssh = GuestSSH()
    hooks = CapabilityHooks()
    forwards = PortForwards(logger.getChild("portfwd"), net.netns)

    # WorkspaceService holds no VMService: its two seams resolve the VM service when
    # called, so construction order cannot cycle.
    late: dict[str, Any] = {}

    def with_vm_lock_by_ref(ref: str) -> Any:
        return late["vm"].with_vm_lock_by_ref(ref)

    async def alive_checker(rec: VMRecord) -> bool:
        return bool(await late["vm"].is_alive(rec))

    if ws is None:
        ws = WorkspaceService(
            store,
            layout,
            config,
            runner,
            logger.getChild("workspace"),
            WorkspaceSeams(with_vm_lock_by_ref=with_vm_lock_by_ref, alive_checker=alive_checker),
            ssh,
        )
    if vm is None:
        vm = VMService(
            store,
            layout,
            config,
            runner,
            logger.getChild("vm"),
            net,
            images,
            ws,
            hooks,
            ssh,
            forwards,
        )
    late["vm"] = vm
    if pool is None:
        pool = PoolService(vm, store, config, logger.getChild("pool"))
        if own_images:
            images.before_delete.append(pool.drain)  # deleting an image drains its pool
    vm.pool = pool

    async def drop_port_forwards(rec: VMRecord) -> None:
        await forwards.remove(rec.id)

    hooks.cleanup.append(drop_port_forwards)  # stop, kill, delete, a crashed VMM
    if capabilities is None:
        capabilities = [WorkDiskCapability(ws=ws), DNSCapability(net=net), NATCapability(net=net)]
    for cap in capabilities:
        cap.register(hooks)
    return Services(net, images, ws, vm, ssh, hooks, forwards, capabilities, pool)
