"""Daemon(...) builds every service and capability (wiring.build_services), keeps pre-set
stubs, and shares one GuestSSH between the services."""

from __future__ import annotations

from typing import Any

import pytest

from stoker.daemon.capabilities import (
    CapabilityHooks,
    DNSCapability,
    NATCapability,
    WorkDiskCapability,
)
from stoker.daemon.daemon import Daemon
from stoker.daemon.host_network import HostNetwork
from stoker.daemon.image_service import ImageService
from stoker.daemon.vm_service import VMService
from stoker.daemon.workspace_service import WorkspaceService
from stoker.rpc.server import RequestContext

pytestmark = pytest.mark.unit


def ctx() -> RequestContext:
    return RequestContext(peer_uid=0, peer_pid=0)


def test_wire_builds_everything(daemon_factory: Any) -> None:
    d = daemon_factory()
    assert isinstance(d.net, HostNetwork)
    assert isinstance(d.images, ImageService)
    assert isinstance(d.ws, WorkspaceService)
    assert isinstance(d.vm, VMService)
    assert isinstance(d.hooks, CapabilityHooks)
    assert d.logger is not None
    kinds = {type(c) for c in d.capabilities}
    assert {WorkDiskCapability, DNSCapability, NATCapability} <= kinds
    # VMService composes the other three (direct pointers, as the seed says)
    assert d.vm.net is d.net and d.vm.images is d.images and d.vm.ws is d.ws
    assert d.vm.hooks is d.hooks
    # every service shares the root's infrastructure
    for svc in (d.images, d.ws, d.vm):
        assert svc.store is d.store
        assert svc.runner is d.runner
        assert svc.layout is d.layout


def test_one_guest_ssh_is_shared(daemon_factory: Any) -> None:
    d = daemon_factory()
    assert d.vm.ssh is d.ssh and d.ws.ssh is d.ssh


def test_capabilities_registered_their_hooks_once(daemon_factory: Any) -> None:
    d = daemon_factory()
    # workdisk: prepare_host; dns: post_start + cleanup; nat: post_network + cleanup;
    # the port forwards' cleanup
    assert {k: len(v) for k, v in vars(d.hooks).items()} == {
        "prepare_host": 1,
        "post_network": 1,
        "post_start": 1,
        "cleanup": 3,
    }


class StubImages:
    """Stands in for ImageService."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def list_images(self) -> list[dict[str, Any]]:
        self.calls.append("list_images")
        return [{"name": "stub-image"}]

    async def kernel_list(self, available: bool) -> list[dict[str, Any]]:
        self.calls.append("list_kernels")
        return [{"name": "stub-kernel"}]

    def __getattr__(self, name: str) -> Any:
        # the method table binds every image method; only the two above may be called here
        async def unexpected(*a: Any, **kw: Any) -> Any:
            raise AssertionError(f"StubImages.{name} called")

        return unexpected


async def test_preset_image_stub_is_kept_and_used(daemon_factory: Any) -> None:
    stub = StubImages()
    d = daemon_factory(images=stub)
    assert d.images is stub
    # services that depend on images got the stub, not a fresh ImageService
    assert d.vm.images is stub
    assert await d.dispatch("image.list", {}, ctx()) == [{"name": "stub-image"}]
    assert await d.dispatch("kernel.list", {}, ctx()) == [{"name": "stub-kernel"}]
    assert stub.calls == ["list_images", "list_kernels"]
    # vm.list still goes to the real VMService (empty store)
    assert await d.dispatch("vm.list", {}, ctx()) == []


async def test_preset_vm_stub_is_used_by_vm_list(daemon_factory: Any) -> None:
    class StubVM:
        async def list_vms(self) -> list[dict[str, str]]:
            return [{"name": "from-stub"}]

        def __getattr__(self, name: str) -> Any:
            # the method table binds every VM method; only vm.list may be called here
            async def unexpected(*a: Any, **kw: Any) -> Any:
                raise AssertionError(f"StubVM.{name} called")

            return unexpected

    stub = StubVM()
    d = daemon_factory(vm=stub, capabilities=[])
    assert d.vm is stub
    assert d.capabilities == []  # a pre-set (empty) capability list is kept too
    assert await d.dispatch("vm.list", {}, ctx()) == [{"name": "from-stub"}]


def test_preset_runner_reaches_services(daemon_factory: Any) -> None:
    from stoker.runner import RecordingRunner

    r = RecordingRunner()
    d = daemon_factory(runner=r)
    assert d.net.runner is r and d.images.runner is r and d.ws.runner is r and d.vm.runner is r


def _points_to(obj: object, target_type: type) -> list[str]:
    found = []
    for k, v in vars(obj).items():
        if isinstance(v, target_type):
            found.append(k)
        elif isinstance(v, list | tuple | set | dict):
            items = v.values() if isinstance(v, dict) else v
            if any(isinstance(x, target_type) for x in items):
                found.append(k)
    return found


def test_workspace_service_has_no_vmservice_pointer(daemon_factory: Any) -> None:
    d = daemon_factory()
    assert _points_to(d.ws, VMService) == []
    assert _points_to(d.ws, Daemon) == []
    # nor through its seams bag: those are plain callables
    assert _points_to(d.ws.seams, VMService) == []
    for name, fn in vars(d.ws.seams).items():
        assert callable(fn), name


def test_no_service_or_capability_holds_the_daemon(daemon_factory: Any) -> None:
    d = daemon_factory()
    for obj in (d.net, d.images, d.ws, d.vm, d.hooks, *d.capabilities):
        assert _points_to(obj, Daemon) == [], type(obj).__name__


def test_capabilities_have_explicit_service_fields(daemon_factory: Any) -> None:
    d = daemon_factory()
    caps = {type(c): c for c in d.capabilities}
    assert caps[WorkDiskCapability].ws is d.ws
    assert caps[DNSCapability].net is d.net
    assert caps[NATCapability].net is d.net


async def test_workspace_seams_resolve_through_vmservice(daemon_factory: Any) -> None:
    from stoker.errors import NotFound

    d = daemon_factory()
    with pytest.raises(NotFound):
        async with d.ws.seams.with_vm_lock_by_ref("nope"):
            pass


def test_daemon_requires_infrastructure() -> None:
    with pytest.raises(TypeError):
        Daemon()  # type: ignore[call-arg]
