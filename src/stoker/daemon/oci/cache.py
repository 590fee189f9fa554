"""Content-addressed blob cache shared by every pull (and every process) on the host.

Layout under the cache root:

    blobs/<algo>/<hex>          verified blobs, only ever created by rename
    tmp/<algo>-<hex>.<n>.partial  downloads in progress
    locks/<algo>-<hex>.pin      shared flock held by every pull that uses the blob
    locks/<algo>-<hex>.dl       exclusive flock held by the one download of the blob

A blob is hashed while it streams into `tmp/` and renamed under its digest only when
size and digest match, so a reader never sees a partial blob. Concurrent pulls of the same
digest coalesce on the `.dl` lock: the second waits, then finds the blob in place. `prune`
takes each `.pin` lock exclusively without waiting, so it skips every blob an in-flight
pull holds. flock (not an in-memory map) is what makes this hold across daemon restarts
and between separate `BlobCache` objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from stoker.daemon.oci.errors import DigestMismatch, NoSpace, TruncatedBlob, UnsupportedImage
from stoker.daemon.oci.registry import TruncatedTransfer
from stoker.errors import Timeout

BlobSource = Callable[[], AbstractAsyncContextManager[AsyncIterator[bytes]]]

_HEX = MappingProxyType(
    {"sha256": re.compile(r"^[0-9a-f]{64}$"), "sha512": re.compile(r"^[0-9a-f]{128}$")}
)
LOCK_POLL = 0.05
DEFAULT_LOCK_TIMEOUT = 3600.0


@dataclass(frozen=True)
class PruneResult:
    """What `prune` removed (or would remove, with `dry_run`)."""

    dry_run: bool
    bytes_freed: int
    removed: list[str] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)
    partials_removed: int = 0


def split_digest(digest: str, label: str = "") -> tuple[str, str]:
    """("sha256", hex) from "sha256:hex", or UnsupportedImage for anything else."""
    algo, _, hexpart = digest.partition(":")
    rx = _HEX.get(algo)
    if rx is None or not rx.match(hexpart):
        where = f"pulling {label}: " if label else ""
        raise UnsupportedImage(f"{where}unsupported or malformed digest {digest!r}")
    return algo, hexpart


def _try_flock(path: Path, flags: int) -> int | None:
    """Open and lock `path` without blocking; None when someone else holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, flags | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # prune may have unlinked the file between our open and our flock: a lock on an
        # orphaned inode protects nothing, so start again on the current file.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class BlobCache:
    """Blobs by digest under `root`; safe for concurrent pulls in one or many processes."""

    def __init__(self, root: Path, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.root = Path(root)
        self.lock_timeout = lock_timeout

    @property
    def blobs_dir(self) -> Path:
        """Verified blobs, by algorithm and hex digest."""
        return self.root / "blobs"

    @property
    def tmp_dir(self) -> Path:
        """Downloads in progress (same filesystem as the blobs, for atomic renames)."""
        return self.root / "tmp"

    @property
    def locks_dir(self) -> Path:
        """flock files: `.pin` (shared, per pull) and `.dl` (exclusive, per download)."""
        return self.root / "locks"

    def ensure_dirs(self) -> None:
        """Create the cache directories (private to the daemon's user)."""
        for d in (self.root, self.blobs_dir, self.tmp_dir, self.locks_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the verified blob `digest` lives (whether or not it is there yet)."""
        algo, hexpart = split_digest(digest)
        return self.blobs_dir / algo / hexpart

    def contains(self, digest: str, size: int | None = None) -> bool:
        """True when the blob is cached (and has `size` bytes, when given)."""
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def _lock_path(self, digest: str, kind: str) -> Path:
        algo, hexpart = split_digest(digest)
        return self.locks_dir / f"{algo}-{hexpart}.{kind}"

    async def _acquire(self, path: Path, flags: int, why: str) -> int:
        deadline = time.monotonic() + self.lock_timeout
        while True:
            fd = _try_flock(path, flags)
            if fd is not None:
                return fd
            if time.monotonic() > deadline:
                raise Timeout(f"{why}: still locked after {self.lock_timeout:.0f}s; retry")
            await asyncio.sleep(LOCK_POLL)

    @asynccontextmanager
    async def pinned(self, digests: Iterable[str], label: str = "") -> AsyncIterator[None]:
        """Keep `prune` away from these blobs for the duration of the block."""
        self.ensure_dirs()
        fds: list[int] = []
        try:
            for d in sorted(set(digests)):
                split_digest(d, label)
                fds.append(
                    await self._acquire(
                        self._lock_path(d, "pin"),
                        fcntl.LOCK_SH,
                        f"pulling {label}: waiting for cache prune to release {d}",
                    )
                )
            yield
        finally:
            for fd in fds:
                _unlock(fd)

    async def fetch(
        self,
        digest: str,
        size: int | None,
        source: BlobSource,
        *,
        label: str,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Path:
        """Return the cached blob, downloading it from `source` once if it is missing.

        The caller should hold a pin on `digest` (see `pinned`) so prune cannot remove
        the blob between this returning and the caller reading it.
        """
        self.ensure_dirs()
        algo, hexpart = split_digest(digest, label)
        final = self.blobs_dir / algo / hexpart
        if self.contains(digest, size):
            return final
        fd_lock = await self._acquire(
            self._lock_path(digest, "dl"),
            fcntl.LOCK_EX,
            f"pulling {label}: waiting for another download of {digest}",
        )
        try:
            # Whoever held the lock before us may have just finished this very blob.
            if self.contains(digest, size):
                return final
            with contextlib.suppress(FileNotFoundError):
                final.unlink()  # wrong size: a leftover from an older, broken cache
            final.parent.mkdir(mode=0o700, exist_ok=True)
            tmp = self.tmp_dir / f"{algo}-{hexpart}.{secrets.token_hex(4)}.partial"
            try:
                await self._download(tmp, algo, hexpart, digest, size, source, label, on_bytes)
                os.rename(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
            return final
        finally:
            _unlock(fd_lock)

    async def _download(
        self,
        tmp: Path,
        algo: str,
        hexpart: str,
        digest: str,
        size: int | None,
        source: BlobSource,
        label: str,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        h = hashlib.new(algo)
        n = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                async with source() as chunks:
                    async for chunk in chunks:
                        n += len(chunk)
                        if size is not None and n > size:
                            raise DigestMismatch(
                                f"pulling {label}: blob {digest} is larger than the "
                                f"{size} bytes its manifest declares: the registry served "
                                "different content; the image or registry is broken"
                            )
                        h.update(chunk)
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                # The rename publishes the blob; make sure its bytes are on disk first.
                await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
        except TruncatedTransfer as e:
            raise TruncatedBlob(
                f"pulling {label}: download of blob {digest} was cut off after {n} of "
                f"{size if size is not None else '?'} bytes ({e}): retry the pull"
            ) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise NoSpace(
                    f"pulling {label}: no space left in the image cache {self.root} while "
                    f"downloading blob {digest} ({size} bytes): free disk space or run "
                    "`stoker image cache prune`"
                ) from None
            raise
        if size is not None and n < size:
            raise TruncatedBlob(
                f"pulling {label}: download of blob {digest} ended after {n} of {size} "
                "bytes: the connection was cut; retry the pull"
            )
        got = h.hexdigest()
        if got != hexpart:
            raise DigestMismatch(
                f"pulling {label}: blob {digest} failed verification: its content hashes to "
                f"{algo}:{got}; the registry served tampered or corrupted data, nothing was "
                "kept"
            )

    def _blob_digests(self) -> list[tuple[str, Path]]:
        out: list[tuple[str, Path]] = []
        for algo, rx in _HEX.items():
            d = self.blobs_dir / algo
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                if rx.match(p.name):
                    out.append((f"{algo}:{p.name}", p))
        return out

    async def prune(self, *, dry_run: bool = False) -> PruneResult:
        """Remove every blob no in-flight pull holds, plus stale partial downloads.

        Reports the bytes freed (or that would be freed with `dry_run`). Blobs pinned by
        a running pull are listed in `in_use` and left alone.
        """
        self.ensure_dirs()
        return await asyncio.to_thread(self._prune_sync, dry_run)

    def _prune_sync(self, dry_run: bool) -> PruneResult:
        freed = 0
        removed: list[str] = []
        in_use: list[str] = []
        for digest, p in self._blob_digests():
            pin_path = self._lock_path(digest, "pin")
            fd = _try_flock(pin_path, fcntl.LOCK_EX)
            if fd is None:
                in_use.append(digest)
                continue
            try:
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    continue
                freed += size
                removed.append(digest)
                if not dry_run:
                    p.unlink(missing_ok=True)
                    # Unlinked under the lock: a waiter re-checks the inode and starts over.
                    pin_path.unlink(missing_ok=True)
                    dl_path = self._lock_path(digest, "dl")
                    fd_dl = _try_flock(dl_path, fcntl.LOCK_EX)
                    if fd_dl is not None:
                        dl_path.unlink(missing_ok=True)
                        _unlock(fd_dl)
            finally:
                _unlock(fd)
        partials = 0
        for t in sorted(self.tmp_dir.iterdir()) if self.tmp_dir.is_dir() else []:
            stem = t.name.split(".", 1)[0]
            algo, _, hexpart = stem.partition("-")
            if algo not in _HEX or not _HEX[algo].match(hexpart):
                continue
            fd = _try_flock(self._lock_path(f"{algo}:{hexpart}", "dl"), fcntl.LOCK_EX)
            if fd is None:
                continue  # a download is writing it right now
            try:
                try:
                    size = t.stat().st_size
                except FileNotFoundError:
                    continue
                freed += size
                partials += 1
                if not dry_run:
                    t.unlink(missing_ok=True)
            finally:
                _unlock(fd)
        return PruneResult(
            dry_run=dry_run,
            bytes_freed=freed,
            removed=removed,
            in_use=in_use,
            partials_removed=partials,
        )
