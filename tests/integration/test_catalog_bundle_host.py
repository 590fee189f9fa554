"""Catalog bundles against the host: a full disk (tmpfs) and bundles made by GNU tar + zstd.

The no-space test mounts a small tmpfs as the destination's parent (root needed) and
unmounts it afterwards. The CLI-made bundle checks that what a publisher would actually
run (`tar -C dir -c . | zstd`) is accepted, `./` prefixes and all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from prereq import require_tools
from stoker.daemon.catalog import BundleNoSpace, fetch_bundle

pytestmark = pytest.mark.integration


def fake_elf(size: int) -> bytes:
    """An x86_64 ELF header followed by incompressible bytes."""
    head = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHI", 2, 0x3E, 1)
    return head + os.urandom(size - len(head))


def kernel_dir(root: Path, vmlinux_size: int) -> Path:
    d = root / "kernel"
    (d / "modules" / "6.1.0-t" / "kernel").mkdir(parents=True)
    (d / "vmlinux").write_bytes(fake_elf(vmlinux_size))
    (d / "manifest.json").write_text(
        json.dumps({"name": "cli-kernel", "version": "6.1.0-t", "arch": "x86_64"})
    )
    (d / "modules" / "6.1.0-t" / "kernel" / "a.ko").write_bytes(os.urandom(1000))
    os.symlink("kernel/a.ko", d / "modules" / "6.1.0-t" / "alias.ko")
    return d


def tar_zst(src: Path, out: Path) -> bytes:
    """`tar -C src -c . | zstd` with the real tools, as a bundle publisher would."""
    require_tools("tar", "zstd")
    tar = subprocess.run(
        ["tar", "-C", str(src), "--owner=0", "--group=0", "-c", "."],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["zstd", "-q", "-19", "-o", str(out)], input=tar, check=True)
    return out.read_bytes()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at `path`, always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


class FileServer:
    """Serves fixed bodies over HTTP on 127.0.0.1."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.port = 0

    def add(self, body: bytes) -> str:
        path = f"/b{len(self.routes)}.tar.zst"
        self.routes[path] = body
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            body = self.routes.get(head.split(b" ", 2)[1].decode(), b"")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def files_server() -> AsyncIterator[FileServer]:
    fs = FileServer()
    server = await asyncio.start_server(fs.handle, "127.0.0.1", 0)
    fs.port = server.sockets[0].getsockname()[1]
    try:
        yield fs
    finally:
        server.close()
        await server.wait_closed()


async def test_bundle_made_with_gnu_tar_and_zstd(tmp_path: Path, files_server: FileServer) -> None:
    body = tar_zst(kernel_dir(tmp_path, 200_000), tmp_path / "k.tar.zst")
    url = files_server.add(body)
    dest = tmp_path / "kernels" / "cli-kernel"
    files = await fetch_bundle(
        url, hashlib.sha256(body).hexdigest(), len(body), dest, kind="kernel"
    )
    assert files.vmlinux is not None
    assert files.vmlinux.read_bytes() == (tmp_path / "kernel" / "vmlinux").read_bytes()
    assert os.readlink(dest / "modules" / "6.1.0-t" / "alias.ko") == "kernel/a.ko"
    assert files.manifest.name == "cli-kernel"
    assert sorted(os.listdir(dest.parent)) == ["cli-kernel"]


async def test_no_space_leaves_nothing(tmp_path: Path, files_server: FileServer) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    body = tar_zst(kernel_dir(tmp_path, 3 << 20), tmp_path / "k.tar.zst")
    url = files_server.add(body)
    with tmpfs(tmp_path / "small", "1m") as small:
        dest = small / "kernels" / "cli-kernel"
        with pytest.raises(BundleNoSpace) as ei:
            await fetch_bundle(
                url, hashlib.sha256(body).hexdigest(), len(body), dest, kind="kernel"
            )
        msg = str(ei.value)
        assert "no space left" in msg and url in msg and str(small) in msg
        assert os.listdir(dest.parent) == []
        # Space is really free again: nothing hidden, nothing held open.
        st = os.statvfs(small)
        assert st.f_bfree * st.f_frsize > (1 << 20) - (64 << 10)
