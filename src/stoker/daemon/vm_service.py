"""VMService: VM lifecycle, stats, ports, handle cache, per-VM locks, create-op registry.

`vm_locks[id]` is held for the entire lifecycle op on a VM. `create_vm_lock` is the
narrow reservation lock: name re-check + IP allocation + initial row only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from stoker.config import Config
from stoker.daemon.capabilities import CapabilityHooks
from stoker.daemon.handles import HandleCache
from stoker.daemon.locks import LockSet
from stoker.daemon.opstate import Registry
from stoker.daemon.opstate.registry import OpState
from stoker.errors import Ambiguous, NotFound
from stoker.layout import Layout
from stoker.model.records import VMRecord, VMState
from stoker.runner import Runner
from stoker.store import Store

if TYPE_CHECKING:
    from stoker.daemon.host_network import HostNetwork
    from stoker.daemon.image_service import ImageService
    from stoker.daemon.workspace_service import WorkspaceService


class VMService:
    """Owns VM records and the processes and devices behind running VMs."""

    def __init__(
        self,
        store: Store,
        layout: Layout,
        config: Config,
        runner: Runner,
        logger: logging.Logger,
        net: HostNetwork,
        images: ImageService,
        ws: WorkspaceService,
        hooks: CapabilityHooks,
    ) -> None:
        self.store = store
        self.layout = layout
        self.config = config
        self.runner = runner
        self.log = logger
        self.net = net
        self.images = images
        self.ws = ws
        self.hooks = hooks
        self.vm_locks = LockSet()
        self.create_vm_lock = asyncio.Lock()
        self.create_ops: Registry[OpState] = Registry()
        self.handles = HandleCache()

    # --- lookup ------------------------------------------------------------------------

    def resolve(self, ref: str) -> VMRecord:
        """A VM by exact name, full id, or unique id prefix."""
        vms = self.store.list_vms()
        for v in vms:
            if v.name == ref or v.id == ref:
                return v
        matches = [v for v in vms if ref and v.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(v.name for v in matches)
            raise Ambiguous(f"VM reference {ref!r} matches several VMs ({names}): use the name")
        raise NotFound(f"VM {ref!r} not found: `stoker vm list` shows the VMs there are")

    async def list_vms(self) -> list[VMRecord]:
        """Every VM, oldest first."""
        return self.store.list_vms()

    async def show_vm(self, ref: str) -> VMRecord:
        """One VM, with its last error and workspace record."""
        return self.resolve(ref)

    # --- locking -----------------------------------------------------------------------

    @asynccontextmanager
    async def with_vm_lock_by_id(self, vm_id: str) -> AsyncIterator[VMRecord]:
        """Hold vm_locks[id]; yields the VM as re-read under the lock."""
        async with self.vm_locks.hold(vm_id):
            vm = self.store.get_vm(vm_id)
            if vm is None:
                raise NotFound(f"VM {vm_id!r} was deleted meanwhile")
            yield vm

    @asynccontextmanager
    async def with_vm_lock_by_ref(self, ref: str) -> AsyncIterator[VMRecord]:
        """Resolve `ref`, then hold its lock (re-resolving under it)."""
        vm = self.resolve(ref)
        async with self.with_vm_lock_by_id(vm.id) as locked:
            yield locked

    def vm_dir(self, vm: VMRecord) -> Path:
        return Path(vm.vm_dir)

    # --- reconcile ---------------------------------------------------------------------

    async def reconcile(self) -> None:
        """At daemon start: keep VMs whose VMM is alive, mark the others stopped."""
        for vm in self.store.list_vms():
            if vm.state not in (VMState.RUNNING, VMState.STARTING, VMState.STOPPING):
                continue
            h = self.handles.load(vm.id, Path(vm.vm_dir))
            if await self.is_alive(vm):
                self.log.info(
                    "reconcile: %s is still running (pid %s)",
                    vm.name,
                    h.pid if h else vm.teardown.vmm_pid,
                )
                vm.state = VMState.RUNNING
                self.store.update_vm(vm)
                continue
            self.log.warning("reconcile: %s's VMM is gone; marking it stopped", vm.name)
            vm.last_error = "the VMM process exited while stokerd was not running"
            vm.state = VMState.STOPPED
            self.store.update_vm(vm)
            self.handles.drop(vm.id, Path(vm.vm_dir))

    # --- liveness ----------------------------------------------------------------------

    async def is_alive(self, vm: VMRecord) -> bool:
        """True when the VM's VMM process is running (by cached handle, else teardown pid)."""
        h = self.handles.get(vm.id)
        pid = h.pid if h is not None else vm.teardown.vmm_pid
        if not pid:
            return False
        return pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """A process exists with this pid and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    # state is the field after the parenthesised comm
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z"
