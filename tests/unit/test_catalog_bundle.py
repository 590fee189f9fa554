"""Catalog bundles over a real local HTTP server: happy paths and every bad input.

Bundles are built here (tarfile + zstandard, a real ext4 from `mkfs.ext4 -d`, a fake
ELF vmlinux) and served from 127.0.0.1. Every failure must leave nothing beside the
destination: no dest dir, no staging dir, no partial file.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard

from prereq import require
from stoker.daemon.catalog import (
    CATALOG_ENV,
    BundleDigestMismatch,
    BundleFiles,
    BundleTruncated,
    CorruptBundle,
    InvalidBundle,
    UnsafeBundle,
    fetch_bundle,
    fetch_catalog_entry,
    load_catalog,
)
from stoker.errors import AlreadyExists, NotFound, StokerError, Timeout, Unavailable

pytestmark = pytest.mark.unit

KVER = "6.1.0-test"


# --- bundle building -------------------------------------------------------------------


@dataclass
class E:
    """A tar entry to put into a test bundle."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644
    pax: dict[str, str] = field(default_factory=dict)


def make_tar(entries: list[E], *, end: bool = True) -> bytes:
    """A pax tar of `entries`; without `end`, cut right after the last member's data."""
    buf = io.BytesIO()
    cut = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = e.type
            ti.mode = e.mode
            ti.mtime = 1_700_000_000
            ti.linkname = e.linkname
            ti.pax_headers = dict(e.pax)
            if e.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                ti.devmajor, ti.devminor = 1, 3
            if e.type == tarfile.REGTYPE:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
        cut = tf.offset
    return buf.getvalue() if end else buf.getvalue()[:cut]


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def manifest(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def image_manifest(**over: Any) -> bytes:
    m = {"name": "tiny", "version": "1.0", "arch": "x86_64", "kernel_ref": "tiny-kernel"}
    m.update(over)
    return json.dumps({k: v for k, v in m.items() if v is not None}).encode()


def kernel_manifest(**over: Any) -> bytes:
    m = {"name": "tiny-kernel", "version": KVER, "arch": "x86_64"}
    m.update(over)
    return json.dumps({k: v for k, v in m.items() if v is not None}).encode()


def fake_elf(machine: int = 0x3E, payload: bytes = b"Linux version 6.1.0-test (x) #1\n") -> bytes:
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHI", 2, machine, 1) + bytes(40) + payload


def fake_bzimage() -> bytes:
    data = bytearray(4096)
    data[0x202:0x206] = b"HdrS"
    return bytes(data)


@dataclass(frozen=True)
class Artifacts:
    rootfs: bytes
    work_seed: bytes


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    require(shutil.which("mkfs.ext4"), "mkfs.ext4 (e2fsprogs) is not installed")
    d = tmp_path_factory.mktemp("ext4")
    (d / "tree" / "etc").mkdir(parents=True)
    (d / "tree" / "etc" / "hostname").write_text("tiny\n")
    (d / "tree" / "data.bin").write_bytes(os.urandom(64 << 10))
    (d / "home").mkdir()
    (d / "home" / ".bashrc").write_text("echo hi\n")
    out: dict[str, bytes] = {}
    for name, src, size in (("rootfs", "tree", "4M"), ("seed", "home", "1M")):
        img = d / f"{name}.ext4"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", str(d / src), str(img), size],
            check=True,
            capture_output=True,
        )
        out[name] = img.read_bytes()
    return Artifacts(rootfs=out["rootfs"], work_seed=out["seed"])


def image_entries(a: Artifacts, *, seed: bool = True) -> list[E]:
    entries = [
        E("./", type=tarfile.DIRTYPE),
        E("./manifest.json", image_manifest()),
        E("./rootfs.ext4", a.rootfs),
    ]
    if seed:
        entries.append(E("./work-seed.ext4", a.work_seed))
    return entries


