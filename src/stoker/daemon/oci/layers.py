"""Replay image layers, in order, into one directory: the merged root filesystem.

Each layer is a tar (plain, gzip or zstd; detected by magic bytes, not trusted from the
media type) applied on top of the tree built so far, with the OCI changeset rules:
`.wh.NAME` deletes NAME from the layers below, `.wh..wh..opq` in a directory hides
everything the layers below put there.

Layers are untrusted input and this runs as root, so every path is handled without
following symlinks out of the tree:

- entry names that are absolute or contain `..` are rejected;
- the parent directories of an entry are resolved one component at a time inside the
  root: a symlink among them is followed the way it will be inside the VM (an absolute
  target starts again at the image root), and one that climbs above the root is rejected;
- the final component is never followed: an existing symlink there is replaced, and
  files are created with O_EXCL | O_NOFOLLOW;
- hardlink targets must be existing non-directories inside the tree;
- character and block devices are created only when allowed (by default they are).

Owners, modes (setuid/setgid/sticky included), mtimes, xattrs, symlinks and hardlinks
are preserved so `mkfs.ext4 -d` can carry them into the image. Run by a user that is not
root, the applier cannot chown or mknod: it keeps the real owner, mode, device numbers
(and the xattrs it may not set) in an `OwnerLedger` and leaves stand-ins on disk (see
`imagemgr/owners.py`); `owners.ext4_fixup` then sets them in the built image.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import math
import os
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, cast

import zstandard

from stoker.daemon.imagemgr.owners import Meta, OwnerLedger, standin_mode
from stoker.daemon.imagemgr.safetree import rmtree, walk_lstat
from stoker.daemon.oci.errors import (
    LayerTooLarge,
    NoSpace,
    OCIError,
    UnsafeLayer,
    UnsupportedImage,
)
from stoker.errors import Cancelled

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
COPY_CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_REGULAR_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
# Longest path (bytes, relative to the image root) an entry may land at. mke2fs 1.47's
# `-d` aborts with heap corruption ("realloc(): invalid next size") past ~2040 bytes, and
# no real image comes near: refuse such a layer rather than crash a root process on it.
MAX_TREE_PATH = 1536
# |mtime| in seconds past which the nanoseconds no longer fit a timespec (year ~2514).
_MAX_MTIME = 1 << 34


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


class _Escape(Exception):
    def __init__(self, link: str) -> None:
        super().__init__(link)
        self.link = link


class _NotDir(Exception):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class _TooManyLinks(Exception):
    pass


def _join(parts: Sequence[str]) -> str:
    return "/".join(parts)


def resolve_dirs(
    root: str,
    parts: Sequence[str],
    *,
    create: bool,
    clamp: bool = False,
    known: Sequence[str] | None = None,
    on_mkdir: Callable[[str], None] | None = None,
) -> list[str] | None:
    """Resolve `parts` as a chain of directories inside `root`; return the real components.

    Symlinks are followed as if `root` were `/`. A relative target that climbs above the
    root raises `_Escape` (or stops at the root with `clamp`). Missing directories are
    created (0755, owned by the caller; `on_mkdir(path)` is told) with `create`, else None
    is returned. `known` is
    the already-resolved form of `parts[:-1]`: only the last component is then looked at
    (so a layer of deeply nested entries costs O(depth) per entry, not O(depth^2)).
    """
    if known is not None and parts:
        resolved: list[str] = list(known)
        todo = [parts[-1]]
    else:
        resolved = []
        todo = list(reversed(parts))
    hops = 0
    current_link = ""
    while todo:
        c = todo.pop()
        if c in ("", "."):
            continue
        if c == "..":
            if resolved:
                resolved.pop()
            elif not clamp:
                raise _Escape(current_link)
            continue
        p = "/".join([root, *resolved, c])  # clean names: no os.path.join cost
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(p, 0o755)
            if on_mkdir is not None:
                on_mkdir(p)
            resolved.append(c)
            continue
        if stat.S_ISDIR(st.st_mode):
            resolved.append(c)
        elif stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise _TooManyLinks(_join([*resolved, c]))
            current_link = _join([*resolved, c])
            target = os.readlink(p)
            if target.startswith("/"):
                resolved = []
            todo.extend(reversed(target.split("/")))
        else:
            raise _NotDir(_join([*resolved, c]))
    return resolved


def lookup(root: Path, relpath: str) -> Path | None:
    """The host path of `relpath` inside `root` following symlinks as the guest would,
    never leaving `root`; None if it does not exist. Read-only: nothing is created."""
    parts = [p for p in relpath.split("/") if p]
    r = str(root)
    for _ in range(MAX_SYMLINK_HOPS):
        if not parts:
            return Path(r)
        try:
            parent = resolve_dirs(r, parts[:-1], create=False, clamp=True)
        except (_NotDir, _TooManyLinks):
            return None
        if parent is None:
            return None
        last = parts[-1]
        if last == "..":
            parts = [*parent[:-1]]
            continue
        if last == ".":
            parts = parent
            continue
        p = os.path.join(r, *parent, last)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            return Path(p)
        target = os.readlink(p)
        base = [] if target.startswith("/") else parent
        parts = [*base, *[t for t in target.split("/") if t]]
    return None


class _ForwardReader:
    """A decompressed stream that tarfile's random-access mode can read.

    tarfile's stream mode ("r|") re-slices its whole read buffer on every small read,
    which is quadratic for layers of many small files. Random-access mode only ever
    seeks forward when reading members in order, so skipping ahead is all we need.
    """

    def __init__(self, src: IO[bytes], limit: int | None = None, on_over: Any = None) -> None:
        self._src = src
        self._pos = 0
        self._limit = limit
        self._on_over = on_over

    def read(self, n: int = -1) -> bytes:
        if self._limit is not None and (n < 0 or n > self._limit + 1 - self._pos):
            n = self._limit + 1 - self._pos  # never inflate more than one byte past it
        b = self._src.read(n)
        self._pos += len(b)
        if self._limit is not None and self._pos > self._limit:
            self._on_over()
        return b

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            pos += self._pos
        elif whence != os.SEEK_SET:
            raise io.UnsupportedOperation("cannot seek from the end of a layer stream")
        if pos < self._pos:
            raise io.UnsupportedOperation("cannot seek backwards in a layer stream")
        while self._pos < pos:
            b = self.read(min(COPY_CHUNK, pos - self._pos))
            if not b:
                break
        return self._pos


@contextlib.contextmanager
def open_layer(
    path: Path, *, limit: int | None = None, on_over: Callable[[], NoReturn] | None = None
) -> Iterator[IO[bytes]]:
    """A decompressed byte stream of a layer blob (gzip, zstd or plain tar).

    The stream supports the forward-only `seek`/`tell` tarfile needs; a plain tar is the
    file itself. With `limit`, `on_over()` is called (and must raise) as soon as the
    decompressed stream passes `limit` bytes: a 2 MiB gzip can expand to terabytes.
    """
    with open(path, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic[:2] == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield cast(IO[bytes], _ForwardReader(cast(IO[bytes], gz), limit, on_over))
        elif magic == ZSTD_MAGIC:
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(raw, read_size=COPY_CHUNK, read_across_frames=True) as zs:
                yield cast(IO[bytes], _ForwardReader(zs, limit, on_over))
        else:
            if limit is not None and os.fstat(raw.fileno()).st_size > limit and on_over:
                on_over()
            yield raw


def _remove(path: str) -> bool:
    """Delete whatever is at `path` without following it; True if it was a dir or link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        rmtree(path)  # iterative: a layer may be thousands of directories deep
        return True
    os.unlink(path)
    return stat.S_ISLNK(st.st_mode)


