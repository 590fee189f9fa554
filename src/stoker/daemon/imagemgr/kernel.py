"""Kernel import: a distribution kernel (directory or .deb) -> vmlinux + bzImage + initrd.

Firecracker before 1.17 boots only an ELF `vmlinux` on x86_64, while distributions ship a
compressed `vmlinuz` (a bzImage). `extract_vmlinux` finds the compressed payload in the
bzImage and decompresses it to the ELF; the bzImage itself is kept for QEMU and newer
Firecracker. Payload formats: gzip, xz, zstd, lz4 (legacy frame), bzip2, lzma.
"""

from __future__ import annotations

import asyncio
import bz2
import errno
import lzma
import os
import re
import shutil
import stat
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lz4.block
import zstandard

from stoker.daemon.imagemgr.publish import publish_dir
from stoker.daemon.imagemgr.safetree import rmtree
from stoker.errors import CommandFailed, InvalidArgument, NotFound
from stoker.runner import Runner

ELF_MAGIC = b"\x7fELF"
_HDRS_OFFSET = 0x202
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 * 1024 * 1024
# vmlinux is tens of MiB; anything past this is a decompression bomb, not a kernel.
_MAX_VMLINUX = 1024 * 1024 * 1024
# A kernel, an initrd or a kernel .deb is well under this; a larger source is refused.
MAX_SOURCE_FILE = 2 * 1024 * 1024 * 1024
_DPKG_TIMEOUT = 300.0
_MAX_SCAN_TRIES = 64
_ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64"}

_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lz4", struct.pack("<I", _LZ4_LEGACY_MAGIC)),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
)


@dataclass(frozen=True)
class KernelFiles:
    """An imported kernel laid out in `dir`."""

    dir: Path
    vmlinux: Path  # ELF, for Firecracker
    bzimage: Path | None  # the compressed boot image, for QEMU / newer Firecracker
    initrd: Path | None
    modules_dir: Path | None  # holds <version>/ trees
    version: str
    arch: str


class _NotElf(Exception):
    pass


# --- decompressors ------------------------------------------------------------------------


# Each returns (output, complete): complete is False for a stream cut short, which the
# decompressors themselves would happily return as a shorter (still ELF-looking) result.


def _gunzip(data: bytes) -> tuple[bytes, bool]:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return d.decompress(data, _MAX_VMLINUX), d.eof


def _unxz(data: bytes) -> tuple[bytes, bool]:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    return d.decompress(data, _MAX_VMLINUX), d.eof


def _unlzma(data: bytes) -> tuple[bytes, bool]:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    return d.decompress(data, _MAX_VMLINUX), d.eof


def _bunzip2(data: bytes) -> tuple[bytes, bool]:
    d = bz2.BZ2Decompressor()
    return d.decompress(data, _MAX_VMLINUX), d.eof


def _unzstd(data: bytes) -> tuple[bytes, bool]:
    # The kernel builds zstd payloads with --ultra -22: allow its large window.
    d = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
    out: bytes = d.decompress(data)
    return out, bool(d.eof)


def _unlz4_legacy(data: bytes) -> tuple[bytes, bool]:
    """LZ4 legacy frame: magic, then (u32 size, block) pairs with 8 MiB blocks, no end mark.

    The format cannot tell its own end. The kernel appends the uncompressed size as a
    u32 after the payload: the stream is complete when it stops exactly at the end of
    the data or at a u32 equal to the bytes produced.
    """
    if struct.unpack_from("<I", data, 0)[0] != _LZ4_LEGACY_MAGIC:
        raise ValueError("not an lz4 legacy frame")
    pos = 4
    chunks: list[bytes] = []
    total = 0
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if size == _LZ4_LEGACY_MAGIC:  # concatenated frames
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(data):
            break
        block = lz4.block.decompress(
            data[pos + 4 : pos + 4 + size], uncompressed_size=_LZ4_LEGACY_BLOCK
        )
        chunks.append(block)
        total += len(block)
        if total > _MAX_VMLINUX:
            raise ValueError("lz4 payload decompresses to more than 1 GiB")
        pos += 4 + size
    if not chunks:
        raise ValueError("lz4 legacy frame holds no block")
    complete = pos == len(data) or (
        pos + 4 <= len(data) and struct.unpack_from("<I", data, pos)[0] == total
    )
    return b"".join(chunks), complete


_DECOMPRESSORS: dict[str, Callable[[bytes], tuple[bytes, bool]]] = {
    "gzip": _gunzip,
    "xz": _unxz,
    "zstd": _unzstd,
    "lz4": _unlz4_legacy,
    "bzip2": _bunzip2,
    "lzma": _unlzma,
}


