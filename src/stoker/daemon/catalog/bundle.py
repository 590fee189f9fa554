"""Download a catalog bundle (`.tar.zst`), verify it, unpack it, publish it atomically.

The bytes are hashed as they arrive and, at the same time, decompressed and unpacked by
a worker thread into a staging directory beside `dest_dir`; the staging directory is
renamed to `dest_dir` only after the whole download matched the expected sha256 and
every entry passed the checks below. Any failure or cancellation removes the staging
directory: nothing is left behind.

What a bundle may hold, exactly (names may carry a leading `./`):

- image: `rootfs.ext4` (ext4 magic) + `manifest.json` (+ optional `work-seed.ext4`);
- kernel: `vmlinux` (ELF) + `manifest.json` (+ optional `bzImage` (with a boot header),
  `initrd.img`, and a `modules/` tree of directories, regular files and symlinks whose
  targets stay inside `modules/`).

Rejected: absolute names, `..`, devices, fifos, hard links, other symlinks, anything
written through a symlink, duplicates, extra or missing entries, sparse tar members, a
manifest without `name`, `version`, `arch` (and `kernel_ref` for images).

When the bundle fails to unpack, the rest is still downloaded and hashed before the
error is reported, so a tampered download is reported as a hash mismatch rather than as
the corrupt archive it produces.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal, NoReturn, Protocol, cast
from urllib.parse import urlsplit

import aiohttp
import zstandard

from stoker.daemon.catalog.catalog import CatalogImage, CatalogKernel
from stoker.daemon.catalog.errors import (
    BundleDigestMismatch,
    BundleError,
    BundleNoSpace,
    BundleTruncated,
    CorruptBundle,
    InvalidBundle,
    UnsafeBundle,
)
from stoker.daemon.catalog.tarstream import TarEntry, TarFormatError, TarReader
from stoker.daemon.imagemgr.safetree import rmtree
from stoker.daemon.opstate.meter import DownloadMeter
from stoker.daemon.opstate.pipe import Aborted, ThreadPipe, settle, worker_error
from stoker.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    StokerError,
    Timeout,
    Unavailable,
)
from stoker.model.names import validate_artifact_name

Kind = Literal["image", "kernel"]

CHUNK = 1 << 20
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0  # no byte for this long: the download is stuck
MAX_WINDOW = 1 << 30  # zstd --long=30; larger windows would let a bundle claim GiBs of RAM
MAX_UNPACKED = 64 << 30
MAX_ENTRIES = 200_000
MAX_MANIFEST = 1 << 20
MAX_SYMLINK_HOPS = 40
HEAD = 4096  # leading bytes kept of each top-level file, for the magic checks
SPARSE_BLOCK = 64 << 10
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
EXT4_MAGIC_OFFSET = 1080
EXT4_MAGIC = b"\x53\xef"
ELF_MAGIC = b"\x7fELF"
_ELF_MACHINES = {"x86_64": 0x3E, "aarch64": 0xB7, "riscv64": 0xF3}
_ZEROS = bytes(SPARSE_BLOCK)

MODULES = "modules"
MANIFEST = "manifest.json"
# name -> required
IMAGE_FILES = {"rootfs.ext4": True, MANIFEST: True, "work-seed.ext4": False}
KERNEL_FILES = {"vmlinux": True, MANIFEST: True, "bzImage": False, "initrd.img": False}
_EXPECTED = {
    "image": "an image bundle holds exactly rootfs.ext4 and manifest.json, "
    "optionally work-seed.ext4",
    "kernel": "a kernel bundle holds exactly vmlinux and manifest.json, optionally "
    "bzImage, initrd.img and a modules/ directory",
}


class Progress(Protocol):
    """Where a download reports what it is doing (matches `RequestContext.progress`)."""

    def __call__(self, stage: str, message: str = "", **fields: Any) -> None: ...


SessionFactory = Callable[[], aiohttp.ClientSession]


@dataclass(frozen=True)
class BundleManifest:
    """The bundle's own `manifest.json` (validated); `raw` holds every field it had."""

    name: str
    version: str
    arch: str
    kernel_ref: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class BundleFiles:
    """A verified bundle unpacked into `dir` (the `dest_dir` given to `fetch_bundle`)."""

    kind: Kind
    dir: Path
    manifest: BundleManifest
    sha256: str
    download_size: int
    unpacked_size: int
    rootfs: Path | None = None  # image
    work_seed: Path | None = None  # image, optional
    vmlinux: Path | None = None  # kernel
    bzimage: Path | None = None  # kernel, optional
    initrd: Path | None = None  # kernel, optional
    modules_dir: Path | None = None  # kernel, optional