class LayerApplier:
    """Applies layers one after another onto `root`; call `finish` after the last one.

    Blocking (run it in a thread). `cancel` is polled between entries and chunks so a
    cancelled pull stops touching the tree promptly. `label` (the image ref) prefixes
    every error message.
    """

    def __init__(
        self,
        root: Path,
        *,
        label: str,
        allow_devices: bool | None = None,
        cancel: threading.Event | None = None,
        max_layer_size: int | None = None,
        max_path: int | None = MAX_TREE_PATH,
        ledger: OwnerLedger | None = None,
    ) -> None:
        """`ledger` forces the unprivileged mode (stand-ins + ledger) even as root."""
        self.root = Path(root)
        self.max_layer_size = max_layer_size
        self.max_path = max_path
        self._root = str(self.root)
        self.label = label
        self.allow_devices = True if allow_devices is None else allow_devices
        self.cancel = cancel or threading.Event()
        self._as_root = os.geteuid() == 0 if ledger is None else False
        # Not root: owners, modes and devices go to the ledger (None as root).
        self.ledger: OwnerLedger | None = None if self._as_root else (ledger or OwnerLedger())
        self._dir_cache: dict[tuple[str, ...], list[str]] = {}
        self._dir_times: dict[str, int] = {}
        self._written: set[str] = set()
        self._ancestors: set[str] = set()
        self._layer = ""
        self._entry = ""
        self._buf = memoryview(bytearray(COPY_CHUNK))
        self._denied_xattrs: list[tuple[str, bytes]] = []
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)

    # --- errors -------------------------------------------------------------------------

    def _unsafe(self, problem: str) -> NoReturn:
        raise UnsafeLayer(
            f"pulling {self.label}: layer {self._layer} entry {self._entry!r} {problem}: "
            "refusing the image (it is broken or malicious)"
        )

    def _too_large(self) -> NoReturn:
        limit = self.max_layer_size or 0
        raise LayerTooLarge(
            f"pulling {self.label}: layer {self._layer} decompresses to more than "
            f"{_human(limit)} (max_layer_size): refusing it; if the image is genuine, raise "
            "max_layer_size in config.toml and pull again"
        )

    def _check_meta(self, m: tarfile.TarInfo) -> None:
        """Refuse metadata that is nonsense before any of it reaches a system call."""
        for what, text in (("path", m.name), ("link target", m.linkname)):
            if "\x00" in text:
                self._unsafe(f"has a NUL byte in its {what}")
        for what, num in (("uid", m.uid), ("gid", m.gid)):
            if not isinstance(num, int) or not 0 <= num < 0xFFFFFFFF:
                self._unsafe(f"has an out-of-range {what} {num!r}")
        mt = m.mtime
        if not isinstance(mt, int | float) or not math.isfinite(mt) or abs(mt) >= _MAX_MTIME:
            self._unsafe(f"has an invalid mtime {mt!r}")
        if self.ledger is not None and any(c in m.name for c in "\n\r"):
            self._unsafe(
                "has a newline or carriage return in its name, which a stokerd that is "
                "not root cannot carry into the image"
            )
        if m.ischr() or m.isblk():
            for what, num in (("major", m.devmajor), ("minor", m.devminor)):
                if not isinstance(num, int) or not 0 <= num < 1 << 32:
                    self._unsafe(f"has an out-of-range device {what} number {num!r}")

    # --- paths --------------------------------------------------------------------------

    def _split(self, name: str, what: str = "path") -> list[str]:
        if name.startswith("/"):
            self._unsafe(f"has an absolute {what} {name!r}")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            self._unsafe(f"has a {what} {name!r} containing '..' (path traversal)")
        return parts

    def _parent(self, parts: Sequence[str], *, create: bool) -> list[str] | None:
        key = tuple(parts)
        hit = self._dir_cache.get(key)
        if hit is not None:
            return hit
        known = self._dir_cache.get(key[:-1]) if key else None
        try:
            resolved = resolve_dirs(
                self._root, parts, create=create, known=known, on_mkdir=self._on_mkdir
            )
        except _Escape as e:
            self._unsafe(
                f"would be written through symlink {e.link!r}, which points outside the image root"
            )
        except _NotDir as e:
            self._unsafe(f"needs {e.path!r} to be a directory, but it is not")
        except _TooManyLinks as e:
            self._unsafe(f"goes through a symlink loop at {e.args[0]!r}")
        if resolved is not None:
            self._dir_cache[key] = resolved
        return resolved

    def _on_mkdir(self, path: str) -> None:
        # A new inode: whatever a reused inode number was recorded as no longer holds.
        if self.ledger is not None:
            self.ledger.forget(os.lstat(path).st_ino)

    def _record(self, target: str | int, m: tarfile.TarInfo, kind: int, rdev: int = 0) -> None:
        """Keep `m`'s owner and mode for the new inode at `target` (not root)."""
        assert self.ledger is not None
        st = os.fstat(target) if isinstance(target, int) else os.lstat(target)
        self.ledger.record(
            st.st_ino,
            Meta(kind, m.mode & 0o7777, m.uid, m.gid, rdev, tuple(self._denied_xattrs)),
        )

    def _host(self, rel: list[str]) -> str:
        return "/".join([self._root, *rel]) if rel else self._root

    def _clear(self, path: str) -> None:
        if _remove(path):
            self._dir_cache.clear()

    def _mark_written(self, rel: str) -> None:
        self._written.add(rel)
        parent = rel
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if parent in self._ancestors:
                break
            self._ancestors.add(parent)

    # --- layers -------------------------------------------------------------------------

    def apply(self, blob: Path, *, digest: str) -> None:
        """Apply one layer blob on top of the tree."""
        self._layer = digest
        self._written = set()
        self._ancestors = set()
        try:
            with open_layer(blob, limit=self.max_layer_size, on_over=self._too_large) as stream:
                tf = tarfile.open(fileobj=stream, mode="r:")  # noqa: SIM115
                while True:
                    if self.cancel.is_set():
                        raise Cancelled(f"pulling {self.label}: cancelled")
                    m = tf.next()
                    if m is None:
                        break
                    self._entry = m.name
                    self._apply_member(tf, m)
                    # tarfile keeps every TarInfo otherwise; hardlinks are resolved
                    # against the tree, not this list.
                    tf.members = []  # type: ignore[attr-defined]
        except (ValueError, OverflowError) as e:
            # Metadata `_check_meta` did not foresee (e.g. an xattr name with a NUL).
            self._unsafe(f"has metadata stoker cannot apply ({e})")
        except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError) as e:
            raise OCIError(
                f"pulling {self.label}: layer {digest} is not a valid tar stream ({e}): the "
                "image is corrupt on the registry"
            ) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise NoSpace(
                    f"pulling {self.label}: no space left on the device holding {self.root} "
                    f"while unpacking layer {digest}: free disk space and retry"
                ) from None
            if isinstance(e, gzip.BadGzipFile):
                raise OCIError(
                    f"pulling {self.label}: layer {digest} is not valid gzip ({e}): the image "
                    "is corrupt on the registry"
                ) from None
            raise OCIError(
                f"pulling {self.label}: unpacking layer {digest} failed at {self._entry!r}: {e}"
            ) from e

    def finish(self) -> None:
        """Set directory mtimes last (creating their children changed them).

        A later layer may have turned a parent of a recorded directory into a symlink, so
        each one is reached with `O_NOFOLLOW` directory fds and skipped when any component
        is no longer a real directory: a path-based utime would follow that link to the host.
        """
        for rel, ns in sorted(self._dir_times.items(), key=lambda kv: -kv[0].count("/")):
            fd = self._open_real_dir(rel.split("/"))
            if fd is None:
                continue
            try:
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)
        if self.ledger is not None:
            self.ledger.freeze(self.root)

    def _open_real_dir(self, parts: list[str]) -> int | None:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._root, flags)
        for c in parts:
            try:
                nfd = os.open(c, flags, dir_fd=fd)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
            os.close(fd)
            fd = nfd
        return fd

    # --- entries ------------------------------------------------------------------------

    def _apply_member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self._check_meta(m)
        if self.max_path is not None and len(m.name) > self.max_path:
            self._unsafe(f"has a name of {len(m.name)} characters, over the {self.max_path} "
                         "stoker accepts (mkfs.ext4 cannot copy such a tree)")  # fmt: skip
        parts = self._split(m.name)
        if not parts:
            return  # the root itself: stays root:root 0755
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts[:-1], base)
            return
        parent = self._parent(parts[:-1], create=True)
        assert parent is not None
        rel = [*parent, base]
        relstr = _join(rel)
        if self.max_path is not None and len(relstr.encode("utf-8", "surrogateescape")) > (
            self.max_path
        ):
            self._unsafe(
                f"lands at a path of {len(relstr.encode('utf-8', 'surrogateescape'))} bytes, "
                f"over the {self.max_path} stoker accepts (mkfs.ext4 cannot copy such a tree)"
            )
        path = self._host(rel)
        self._mark_written(relstr)
        if m.isdir():
            self._make_dir(path, relstr, m)
        elif m.type in _REGULAR_TYPES or m.issparse():
            self._clear(path)
            self._make_file(tf, m, path)
        elif m.issym():
            self._clear(path)
            os.symlink(m.linkname, path)
            self._chown(path, m)
            self._utime(path, m)
            if self.ledger is not None:
                self._denied_xattrs = []
                self._record(path, m, stat.S_IFLNK)
        elif m.islnk():
            self._make_hardlink(m, path)
        elif m.ischr() or m.isblk():
            if not self.allow_devices:
                self._unsafe("is a device node, and device nodes are not allowed here")
            self._clear(path)
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            rdev = os.makedev(m.devmajor, m.devminor)
            if self.ledger is None:
                os.mknod(path, kind | 0o600, rdev)
                self._meta(path, m)
            else:
                # Not root: an empty file stands in; the fix-up makes the node in the image.
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                os.close(fd)
                self._meta(path, m, kind, rdev)
        elif m.isfifo():
            self._clear(path)
            os.mkfifo(path, 0o600)
            self._meta(path, m, stat.S_IFIFO)
        else:
            raise UnsupportedImage(
                f"pulling {self.label}: layer {self._layer} entry {m.name!r} has unsupported "
                f"tar type {m.type!r}"
            )

    def _whiteout(self, parent_parts: list[str], base: str) -> None:
        parent = self._parent(parent_parts, create=False)
        if parent is None:
            return  # nothing below to hide
        if base == OPAQUE_MARKER:
            self._opaque(parent)
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", "..") or name.startswith(WHITEOUT_PREFIX):
            self._unsafe("is a malformed whiteout")
        rel = [*parent, name]
        relstr = _join(rel)
        # A whiteout hides only what *lower* layers put there (OCI image spec, "Whiteouts"):
        # an entry this layer wrote stays; a directory this layer wrote into keeps this
        # layer's entries and loses the lower layers' ones.
        if relstr in self._written:
            return
        if relstr in self._ancestors:
            self._opaque(rel)
            return
        self._clear(self._host(rel))

    def _opaque(self, parent: list[str]) -> None:
        """Drop what lower layers put under `parent`, keeping this layer's entries."""
        stack = [parent]
        while stack:
            d = stack.pop()
            host = self._host(d)
            try:
                names = os.listdir(host)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                rel = [*d, name]
                relstr = _join(rel)
                if relstr in self._written or relstr in self._ancestors:
                    if os.path.isdir(self._host(rel)) and not os.path.islink(self._host(rel)):
                        stack.append(rel)
                else:
                    self._clear(self._host(rel))

    def _make_dir(self, path: str, relstr: str, m: tarfile.TarInfo) -> None:
        try:
            st = os.lstat(path)
            is_dir = stat.S_ISDIR(st.st_mode)
        except FileNotFoundError:
            st, is_dir = None, False
        if st is not None and not is_dir:
            self._clear(path)
        if not is_dir:
            os.mkdir(path, 0o700)
        self._chown(path, m)
        if self.ledger is None:
            os.chmod(path, m.mode & 0o7777)  # never a symlink: we just made it
            self._xattrs(path, m)
        else:
            # user.* xattrs need write permission on the inode: before the stand-in mode.
            self._xattrs(path, m)
            os.chmod(path, standin_mode(stat.S_IFDIR))
            self._record(path, m, stat.S_IFDIR)
        self._dir_times[relstr] = int(m.mtime * 1_000_000_000)

    def _make_file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> None:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            src = tf.extractfile(m)
            if src is not None:
                view = self._buf
                with src:
                    while True:
                        if self.cancel.is_set():
                            raise Cancelled(f"pulling {self.label}: cancelled")
                        n = src.readinto(view)  # type: ignore[attr-defined]
                        if not n:
                            break
                        out = view[:n]
                        while out:
                            out = out[os.write(fd, out) :]
            if self._as_root:
                os.fchown(fd, m.uid, m.gid)
            # chmod after chown: chown clears setuid/setgid.
            if self.ledger is None:
                os.fchmod(fd, m.mode & 0o7777)
                self._xattrs(fd, m)
            else:
                self._xattrs(fd, m)  # while still 0600: user.* needs write permission
                os.fchmod(fd, standin_mode(stat.S_IFREG))
                self._record(fd, m, stat.S_IFREG)
            ns = int(m.mtime * 1_000_000_000)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def _make_hardlink(self, m: tarfile.TarInfo, path: str) -> None:
        src_parts = self._split(m.linkname, "hardlink target")
        if not src_parts:
            self._unsafe("is a hardlink to the image root")
        src_parent = self._parent(src_parts[:-1], create=False)
        src = self._host([*src_parent, src_parts[-1]]) if src_parent is not None else None
        try:
            st = os.lstat(src) if src is not None else None
        except FileNotFoundError:
            st = None
        if src is None or st is None:
            self._unsafe(f"is a hardlink to {m.linkname!r}, which does not exist in the image")
        if stat.S_ISDIR(st.st_mode):
            self._unsafe(f"is a hardlink to directory {m.linkname!r}")
        if os.path.normpath(src) == os.path.normpath(path):
            return
        self._clear(path)
        os.link(src, path, follow_symlinks=False)

    # --- metadata -----------------------------------------------------------------------

    def _chown(self, path: str, m: tarfile.TarInfo) -> None:
        if self._as_root:
            os.chown(path, m.uid, m.gid, follow_symlinks=False)

    def _utime(self, path: str, m: tarfile.TarInfo) -> None:
        ns = int(m.mtime * 1_000_000_000)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def _meta(self, path: str, m: tarfile.TarInfo, kind: int = 0, rdev: int = 0) -> None:
        self._chown(path, m)
        if self.ledger is None:
            os.chmod(path, m.mode & 0o7777)  # never a symlink: we just made it
            self._xattrs(path, m)
        else:
            self._xattrs(path, m)  # while still 0600: user.* needs write permission
            os.chmod(path, standin_mode(kind))
            self._record(path, m, kind, rdev)
        self._utime(path, m)

    def _xattrs(self, target: str | int, m: tarfile.TarInfo) -> None:
        """Set `m`'s xattrs; when not root only user.* ones, the others are kept in
        `_denied_xattrs` for the ledger."""
        self._denied_xattrs = []
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr.") :]
            # tarfile decodes PAX values as UTF-8 with surrogateescape; undo that.
            raw = value.encode("utf-8", "surrogateescape")
            if self.ledger is not None and not name.startswith("user."):
                # Not root: only user.* on disk. A POSIX ACL would rewrite the stand-in's
                # mode (and be rewritten by it); security.capability and trusted.* need
                # privilege. The fix-up sets them in the image, after the mode.
                self._denied_xattrs.append((name, raw))
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, raw)
                else:
                    os.setxattr(target, name, raw, follow_symlinks=False)
            except OSError as e:
                # Unsupported namespaces (e.g. user.* on a device node) are not fatal.
                if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.EINVAL):
                    raise


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes, inodes) the tree needs: file sizes rounded to 4 KiB blocks, hardlinks once.

    Iterative (`safetree.walk_lstat`), so a layer thousands of directories deep is fine.
    """
    total = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    block = 4096
    for st in walk_lstat(root):
        if stat.S_ISDIR(st.st_mode):
            total += block
            inodes += 1
            continue
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
        inodes += 1
        if stat.S_ISREG(st.st_mode):
            total += (st.st_size + block - 1) // block * block
        elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
            total += block
    return total, inodes


def detect(root: Path) -> tuple[bool, bool]:
    """(has_systemd, has_sshd) of a root filesystem tree, resolving links inside it."""

    def is_exec(rel: str) -> bool:
        p = lookup(root, rel)
        if p is None:
            return False
        try:
            st = os.stat(p, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode)

    has_systemd = any(is_exec(p) for p in ("usr/lib/systemd/systemd", "lib/systemd/systemd"))
    has_sshd = any(
        is_exec(p)
        for p in ("usr/sbin/sshd", "sbin/sshd", "usr/bin/sshd", "bin/sshd", "usr/local/sbin/sshd")
    )
    return has_systemd, has_sshd
