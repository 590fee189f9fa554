"""vmlinux extraction from bzImage payloads, version parsing, directory/file imports."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lz4.block
import pytest
import zstandard

from stoker.daemon.imagemgr import kernel as km
from stoker.errors import InvalidArgument, NotFound
from stoker.runner import RecordingRunner

pytestmark = pytest.mark.unit

VERSION = "6.9.9-stoker-test"


def fake_elf(size: int = 200_000, machine: int = 0x3E) -> bytes:
    """An x86_64 ELF header followed by a kernel banner and filler that compresses well."""
    hdr = bytearray(64)
    hdr[0:4] = b"\x7fELF"
    hdr[4] = 2  # 64-bit
    hdr[5] = 1  # little endian
    hdr[6] = 1
    struct.pack_into("<HH", hdr, 16, 2, machine)
    banner = f"Linux version {VERSION} (builder@example) #1 SMP\n".encode()
    body = bytes(hdr) + banner
    filler = bytes(range(256)) * (size // 256 + 1)
    return (body + filler)[:size]


def lz4_legacy(data: bytes, block: int = 8 * 1024 * 1024) -> bytes:
    out = [struct.pack("<I", 0x184C2102)]
    for i in range(0, len(data), block):
        c = lz4.block.compress(data[i : i + block], store_size=False)
        out.append(struct.pack("<I", len(c)) + c)
    return b"".join(out)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, 9),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "zstd": lambda d: zstandard.ZstdCompressor(level=19).compress(d),
    "lz4": lz4_legacy,
    "bzip2": lambda d: bz2.compress(d),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
}


def fake_bzimage(
    payload: bytes, *, usize: int = 200_000, protocol: int = 0x20F, version: str = VERSION
) -> bytes:
    """A bzImage-shaped blob: setup sectors with the boot header, then the payload.

    Like the real thing, the payload carries the uncompressed size `usize` as a trailing u32.
    """
    setup_sects = 3
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    vstr = f"{version} (builder@example) #1 SMP\0".encode()
    vpos = 0x400
    setup[vpos : vpos + len(vstr)] = vstr
    struct.pack_into("<H", setup, 0x20E, vpos - 0x200)
    prefix = b"\x90" * 0x300  # decompressor stub stand-in
    full_payload = payload + struct.pack("<I", usize)
    if protocol >= 0x208:
        struct.pack_into("<II", setup, 0x248, len(prefix), len(full_payload))
    return bytes(setup) + prefix + full_payload + b"\0" * 64


@pytest.mark.parametrize("fmt", sorted(COMPRESSORS))
def test_extracts_elf_from_every_payload_format(tmp_path: Path, fmt: str) -> None:
    elf = fake_elf()
    img = tmp_path / "vmlinuz"
    img.write_bytes(fake_bzimage(COMPRESSORS[fmt](elf)))
    out = tmp_path / "vmlinux"
    km.extract_vmlinux(img, out)
    assert out.read_bytes() == elf


@pytest.mark.parametrize("fmt", ["gzip", "xz", "zstd", "lz4"])
def test_scans_for_payload_when_header_has_no_payload_fields(tmp_path: Path, fmt: str) -> None:
    elf = fake_elf()
    img = tmp_path / "vmlinuz"
    img.write_bytes(fake_bzimage(COMPRESSORS[fmt](elf), protocol=0x206))
    out = tmp_path / "vmlinux"
    km.extract_vmlinux(img, out)
    assert out.read_bytes() == elf


def test_lz4_legacy_with_several_blocks() -> None:
    elf = fake_elf(size=300_000)
    data = fake_bzimage(lz4_legacy(elf, block=64 * 1024), usize=len(elf))
    assert km.vmlinux_from_bytes(data) == elf


def test_truncated_lz4_is_refused() -> None:
    elf = fake_elf(size=300_000)
    frame = lz4_legacy(elf, block=64 * 1024)
    # Drop the last block: what is left still decodes to an ELF-looking prefix.
    last = frame.rfind(struct.pack("<I", 0x184C2102))
    assert last == 0
    cut = frame[: len(frame) - 1000]
    with pytest.raises(InvalidArgument, match="truncated"):
        km.vmlinux_from_bytes(fake_bzimage(cut, usize=len(elf)))


def test_elf_input_is_copied(tmp_path: Path) -> None:
    elf = fake_elf()
    src = tmp_path / "vmlinux-in"
    src.write_bytes(elf)
    km.extract_vmlinux(src, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == elf


def test_not_a_kernel(tmp_path: Path) -> None:
    src = tmp_path / "junk"
    src.write_bytes(b"hello world" * 1000)
    with pytest.raises(InvalidArgument, match="not a Linux kernel"):
        km.extract_vmlinux(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_payload_that_is_not_elf(tmp_path: Path) -> None:
    src = tmp_path / "vmlinuz"
    src.write_bytes(fake_bzimage(gzip.compress(b"definitely not an ELF" * 100)))
    with pytest.raises(InvalidArgument, match="cannot extract an ELF vmlinux"):
        km.extract_vmlinux(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_payload(tmp_path: Path) -> None:
    payload = gzip.compress(fake_elf())
    src = tmp_path / "vmlinuz"
    src.write_bytes(fake_bzimage(payload[:200]))
    with pytest.raises(InvalidArgument, match="cannot extract"):
        km.extract_vmlinux(src, tmp_path / "out")


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        km.extract_vmlinux(tmp_path / "nope", tmp_path / "out")


def test_versions_and_arch() -> None:
    elf = fake_elf()
    bz = fake_bzimage(gzip.compress(elf), version="6.1.0-56-cloud-amd64")
    assert km.bzimage_version(bz) == "6.1.0-56-cloud-amd64"
    assert km.bzimage_version(elf) is None
    assert km.elf_version(elf) == VERSION
    assert km.elf_arch(elf) == "x86_64"
    assert km.elf_arch(fake_elf(machine=0xB7)) == "aarch64"
    with pytest.raises(InvalidArgument):
        km.elf_arch(b"nope")


def kernel_dir(root: Path, *, version: str = "6.1.0-56-cloud-amd64", boot: bool = False) -> Path:
    d = root / "boot" if boot else root
    d.mkdir(parents=True, exist_ok=True)
    (d / f"vmlinuz-{version}").write_bytes(fake_bzimage(lz4_legacy(fake_elf()), version=version))
    (d / f"initrd.img-{version}").write_bytes(b"initrd-bytes")
    mods = root / "lib" / "modules" / version / "kernel"
    mods.mkdir(parents=True)
    (mods / "virtio_mmio.ko").write_bytes(b"\x7fELF-module")
    return root


async def test_import_directory(tmp_path: Path) -> None:
    src = kernel_dir(tmp_path / "src", boot=True)
    dest = tmp_path / "kernels" / "k1"
    files = await km.import_kernel(RecordingRunner(), src, dest)
    assert files.dir == dest
    assert files.version == "6.1.0-56-cloud-amd64"
    assert files.arch == "x86_64"
    assert files.vmlinux.read_bytes() == fake_elf()
    assert files.bzimage is not None
    assert files.bzimage.read_bytes()[0x202:0x206] == b"HdrS"
    assert files.initrd is not None and files.initrd.read_bytes() == b"initrd-bytes"
    assert files.modules_dir == dest / "modules"
    assert (dest / "modules" / "6.1.0-56-cloud-amd64" / "kernel" / "virtio_mmio.ko").is_file()
    # Nothing but the published directory is left beside it.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["k1"]


async def test_import_single_file_and_replace(tmp_path: Path) -> None:
    src = tmp_path / "vmlinux"
    src.write_bytes(fake_elf())
    dest = tmp_path / "k"
    dest.mkdir()
    (dest / "stale").write_text("old")
    files = await km.import_kernel(RecordingRunner(), src, dest)
    assert files.bzimage is None and files.initrd is None and files.modules_dir is None
    assert files.version == VERSION  # from the ELF banner
    assert sorted(p.name for p in dest.iterdir()) == ["vmlinux"]


async def test_failed_import_leaves_destination_alone(tmp_path: Path) -> None:
    dest = tmp_path / "k"
    dest.mkdir()
    (dest / "vmlinux").write_bytes(b"previous")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vmlinuz-1.2.3").write_bytes(b"garbage" * 100)
    with pytest.raises(InvalidArgument):
        await km.import_kernel(RecordingRunner(), bad, dest)
    assert (dest / "vmlinux").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "k"]


async def test_import_rejects_ambiguous_and_empty_dirs(tmp_path: Path) -> None:
    two = tmp_path / "two"
    two.mkdir()
    for v in ("1.0", "2.0"):
        (two / f"vmlinuz-{v}").write_bytes(fake_bzimage(gzip.compress(fake_elf())))
    with pytest.raises(InvalidArgument, match="several kernels"):
        await km.import_kernel(RecordingRunner(), two, tmp_path / "d1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotFound, match="no kernel"):
        await km.import_kernel(RecordingRunner(), empty, tmp_path / "d2")
    with pytest.raises(NotFound):
        await km.import_kernel(RecordingRunner(), tmp_path / "missing", tmp_path / "d3")
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


# --- issue 9 item 4: `kernel import --from` takes regular files and directories only --------


async def test_fifo_source_is_refused_at_once_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "kernel.fifo"
    os.mkfifo(fifo)

    def unblock() -> None:
        # Frees an implementation that opened the FIFO blocking (the test then fails on
        # time and message instead of hanging the run).
        time.sleep(5)
        with contextlib.suppress(OSError):
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)

    threading.Thread(target=unblock, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(InvalidArgument, match="is a FIFO: give a regular file"):
        await km.import_kernel(RecordingRunner(), fifo, tmp_path / "k")
    assert time.monotonic() - t0 < 3
    assert not (tmp_path / "k").exists()


async def test_device_source_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="/dev/zero is a character device"):
        await km.import_kernel(RecordingRunner(), Path("/dev/zero"), tmp_path / "k")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


async def test_oversized_source_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(km, "MAX_SOURCE_FILE", 1 << 20)
    big = tmp_path / "vmlinuz-9.9"
    with open(big, "wb") as f:
        f.truncate((1 << 20) + 1)
    with pytest.raises(InvalidArgument, match=r"is 1 MiB, over the 1 MiB a kernel source may be"):
        await km.import_kernel(RecordingRunner(), big, tmp_path / "k")


async def test_package_symlinks_to_host_files_are_not_followed(tmp_path: Path) -> None:
    """A .deb whose boot/initrd.img-V links to a host file: the host file's bytes must not
    be copied into the kernel directory."""
    from prereq import require_tools
    from stoker.runner import Runner

    require_tools("dpkg-deb")

    secret = tmp_path / "host-secret"
    secret.write_text("host secret\n")
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: linux-image-x\nVersion: 1\nArchitecture: amd64\n"
        "Maintainer: t <t@example>\nDescription: t\n"
    )
    (pkg / "boot").mkdir()
    (pkg / "boot" / "vmlinuz-6.1.0-9").write_bytes(fake_bzimage(gzip.compress(fake_elf())))
    (pkg / "boot" / "initrd.img-6.1.0-9").symlink_to(secret)
    deb = tmp_path / "k.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(deb)], check=True,
                   capture_output=True)  # fmt: skip
    files = await km.import_kernel(Runner(), deb, tmp_path / "kernels" / "k")
    assert files.initrd is None
    for p in (tmp_path / "kernels" / "k").rglob("*"):
        assert not p.is_file() or p.read_bytes() != secret.read_bytes(), p