_FORMAT_ERRORS = (CorruptBundle, InvalidBundle, UnsafeBundle)


def _clean_name(name: str) -> list[str] | None:
    """Path components of an entry name; None when it is absolute or climbs with `..`."""
    if name.startswith("/") or "\x00" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return parts


class _Escape(Exception):
    pass


class _Unpacker:
    """Applies the bundle rules to each tar entry and writes accepted ones into `root`.

    Runs in a worker thread. It never follows a symlink: files are created with
    O_EXCL | O_NOFOLLOW and no entry may have a symlink among its parents.
    """

    def __init__(
        self,
        root: Path,
        kind: Kind,
        pipe: ThreadPipe,
        *,
        label: str,
        url: str,
        expect: Mapping[str, str] | None,
        max_unpacked: int,
    ) -> None:
        self.root = root
        self.kind = kind
        self.pipe = pipe
        self.label = label
        self.url = url
        self.expect = dict(expect or {})
        self.max_unpacked = max_unpacked
        self.files = IMAGE_FILES if kind == "image" else KERNEL_FILES
        self.explicit: set[str] = set()
        self.kinds: dict[str, str] = {}  # path -> "file" | "directory" | "symlink"
        self.symlinks: dict[str, str] = {}
        self.heads: dict[str, bytes] = {}
        self.manifest_bytes = b""
        self.total = 0

    # --- errors ---

    def _where(self) -> str:
        return f"pulling {self.label}: bundle {self.url}"

    def unsafe(self, problem: str) -> NoReturn:
        raise UnsafeBundle(f"{self._where()} is unsafe: {problem}; nothing was kept")

    def invalid(self, problem: str) -> NoReturn:
        raise InvalidBundle(
            f"{self._where()} is not a valid {self.kind} bundle: {problem}; nothing was kept"
        )

    # --- driver ---

    def run(self) -> tuple[BundleManifest, int]:
        """Decompress and unpack everything the pipe delivers; (manifest, bytes unpacked)."""
        try:
            try:
                self._unpack()
            except OSError as e:
                raise self._os_error(e) from None
        finally:
            self.pipe.wake_producer()
        return self._check(), self.total

    def _unpack(self) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        reader = dctx.stream_reader(
            cast(IO[bytes], self.pipe), read_size=CHUNK, read_across_frames=True
        )

        def read(n: int) -> bytes:
            if self.pipe.aborted:
                raise Aborted()
            try:
                out: bytes = reader.read(n)
            except zstandard.ZstdError as e:
                if self.pipe.head and not ZSTD_MAGIC.startswith(self.pipe.head[:4]):
                    raise CorruptBundle(
                        f"{self._where()} is not zstd-compressed (it starts with "
                        f"{self.pipe.head[:4].hex()}): a bundle must be a .tar.zst; nothing "
                        "was kept"
                    ) from None
                raise CorruptBundle(
                    f"{self._where()} is corrupt: zstd cannot decompress it ({e}); nothing was kept"
                ) from None
            return out

        tar = TarReader(read)
        try:
            while (entry := tar.next()) is not None:
                self._add(entry, tar)
        except TarFormatError as e:
            raise CorruptBundle(
                f"{self._where()} is corrupt: not a well-formed tar ({e}); nothing was kept"
            ) from None

    def _os_error(self, e: OSError) -> StokerError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return BundleNoSpace(
                f"pulling {self.label}: no space left in {self.root.parent} while unpacking "
                f"{self.url} ({self.total // (1 << 20)} MiB written so far): free disk space "
                "and retry; nothing was kept"
            )
        return BundleError(
            f"pulling {self.label}: unpacking {self.url} into {self.root.parent} failed: "
            f"{e.strerror or e}; nothing was kept"
        )

    # --- entries ---

    def _add(self, entry: TarEntry, tar: TarReader) -> None:
        parts = _clean_name(entry.name)
        if parts is None:
            self.unsafe(f"entry {entry.name!r} has an absolute path or '..'")
        if not parts:
            if entry.kind != "directory":
                self.unsafe(f"entry {entry.name!r} is a {entry.kind} at the bundle's root")
            return  # "./": the bundle root itself
        rel = "/".join(parts)
        if rel in self.explicit:
            self.invalid(f"{rel} appears twice")
        self.explicit.add(rel)
        if len(self.explicit) > MAX_ENTRIES:
            self.invalid(f"it has more than {MAX_ENTRIES} entries")
        in_modules = self.kind == "kernel" and parts[0] == MODULES
        if entry.kind == "hardlink":
            self.unsafe(f"{rel} is a hard link (to {entry.linkname!r}): use a regular file")
        if entry.kind in ("character device", "block device", "fifo"):
            self.unsafe(f"{rel} is a {entry.kind}: bundles hold only regular files")
        if entry.kind == "sparse file":
            self.invalid(
                f"{rel} is a sparse tar member: create the tar without --sparse (zstd "
                "compresses the zeros anyway)"
            )
        if entry.kind not in ("file", "directory", "symlink"):
            self.unsafe(f"{rel} is an unsupported {entry.kind}")
        if not in_modules:
            if len(parts) != 1 or parts[0] not in self.files:
                self.invalid(f"unexpected entry {rel} ({_EXPECTED[self.kind]})")
            if entry.kind != "file":
                target = f" -> {entry.linkname}" if entry.kind == "symlink" else ""
                self.unsafe(f"{rel}{target} is a {entry.kind}, not a regular file")
            self._file(rel, entry, tar, top=True)
            return
        if len(parts) == 1:
            if entry.kind != "directory":
                self.invalid(f"{MODULES} is a {entry.kind}; it must be a directory")
            self._dirs(parts)
            return
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            k = self.kinds.get(prefix)
            if k == "symlink":
                self.unsafe(f"{rel} would be written through the symlink {prefix}")
            if k == "file":
                self.invalid(f"{rel} is inside {prefix}, which is a file")
        if rel in self.kinds and not (entry.kind == "directory" == self.kinds[rel]):
            self.invalid(f"{rel} is both a directory and a {entry.kind}")
        self._dirs(parts[:-1])
        if entry.kind == "directory":
            self._dirs(parts)
        elif entry.kind == "symlink":
            if not entry.linkname or entry.linkname.startswith("/"):
                self.unsafe(
                    f"symlink {rel} -> {entry.linkname!r} is absolute or empty: symlinks "
                    f"must be relative and stay inside {MODULES}/"
                )
            os.symlink(entry.linkname, self.root / rel)
            self.kinds[rel] = "symlink"
            self.symlinks[rel] = entry.linkname
        else:
            self._file(rel, entry, tar, top=False)

    def _dirs(self, parts: list[str]) -> None:
        """Create each missing directory of `parts` (none of which is a symlink)."""
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            if self.kinds.get(rel) == "directory":
                continue
            os.mkdir(self.root / rel, 0o755)
            self.kinds[rel] = "directory"

    def _file(self, rel: str, entry: TarEntry, tar: TarReader, *, top: bool) -> None:
        if rel == MANIFEST and entry.size > MAX_MANIFEST:
            self.invalid(f"{MANIFEST} is {entry.size} bytes; at most {MAX_MANIFEST} are allowed")
        if self.total + entry.size > self.max_unpacked:
            self.invalid(f"it unpacks to more than {self.max_unpacked // (1 << 30)} GiB")
        path = self.root / rel
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        self.kinds[rel] = "file"
        keep = MAX_MANIFEST if rel == MANIFEST else HEAD if top else 0
        head = bytearray()
        written = 0
        try:
            while True:
                if self.pipe.aborted:
                    raise Aborted()
                data = tar.read_data(CHUNK)
                if not data:
                    break
                if len(head) < keep:
                    head += data[: keep - len(head)]
                _write_sparse(fd, data)
                written += len(data)
                self.total += len(data)
            # Zero blocks were skipped, not written: the length comes from truncate.
            os.ftruncate(fd, written)
            os.fchmod(fd, 0o755 if entry.mode & 0o111 and not top else 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        if rel == MANIFEST:
            self.manifest_bytes = bytes(head)
        elif top:
            self.heads[rel] = bytes(head)

    # --- final checks ---

    def _check(self) -> BundleManifest:
        missing = [f for f, required in self.files.items() if required and f not in self.kinds]
        if missing:
            self.invalid(f"{', '.join(missing)} missing ({_EXPECTED[self.kind]})")
        for link in self.symlinks:
            try:
                self._resolve(link.split("/")[:-1], self.symlinks[link], [0])
            except _Escape as e:
                self.unsafe(
                    f"symlink {link} -> {self.symlinks[link]} {e}: symlinks must stay "
                    f"inside {MODULES}/"
                )
        manifest = self._manifest()
        if self.kind == "image":
            for f in ("rootfs.ext4", "work-seed.ext4"):
                head = self.heads.get(f)
                if (
                    head is not None
                    and head[EXT4_MAGIC_OFFSET : EXT4_MAGIC_OFFSET + 2] != EXT4_MAGIC
                ):
                    self.invalid(f"{f} is not an ext4 filesystem image (no ext4 magic)")
        else:
            self._check_elf(self.heads["vmlinux"], manifest.arch)
            bz = self.heads.get("bzImage")
            if bz is not None and bz[0x202:0x206] != b"HdrS":
                self.invalid("bzImage has no Linux boot header (HdrS)")
        for key, want in self.expect.items():
            got = manifest.raw.get(key)
            if got != want:
                self.invalid(f"its manifest says {key} {got!r} but the catalog entry says {want!r}")
        return manifest

    def _resolve(self, base: list[str], target: str, hops: list[int]) -> list[str]:
        """Follow `target` from directory `base` through the bundle's own symlinks.

        Every step must stay inside modules/, checked on the real resolution, not the
        lexical one (`l/..` where `l -> .` climbs out although it looks harmless). Even a
        detour out and back (`../../modules/x`) is refused: the tree is later installed
        under another name (the guest's /lib/modules), where such a link would break.
        """
        if target.startswith("/"):
            raise _Escape("is absolute")
        parts = list(base)
        for comp in target.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if parts:
                    parts.pop()
            else:
                parts.append(comp)
                key = "/".join(parts)
                if key in self.symlinks:
                    hops[0] += 1
                    if hops[0] > MAX_SYMLINK_HOPS:
                        raise _Escape("is part of a symlink loop")
                    parts = self._resolve(parts[:-1], self.symlinks[key], hops)
            if not parts or parts[0] != MODULES:
                raise _Escape("points outside")
        return parts

    def _manifest(self) -> BundleManifest:
        try:
            doc = json.loads(self.manifest_bytes)
        except ValueError as e:
            self.invalid(f"{MANIFEST} is not valid JSON ({e})")
        if not isinstance(doc, dict):
            self.invalid(f"{MANIFEST} must hold a JSON object")
        keys = ("name", "version", "arch") + (("kernel_ref",) if self.kind == "image" else ())
        for key in keys:
            v = doc.get(key)
            if not isinstance(v, str) or not v:
                self.invalid(f'{MANIFEST} has no "{key}" (a non-empty string)')
        for key in ("name", "kernel_ref"):
            if key in keys:
                try:
                    validate_artifact_name(doc[key], "kernel" if key == "kernel_ref" else "image")
                except InvalidArgument:
                    self.invalid(f'{MANIFEST}: "{key}" {doc[key]!r} is not a valid name')
        if "kind" in doc and doc["kind"] != self.kind:
            self.invalid(f"{MANIFEST} says it is a {doc['kind']!r} bundle")
        return BundleManifest(
            name=doc["name"],
            version=doc["version"],
            arch=doc["arch"],
            kernel_ref=doc.get("kernel_ref") if self.kind == "image" else None,
            raw=doc,
        )

    def _check_elf(self, head: bytes, arch: str) -> None:
        if len(head) < 20 or not head.startswith(ELF_MAGIC):
            self.invalid("vmlinux is not an ELF image (Firecracker boots an uncompressed ELF)")
        order: Literal["little", "big"] = "little" if head[5] == 1 else "big"
        machine = int.from_bytes(head[18:20], order)
        want = _ELF_MACHINES.get(arch)
        if want is not None and machine != want:
            self.invalid(f"vmlinux is built for ELF machine {machine:#x}, not {arch}")


def _write_sparse(fd: int, data: bytes) -> None:
    """Write `data`, seeking over all-zero blocks so disk images stay sparse."""
    for off in range(0, len(data), SPARSE_BLOCK):
        piece = data[off : off + SPARSE_BLOCK]
        if piece == _ZEROS[: len(piece)]:
            os.lseek(fd, len(piece), os.SEEK_CUR)
            continue
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view) :]


