"""Capabilities: per-feature hooks invoked by VMService around a VM's lifecycle.

Each capability has explicit service fields populated at wiring time; none holds a
`Daemon`. VMService calls them through the function-typed `CapabilityHooks` bag.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stoker.model.records import VMRecord
from stoker.store import Store

if TYPE_CHECKING:
    from stoker.daemon.host_network import HostNetwork
    from stoker.daemon.vm_service import VMService
    from stoker.daemon.workspace_service import WorkspaceService

Hook = Callable[[VMRecord], Awaitable[None]]


@dataclass
class CapabilityHooks:
    """Function-typed hook lists VMService runs at each lifecycle point, in order."""

    prepare_host: list[Hook] = field(default_factory=list)  # before the VMM starts
    post_start: list[Hook] = field(default_factory=list)  # after the guest is ready
    cleanup: list[Hook] = field(default_factory=list)  # on stop/kill/delete (errors joined)


class Capability:
    """Base: a capability contributes hooks."""

    name = "capability"

    def register(self, hooks: CapabilityHooks) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class WorkDiskCapability(Capability):
    """Builds/grows the /root work disk and syncs keys, git identity and file_sync onto it."""

    vm: VMService
    ws: WorkspaceService
    store: Store
    default_image_name: str
    name = "workdisk"

    def register(self, hooks: CapabilityHooks) -> None:
        pass


@dataclass
class DNSCapability(Capability):
    """Publishes NAME.vm records while a VM runs."""

    net: HostNetwork
    name = "dns"

    def register(self, hooks: CapabilityHooks) -> None:
        pass


@dataclass
class NATCapability(Capability):
    """Adds and removes per-VM NAT rules for VMs created with --nat."""

    vm: VMService
    net: HostNetwork
    logger: logging.Logger
    name = "nat"

    def register(self, hooks: CapabilityHooks) -> None:
        pass
