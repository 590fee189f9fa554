"""Capabilities: per-feature hooks invoked by VMService around a VM's lifecycle.

Each capability has explicit service fields populated at wiring time; none holds a
`Daemon`. VMService calls them through the function-typed `CapabilityHooks` bag.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stoker.daemon.vm_disks import mac_for
from stoker.model.records import VMRecord

if TYPE_CHECKING:
    from stoker.daemon.host_network import HostNetwork
    from stoker.daemon.workspace_service import WorkspaceService

Hook = Callable[[VMRecord], Awaitable[None]]


@dataclass
class CapabilityHooks:
    """Function-typed hook lists VMService runs at each lifecycle point, in order."""

    prepare_host: list[Hook] = field(default_factory=list)  # before network + VMM
    post_network: list[Hook] = field(default_factory=list)  # tap is up (vm.teardown.tap)
    post_start: list[Hook] = field(default_factory=list)  # guest answers SSH
    cleanup: list[Hook] = field(default_factory=list)  # stop/kill/delete; errors joined


class Capability:
    """Base: a capability contributes hooks."""

    name = "capability"

    def register(self, hooks: CapabilityHooks) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class WorkDiskCapability(Capability):
    """Before every start: grow the /root work disk and write keys, git identity and
    `[[file_sync]]` files onto it (WorkspaceService owns that sync)."""

    ws: WorkspaceService
    name = "workdisk"

    def register(self, hooks: CapabilityHooks) -> None:
        async def sync_work_disk(vm: VMRecord) -> None:
            await self.ws.sync_work_disk(vm)

        hooks.prepare_host.append(sync_work_disk)


@dataclass
class DNSCapability(Capability):
    """Publishes NAME.vm while a VM runs."""

    net: HostNetwork
    name = "dns"

    def register(self, hooks: CapabilityHooks) -> None:
        async def publish_dns(vm: VMRecord) -> None:
            self.net.publish_dns(vm.name, vm.guest_ip)

        async def unpublish_dns(vm: VMRecord) -> None:
            self.net.unpublish_dns(vm.name)

        hooks.post_start.append(publish_dns)
        hooks.cleanup.append(unpublish_dns)


@dataclass
class NATCapability(Capability):
    """Per-VM network policy (`--net`; NAT is one mode of it): nftables rules in stoker's
    own tables and the guest's DNS view, installed before the VMM starts."""

    net: HostNetwork
    name = "nat"

    def register(self, hooks: CapabilityHooks) -> None:
        async def apply_policy(vm: VMRecord) -> None:
            if vm.teardown.tap:
                await self.net.apply_policy(
                    vm.id, vm.guest_ip, vm.teardown.tap, mac_for(vm.guest_ip), vm.spec.net
                )

        async def remove_policy(vm: VMRecord) -> None:
            # Keyed on the durable teardown record, so rules survive a crash until removed.
            if vm.teardown.tap or vm.teardown.nat:
                await self.net.remove_policy(vm.id)

        hooks.post_network.append(apply_policy)
        hooks.cleanup.append(remove_policy)