async def fetch_bundle(
    url: str,
    sha256: str,
    size: int | None,
    dest_dir: Path,
    *,
    kind: Kind,
    progress: Progress | None = None,
    label: str | None = None,
    expect: Mapping[str, str] | None = None,
    session_factory: SessionFactory | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    max_unpacked: int = MAX_UNPACKED,
) -> BundleFiles:
    """Download the `.tar.zst` at `url`, verify its sha256, unpack it as `dest_dir`.

    `dest_dir` must not exist; its parent is created if needed and must be on the
    filesystem where the files will stay (they are staged beside it and renamed).
    `size` (bytes, when known) bounds the download. `expect` maps manifest fields to the
    values they must have (e.g. the catalog entry's name, version, arch). `label` names
    what is being pulled in messages (default: "KIND bundle"). `session_factory` makes the
    aiohttp session (owned and closed by this call). A transfer with no byte for
    `read_timeout` seconds fails. On any error or cancellation nothing is left.
    """
    what = label or f"{kind} bundle"
    if kind not in ("image", "kernel"):
        raise InvalidArgument(f"bundle kind must be image or kernel, not {kind!r}")
    sha256 = sha256.lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise InvalidArgument(f"pulling {what}: {sha256!r} is not a sha256 hex digest")
    if urlsplit(url).scheme not in ("http", "https"):
        raise InvalidArgument(f"pulling {what}: bundle URL {url!r} is not http(s)")
    if dest_dir.exists() or dest_dir.is_symlink():
        raise AlreadyExists(f"pulling {what}: {dest_dir} already exists; remove it first")
    try:
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.bundle-", dir=dest_dir.parent))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BundleNoSpace(
                f"pulling {what}: no space left in {dest_dir.parent}: free disk space and retry"
            ) from None
        raise BundleError(f"pulling {what}: cannot create {dest_dir.parent}: {e}") from None
    try:
        if progress is not None:
            progress("download", f"downloading {url}")
        manifest, unpacked, n = await _download_and_unpack(
            url,
            sha256,
            size,
            staging,
            kind=kind,
            what=what,
            progress=progress,
            expect=expect,
            session_factory=session_factory,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_unpacked=max_unpacked,
        )
        if dest_dir.exists() or dest_dir.is_symlink():
            raise AlreadyExists(f"pulling {what}: {dest_dir} appeared meanwhile; retry")
        fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o755)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(staging, dest_dir)
    except BaseException:
        # Synchronous on purpose: it must complete even while the task is being cancelled.
        rmtree(staging, ignore_errors=True)  # iterative: any depth
        raise
    if progress is not None:
        progress(
            "unpacked",
            f"{kind} {manifest.name} {manifest.version}: {unpacked // (1 << 20)} MiB",
        )

    def opt(name: str) -> Path | None:
        p = dest_dir / name
        return p if os.path.lexists(p) else None

    files = BundleFiles(
        kind=kind,
        dir=dest_dir,
        manifest=manifest,
        sha256=sha256,
        download_size=n,
        unpacked_size=unpacked,
    )
    if kind == "image":
        return replace(files, rootfs=dest_dir / "rootfs.ext4", work_seed=opt("work-seed.ext4"))
    return replace(
        files,
        vmlinux=dest_dir / "vmlinux",
        bzimage=opt("bzImage"),
        initrd=opt("initrd.img"),
        modules_dir=opt(MODULES),
    )