# --- bzImage parsing --------------------------------------------------------------------


def _is_bzimage(data: bytes) -> bool:
    return len(data) > 0x260 and data[_HDRS_OFFSET : _HDRS_OFFSET + 4] == b"HdrS"


def _header_payload(data: bytes) -> bytes | None:
    """The payload the boot header points at (boot protocol 2.08+), else None."""
    (proto,) = struct.unpack_from("<H", data, 0x206)
    if proto < 0x208:
        return None
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(data):
        return None
    return data[start : start + length]


def bzimage_version(data: bytes) -> str | None:
    """The kernel release from the bzImage header's version string (pointer at 0x20E)."""
    if not _is_bzimage(data):
        return None
    (ptr,) = struct.unpack_from("<H", data, 0x20E)
    start = ptr + 0x200
    if ptr == 0 or start >= len(data):
        return None
    raw = data[start : start + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    version = raw.split(" ", 1)[0]
    return version or None


def elf_version(data: bytes) -> str | None:
    """The release from an ELF vmlinux's `Linux version X ...` banner."""
    m = re.search(rb"Linux version (\S+) \(", data)
    return m.group(1).decode("ascii", "replace") if m else None


def elf_arch(data: bytes) -> str:
    """Architecture of an ELF image, from e_machine."""
    if len(data) < 20 or not data.startswith(ELF_MAGIC):
        raise InvalidArgument("not an ELF image")
    little = data[5] == 1
    (machine,) = struct.unpack_from("<H" if little else ">H", data, 18)
    return _ELF_MACHINES.get(machine, f"elf-machine-{machine:#x}")


def _try(fmt: str, payload: bytes) -> bytes:
    try:
        out, complete = _DECOMPRESSORS[fmt](payload)
    except (
        OSError,
        EOFError,
        ValueError,
        struct.error,
        lzma.LZMAError,
        zlib.error,
        zstandard.ZstdError,
        lz4.block.LZ4BlockError,
    ) as e:
        raise _NotElf(f"{fmt}: {e}") from None
    if not complete:
        raise _NotElf(f"{fmt} payload is truncated or corrupt ({len(out)} bytes decoded)")
    if not out.startswith(ELF_MAGIC):
        raise _NotElf(f"{fmt} payload decompressed to {len(out)} bytes that are not ELF")
    return out


def vmlinux_from_bytes(data: bytes, what: str = "kernel image") -> bytes:
    """The ELF vmlinux inside `data` (a bzImage, or already an ELF)."""
    if data.startswith(ELF_MAGIC):
        return data
    if not _is_bzimage(data):
        raise InvalidArgument(
            f"{what} is not a Linux kernel: no bzImage header (HdrS) and no ELF magic"
        )
    tried: list[str] = []
    payload = _header_payload(data)
    if payload is not None:
        for fmt, magic in _MAGICS:
            if payload.startswith(magic):
                try:
                    return _try(fmt, payload)
                except _NotElf as e:
                    tried.append(str(e))
    # Old boot protocols, or a header we misread: scan for every known magic (bounded:
    # short magics such as lzma's occur by chance in any large binary).
    for fmt, magic in _MAGICS:
        start = 0
        for _ in range(_MAX_SCAN_TRIES):
            pos = data.find(magic, start)
            if pos == -1:
                break
            start = pos + 1
            try:
                return _try(fmt, data[pos:])
            except _NotElf as e:
                if len(tried) < 8:
                    tried.append(f"{e} at offset {pos:#x}")
    detail = "; ".join(tried) if tried else "no gzip/xz/zstd/lz4/bzip2/lzma payload found"
    raise InvalidArgument(f"cannot extract an ELF vmlinux from {what}: {detail}")


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """Write the ELF vmlinux inside the bzImage `vmlinuz` (or a copy of an ELF) to `out`.

    Raises InvalidArgument when `vmlinuz` is not a kernel or yields no ELF. `out` is
    written atomically.
    """
    try:
        data = vmlinuz.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"kernel image {vmlinuz} does not exist") from None
    elf = vmlinux_from_bytes(data, str(vmlinuz))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(elf)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# --- import -------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path, what: str, *, follow: bool = True) -> int:
    """An fd on the regular file `path`, checked with fstat, at most MAX_SOURCE_FILE bytes.

    Opened non-blocking, so a FIFO planted where a kernel should be cannot hang the
    import; devices such as /dev/zero are refused before anything is read. Without
    `follow` a symlink is refused too (files inside an unpacked package).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidArgument(f"{what} {path} is a symlink inside a package: refused") from None
        raise InvalidArgument(f"cannot open {what} {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InvalidArgument(
            f"{what} {path} is {_kind(st.st_mode)}: give a regular file (a kernel image, "
            "an initrd or a .deb) or a directory holding them"
        )
    if st.st_size > MAX_SOURCE_FILE:
        os.close(fd)
        raise InvalidArgument(
            f"{what} {path} is {st.st_size // (1 << 20)} MiB, over the "
            f"{MAX_SOURCE_FILE // (1 << 20)} MiB a kernel source may be: pick the right file"
        )
    os.set_blocking(fd, True)
    return fd


def _read_regular(path: Path, what: str, *, follow: bool = True) -> bytes:
    fd = _open_regular(path, what, follow=follow)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_SOURCE_FILE + 1)
    if len(data) > MAX_SOURCE_FILE:
        raise InvalidArgument(f"{what} {path} grew past {MAX_SOURCE_FILE} bytes while read")
    return data


def _copy_regular(path: Path, out: Path, what: str, *, follow: bool = True) -> None:
    fd = _open_regular(path, what, follow=follow)
    with os.fdopen(fd, "rb") as f, open(out, "xb") as o:
        left = MAX_SOURCE_FILE + 1
        while chunk := f.read(min(1 << 20, left)):
            o.write(chunk)
            left -= len(chunk)
            if left <= 0:
                raise InvalidArgument(f"{what} {path} grew past {MAX_SOURCE_FILE} bytes")


def _classify(source: Path) -> str:
    """ "dir", "deb" or "file" for a `kernel import --from` source; anything else refused."""
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise NotFound(f"kernel source {source} does not exist") from None
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    fd = _open_regular(source, "kernel source")
    with os.fdopen(fd, "rb") as f:
        return "deb" if f.read(8) == b"!<arch>\n" else "file"


@dataclass
class _Found:
    kernel: Path
    initrd: Path | None
    modules: Path | None  # a directory holding <version>/ trees
    version_hint: str | None
    packaged: bool = False  # found inside an unpacked .deb: never follow its symlinks


def _suffix_version(name: str) -> str | None:
    m = re.match(
        r"^(?:vmlinuz|vmlinux|bzImage|initrd\.img|initrd|initramfs)-(.+?)(?:\.img)?$", name
    )
    return m.group(1) if m else None


def _pick(cands: list[Path], what: str, where: Path) -> Path | None:
    if not cands:
        return None
    if len(cands) > 1:
        names = ", ".join(sorted(p.name for p in cands))
        raise InvalidArgument(
            f"{where} holds several {what} ({names}): point --from at a directory with one"
        )
    return cands[0]


def _is_candidate(p: Path, packaged: bool) -> bool:
    """A regular file (a package's own symlinks are never followed: they could name any
    host file, which would be copied into the kernel directory)."""
    try:
        st = os.lstat(p) if packaged else os.stat(p)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode)


def _find_in_dir(src: Path, *, packaged: bool = False) -> _Found:
    """Locate kernel, initrd and modules in a kernel directory or an unpacked package."""
    dirs = [src, src / "boot"]
    if packaged and os.path.islink(src / "boot"):
        dirs = [src]
    kernel: Path | None = None
    for pattern in ("vmlinuz-*", "vmlinuz", "bzImage", "bzImage-*", "vmlinux", "vmlinux-*"):
        cands = [p for d in dirs for p in sorted(d.glob(pattern)) if _is_candidate(p, packaged)]
        kernel = _pick(cands, "kernels", src)
        if kernel is not None:
            break
    if kernel is None:
        raise NotFound(
            f"no kernel in {src}: expected vmlinuz*, bzImage or vmlinux (also under boot/)"
        )
    hint = _suffix_version(kernel.name)
    initrd: Path | None = None
    for pattern in ("initrd.img-*", "initrd.img", "initrd", "initrd-*", "initramfs*"):
        cands = [p for d in dirs for p in sorted(d.glob(pattern)) if _is_candidate(p, packaged)]
        if hint:
            same = [p for p in cands if _suffix_version(p.name) == hint]
            cands = same or cands
        initrd = _pick(cands, "initrds", src)
        if initrd is not None:
            break
    modules: Path | None = None
    for cand in (src / "modules", src / "lib" / "modules", src / "usr" / "lib" / "modules"):
        if cand.is_dir() and any(p.is_dir() for p in cand.iterdir()):
            modules = cand
            break
    return _Found(kernel, initrd, modules, hint, packaged)


def _copy_modules(src: Path, dest: Path) -> None:
    try:
        shutil.copytree(src, dest, symlinks=True)
    except shutil.Error as e:
        errors = e.args[0] if e.args and isinstance(e.args[0], list) else []
        why = errors[0][2] if errors else str(e)
        raise InvalidArgument(f"cannot copy the kernel modules from {src}: {why}") from None


def _assemble(found: _Found, staging: Path) -> KernelFiles:
    """Blocking part of an import: read, extract, copy into `staging`."""
    follow = not found.packaged
    data = _read_regular(found.kernel, "kernel image", follow=follow)
    elf = vmlinux_from_bytes(data, str(found.kernel))
    arch = elf_arch(elf)
    version = bzimage_version(data) or found.version_hint or elf_version(elf)
    if version is None and found.modules is not None:
        subdirs = [p.name for p in found.modules.iterdir() if p.is_dir()]
        version = subdirs[0] if len(subdirs) == 1 else None
    if version is None:
        raise InvalidArgument(
            f"cannot tell the version of kernel {found.kernel}: name it vmlinuz-VERSION"
        )
    vmlinux = staging / "vmlinux"
    vmlinux.write_bytes(elf)
    bzimage: Path | None = None
    if _is_bzimage(data):
        bzimage = staging / "bzImage"
        bzimage.write_bytes(data)  # the bytes already read and checked, not a re-open
    initrd: Path | None = None
    if found.initrd is not None:
        initrd = staging / "initrd.img"
        _copy_regular(found.initrd, initrd, "initrd", follow=follow)
    modules: Path | None = None
    if found.modules is not None:
        modules = staging / "modules"
        _copy_modules(found.modules, modules)
    for p in (vmlinux, bzimage, initrd):
        if p is not None:
            os.chmod(p, 0o644)
    return KernelFiles(staging, vmlinux, bzimage, initrd, modules, version, arch)


async def import_kernel(runner: Runner, source: Path, dest_dir: Path) -> KernelFiles:
    """Import a kernel from a directory, a `.deb`, or a single kernel file into `dest_dir`.

    The result holds `vmlinux` (ELF, always), `bzImage` (when the source was one),
    `initrd.img` and `modules/` when the source had them. A .deb is unpacked with
    `dpkg-deb -x`; packages carry no initrd (it is generated at install time), so pass a
    directory that has one when the guest needs it. Everything is built in a staging
    directory beside `dest_dir` and renamed into place; an existing `dest_dir` is
    replaced, a failure leaves it untouched.
    """
    # Classified off the event loop: a FIFO or /dev/zero named by the user must neither
    # hang the daemon nor be read until memory runs out.
    kind = await asyncio.to_thread(_classify, source)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.import-", dir=dest_dir.parent))
    unpacked = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.src-", dir=dest_dir.parent))
    try:
        if kind == "dir":
            found = await asyncio.to_thread(_find_in_dir, source)
        elif kind == "deb":
            try:
                await runner.run(
                    ["dpkg-deb", "-x", str(source), str(unpacked)], timeout=_DPKG_TIMEOUT
                )
            except CommandFailed as e:
                raise InvalidArgument(
                    f"{source} is not a readable Debian package: {e.message}"
                ) from None
            try:
                found = await asyncio.to_thread(_find_in_dir, unpacked, packaged=True)
            except NotFound:
                raise NotFound(
                    f"package {source.name} holds no kernel image (metapackages such as "
                    "linux-image-cloud-amd64 only depend on one: use the versioned "
                    "linux-image-<version> package)"
                ) from None
        else:
            found = _Found(source, None, None, _suffix_version(source.name))
        files = await asyncio.to_thread(_assemble, found, staging)
        await asyncio.to_thread(publish_dir, staging, dest_dir)
    except BaseException:
        await asyncio.to_thread(rmtree, staging, ignore_errors=True)
        raise
    finally:
        await asyncio.to_thread(rmtree, unpacked, ignore_errors=True)

    def moved(p: Path | None) -> Path | None:
        return None if p is None else dest_dir / p.relative_to(staging)

    return KernelFiles(
        dir=dest_dir,
        vmlinux=dest_dir / "vmlinux",
        bzimage=moved(files.bzimage),
        initrd=moved(files.initrd),
        modules_dir=moved(files.modules_dir),
        version=files.version,
        arch=files.arch,
    )
