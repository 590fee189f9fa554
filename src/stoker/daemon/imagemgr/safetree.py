"""Symlink-safe file operations inside an untrusted tree, and tree walks without recursion.

An unpacked image or bundle is attacker-controlled: any name in it may be a symlink to a
host path (`etc/.fstab.stoker-tmp -> /root/.ssh/authorized_keys`). `SafeTree` never hands
such a name to a path-based call. It holds a directory fd on the root and walks each
guest path one component at a time with `O_NOFOLLOW | O_DIRECTORY` directory fds (what
`openat2(RESOLVE_IN_ROOT)` does, which Python's stdlib lacks): a symlink among the
parents is followed the way the guest will follow it (an absolute target starts again at
the root, `..` stops at the root), so every result stays inside the tree. The final
component is followed only by readers that ask for it. Files are created as
`O_CREAT | O_EXCL | O_NOFOLLOW` temporaries in the resolved directory, `fchmod`/`fchown`ed
on the fd, and renamed over the target within that directory (atomic, and a rename
replaces a symlink rather than writing through it).

Only one directory fd is open at a time besides the root's (`..` is reopened relative to
the current directory), so a deep tree or a long chain of links cannot run out of fds.

`walk_lstat` and `rmtree` visit trees of any depth iteratively (Python 3.11's `os.walk` and
`shutil.rmtree` recurse, and a layer 1,100 directories deep makes them raise
RecursionError), relative to directory fds so no path ever grows past PATH_MAX.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import TracebackType

from stoker.errors import InvalidArgument

MAX_LINKS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TooLarge(InvalidArgument):
    """A file read from an untrusted tree is over the size stoker is willing to read."""


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _swap(old: int, new: int) -> int:
    os.close(old)
    return new


class SafeTree:
    """Operations on guest paths inside the directory `root`, never leaving it.

    Use as a context manager (or call `close`). `chown_root` makes created files and
    directories root:root (it defaults to "running as root").
    """

    def __init__(self, root: Path, *, chown_root: bool | None = None) -> None:
        self.root = Path(root)
        try:
            self.fd = os.open(self.root, _DIR_FLAGS)
        except OSError as e:
            raise InvalidArgument(
                f"{self.root} is not a directory stoker can work in ({e.strerror}); a tree "
                "root must be a real directory, not a symlink"
            ) from None
        self.chown_root = os.geteuid() == 0 if chown_root is None else chown_root

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SafeTree:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- resolution ---------------------------------------------------------------------

    def _own(self, name: str, dir_fd: int) -> None:
        if self.chown_root:
            os.chown(name, 0, 0, dir_fd=dir_fd, follow_symlinks=False)

    def _mkdir(self, name: str, dir_fd: int, mode: int) -> None:
        os.mkdir(name, mode, dir_fd=dir_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            if self.chown_root:
                os.fchown(fd, 0, 0)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def resolve(
        self, guest_path: str, *, create: bool = False, follow_last: bool = False
    ) -> tuple[int, list[str], str | None] | None:
        """(fd of the parent directory, its components from the root, last name).

        The caller closes the fd. The last name is None when the path is a directory
        reached by `..` or is the root itself (the fd is then that directory). Parents
        that are missing (or files in the way) are created as 0755 directories with
        `create`; without it, None is returned for a missing parent.
        """
        todo = list(reversed(_parts(guest_path)))
        fd = os.dup(self.fd)
        names: list[str] = []
        hops = 0
        try:
            while todo:
                c = todo.pop()
                if c == "..":
                    if names:
                        fd = _swap(fd, os.open("..", _DIR_FLAGS, dir_fd=fd))
                        names.pop()
                    continue
                try:
                    st: os.stat_result | None = os.stat(c, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                last = not todo
                if st is not None and stat.S_ISLNK(st.st_mode) and (follow_last or not last):
                    hops += 1
                    if hops > MAX_LINKS:
                        raise InvalidArgument(
                            f"too many symlinks resolving {guest_path} in {self.root}"
                        )
                    target = os.readlink(c, dir_fd=fd)
                    if target.startswith("/"):
                        fd = _swap(fd, os.dup(self.fd))
                        names = []
                    todo.extend(reversed(_parts(target)))
                    continue
                if last:
                    out = fd
                    fd = -1
                    return out, names, c
                if st is None or not stat.S_ISDIR(st.st_mode):
                    if not create:
                        return None
                    if st is not None:
                        os.unlink(c, dir_fd=fd)  # a file where a directory must be
                    self._mkdir(c, fd, 0o755)
                fd = _swap(fd, os.open(c, _DIR_FLAGS, dir_fd=fd))
                names.append(c)
            out = fd
            fd = -1
            return out, names, None
        finally:
            if fd >= 0:
                os.close(fd)

    def _parent(self, guest_path: str) -> tuple[int, list[str], str]:
        got = self.resolve(guest_path, create=True)
        assert got is not None
        fd, names, name = got
        if name is None:
            os.close(fd)
            raise InvalidArgument(f"{guest_path} is a directory in {self.root}, not a file")
        return fd, names, name

    def opendir(self, guest_dir: str, *, create: bool = False) -> int | None:
        """An fd on the directory `guest_dir` (links followed inside the root), or None.

        With `create`, missing directories are made (0755) and a file or dangling link in
        the way is replaced.
        """
        got = self.resolve(guest_dir, create=create, follow_last=True)
        if got is None:
            return None
        fd, _, name = got
        if name is None:
            return fd
        try:
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                if not create:
                    return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
            self._mkdir(name, fd, 0o755)
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)

    # --- reading ------------------------------------------------------------------------

    def read(self, guest_path: str, limit: int) -> bytes | None:
        """The regular file at `guest_path` (links followed inside the root), or None.

        Anything but a regular file (FIFO, device, directory) is None: it is opened
        non-blocking and checked with fstat, so a FIFO cannot hang the reader. Over
        `limit` bytes raises `TooLarge`.
        """
        got = self.resolve(guest_path, follow_last=True)
        if got is None:
            return None
        dfd, _, name = got
        try:
            if name is None:
                return None
            try:
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(name, flags, dir_fd=dfd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EACCES):
                    return None
                raise
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            if st.st_size > limit:
                raise TooLarge(
                    f"{guest_path} in the image is {st.st_size} bytes, over the {limit} bytes "
                    "stoker reads from an image: the image is broken or hostile; fix the file "
                    "or use another image"
                )
            chunks: list[bytes] = []
            got_n = 0
            while True:
                b = os.read(fd, min(1 << 20, limit + 1 - got_n))
                if not b:
                    break
                chunks.append(b)
                got_n += len(b)
                if got_n > limit:
                    raise TooLarge(
                        f"{guest_path} in the image grew past the {limit} bytes stoker reads "
                        "from an image: the image is broken or hostile"
                    )
            return b"".join(chunks)
        finally:
            os.close(fd)

    def lstat(self, guest_path: str) -> os.stat_result | None:
        """lstat of the final component (parents resolved inside the root), or None."""
        got = self.resolve(guest_path)
        if got is None:
            return None
        fd, _, name = got
        try:
            if name is None:
                return os.fstat(fd)
            try:
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
        finally:
            os.close(fd)

    # --- writing ------------------------------------------------------------------------

    def write(self, guest_path: str, data: bytes, mode: int) -> None:
        """Atomically replace `guest_path` with a regular file holding `data`.

        A symlink at the final component is replaced, never followed; a directory there
        is an error.
        """
        dfd, _, name = self._parent(guest_path)
        try:
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(
                    f"{guest_path} is a directory in {self.root}: cannot write a file there"
                )
            tmp = f".{name[:200]}.stoker-tmp-{secrets.token_hex(6)}"
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dfd,
            )
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    if self.chown_root:
                        os.fchown(fd, 0, 0)
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
        finally:
            os.close(dfd)

    def symlink(self, guest_path: str, target: str) -> None:
        """Make `guest_path` a symlink to `target`, replacing a file or link there."""
        dfd, _, name = self._parent(guest_path)
        try:
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(
                    f"{guest_path} is a directory in {self.root}: cannot make a link there"
                )
            # Made under a temporary name and renamed over: the link is always a new
            # inode (owners.OwnerLedger tells the layers' inodes from stoker's by number).
            tmp = f".{name[:200]}.stoker-{secrets.token_hex(6)}"
            os.symlink(target, tmp, dir_fd=dfd)
            try:
                self._own(tmp, dfd)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
        finally:
            os.close(dfd)

    def unlink(self, guest_path: str) -> bool:
        """Remove the file or symlink at `guest_path` (never a directory); True if removed."""
        got = self.resolve(guest_path)
        if got is None:
            return False
        dfd, _, name = got
        try:
            if name is None:
                return False
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if stat.S_ISDIR(st.st_mode):
                return False
            os.unlink(name, dir_fd=dfd)
            return True
        finally:
            os.close(dfd)

    def real_dir(self, guest_dir: str, mode: int) -> Path:
        """Make `guest_dir` a real directory (a symlink or file there is *replaced*, not
        followed), set its mode and owner, and return its host path, which passes through
        no symlink below the root."""
        dfd, names, name = self._parent(guest_dir)
        try:
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=dfd)
                st = None
            if st is None:
                self._mkdir(name, dfd, mode)
            fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            try:
                if self.chown_root:
                    os.fchown(fd, 0, 0)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            return self.root.joinpath(*names, name)
        finally:
            os.close(dfd)

    def remove_matching(self, guest_dir: str, match: Callable[[str], bool]) -> list[str]:
        """Unlink every non-directory in `guest_dir` whose name `match(name)` accepts."""
        fd = self.opendir(guest_dir)
        if fd is None:
            return []
        removed: list[str] = []
        try:
            for name in os.listdir(fd):
                if not match(name):
                    continue
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=fd)
                    removed.append(name)
        finally:
            os.close(fd)
        return removed


# --- checks for host-side consumers of a tree ------------------------------------------------


def check_no_symlink(path: Path, within: Path | None = None) -> None:
    """Refuse `path` if it is a symlink or, below `within`, passes through one.

    For tools that follow a source path on the host (`mkfs.ext4 -d`): an image's /root as
    a link to `/proc/self/root/<host dir>` must never be handed to them.
    """
    path = Path(os.path.abspath(path))
    checks = [path]
    if within is not None:
        base = Path(os.path.abspath(within))
        if path != base and base not in path.parents:
            raise InvalidArgument(f"{path} is not inside {base}")
        checks = [p for p in [path, *path.parents] if p == base or base in p.parents]
    for p in checks:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue  # not a link; the caller reports what is missing
        if stat.S_ISLNK(st.st_mode):
            raise InvalidArgument(
                f"refusing to read {path}: {p} is a symlink, and following it could reach "
                "files outside the tree"
            )


# --- iterative walks ---------------------------------------------------------------------


def _walk(fd: int) -> Generator[tuple[int, str, os.stat_result | None], None, None]:
    """Everything below the directory open at `fd`, depth first, without recursion.

    Yields `(dir_fd, name, lstat)` for each entry, and `(dir_fd, name, None)` once the
    directory `name` has been left (`dir_fd` is then its parent's), so a caller may remove
    it. Symlinks are reported, never followed; directories are entered relative to their
    parent's fd, so depth is bounded by nothing but the tree. The walk owns `fd` and
    closes whichever directory it holds when it ends.
    """
    entered: list[str] = []
    pending: list[list[str]] = []
    try:
        while True:
            subdirs: list[str] = []
            for name in os.listdir(fd):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield fd, name, st
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(name)
            pending.append(subdirs)
            while not pending[-1]:
                pending.pop()
                if not entered:
                    return
                fd = _swap(fd, os.open("..", _DIR_FLAGS, dir_fd=fd))
                yield fd, entered.pop(), None
            name = pending[-1].pop()
            fd = _swap(fd, os.open(name, _DIR_FLAGS, dir_fd=fd))
            entered.append(name)
    finally:
        os.close(fd)


def walk_lstat(root: Path) -> Iterator[os.stat_result]:
    """lstat of `root` and of everything below it, depth first, without recursion
    (symlinks reported, never followed)."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        yield os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    with contextlib.closing(_walk(fd)) as walk:
        for _, _, st in walk:
            if st is not None:
                yield st


def rmtree(path: Path | str, *, ignore_errors: bool = False) -> None:
    """Delete `path` and everything below it, without recursion and never following a
    symlink (a link is removed, its target left alone). A missing `path` is fine."""
    try:
        _rmtree(Path(path))
    except OSError:
        if not ignore_errors:
            raise


def _rmtree(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    with contextlib.closing(_walk(os.open(path, _DIR_FLAGS))) as walk:
        for dir_fd, name, sub in walk:
            if sub is None:
                os.rmdir(name, dir_fd=dir_fd)  # left, and empty now
            elif not stat.S_ISDIR(sub.st_mode):
                os.unlink(name, dir_fd=dir_fd)
    os.rmdir(path)