async def _download_and_unpack(
    url: str,
    sha256: str,
    size: int | None,
    staging: Path,
    *,
    kind: Kind,
    what: str,
    progress: Progress | None,
    expect: Mapping[str, str] | None,
    session_factory: SessionFactory | None,
    connect_timeout: float,
    read_timeout: float,
    max_unpacked: int,
) -> tuple[BundleManifest, int, int]:
    """(manifest, bytes unpacked, bytes downloaded); the staging dir is filled on success."""
    loop = asyncio.get_running_loop()
    pipe = ThreadPipe(loop)
    unpacker = _Unpacker(
        staging, kind, pipe, label=what, url=url, expect=expect, max_unpacked=max_unpacked
    )
    worker: asyncio.Future[tuple[BundleManifest, int]] = asyncio.ensure_future(
        asyncio.to_thread(unpacker.run)
    )
    h = hashlib.sha256()
    n = 0
    meter = DownloadMeter(progress, size)
    try:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        session = (
            session_factory()
            if session_factory is not None
            else aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        )
        try:
            async with session.get(
                url,
                headers={"Accept-Encoding": "identity"},
                timeout=timeout,
                auto_decompress=False,
                read_bufsize=CHUNK,
            ) as resp:
                _check_response(resp, url, what, size)
                feeding = True
                async for chunk in resp.content.iter_chunked(CHUNK):
                    n += len(chunk)
                    if size is not None and n > size:
                        raise BundleDigestMismatch(
                            f"pulling {what}: bundle {url} is larger than the {size} bytes the "
                            "catalog says: the URL serves a different file; nothing was kept"
                        )
                    h.update(chunk)
                    meter.add(len(chunk))
                    if feeding:
                        err = worker_error(worker)
                        if err is None:
                            await pipe.put(chunk, worker)
                        elif isinstance(err, _FORMAT_ERRORS):
                            # Keep hashing: if the bytes were tampered with, that is the
                            # real cause of the format error and the better message.
                            feeding = False
                        else:
                            break  # no space, I/O error: nothing to gain from the rest
        except aiohttp.ClientPayloadError as e:
            raise BundleTruncated(
                f"pulling {what}: download of {url} was cut off after {n} of "
                f"{size if size is not None else '?'} bytes ({e or 'connection closed'}): "
                "retry; nothing was kept"
            ) from None
        except TimeoutError:
            raise Timeout(
                f"pulling {what}: {urlsplit(url).netloc} sent nothing for {read_timeout:.0f}s "
                f"while downloading {url} ({n} bytes in): check the network and retry"
            ) from None
        except aiohttp.ClientError as e:
            raise Unavailable(
                f"pulling {what}: cannot download {url}: {e or type(e).__name__}: check the "
                "network and retry"
            ) from None
        finally:
            await session.close()
        err = worker_error(worker)
        if err is not None and not isinstance(err, _FORMAT_ERRORS):
            raise err
        if size is not None and n < size:
            raise BundleTruncated(
                f"pulling {what}: download of {url} ended after {n} of {size} bytes: the "
                "connection was cut; retry; nothing was kept"
            )
        got = h.hexdigest()
        if got != sha256:
            raise BundleDigestMismatch(
                f"pulling {what}: bundle {url} failed verification: expected sha256 "
                f"{sha256}, got {got}: the download was corrupted or tampered with; nothing "
                "was kept"
            )
        if progress is not None:
            progress("verify", f"sha256 {sha256[:12]} verified")
        pipe.close()
        # Shielded: the worker must never be cancelled under a running thread.
        manifest, unpacked = await asyncio.shield(worker)
        return manifest, unpacked, n
    except BaseException as exc:
        pipe.abort()
        cancelled_meanwhile = await settle(worker)
        if cancelled_meanwhile and not isinstance(exc, asyncio.CancelledError):
            raise asyncio.CancelledError() from exc
        raise


