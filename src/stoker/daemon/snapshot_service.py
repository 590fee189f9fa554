"""`stoker vm snapshot` (issue 13 item 2): quiesce, pause, save device state + RAM, copy
the VM's writable disks at that paused instant (sparse), resume. The files live under the
VM's directory (`snapshots/NAME/`), so deleting the VM deletes them; the row in the
`snapshots` table goes with the VM (ON DELETE CASCADE). A snapshot records what a restore
must match (`snapshot_files.SNAPSHOT_KEYS`)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.daemon.snapshot_files import copy_sparse, snapshot_refusal
from stoker.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, StokerError
from stoker.model.records import VMRecord, VMState
from stoker.model.wire import SnapshotDeleted, SnapshotInfo, SnapshotTaken

if TYPE_CHECKING:
    from stoker.daemon.vm_service import Progress, VMService
    from stoker.daemon.vmm.base import MachineConfig, VMMDriver, VMMHandle
    from stoker.model.records import VMRecord

SNAPSHOTS_DIR = "snapshots"
STATE_FILE = "state.bin"
# In a VM's directory while its guest is paused for a save: a daemon killed then leaves the
# guest paused, and reconcile resumes every running VM that has it.
PAUSED_MARK = "PAUSED-FOR-SNAPSHOT"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"snapshot name {name!r} is not valid: use 1-63 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


def _file_id(p: Path) -> str:
    """A file as a snapshot knows it: path, size, mtime (a re-imported kernel differs)."""
    try:
        st = p.stat()
    except OSError:
        return f"{p} (missing)"
    return f"{p} ({st.st_size} bytes, mtime {st.st_mtime_ns})"


def machine_meta(
    driver_name: str, version: str, accel: object, image_id: str, cfg: MachineConfig
) -> dict[str, Any]:
    """What a snapshot of `cfg` records (and a restore compares)."""
    return {
        "vmm": driver_name,
        "vmm_version": version,
        "accel": accel,
        "kernel": _file_id(cfg.kernel),
        "image_id": image_id,
        "vcpu": cfg.vcpu,
        "memory_mib": cfg.memory_mib,
        "devices": [f"blk:{d.id}:{'ro' if d.read_only else 'rw'}" for d in cfg.disks]
        + (["net"] if cfg.tap else [])
        + (["agent"] if cfg.agent_socket else []),
    }


async def refuse_if_changed(
    svc: VMService, drv: VMMDriver, image_name: str, cfg: MachineConfig, recorded: dict[str, Any]
) -> None:
    """Conflict naming every difference between what a snapshot recorded and what a
    restore with `drv` of `cfg` on `image_name` would run (VMM, version, accel, image, shape)."""
    image = await svc.images.get_image(image_name)
    current = machine_meta(
        drv.name,
        await drv.binary_version(),
        drv.accelerator(),
        image.digest or image.created_at,
        cfg,
    )
    why = snapshot_refusal(recorded, current)
    if why:
        raise Conflict(why)


async def snapshot_vm(
    svc: VMService, ref: str, name: str | None, progress: Progress
) -> SnapshotTaken:
    """Snapshot a running VM; on any failure no snapshot (row or files) is left and the
    VM keeps running."""
    return await snapshot_vm_by_id(svc, svc.resolve(ref).id, name, progress)


async def snapshot_vm_by_id(
    svc: VMService, vm_id: str, name: str | None, progress: Progress
) -> SnapshotTaken:
    """`snapshot_vm` by id: hidden VMs too (the warm pool's template)."""
    async with svc.with_vm_lock_by_id(vm_id) as vm:
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
        driver = svc._driver()
        if not driver.supports_snapshots:
            raise Conflict(
                f"the {driver.label} driver cannot take snapshots: stop the VM and start it "
                "again instead"
            )
        handle = svc._handle(vm)
        if handle is None:
            raise Conflict(f"VM {vm.name}'s VMM is not reachable: restart the VM")
        image = await svc.images.get_image(vm.image)
        # A VM on a workload root boots its system image's kernel (VMService.boot_kernel).
        boot = await svc.images.get_image(vm.system_image) if vm.system_image else image
        kernel = await svc.images.get_kernel(boot.kernel or "")
        tap = vm.teardown.tap or ""
        cfg = svc._machine_config(vm, kernel, image, tap)
        meta = machine_meta(
            driver.name,
            await driver.vmm_version(handle),
            driver.accelerator(handle),
            image.digest or image.created_at,
            cfg,
        )
        final = Path(vm.vm_dir) / SNAPSHOTS_DIR / name
        size = await _take(svc, vm, driver, handle, cfg, final, progress)
        svc.store.insert_snapshot(vm.id, name, final, meta)
        progress("snapshot", f"snapshot {name} of {vm.name}: {size} bytes")
        return SnapshotTaken(vm.name, name, str(final), size, meta)


async def _take(
    svc: VMService,
    vm: VMRecord,
    driver: VMMDriver,
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
    mark = Path(vm.vm_dir) / PAUSED_MARK
    try:
        progress("save", "pausing the guest, saving device state and memory")
        mark.touch()
        try:
            # save_state runs the guest again itself when it fails.
            size = int(await driver.save_state(handle, part / STATE_FILE))
            try:
                progress("disks", "copying the writable disks (sparse)")
                for d in cfg.disks:
                    if not d.read_only:
                        size += await asyncio.to_thread(copy_sparse, d.path, part / d.path.name)
            finally:
                await driver.resume(handle)
        finally:
            mark.unlink(missing_ok=True)
        part.rename(final)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return size


def list_snapshots(svc: VMService, ref: str | None) -> list[SnapshotInfo]:
    vms = {v.id: v.name for v in svc.store.list_vms()}
    vm_id = svc.resolve(ref).id if ref else None
    # The user's VMs' snapshots: a hidden VM's (the warm pool's template) are not listed.
    return [
        SnapshotInfo(**s, vm=vms[s["vm_id"]])
        for s in svc.store.list_snapshots(vm_id)
        if s["vm_id"] in vms
    ]


async def delete_snapshot(svc: VMService, ref: str, name: str) -> SnapshotDeleted:
    async with svc.with_vm_lock_by_ref(ref) as vm:
        snap = svc.store.get_snapshot(vm.id, check_name(name))
        if snap is None:
            raise NotFound(
                f"VM {vm.name} has no snapshot named {name!r} "
                f"(see `stoker vm snapshot list {vm.name}`)"
            )
        svc.store.delete_snapshot(vm.id, name)
        shutil.rmtree(Path(vm.vm_dir) / SNAPSHOTS_DIR / name, ignore_errors=True)
        return SnapshotDeleted(vm.name, name)


async def start_from_snapshot(svc: VMService, ref: str, name: str, progress: Progress) -> VMRecord:
    """`vm start NAME --from-snapshot SNAP`: a stopped VM gets the snapshot's disks back
    and its guest resumes from the saved memory. Refused, with every difference named,
    when the VMM (kind, version), accel, kernel, image or machine shape changed since; the
    VM's own disks are put back if anything fails before the guest runs."""
    async with svc.with_vm_lock_by_ref(ref) as vm:
        if vm.state == VMState.RUNNING and await svc.is_alive(vm):
            raise Conflict(
                f"VM {vm.name} is running: stop it first (`stoker vm stop {vm.name}`), a "
                "snapshot is restored into a stopped VM"
            )
        snap = svc.store.get_snapshot(vm.id, check_name(name))
        if snap is None:
            raise NotFound(
                f"VM {vm.name} has no snapshot named {name!r} "
                f"(see `stoker vm snapshot list {vm.name}`)"
            )
        d = Path(vm.vm_dir) / SNAPSHOTS_DIR / name
        if not (d / STATE_FILE).is_file():
            raise Conflict(f"snapshot {name} of {vm.name} is incomplete ({d}): delete it")
        recorded: dict[str, Any] = snap["meta"]
        driver = svc._driver()
        if not driver.supports_snapshots:
            raise Conflict(
                f"the {driver.label} driver cannot restore snapshots: start {vm.name} "
                "without --from-snapshot"
            )

        async def boot(drv: VMMDriver, cfg: MachineConfig) -> VMMHandle:
            await refuse_if_changed(svc, drv, vm.image, cfg, recorded)
            progress("restore", f"restoring disks and memory from snapshot {name}")
            put_back = await asyncio.to_thread(_swap_in_disks, cfg, d)
            try:
                handle = await drv.restore(cfg, d / STATE_FILE)
            except BaseException:
                await asyncio.to_thread(_put_back, put_back)
                raise
            for old in put_back.values():
                old.unlink(missing_ok=True)
            return handle

        await svc.ssh.forget(svc.ssh_target(vm))
        out = await svc._start_locked(vm, progress, spawn=boot)
        # The guest's clock stopped when it was saved: set it from the host's.
        try:
            await svc.ssh.run(svc.ssh_target(vm), f"date -u -s @{time.time():.3f}", timeout=15)
        except StokerError as e:
            progress("clock", f"could not set the guest clock ({e.message})")
        return out


def _swap_in_disks(cfg: MachineConfig, snap_dir: Path) -> dict[Path, Path]:
    """Move each writable disk aside and copy the snapshot's in; {disk: moved-aside}."""
    moved: dict[Path, Path] = {}
    try:
        for disk in cfg.disks:
            if disk.read_only:
                continue
            src = snap_dir / disk.path.name
            if not src.is_file():
                raise Conflict(f"snapshot {snap_dir.name} has no copy of disk {disk.id} ({src})")
            aside = disk.path.with_name(f".{disk.path.name}.pre-restore")
            os.replace(disk.path, aside)
            moved[disk.path] = aside
            copy_sparse(src, disk.path)
    except BaseException:
        _put_back(moved)
        raise
    return moved


def _put_back(moved: dict[Path, Path]) -> None:
    for disk, aside in moved.items():
        os.replace(aside, disk)
