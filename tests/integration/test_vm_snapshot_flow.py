"""The `vm snapshot` flow (snapshot_service) with the real QEMU driver and a real store:
the VM service around it is a stand-in (no network, no SSH: the guest only halts). A
snapshot of a running VM leaves the state and sparse disk copies under the VM's dir and a
row; a stopped VM is refused; a disk that fills during the copy leaves no snapshot (no
row, no files) and the VM running; delete removes both."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_vmm_qemu_snapshot import machine

from prereq import require
from stoker.daemon import snapshot_files, snapshot_service
from stoker.daemon.vmm.base import MachineConfig, VMMHandle
from stoker.daemon.vmm.qemu import QemuDriver, QMPClient
from stoker.errors import CommandFailed, Conflict, StokerError
from stoker.model.records import Image, Kernel, Teardown, VMRecord, VMSpec, VMState
from stoker.runner import Runner
from stoker.store.db import Store, now

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stkf", dir="/tmp"))  # short: unix socket paths
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class FakeSSH:
    def __init__(self) -> None:
        self.ran: list[str] = []
        self.forgot = 0

    async def run(self, t: object, command: str, **kw: Any) -> Any:
        self.ran.append(command)
        raise StokerError("no SSH in this guest")  # the flow goes on without the sync

    async def forget(self, t: object) -> None:
        self.forgot += 1


class World:
    def __init__(self, tmp: Path) -> None:
        self.store = Store(tmp / "state.db")
        self.drv = QemuDriver(Runner(), accel="tcg", ready_timeout=30)
        self.cfg: MachineConfig = machine(tmp / "vm")
        # A second, sparse writable disk, mostly holes, some data.
        with open(tmp / "vm" / "overlay.ext4", "wb") as f:
            f.truncate(32 << 20)
            f.seek(5 << 20)
            f.write(b"overlay data")
        from stoker.daemon.vmm.base import Disk

        self.cfg.disks.insert(
            0, Disk(path=tmp / "vm" / "overlay.ext4", read_only=False, id="overlay")
        )
        ts = now()
        self.store.upsert_kernel(
            Kernel("k1", "6.1", "x86_64", "/k", str(self.cfg.kernel), None, None, None, "t", ts)
        )
        self.image = Image(
            name="img",
            managed=True,
            rootfs="/r",
            work_seed=None,
            kernel="k1",
            source="t",
            size=1,
            created_at=ts,
            meta={},
            digest="sha256:feed",
        )
        self.store.upsert_image(self.image)
        self.vm = VMRecord(
            id="v" * 16,
            name="snap",
            state=VMState.RUNNING,
            image="img",
            spec=VMSpec(vcpu=1, memory_mib=128, disk_size=8 << 20, overlay_size=8 << 20),
            guest_ip="172.30.0.9",
            dns_name="snap.vm",
            vm_dir=str(tmp / "vm"),
            created_at=ts,
            updated_at=ts,
        )
        self.vm.teardown = Teardown()
        self.store.insert_vm(self.vm)
        self.ssh = FakeSSH()
        self.handle: VMMHandle | None = None
        self.events: list[tuple[str, str]] = []

    def svc(self) -> Any:
        w = self

        @contextlib.asynccontextmanager
        async def lock(ref: str) -> AsyncIterator[VMRecord]:
            assert ref == "snap"
            yield w.vm

        @contextlib.asynccontextmanager
        async def lock_id(vm_id: str) -> AsyncIterator[VMRecord]:
            assert vm_id == w.vm.id
            yield w.vm

        async def alive(vm: VMRecord) -> bool:
            return w.handle is not None and w.drv.is_running(w.handle)

        async def get_image(name: str) -> Image:
            return w.image

        async def get_kernel(name: str) -> Any:
            return w.store.get_kernel(name)

        return SimpleNamespace(
            store=w.store,
            ssh=w.ssh,
            with_vm_lock_by_ref=lock,
            with_vm_lock_by_id=lock_id,
            is_alive=alive,
            _driver=lambda: w.drv,
            _handle=lambda vm: w.handle,
            images=SimpleNamespace(get_image=get_image, get_kernel=get_kernel),
            _machine_config=lambda vm, k, i, tap: w.cfg,
            ssh_target=lambda vm: "target",
            resolve=lambda ref: w.vm,
        )

    def progress(self, stage: str, msg: str = "", **kw: Any) -> None:
        self.events.append((stage, msg))


async def status(h: VMMHandle) -> str:
    async with QMPClient(h.api_socket or "") as c:
        return str((await c.execute("query-status"))["status"])


@pytest.fixture
async def world(tmp: Path) -> AsyncIterator[World]:
    require(shutil.which(QEMU), f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    w = World(tmp)
    try:
        yield w
    finally:
        if w.handle is not None:
            await w.drv.kill(w.handle)
        w.store.close()


async def test_a_stopped_vm_is_refused(world: World) -> None:
    world.vm.state = VMState.STOPPED
    with pytest.raises(Conflict, match=r"not running.*stoker vm start snap"):
        await snapshot_service.snapshot_vm(world.svc(), "snap", "s1", world.progress)
    assert world.store.list_snapshots() == []
    assert not (Path(world.vm.vm_dir) / "snapshots").exists()


async def test_snapshot_list_delete_with_the_real_qemu(world: World) -> None:
    world.handle = await world.drv.start(world.cfg)
    svc = world.svc()
    out = await snapshot_service.snapshot_vm(svc, "snap", "s1", world.progress)
    assert await status(world.handle) == "running"  # resumed
    d = Path(out.dir)
    assert d == Path(world.vm.vm_dir) / "snapshots" / "s1"
    assert sorted(p.name for p in d.iterdir()) == ["overlay.ext4", "state.bin", "work.ext4"]
    ov = d / "overlay.ext4"
    assert ov.read_bytes() == (Path(world.vm.vm_dir) / "overlay.ext4").read_bytes()
    assert ov.stat().st_blocks * 512 < 1 << 20  # sparse: 32 MiB file, a few KiB of data
    meta = out.meta
    assert meta["vmm"] == "qemu" and re.fullmatch(r"\d+\.\d+\.\d+.*", meta["vmm_version"])
    assert meta["accel"] == "tcg" and meta["image_id"] == "sha256:feed"
    assert meta["vcpu"] == 1 and meta["memory_mib"] == 128
    assert world.ssh.ran == ["sync"] and world.ssh.forgot == 1
    assert [s.name for s in snapshot_service.list_snapshots(svc, "snap")] == ["s1"]
    with pytest.raises(StokerError, match="already has a snapshot named 's1'"):
        await snapshot_service.snapshot_vm(svc, "snap", "s1", world.progress)
    await snapshot_service.delete_snapshot(svc, "snap", "s1")
    assert not d.exists() and world.store.list_snapshots() == []


async def test_a_full_disk_while_copying_leaves_no_snapshot_and_the_vm_running(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.handle = await world.drv.start(world.cfg)

    def full(*a: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(snapshot_files.os, "copy_file_range", full)
    with pytest.raises(CommandFailed, match="No space left"):
        await snapshot_service.snapshot_vm(world.svc(), "snap", "s1", world.progress)
    assert world.store.list_snapshots() == []
    assert list((Path(world.vm.vm_dir) / "snapshots").iterdir()) == []
    assert await status(world.handle) == "running"


async def test_start_from_snapshot_restores_disks_and_memory_and_refuses_a_changed_vmm(
    world: World,
) -> None:
    world.handle = await world.drv.start(world.cfg)
    assert await world.drv.vmm_version(world.handle) == await world.drv.binary_version()
    svc = world.svc()
    started: list[VMMHandle] = []

    async def start_locked(
        vm: VMRecord, progress: Any, ready: str = "ssh", spawn: Any = None
    ) -> VMRecord:
        h = await spawn(world.drv, world.cfg)
        started.append(h)
        world.handle = h
        return vm

    svc._start_locked = start_locked
    await snapshot_service.snapshot_vm(svc, "snap", "s1", world.progress)
    with pytest.raises(Conflict, match="is running: stop it first"):
        await snapshot_service.start_from_snapshot(svc, "snap", "s1", world.progress)
    await world.drv.kill(world.handle)
    world.handle = None
    world.vm.state = VMState.STOPPED
    overlay = Path(world.vm.vm_dir) / "overlay.ext4"
    with open(overlay, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"CHANGED!")  # after the snapshot

    # A snapshot recorded with another QEMU version (faked) is refused, disks untouched.
    snap = world.store.get_snapshot(world.vm.id, "s1")
    assert snap is not None
    world.store.insert_snapshot(
        world.vm.id, "old", Path(snap["dir"]), {**snap["meta"], "vmm_version": "6.0.0"}
    )
    os.symlink(Path(snap["dir"]), Path(world.vm.vm_dir) / "snapshots" / "old")
    with pytest.raises(Conflict, match=r"the VMM version was '6\.0\.0', is now '7\."):
        await snapshot_service.start_from_snapshot(svc, "snap", "old", world.progress)
    assert started == []
    assert b"CHANGED!" in overlay.read_bytes()

    # The image changed since the snapshot: refused with the reason.
    world.image.digest = "sha256:other"
    with pytest.raises(Conflict, match="the image was 'sha256:feed', is now 'sha256:other'"):
        await snapshot_service.start_from_snapshot(svc, "snap", "s1", world.progress)
    world.image.digest = "sha256:feed"

    await snapshot_service.start_from_snapshot(svc, "snap", "s1", world.progress)
    assert len(started) == 1 and await status(started[0]) == "running"
    data = overlay.read_bytes()
    assert b"overlay data" in data and b"CHANGED!" not in data  # the snapshot's disk
    assert not list(Path(world.vm.vm_dir).glob(".*.pre-restore"))


async def test_a_failed_restore_puts_the_vms_own_disks_back(world: World) -> None:
    world.handle = await world.drv.start(world.cfg)
    svc = world.svc()
    await snapshot_service.snapshot_vm(svc, "snap", "s1", world.progress)
    await world.drv.kill(world.handle)
    world.handle = None
    world.vm.state = VMState.STOPPED
    overlay = Path(world.vm.vm_dir) / "overlay.ext4"
    with open(overlay, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"CHANGED!")
    (Path(world.vm.vm_dir) / "snapshots" / "s1" / "state.bin").write_bytes(b"garbage")

    async def start_locked(
        vm: VMRecord, progress: Any, ready: str = "ssh", spawn: Any = None
    ) -> VMRecord:
        await spawn(world.drv, world.cfg)
        return vm

    svc._start_locked = start_locked
    with pytest.raises(CommandFailed, match="could not load the VM state"):
        await snapshot_service.start_from_snapshot(svc, "snap", "s1", world.progress)
    assert b"CHANGED!" in overlay.read_bytes()  # its own disk again
    assert not list(Path(world.vm.vm_dir).glob(".*.pre-restore"))