def _check_response(resp: aiohttp.ClientResponse, url: str, what: str, size: int | None) -> None:
    if resp.status in (404, 410):
        raise NotFound(
            f"pulling {what}: bundle {url} is gone (HTTP {resp.status}): the catalog entry "
            "is out of date; upgrade stoker or point STOKER_CATALOG at a current catalog"
        )
    if resp.status != 200:
        raise Unavailable(
            f"pulling {what}: downloading {url} failed: HTTP {resp.status} "
            f"{resp.reason or ''}: retry later"
        )
    cl = resp.content_length
    if size is not None and cl is not None and cl != size:
        raise BundleDigestMismatch(
            f"pulling {what}: {url} offers {cl} bytes but the catalog says {size}: the URL "
            "serves a different file; nothing was kept"
        )


async def fetch_catalog_entry(
    entry: CatalogImage | CatalogKernel,
    dest_dir: Path,
    *,
    progress: Progress | None = None,
    session_factory: SessionFactory | None = None,
    read_timeout: float = READ_TIMEOUT,
) -> BundleFiles:
    """`fetch_bundle` for a catalog entry: its URL, sha256, size, and a manifest that
    must agree with the entry's name, version and arch (and kernel_ref for images)."""
    kind: Kind = "image" if isinstance(entry, CatalogImage) else "kernel"
    expect = {"name": entry.name, "version": entry.version, "arch": entry.arch}
    if isinstance(entry, CatalogImage):
        expect["kernel_ref"] = entry.kernel_ref
    return await fetch_bundle(
        entry.url,
        entry.sha256,
        entry.size,
        dest_dir,
        kind=kind,
        progress=progress,
        label=f"{kind} {entry.name}",
        expect=expect,
        session_factory=session_factory,
        read_timeout=read_timeout,
    )


__all__ = [
    "BundleFiles",
    "BundleManifest",
    "Progress",
    "SessionFactory",
    "fetch_bundle",
    "fetch_catalog_entry",
]
