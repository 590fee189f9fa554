"""Sparse, all-or-nothing disk copies for snapshots."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from stoker.daemon import snapshot_files
from stoker.daemon.snapshot_files import copy_sparse, snapshot_refusal
from stoker.errors import CommandFailed

pytestmark = pytest.mark.unit

MiB = 1024 * 1024


def sparse_disk(path: Path) -> bytes:
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(1 * MiB)
        f.write(b"A" * 4096)
        f.seek(40 * MiB + 123)
        f.write(b"B" * 10000)
    return path.read_bytes()


def test_the_copy_has_the_same_bytes_and_keeps_the_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "work.ext4", tmp_path / "copy.ext4"
    want = sparse_disk(src)
    copied = copy_sparse(src, dst)
    assert dst.read_bytes() == want
    assert copied < 1 * MiB  # only the data extents, not 64 MiB
    assert dst.stat().st_blocks * 512 <= src.stat().st_blocks * 512 + 64 * 1024
    assert not list(tmp_path.glob(".copy.ext4.tmp-*"))


def test_a_full_disk_leaves_no_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "work.ext4", tmp_path / "copy.ext4"
    sparse_disk(src)
    calls = []

    def full(*args: int) -> int:
        calls.append(args)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    real = os.copy_file_range
    monkeypatch.setattr(snapshot_files.os, "copy_file_range", full)
    with pytest.raises(CommandFailed, match=r"No space left.*free space"):
        copy_sparse(src, dst)
    assert len(calls) == 2  # failed after a first extent was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work.ext4"]


def test_an_existing_destination_is_never_overwritten_half_way(tmp_path: Path) -> None:
    src, dst = tmp_path / "work.ext4", tmp_path / "copy.ext4"
    sparse_disk(src)
    dst.write_bytes(b"old")
    copy_sparse(src, dst)  # replaced whole, by rename
    assert dst.stat().st_size == 64 * MiB


MACHINE: dict[str, object] = {
    "vmm": "qemu",
    "vmm_version": "7.2.19",
    "accel": "tcg",
    "kernel": "sha256:aa",
    "image_id": "sha256:bb",
    "vcpu": 1,
    "memory_mib": 1024,
    "devices": ["virtio-blk:rootfs", "virtio-blk:work", "virtio-net", "virtio-serial"],
}


def test_the_same_machine_may_load_its_snapshot() -> None:
    assert snapshot_refusal(MACHINE, dict(MACHINE)) is None


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("vmm_version", "8.2.0", "the VMM version was '7.2.19', is now '8.2.0'"),
        ("image_id", "sha256:cc", "the image was 'sha256:bb', is now 'sha256:cc'"),
        ("kernel", "sha256:dd", "the kernel was"),
        ("accel", "kvm", "the accelerator"),
        ("memory_mib", 2048, "the memory size was 1024, is now 2048"),
        ("vcpu", 2, "the vCPU count"),
        ("devices", ["virtio-blk:rootfs"], "the device set"),
        ("vmm", "firecracker", "the VMM kind"),
    ],
)
def test_any_difference_refuses_with_the_reason(key: str, value: object, reason: str) -> None:
    msg = snapshot_refusal(MACHINE, {**MACHINE, key: value})
    assert msg is not None and reason in msg and "without --from-snapshot" in msg


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["vm", "snapshot", "delete", "web"], "delete NAME SNAP"),
        (["vm", "snapshot", "list", "a", "b"], "list [NAME]"),
        (["vm", "snapshot", "web", "extra"], "snapshot NAME [--name SNAP]"),
    ],
)
def test_cli_refuses_bad_snapshot_words_before_asking_any_daemon(
    argv: list[str], usage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from stoker.cli import connect, vm
    from stoker.cli.main import main

    def no_daemon(*a: Any, **k: Any) -> Any:
        raise AssertionError("a daemon was asked for a malformed snapshot command")

    monkeypatch.setattr(connect, "client", no_daemon)
    monkeypatch.setattr(vm, "client", no_daemon)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert main(argv) != 0
    assert usage in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["", "../x", "A", "-x", "a/b", "a" * 64])
def test_a_bad_snapshot_name_is_refused(bad: str) -> None:
    from stoker.daemon.snapshot_service import check_name
    from stoker.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="snapshot name"):
        check_name(bad)