def kernel_entries() -> list[E]:
    mods = f"modules/{KVER}"
    return [
        E("vmlinux", fake_elf()),
        E("manifest.json", kernel_manifest()),
        E("bzImage", fake_bzimage()),
        E("initrd.img", b"070701" + os.urandom(2000)),
        E("modules", type=tarfile.DIRTYPE, mode=0o755),
        E(f"{mods}/kernel/drivers/virtio", type=tarfile.DIRTYPE, mode=0o755),
        E(f"{mods}/kernel/drivers/virtio/virtio_mmio.ko", os.urandom(3000)),
        E(f"{mods}/modules.dep", b"kernel/drivers/virtio/virtio_mmio.ko:\n"),
        E(f"{mods}/helper.sh", b"#!/bin/sh\n", mode=0o755),
        E(f"{mods}/extra", type=tarfile.SYMTYPE, linkname="kernel/drivers"),
        E(
            f"{mods}/dep-link",
            type=tarfile.SYMTYPE,
            linkname=f"../{KVER}/modules.dep",
        ),
    ]


# --- a local HTTP server --------------------------------------------------------------


@dataclass
class Route:
    body: bytes
    mode: str = "ok"  # ok | truncate | nolength | stall


class BundleServer:
    """A tiny HTTP/1.1 server on 127.0.0.1 that can misbehave on purpose."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def add(self, body: bytes, mode: str = "ok") -> str:
        path = f"/bundles/{uuid.uuid4().hex[:8]}.tar.zst"
        self.routes[path] = Route(body, mode)
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.hits[path] += 1
            route = self.routes.get(path)
            if route is None:
                writer.write(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                return
            body = route.body
            length = b"" if route.mode == "nolength" else b"Content-Length: %d\r\n" % len(body)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                + length
                + b"Connection: close\r\n\r\n"
            )
            if route.mode == "ok":
                writer.write(body)
            elif route.mode in ("truncate", "nolength"):
                writer.write(body[: len(body) // 2])
            elif route.mode == "stall":
                writer.write(body[: len(body) // 2])
                await writer.drain()
                await self.release.wait()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[BundleServer]:
    s = BundleServer()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def leftovers(parent: Path) -> list[str]:
    return sorted(os.listdir(parent)) if parent.exists() else []


async def fetch(
    server: BundleServer,
    body: bytes,
    dest: Path,
    kind: str,
    *,
    mode: str = "ok",
    digest: str | None = None,
    size: int | None = -1,
    **kw: Any,
) -> BundleFiles:
    url = server.add(body, mode)
    return await fetch_bundle(
        url,
        digest or sha(body),
        len(body) if size == -1 else size,
        dest,
        kind=kind,  # type: ignore[arg-type]
        **kw,
    )


# --- happy paths ------------------------------------------------------------------------


async def test_image_bundle(server: BundleServer, artifacts: Artifacts, tmp_path: Path) -> None:
    body = zst(make_tar(image_entries(artifacts)))
    dest = tmp_path / "images" / "tiny"
    stages: list[str] = []

    def progress(stage: str, message: str = "", **fields: Any) -> None:
        stages.append(stage)

    files = await fetch(server, body, dest, "image", progress=progress)
    assert files.dir == dest and files.kind == "image"
    assert sorted(os.listdir(dest)) == ["manifest.json", "rootfs.ext4", "work-seed.ext4"]
    assert files.rootfs == dest / "rootfs.ext4"
    assert files.rootfs.read_bytes() == artifacts.rootfs
    assert files.work_seed is not None and files.work_seed.read_bytes() == artifacts.work_seed
    assert (files.manifest.name, files.manifest.version, files.manifest.kernel_ref) == (
        "tiny",
        "1.0",
        "tiny-kernel",
    )
    assert files.sha256 == sha(body) and files.download_size == len(body)
    assert files.unpacked_size == len(artifacts.rootfs) + len(artifacts.work_seed) + len(
        image_manifest()
    )
    # Zero blocks are skipped on disk: the 4 MiB image takes far less.
    st = files.rootfs.stat()
    assert st.st_blocks * 512 < st.st_size // 2
    assert "verify" in stages and stages[-1] == "unpacked"
    assert leftovers(dest.parent) == ["tiny"]


async def test_image_bundle_without_work_seed(
    server: BundleServer, artifacts: Artifacts, tmp_path: Path
) -> None:
    body = zst(make_tar(image_entries(artifacts, seed=False)))
    files = await fetch(server, body, tmp_path / "i", "image", size=None)
    assert files.work_seed is None and files.rootfs is not None


async def test_kernel_bundle_with_modules(server: BundleServer, tmp_path: Path) -> None:
    body = zst(make_tar(kernel_entries()))
    dest = tmp_path / "kernels" / "tiny-kernel"
    files = await fetch(server, body, dest, "kernel")
    assert files.vmlinux is not None and files.vmlinux.read_bytes() == fake_elf()
    assert files.bzimage == dest / "bzImage" and files.initrd == dest / "initrd.img"
    assert files.modules_dir == dest / "modules"
    mods = dest / "modules" / KVER
    assert (mods / "kernel/drivers/virtio/virtio_mmio.ko").stat().st_size == 3000
    assert os.readlink(mods / "extra") == "kernel/drivers"
    assert (mods / "extra" / "virtio" / "virtio_mmio.ko").is_file()
    assert (mods / "dep-link").read_bytes() == b"kernel/drivers/virtio/virtio_mmio.ko:\n"
    assert (mods / "helper.sh").stat().st_mode & 0o777 == 0o755
    assert (dest / "vmlinux").stat().st_mode & 0o777 == 0o644
    assert files.manifest.version == KVER and files.manifest.kernel_ref is None
    assert leftovers(dest.parent) == ["tiny-kernel"]


async def test_minimal_kernel_bundle_gnu_format(server: BundleServer, tmp_path: Path) -> None:
    """A GNU-format tar with a long name works too (not only pax)."""
    buf = io.BytesIO()
    long_dir = "modules/" + "d" * 120
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in (
            ("vmlinux", fake_elf()),
            ("manifest.json", kernel_manifest()),
            (f"{long_dir}/m.ko", b"x"),
        ):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    files = await fetch(server, zst(buf.getvalue()), tmp_path / "k", "kernel")
    assert (tmp_path / "k" / long_dir / "m.ko").read_bytes() == b"x"
    assert files.bzimage is None and files.initrd is None


async def test_catalog_entries_via_env(
    server: BundleServer, artifacts: Artifacts, tmp_path: Path
) -> None:
    """load_catalog (STOKER_CATALOG) + fetch_catalog_entry for an image and its kernel."""
    ibody = zst(make_tar(image_entries(artifacts)))
    kbody = zst(make_tar(kernel_entries()))
    doc = {
        "images": [
            {
                "name": "tiny",
                "version": "1.0",
                "arch": "x86_64",
                "url": server.add(ibody),
                "sha256": sha(ibody),
                "size": len(ibody),
                "kernel_ref": "tiny-kernel",
                "description": "a test image",
            }
        ],
        "kernels": [
            {
                "name": "tiny-kernel",
                "version": KVER,
                "arch": "x86_64",
                "url": server.add(kbody),
                "sha256": sha(kbody),
                "size": len(kbody),
            }
        ],
    }
    p = tmp_path / "catalog.json"
    p.write_text(json.dumps(doc))
    cat = load_catalog(env={CATALOG_ENV: str(p)})
    im = cat.image("tiny")
    files = await fetch_catalog_entry(im, tmp_path / "images" / "tiny")
    assert files.rootfs is not None and files.rootfs.read_bytes() == artifacts.rootfs
    kfiles = await fetch_catalog_entry(cat.kernel_for(im), tmp_path / "kernels" / "tiny-kernel")
    assert kfiles.vmlinux is not None and kfiles.manifest.name == "tiny-kernel"


async def test_catalog_entry_manifest_must_agree(
    server: BundleServer, artifacts: Artifacts, tmp_path: Path
) -> None:
    body = zst(make_tar(image_entries(artifacts)))
    doc = {
        "images": [
            {
                "name": "tiny",
                "version": "2.0",
                "arch": "x86_64",
                "url": server.add(body),
                "sha256": sha(body),
                "size": len(body),
                "kernel_ref": "tiny-kernel",
                "description": "",
            }
        ],
        "kernels": [
            {
                "name": "tiny-kernel",
                "version": "1",
                "arch": "x86_64",
                "url": server.add(b"x"),
                "sha256": sha(b"x"),
                "size": 1,
            }
        ],
    }
    p = tmp_path / "catalog.json"
    p.write_text(json.dumps(doc))
    dest = tmp_path / "images" / "tiny"
    with pytest.raises(InvalidBundle) as ei:
        await fetch_catalog_entry(load_catalog(p).image("tiny"), dest)
    msg = str(ei.value)
    assert "image tiny" in msg and "version '1.0'" in msg and "'2.0'" in msg
    assert leftovers(dest.parent) == []


# --- bad bundles (content) --------------------------------------------------------------


def _image(a: Artifacts, *extra: E, drop: str | None = None, **man: Any) -> list[E]:
    entries = [E("manifest.json", image_manifest(**man)), E("rootfs.ext4", a.rootfs)]
    entries = [e for e in entries if e.name != drop]
    return [*entries, *extra]


def _kernel(*extra: E, drop: str | None = None, vmlinux: bytes | None = None) -> list[E]:
    entries = [
        E("vmlinux", vmlinux if vmlinux is not None else fake_elf()),
        E("manifest.json", kernel_manifest()),
    ]
    entries = [e for e in entries if e.name != drop]
    return [*entries, *extra]


Builder = Callable[[Artifacts], tuple[str, list[E]]]

BAD: list[tuple[str, Builder, type[StokerError], str]] = [
    (
        "extra entry",
        lambda a: ("image", _image(a, E("README", b"hi"))),
        InvalidBundle,
        "unexpected entry README",
    ),
    (
        "extra nested",
        lambda a: ("image", _image(a, E("etc/passwd", b"x"))),
        InvalidBundle,
        "unexpected entry etc/passwd",
    ),
    (
        "modules in image",
        lambda a: ("image", _image(a, E("modules/x.ko", b"x"))),
        InvalidBundle,
        "unexpected entry modules/x.ko",
    ),
    (
        "duplicate",
        lambda a: ("image", _image(a, E("./rootfs.ext4", a.rootfs))),
        InvalidBundle,
        "rootfs.ext4 appears twice",
    ),
    (
        "fifo",
        lambda a: ("image", _image(a, E("work-seed.ext4", type=tarfile.FIFOTYPE))),
        UnsafeBundle,
        "fifo",
    ),
    (
        "char device",
        lambda a: ("image", _image(a, E("null", type=tarfile.CHRTYPE))),
        UnsafeBundle,
        "character device",
    ),
    (
        "block device in modules",
        lambda a: ("kernel", _kernel(E("modules/sda", type=tarfile.BLKTYPE))),
        UnsafeBundle,
        "block device",
    ),
    (
        "hardlink",
        lambda a: (
            "image",
            _image(a, E("work-seed.ext4", type=tarfile.LNKTYPE, linkname="rootfs.ext4")),
        ),
        UnsafeBundle,
        "hard link",
    ),
    (
        "top-level symlink",
        lambda a: (
            "image",
            [
                E("manifest.json", image_manifest()),
                E("rootfs.ext4", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
            ],
        ),
        UnsafeBundle,
        "rootfs.ext4 -> /etc/passwd is a symlink",
    ),
    (
        "top-level dir",
        lambda a: ("image", _image(a, E("work-seed.ext4", type=tarfile.DIRTYPE))),
        UnsafeBundle,
        "not a regular file",
    ),
    ("dotdot", lambda a: ("image", _image(a, E("../evil", b"x"))), UnsafeBundle, "'../evil'"),
    (
        "dotdot in modules",
        lambda a: ("kernel", _kernel(E("modules/../../evil", b"x"))),
        UnsafeBundle,
        "'..'",
    ),
    ("absolute", lambda a: ("image", _image(a, E("/etc/evil", b"x"))), UnsafeBundle, "'/etc/evil'"),
    (
        "sparse member",
        lambda a: (
            "image",
            _image(
                a,
                E(
                    "work-seed.ext4",
                    a.work_seed,
                    pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"},
                ),
            ),
        ),
        InvalidBundle,
        "sparse",
    ),
    (
        "missing manifest",
        lambda a: ("image", _image(a, drop="manifest.json")),
        InvalidBundle,
        "manifest.json missing",
    ),
    (
        "missing rootfs",
        lambda a: ("image", _image(a, drop="rootfs.ext4")),
        InvalidBundle,
        "rootfs.ext4 missing",
    ),
    (
        "missing vmlinux",
        lambda a: ("kernel", _kernel(E("bzImage", fake_bzimage()), drop="vmlinux")),
        InvalidBundle,
        "vmlinux missing",
    ),
    (
        "manifest not json",
        lambda a: ("image", [E("manifest.json", b"{name"), E("rootfs.ext4", a.rootfs)]),
        InvalidBundle,
        "not valid JSON",
    ),
    (
        "manifest not object",
        lambda a: ("image", [E("manifest.json", b"[1]"), E("rootfs.ext4", a.rootfs)]),
        InvalidBundle,
        "JSON object",
    ),
    (
        "manifest without kernel_ref",
        lambda a: ("image", _image(a, kernel_ref=None)),
        InvalidBundle,
        '"kernel_ref"',
    ),
    ("manifest bad name", lambda a: ("image", _image(a, name="Not OK")), InvalidBundle, '"name"'),
    (
        "manifest wrong kind",
        lambda a: ("image", _image(a, kind="kernel")),
        InvalidBundle,
        "'kernel' bundle",
    ),
    (
        "rootfs not ext4",
        lambda a: (
            "image",
            [E("manifest.json", image_manifest()), E("rootfs.ext4", os.urandom(8192))],
        ),
        InvalidBundle,
        "rootfs.ext4 is not an ext4",
    ),
    (
        "work-seed not ext4",
        lambda a: ("image", _image(a, E("work-seed.ext4", bytes(4096)))),
        InvalidBundle,
        "work-seed.ext4 is not an ext4",
    ),
    (
        "vmlinux not ELF",
        lambda a: ("kernel", _kernel(vmlinux=fake_bzimage())),
        InvalidBundle,
        "vmlinux is not an ELF",
    ),
    (
        "vmlinux wrong arch",
        lambda a: ("kernel", _kernel(vmlinux=fake_elf(machine=0xB7))),
        InvalidBundle,
        "machine 0xb7",
    ),
    (
        "bzImage without header",
        lambda a: ("kernel", _kernel(E("bzImage", bytes(4096)))),
        InvalidBundle,
        "HdrS",
    ),
    (
        "modules is a file",
        lambda a: ("kernel", _kernel(E("modules", b"x"))),
        InvalidBundle,
        "must be a directory",
    ),
    (
        "absolute modules symlink",
        lambda a: (
            "kernel",
            _kernel(E("modules/6.1/build", type=tarfile.SYMTYPE, linkname="/usr/src/linux")),
        ),
        UnsafeBundle,
        "/usr/src/linux",
    ),
    (
        "modules symlink escaping",
        lambda a: (
            "kernel",
            _kernel(E("modules/6.1/v", type=tarfile.SYMTYPE, linkname="../../vmlinux")),
        ),
        UnsafeBundle,
        "points outside",
    ),
    # Lexically `l/..` is modules/, really it is the bundle root (l -> .).
    (
        "symlink chain escaping",
        lambda a: (
            "kernel",
            _kernel(
                E("modules/l", type=tarfile.SYMTYPE, linkname="."),
                E("modules/up", type=tarfile.SYMTYPE, linkname="l/.."),
            ),
        ),
        UnsafeBundle,
        "modules/up -> l/.. points outside",
    ),
    # Out and back in: breaks once modules/ is installed as the guest's /lib/modules.
    (
        "symlink detour",
        lambda a: (
            "kernel",
            _kernel(E("modules/6.1/dep", type=tarfile.SYMTYPE, linkname="../../modules/x")),
        ),
        UnsafeBundle,
        "points outside",
    ),
    (
        "symlink loop",
        lambda a: (
            "kernel",
            _kernel(
                E("modules/a", type=tarfile.SYMTYPE, linkname="b"),
                E("modules/b", type=tarfile.SYMTYPE, linkname="a"),
            ),
        ),
        UnsafeBundle,
        "loop",
    ),
    (
        "write through symlink",
        lambda a: (
            "kernel",
            _kernel(
                E("modules/6.1", type=tarfile.DIRTYPE),
                E("modules/l", type=tarfile.SYMTYPE, linkname="6.1"),
                E("modules/l/evil.ko", b"x"),
            ),
        ),
        UnsafeBundle,
        "through the symlink modules/l",
    ),
    (
        "file under file",
        lambda a: ("kernel", _kernel(E("modules/a", b"x"), E("modules/a/b", b"y"))),
        InvalidBundle,
        "which is a file",
    ),
]


@pytest.mark.parametrize(
    ("build", "exc", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
async def test_bad_bundle(
    server: BundleServer,
    artifacts: Artifacts,
    tmp_path: Path,
    build: Builder,
    exc: type[StokerError],
    fragment: str,
) -> None:
    kind, entries = build(artifacts)
    body = zst(make_tar(entries))
    dest = tmp_path / "out" / "bundle"
    with pytest.raises(exc) as ei:
        await fetch(server, body, dest, kind, label=f"{kind} test-entry")
    msg = str(ei.value)
    assert fragment in msg, msg
    assert f"pulling {kind} test-entry" in msg and "127.0.0.1" in msg
    assert leftovers(dest.parent) == []


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        ("plain tar", "not zstd-compressed"),
        ("gzip tar", "not zstd-compressed (it starts with 1f8b"),
        ("corrupt zstd", "is corrupt"),
        ("garbage after zstd", "is corrupt"),
        ("no end marker", "end-of-archive marker"),
        ("data after end", "data after the end-of-archive marker"),
        ("bad checksum", "bad header checksum"),
        ("empty", "end-of-archive"),
    ],
)
async def test_corrupt_archive(
    server: BundleServer, tmp_path: Path, make: str, fragment: str
) -> None:
    """Each of these is hashed correctly (the catalog agrees): the bundle itself is broken."""
    tar = make_tar(_kernel())
    if make == "plain tar":
        body = tar
    elif make == "gzip tar":
        body = gzip.compress(tar)
    elif make == "corrupt zstd":
        body = bytearray(zst(tar + os.urandom(20000)))
        for i in range(len(body) // 3, len(body) // 3 + 8):
            body[i] ^= 0x5A
        body = bytes(body)
    elif make == "garbage after zstd":
        body = zst(tar) + b"garbage!" * 8
    elif make == "no end marker":
        body = zst(make_tar(_kernel(), end=False))
    elif make == "data after end":
        body = zst(tar + b"\x01" * 512)
    elif make == "bad checksum":
        raw = bytearray(tar)
        # The second header (vmlinux's pax header is first): corrupt its name field.
        second = raw.find(b"manifest.json")
        raw[second] ^= 0x20
        body = zst(bytes(raw))
    else:
        body = zst(b"")
    dest = tmp_path / "k" / "x"
    with pytest.raises(CorruptBundle) as ei:
        await fetch(server, body, dest, "kernel")
    assert fragment in str(ei.value), str(ei.value)
    assert leftovers(dest.parent) == []


# --- bad downloads -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["early", "middle", "last"])
async def test_tampered_byte_is_a_hash_mismatch(
    server: BundleServer, artifacts: Artifacts, tmp_path: Path, where: str
) -> None:
    """Whatever the flipped byte does to the archive, the report is the hash mismatch.

    "early" (the zstd frame header) breaks decompression long before the 3 MiB download
    ends: the rest is still downloaded and hashed so the real cause is reported.
    """
    entries = image_entries(artifacts)
    entries.insert(1, E("./work-seed.ext4", artifacts.work_seed + os.urandom(3 << 20)))
    del entries[-1]
    good = zst(make_tar(entries))
    bad = bytearray(good)
    bad[{"early": 4, "middle": len(bad) // 2, "last": len(bad) - 1}[where]] ^= 0xFF
    url = server.add(bytes(bad))
    dest = tmp_path / "images" / "tiny"
    with pytest.raises(BundleDigestMismatch) as ei:
        await fetch_bundle(url, sha(good), len(good), dest, kind="image")
    msg = str(ei.value)
    assert url in msg and sha(good) in msg and sha(bytes(bad)) in msg
    assert leftovers(dest.parent) == []


async def test_early_format_error_is_reported_after_verifying(
    server: BundleServer, tmp_path: Path
) -> None:
    """An extra entry up front fails unpacking at once; the hash still gets checked."""
    body = zst(make_tar([E("README", b"x"), *_kernel(E("initrd.img", os.urandom(2 << 20)))]))
    dest = tmp_path / "k" / "x"
    with pytest.raises(InvalidBundle, match="unexpected entry README"):
        await fetch(server, body, dest, "kernel")
    with pytest.raises(BundleDigestMismatch):
        await fetch(server, body, dest, "kernel", digest="1" * 64)
    assert leftovers(dest.parent) == []


async def test_valid_bundle_with_wrong_hash_is_not_published(
    server: BundleServer, tmp_path: Path
) -> None:
    body = zst(make_tar(_kernel()))
    dest = tmp_path / "k" / "x"
    with pytest.raises(BundleDigestMismatch, match="expected sha256 " + "0" * 64):
        await fetch(server, body, dest, "kernel", digest="0" * 64)
    assert leftovers(dest.parent) == []


@pytest.mark.parametrize("mode", ["truncate", "nolength"])
async def test_truncated_download(server: BundleServer, tmp_path: Path, mode: str) -> None:
    body = zst(make_tar(_kernel(E("initrd.img", os.urandom(300_000)))))
    dest = tmp_path / "k" / "x"
    with pytest.raises(BundleTruncated) as ei:
        await fetch(server, body, dest, "kernel", mode=mode)
    msg = str(ei.value)
    assert "cut" in msg and "127.0.0.1" in msg and str(len(body)) in msg
    assert leftovers(dest.parent) == []


async def test_cut_short_without_known_size_is_a_mismatch(
    server: BundleServer, tmp_path: Path
) -> None:
    body = zst(make_tar(_kernel(E("initrd.img", os.urandom(300_000)))))
    dest = tmp_path / "k" / "x"
    with pytest.raises(BundleDigestMismatch):
        await fetch(server, body, dest, "kernel", mode="nolength", size=None)
    assert leftovers(dest.parent) == []


@pytest.mark.parametrize("mode", ["ok", "nolength"])
async def test_larger_than_catalog_size(server: BundleServer, tmp_path: Path, mode: str) -> None:
    body = zst(make_tar(_kernel(E("initrd.img", os.urandom(300_000)))))
    dest = tmp_path / "k" / "x"
    small = len(body) // 2 - 100 if mode == "nolength" else len(body) - 1
    with pytest.raises(BundleDigestMismatch) as ei:
        await fetch(server, body, dest, "kernel", mode=mode, size=small)
    assert str(small) in str(ei.value)
    assert leftovers(dest.parent) == []


async def test_http_404(server: BundleServer, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{server.port}/missing.tar.zst"
    with pytest.raises(NotFound, match="HTTP 404"):
        await fetch_bundle(url, "0" * 64, 10, tmp_path / "k" / "x", kind="kernel")
    assert leftovers(tmp_path / "k") == []


async def test_connection_refused(server: BundleServer, tmp_path: Path) -> None:
    port = server.port
    await server.stop()
    url = f"http://127.0.0.1:{port}/k.tar.zst"
    with pytest.raises(Unavailable) as ei:
        await fetch_bundle(url, "0" * 64, 10, tmp_path / "k" / "x", kind="kernel")
    assert url in str(ei.value)
    assert leftovers(tmp_path / "k") == []


async def test_stalled_download_times_out(server: BundleServer, tmp_path: Path) -> None:
    body = zst(make_tar(_kernel(E("initrd.img", os.urandom(300_000)))))
    dest = tmp_path / "k" / "x"
    with pytest.raises(Timeout, match="sent nothing"):
        await fetch(server, body, dest, "kernel", mode="stall", read_timeout=0.5)
    assert leftovers(dest.parent) == []


async def test_cancel_mid_download_leaves_nothing(server: BundleServer, tmp_path: Path) -> None:
    big = os.urandom(4 << 20)
    body = zst(make_tar(_kernel(E("initrd.img", big))))
    dest = tmp_path / "k" / "x"
    task = asyncio.create_task(fetch(server, body, dest, "kernel", mode="stall"))
    # Wait until unpacking is visibly under way (a partial initrd in the staging dir).
    partial: list[Path] = []
    for _ in range(500):
        partial = list(dest.parent.glob(".x.bundle-*/initrd.img")) if dest.parent.exists() else []
        if partial and partial[0].stat().st_size > 0:
            break
        await asyncio.sleep(0.01)
    assert partial, "unpacking did not start while the download was in flight"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(dest.parent) == []


async def test_existing_destination_is_refused_and_untouched(
    server: BundleServer, tmp_path: Path
) -> None:
    dest = tmp_path / "k" / "x"
    dest.mkdir(parents=True)
    (dest / "keep").write_text("mine")
    body = zst(make_tar(_kernel()))
    with pytest.raises(AlreadyExists):
        await fetch(server, body, dest, "kernel")
    assert (dest / "keep").read_text() == "mine"
    assert leftovers(dest.parent) == ["x"]
    assert server.hits == collections.Counter()  # refused before downloading
