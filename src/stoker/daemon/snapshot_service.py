"""`stoker vm snapshot` (issue 13 item 2): quiesce, pause, save device state + RAM, copy
the VM's writable disks at that paused instant (sparse), resume. The files live under the
VM's directory (`snapshots/NAME/`), so deleting the VM deletes them; the row in the
`snapshots` table goes with the VM (ON DELETE CASCADE). A snapshot records what a restore
must match (`snapshot_files.SNAPSHOT_KEYS`)."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.daemon.snapshot_files import copy_sparse
from stoker.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, StokerError
from stoker.model.records import VMState

if TYPE_CHECKING:
    from stoker.daemon.vm_service import Progress, VMService
    from stoker.daemon.vmm.base import MachineConfig, VMMHandle
    from stoker.model.records import VMRecord

SNAPSHOTS_DIR = "snapshots"
STATE_FILE = "state.bin"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"snapshot name {name!r} is not valid: use 1-63 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


def machine_meta(
    driver_name: str, version: str, accel: object, image_id: str, cfg: MachineConfig
) -> dict[str, Any]:
    """What a snapshot of `cfg` records (and a restore compares)."""
    return {
        "vmm": driver_name,
        "vmm_version": version,
        "accel": accel,
        "kernel": str(cfg.kernel),
        "image_id": image_id,
        "vcpu": cfg.vcpu,
        "memory_mib": cfg.memory_mib,
        "devices": [f"blk:{d.id}:{'ro' if d.read_only else 'rw'}" for d in cfg.disks]
        + (["net"] if cfg.tap else [])
        + (["agent"] if cfg.agent_socket else []),
    }


async def snapshot_vm(
    svc: VMService, ref: str, name: str | None, progress: Progress
) -> dict[str, Any]:
    """Snapshot a running VM; on any failure no snapshot (row or files) is left and the
    VM keeps running."""
    async with svc.with_vm_lock_by_ref(ref) as vm:
        if vm.state != VMState.RUNNING or not await svc.is_alive(vm):
            raise Conflict(
                f"VM {vm.name} is not running ({vm.state.value}): a snapshot is taken of a "
                f"running VM; start it with `stoker vm start {vm.name}` first"
            )
        name = check_name(name or time.strftime("s%Y%m%d-%H%M%S"))
        if svc.store.get_snapshot(vm.id, name) is not None:
            raise AlreadyExists(
                f"VM {vm.name} already has a snapshot named {name!r}: pick another --name "
                f"or `stoker vm snapshot delete {vm.name} {name}`"
            )
        driver: Any = svc._driver()
        if not hasattr(driver, "save_state"):
            raise Conflict(f"the {driver.name} driver cannot take snapshots yet")
        handle = svc._handle(vm)
        if handle is None:
            raise Conflict(f"VM {vm.name}'s VMM is not reachable: restart the VM")
        image = await svc.images.get_image(vm.image)
        kernel = await svc.images.get_kernel(image.kernel or "")
        tap = vm.teardown.tap or ""
        cfg = svc._machine_config(vm, kernel, image, tap)
        meta = machine_meta(
            driver.name,
            await driver.vmm_version(handle),
            handle.extra.get("accel"),
            image.digest or image.created_at,
            cfg,
        )
        final = Path(vm.vm_dir) / SNAPSHOTS_DIR / name
        size = await _take(svc, vm, driver, handle, cfg, final, progress)
        svc.store.insert_snapshot(vm.id, name, final, meta)
        progress("snapshot", f"snapshot {name} of {vm.name}: {size} bytes")
        return {"vm": vm.name, "name": name, "dir": str(final), "bytes": size, "meta": meta}


async def _take(
    svc: VMService,
    vm: VMRecord,
    driver: Any,
    handle: VMMHandle,
    cfg: MachineConfig,
    final: Path,
    progress: Progress,
) -> int:
    target = svc.ssh_target(vm)
    progress("quiesce", "sync in the guest")
    try:
        r = await svc.ssh.run(target, "sync", timeout=30.0)
        if r.exit_status != 0:
            progress("quiesce", f"guest sync exited {r.exit_status}: going on")
    except StokerError as e:
        progress("quiesce", f"guest sync failed ({e.message}): going on")
    # A restored guest never had the pooled connection: it would hang on first use.
    await svc.ssh.forget(target)
    part = final.with_name(f".{final.name}.partial")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True, mode=0o700)
    try:
        progress("save", "pausing the guest, saving device state and memory")
        size = int(await driver.save_state(handle, part / STATE_FILE))
        try:
            progress("disks", "copying the writable disks (sparse)")
            for d in cfg.disks:
                if not d.read_only:
                    size += await asyncio.to_thread(copy_sparse, d.path, part / d.path.name)
        finally:
            await driver.resume(handle)
        part.rename(final)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return size


def list_snapshots(svc: VMService, ref: str | None) -> list[dict[str, Any]]:
    vms = {v.id: v.name for v in svc.store.list_vms()}
    vm_id = svc.resolve(ref).id if ref else None
    return [{**s, "vm": vms.get(s["vm_id"], s["vm_id"])} for s in svc.store.list_snapshots(vm_id)]


async def delete_snapshot(svc: VMService, ref: str, name: str) -> dict[str, str]:
    async with svc.with_vm_lock_by_ref(ref) as vm:
        snap = svc.store.get_snapshot(vm.id, check_name(name))
        if snap is None:
            raise NotFound(
                f"VM {vm.name} has no snapshot named {name!r} "
                f"(see `stoker vm snapshot list {vm.name}`)"
            )
        svc.store.delete_snapshot(vm.id, name)
        shutil.rmtree(Path(vm.vm_dir) / SNAPSHOTS_DIR / name, ignore_errors=True)
        return {"vm": vm.name, "name": name}
