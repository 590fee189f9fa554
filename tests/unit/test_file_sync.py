"""`[[file_sync]]` at VM start: host paths are read as regular files only, off the loop."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stoker.config import Config, FileSync
from stoker.daemon.workspace_service import read_sync_file
from stoker.errors import InvalidArgument
from stoker.model.records import VMRecord, VMSpec, VMState

pytestmark = pytest.mark.unit


def vm_record(vm_dir: Path) -> VMRecord:
    return VMRecord(
        id="v1",
        name="t1",
        state=VMState.STOPPED,
        image="base",
        spec=VMSpec(vcpu=1, memory_mib=512, disk_size=1 << 30, overlay_size=1 << 30),
        guest_ip="172.30.0.2",
        dns_name="t1.vm",
        vm_dir=str(vm_dir),
        created_at="x",
        updated_at="x",
    )


def test_reads_a_regular_file_and_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"secret\n")
    (tmp_path / "l").symlink_to(tmp_path / "f")
    assert read_sync_file(str(tmp_path / "f"), "/root/f") == b"secret\n"
    assert read_sync_file(str(tmp_path / "l"), "/root/f") == b"secret\n"


def test_refuses_special_files_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock"))
    s.close()
    (tmp_path / "dir").mkdir()
    for p in ("/dev/zero", tmp_path / "fifo", tmp_path / "sock", tmp_path / "dir"):
        t0 = time.monotonic()
        with pytest.raises(InvalidArgument, match="not a regular file"):
            read_sync_file(str(p), "/root/x")
        assert time.monotonic() - t0 < 1.0
    with pytest.raises(InvalidArgument, match="cannot read the host file"):
        read_sync_file(str(tmp_path / "missing"), "/root/x")


def test_refuses_a_file_over_the_limit(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(InvalidArgument, match="101 bytes, more than 100"):
        read_sync_file(str(tmp_path / "big"), "/root/x", max_bytes=100)
    assert read_sync_file(str(tmp_path / "big"), "/root/x", max_bytes=101) == b"x" * 101


async def test_fifo_swapped_in_after_load_does_not_hang_the_daemon(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Old behaviour (issue 9 item 4): `open(ent.host)` on the event loop blocked the whole
    daemon (SIGTERM ignored) until something wrote to the FIFO.

    The config is built by hand, as if the file were replaced by a FIFO after load. A
    thread opens the FIFO for writing after 3 s so the old code cannot hang the test."""
    fifo = tmp_path / "netrc"
    os.mkfifo(fifo)
    d = daemon_factory()
    d.ws.config = Config(file_sync=(FileSync(host=str(fifo), guest="/root/.netrc"),))

    def unblock() -> None:
        time.sleep(3)
        fd = os.open(fifo, os.O_RDWR)  # a writer: the blocked reader gets EOF
        os.close(fd)

    threading.Thread(target=unblock, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(InvalidArgument, match=r"file_sync entry .*netrc.* not a regular file"):
        await d.ws.sync_work_disk(vm_record(tmp_path))
    assert time.monotonic() - t0 < 2.0
