"""Start-up sweep (issue 9 item 5): what a crash or `kill -9` left in staging/, image,
kernel and VM directories with no store row, and kernels/.* temporaries, is removed at
daemon start; recorded artifacts and anything a leftover symlink points at are kept."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from stoker.config import parse_config
from stoker.daemon.daemon import Daemon
from stoker.daemon.imagemgr.safetree import rmtree
from stoker.layout import Layout
from stoker.model.records import Image, Kernel, VMRecord, VMSpec, VMState
from stoker.store import Store
from stoker.store.db import now

pytestmark = pytest.mark.unit


def _daemon(tmp: Path) -> Daemon:
    layout = Layout(tmp / "c", tmp / "s", tmp / "k", tmp / "r")
    layout.ensure()
    d = Daemon(
        layout=layout,
        config=parse_config({}),
        store=Store(layout.db_path),
        logger=logging.getLogger("stoker.test"),
    )
    return d


async def test_sweep_removes_leftovers_and_keeps_recorded_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _daemon(tmp_path)
    lay, store = d.layout, d.store
    assert lay is not None and store is not None and d.vm is not None
    # Recorded: one managed image, one kernel, one VM.
    (lay.images_dir / "img").mkdir()
    (lay.images_dir / "img" / "rootfs.ext4").write_bytes(b"x")
    kdir = lay.kernels_dir / "k1"
    kdir.mkdir()
    (kdir / "vmlinux").write_bytes(b"\x7fELF")
    store.upsert_kernel(
        Kernel(name="k1", version="6", arch="x86_64", dir=str(kdir), vmlinux=str(kdir / "vmlinux"),
               bzimage=None, initrd=None, modules_dir=None, source="t", created_at=now())
    )  # fmt: skip
    store.upsert_image(
        Image(name="img", managed=True, rootfs=str(lay.images_dir / "img" / "rootfs.ext4"),
              work_seed=None, kernel="k1", source="t", size=1, created_at=now())
    )  # fmt: skip
    vm_dir = lay.vm_dir("a" * 32)
    vm_dir.mkdir()
    store.insert_vm(
        VMRecord(id="a" * 32, name="v", state=VMState.STOPPED, image="img",
                 spec=VMSpec(vcpu=1, memory_mib=256, disk_size=1 << 30, overlay_size=1 << 30),
                 guest_ip="172.30.0.2", dns_name="v.vm", vm_dir=str(vm_dir),
                 created_at=now(), updated_at=now())
    )  # fmt: skip
    # Leftovers, one of them deeper than Python's recursion limit.
    host = tmp_path / "host-dir"
    host.mkdir()
    (host / "keep").write_text("host file\n")
    deep = lay.staging_dir / "oci-killed"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1100):  # fd-relative: pathlib's mkdir(parents=True) recurses
        os.mkdir("d", dir_fd=fd)
        fd, old = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(old)
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    (lay.staging_dir / "img-x-1234").mkdir()
    (lay.staging_dir / "bundle-link").symlink_to(host)
    (lay.images_dir / "ghost").mkdir()
    (lay.images_dir / ".debian-bookworm.build-abc").mkdir()
    (lay.kernels_dir / ".k1.import-xyz").mkdir()
    (lay.kernels_dir / ".k2.old-1").mkdir()
    (lay.kernels_dir / "orphan").mkdir()
    (lay.vms_dir / ("b" * 32)).mkdir()
    try:

        async def no_vm_reconcile() -> None:
            pass

        monkeypatch.setattr(d.vm, "reconcile", no_vm_reconcile)
        await d.reconcile()  # the daemon's start-up hook
        assert os.listdir(lay.staging_dir) == []
        assert sorted(os.listdir(lay.images_dir)) == ["img"]
        assert sorted(os.listdir(lay.kernels_dir)) == ["k1"]
        assert sorted(os.listdir(lay.vms_dir)) == ["a" * 32]
        assert (kdir / "vmlinux").exists() and (lay.images_dir / "img" / "rootfs.ext4").exists()
        assert (host / "keep").read_text() == "host file\n"  # the link was removed, not followed
    finally:
        rmtree(deep, ignore_errors=True)  # pytest's tmp cleanup would recurse too deep
