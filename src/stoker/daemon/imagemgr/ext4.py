"""ext4 images without mounting: build from a tree, edit single files, grow, clone.

Everything here uses e2fsprogs on image files: `mkfs.ext4 -d` populates a new filesystem
from a directory, `debugfs -w` edits one in place, `resize2fs` grows it. Nothing needs a
loop device, a mount or device-mapper, so it works unprivileged on files the caller owns
(owners other than the caller's need root only where the *source tree* needs it).

debugfs reports most failures on stderr while still exiting 0, so every call here checks
stderr against the few messages that are expected (see `_debugfs`).
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stoker.daemon.imagemgr.owners import OwnerSource, ext4_fixup
from stoker.daemon.imagemgr.safetree import check_no_symlink, walk_lstat
from stoker.errors import CommandFailed, InvalidArgument, NotFound
from stoker.runner import Runner

MIB = 1024**2
GIB = 1024**3

MKFS_TIMEOUT = 600.0
DEBUGFS_TIMEOUT = 60.0
FSCK_TIMEOUT = 600.0
RESIZE_TIMEOUT = 600.0
COPY_TIMEOUT = 600.0

_TYPE_BITS = {
    "regular": stat.S_IFREG,
    "directory": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "character special": stat.S_IFCHR,
    "block special": stat.S_IFBLK,
    "FIFO": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
}
_STAT_TYPE = re.compile(r"Type:\s+(.+?)\s+Mode:\s+(\d+)")
_STAT_OWNER = re.compile(r"User:\s+(\d+)\s+Group:\s+(\d+)")
_STAT_SIZE = re.compile(r"Size:\s+(\d+)")


@dataclass(frozen=True)
class Ext4Stat:
    """What debugfs says about one inode."""

    path: str
    kind: str  # "regular", "directory", "symlink", ...
    mode: int  # permission bits only (e.g. 0o755)
    uid: int
    gid: int
    size: int

    @property
    def is_dir(self) -> bool:
        return self.kind == "directory"

    @property
    def is_file(self) -> bool:
        return self.kind == "regular"


# --- sizing ---------------------------------------------------------------------------


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes, inodes) a directory tree occupies; hardlinked files count once.

    Iterative (`safetree.walk_lstat`): a tree of any depth is fine.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    count = 0
    walk = walk_lstat(root)
    next(walk)  # the root itself: counted below
    for st in walk:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if key in seen:
                continue
            seen.add(key)
        count += 1
        # Apparent size, rounded to the 4 KiB block it will take in the image.
        total += (st.st_size + 4095) // 4096 * 4096 if not stat.S_ISDIR(st.st_mode) else 4096
    return total, count + 1


def size_for_content(content: int, *, factor: float = 1.5, minimum: int = GIB) -> int:
    """Image size for `content` bytes: content x factor, at least `minimum`, MiB-aligned."""
    size = max(int(content * factor), minimum)
    return (size + MIB - 1) // MIB * MIB


# --- build ----------------------------------------------------------------------------


async def build_from_dir(
    runner: Runner,
    src: Path,
    out: Path,
    size: int | None = None,
    *,
    label: str | None = None,
    journal: bool = True,
    reserved_percent: int = 0,
    within: Path | None = None,
    ledger: OwnerSource | None = None,
) -> None:
    """Create the sparse ext4 image `out` holding a copy of the tree `src`.

    `size` in bytes; None sizes it from the content (`size_for_content`). The image root
    is 0755 root:root whatever `src` itself is (mkfs does not copy the root directory's
    attributes; use `set_mode` after to change it). Owners, modes, xattrs, hardlinks,
    symlinks and device nodes in the tree are kept. The file appears atomically: a
    failed build leaves nothing at `out`.

    mkfs follows `src` itself on the host, so a `src` that is a symlink, or that passes
    through one below `within` (the untrusted tree it was taken from), is refused: an
    image's /root linked to a host directory would otherwise be copied into the image.

    `ledger` (with `within`: the tree it was recorded for, `src` inside it) sets the
    owners, modes and devices an unprivileged unpack recorded (`owners.ext4_fixup`).
    """
    check_no_symlink(src, within)
    if not src.is_dir():
        raise NotFound(f"cannot build an ext4 image from {src}: not a directory")
    content, inodes = await asyncio.to_thread(tree_usage, src)
    if size is None:
        size = size_for_content(content)
    size = (size + MIB - 1) // MIB * MIB
    if content + content // 10 + 16 * MIB > size:
        raise InvalidArgument(
            f"{src} holds about {content // MIB} MiB, too much for a {size // MIB} MiB "
            "ext4 image: give a larger size"
        )
    # Enough inodes for the tree even when the files are tiny, never fewer than the
    # default ratio would give (a work disk is grown later and must stay usable).
    inode_args = ["-i", "16384"]
    if inodes + inodes // 4 + 256 > size // 16384:
        inode_args = ["-N", str(inodes + inodes // 4 + 256)]
    argv = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-b",
        "4096",
        "-m",
        str(reserved_percent),
        *inode_args,
        "-E",
        "root_owner=0:0",
        "-d",
        str(src),
    ]
    if label:
        argv += ["-L", label[:16]]
    if not journal:
        argv += ["-O", "^has_journal"]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        fd = -1
        await runner.run([*argv, str(tmp)], timeout=MKFS_TIMEOUT)
        if ledger is not None:
            await ext4_fixup(runner, tmp, ledger, within or src, src)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


async def grow(runner: Runner, image: Path, size: int) -> None:
    """Grow the ext4 in `image` (file and filesystem) to `size` bytes; never shrinks.

    The filesystem is checked first: resize2fs refuses one that was mounted since its
    last check, which is every work disk after a VM ran.
    """
    size = (size + MIB - 1) // MIB * MIB
    if image.stat().st_size >= size:
        return
    await fsck(runner, image)
    os.truncate(image, size)
    await runner.run(["resize2fs", str(image)], timeout=RESIZE_TIMEOUT)


async def fsck(runner: Runner, image: Path) -> None:
    """Check (and safely repair) the filesystem in `image`; raise if it needs a human."""
    res = await runner.run(["e2fsck", "-f", "-p", str(image)], check=False, timeout=FSCK_TIMEOUT)
    # 0: clean, 1: errors fixed. Anything else means it could not be fixed unattended.
    if res.returncode not in (0, 1):
        raise CommandFailed(
            f"the filesystem in {image} is damaged (e2fsck exit {res.returncode}): "
            f"{(res.err or res.out).strip()[-1000:]}; run `e2fsck -f {image}` by hand"
        )


async def clone_grow(runner: Runner, seed: Path, out: Path, size: int) -> None:
    """Copy the ext4 image `seed` to `out` (sparse) and grow it to `size` bytes.

    `out` appears atomically; a smaller `size` than the seed keeps the seed's size.
    """
    if not seed.is_file():
        raise NotFound(f"work seed {seed} does not exist: rebuild or re-pull the image")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        await runner.run(["cp", "--sparse=always", "--", str(seed), str(tmp)], timeout=COPY_TIMEOUT)
        await grow(runner, tmp, size)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- debugfs editing --------------------------------------------------------------------


def _check_path(path: str) -> str:
    if not path.startswith("/") or '"' in path or "\n" in path or "\x00" in path:
        raise InvalidArgument(
            f"ext4 path {path!r} must be absolute and free of quotes and newlines"
        )
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise InvalidArgument(f"ext4 path {path!r} must not contain '..'")
    return "/" + "/".join(parts)


def _q(path: str) -> str:
    return f'"{path}"'


# stderr lines debugfs prints for steps we run knowing they may be no-ops. ("mkdir" of an
# existing name is not one of them: callers never issue it, see mkdir_p.)
_BENIGN = (
    re.compile(r"^debugfs \d"),
    re.compile(r"^rm: File not found by ext2_lookup"),
    re.compile(r"^\s*$"),
)


async def _debugfs(
    runner: Runner, image: Path, commands: Sequence[str], *, write: bool = True
) -> str:
    """Run debugfs commands on `image`; raise CommandFailed on any unexpected stderr."""
    if not image.is_file():
        raise NotFound(f"ext4 image {image} does not exist")
    script = "".join(c + "\n" for c in commands).encode()
    argv = ["debugfs", *(["-w"] if write else []), "-f", "-", str(image)]
    res = await runner.run(argv, input=script, timeout=DEBUGFS_TIMEOUT)
    bad = [line for line in res.err.splitlines() if not any(p.search(line) for p in _BENIGN)]
    if bad:
        raise CommandFailed(
            f"debugfs on {image} failed: {'; '.join(bad)[-1000:]} "
            f"(commands: {'; '.join(commands)[-500:]})"
        )
    return res.out


def _parse_stat(path: str, text: str) -> Ext4Stat | None:
    m = _STAT_TYPE.search(text)
    if m is None:
        return None
    owner = _STAT_OWNER.search(text)
    size = _STAT_SIZE.search(text)
    return Ext4Stat(
        path=path,
        kind=m.group(1),
        mode=int(m.group(2), 8) & 0o7777,
        uid=int(owner.group(1)) if owner else 0,
        gid=int(owner.group(2)) if owner else 0,
        size=int(size.group(1)) if size else 0,
    )


async def stat_many(
    runner: Runner, image: Path, paths: Sequence[str]
) -> dict[str, Ext4Stat | None]:
    """`stat_path` for several paths in one debugfs run."""
    checked = list(dict.fromkeys(_check_path(p) for p in paths))
    if not image.is_file():
        raise NotFound(f"ext4 image {image} does not exist")
    if not checked:
        return {}
    script = "".join(f"stat {_q(p)}\n" for p in checked).encode()
    res = await runner.run(
        ["debugfs", "-f", "-", str(image)], input=script, timeout=DEBUGFS_TIMEOUT
    )
    # debugfs echoes each command as "debugfs: CMD" on stdout, then its output.
    sections = re.split(r"^debugfs: stat .*$", res.out, flags=re.M)[1:]
    if len(sections) != len(checked):
        raise CommandFailed(f"debugfs could not stat paths in {image}: {res.err.strip()}")
    return {p: _parse_stat(p, text) for p, text in zip(checked, sections, strict=True)}


async def stat_path(runner: Runner, image: Path, path: str) -> Ext4Stat | None:
    """The inode at `path` in the image, or None if nothing is there."""
    path = _check_path(path)
    if not image.is_file():
        raise NotFound(f"ext4 image {image} does not exist")
    res = await runner.run(
        ["debugfs", "-R", f"stat {_q(path)}", str(image)], timeout=DEBUGFS_TIMEOUT
    )
    st = _parse_stat(path, res.out)
    if st is None and "File not found" not in res.err:
        raise CommandFailed(f"debugfs could not stat {path} in {image}: {res.err.strip()}")
    return st


async def exists(runner: Runner, image: Path, path: str) -> bool:
    """True when something (file, directory, link...) is at `path` in the image."""
    return await stat_path(runner, image, path) is not None


async def set_mode(
    runner: Runner, image: Path, path: str, mode: int, uid: int = 0, gid: int = 0
) -> None:
    """Set permission bits and owner of an existing inode (its type is kept)."""
    path = _check_path(path)
    st = await stat_path(runner, image, path)
    if st is None:
        raise NotFound(f"{path} does not exist in {image}")
    full = _TYPE_BITS.get(st.kind, 0) | (mode & 0o7777)
    await _debugfs(
        runner,
        image,
        [
            f"sif {_q(path)} mode 0{full:o}",
            f"sif {_q(path)} uid {uid}",
            f"sif {_q(path)} gid {gid}",
        ],
    )


def _parents(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


async def mkdir_p(
    runner: Runner, image: Path, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0
) -> None:
    """Create `path` and missing parents; the leaf gets `mode`/owner even if it existed.

    Missing parents are created 0755 root:root. A non-directory in the way is an error.
    """
    path = _check_path(path)
    if path == "/":
        await set_mode(runner, image, "/", mode, uid, gid)
        return
    chain = [*_parents(path), path]
    found = await stat_many(runner, image, chain)
    for p in chain:
        st = found[p]
        if st is not None and not st.is_dir:
            raise CommandFailed(
                f"cannot create directory {path} in {image}: a {st.kind} is in the way at {p}"
            )
    # Only the missing ones: debugfs's mkdir over an existing name corrupts the
    # filesystem (e2fsprogs 1.47.0 allocates the new inode before failing).
    cmds = [f"mkdir {_q(p)}" for p in chain if found[p] is None]
    cmds += [
        f"sif {_q(path)} mode 0{stat.S_IFDIR | (mode & 0o7777):o}",
        f"sif {_q(path)} uid {uid}",
        f"sif {_q(path)} gid {gid}",
    ]
    await _debugfs(runner, image, cmds)


@dataclass(frozen=True)
class FileEntry:
    """One regular file for `write_files`."""

    path: str
    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


async def write_files(
    runner: Runner, image: Path, files: Iterable[FileEntry], *, make_parents: bool = True
) -> None:
    """Write regular files into the image in one debugfs run, replacing what was there.

    Missing parent directories are created 0755 root:root when `make_parents`. A directory
    at a file's path is an error (debugfs would otherwise leave it alone silently).
    """
    entries = [FileEntry(_check_path(f.path), f.data, f.mode, f.uid, f.gid) for f in files]
    if not entries:
        return
    if any(f.path == "/" for f in entries):
        raise InvalidArgument("cannot write a file over the image's root directory")
    # Check first: debugfs carries on after a failed step, and `sif ... mode` on a
    # directory that `rm` refused to remove would turn it into a corrupt "file".
    parents = {p for f in entries for p in _parents(f.path)}
    found = await stat_many(runner, image, [*parents, *(f.path for f in entries)])
    for p in sorted(parents):
        st = found[p]
        if st is not None and not st.is_dir:
            raise CommandFailed(f"cannot write under {p} in {image}: it is a {st.kind}")
        if st is None and not make_parents:
            raise NotFound(f"directory {p} does not exist in {image}")
    for f in entries:
        st = found[f.path]
        if st is not None and st.is_dir:
            raise CommandFailed(f"cannot write {f.path} in {image}: a directory is there")
    with tempfile.TemporaryDirectory(prefix="stoker-debugfs-") as tmp:
        cmds: list[str] = []
        made: set[str] = set()
        for i, f in enumerate(entries):
            src = Path(tmp) / str(i)
            src.write_bytes(f.data)
            if make_parents:
                for p in _parents(f.path):
                    if p not in made and found[p] is None:
                        made.add(p)
                        cmds.append(f"mkdir {_q(p)}")
            cmds += [
                f"rm {_q(f.path)}",
                f"write {_q(str(src))} {_q(f.path)}",
                f"sif {_q(f.path)} mode 0{stat.S_IFREG | (f.mode & 0o7777):o}",
                f"sif {_q(f.path)} uid {f.uid}",
                f"sif {_q(f.path)} gid {f.gid}",
            ]
        await _debugfs(runner, image, cmds)


async def write_file(
    runner: Runner,
    image: Path,
    path: str,
    data: bytes,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
) -> None:
    """Write one regular file into the image (parents made 0755 root:root)."""
    await write_files(runner, image, [FileEntry(path, data, mode, uid, gid)])


async def read_file(runner: Runner, image: Path, path: str) -> bytes:
    """The content of the regular file at `path` in the image."""
    path = _check_path(path)
    st = await stat_path(runner, image, path)
    if st is None:
        raise NotFound(f"{path} does not exist in {image}")
    if not st.is_file:
        raise InvalidArgument(f"{path} in {image} is a {st.kind}, not a regular file")
    res = await runner.run(
        ["debugfs", "-R", f"cat {_q(path)}", str(image)], timeout=DEBUGFS_TIMEOUT
    )
    if len(res.stdout) != st.size:
        raise CommandFailed(
            f"debugfs read {len(res.stdout)} of {st.size} bytes of {path} in {image}: "
            f"{res.err.strip()}"
        )
    return res.stdout


async def remove(runner: Runner, image: Path, path: str, *, missing_ok: bool = True) -> None:
    """Remove a file, symlink or empty directory from the image."""
    path = _check_path(path)
    st = await stat_path(runner, image, path)
    if st is None:
        if missing_ok:
            return
        raise NotFound(f"{path} does not exist in {image}")
    verb = "rmdir" if st.is_dir else "rm"
    await _debugfs(runner, image, [f"{verb} {_q(path)}"])
    if await stat_path(runner, image, path) is not None:
        raise CommandFailed(f"could not remove {path} from {image} (a non-empty directory?)")
