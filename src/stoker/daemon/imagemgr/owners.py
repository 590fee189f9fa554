"""File owners, modes and device nodes for trees unpacked by a daemon that is not root.

`mkfs.ext4 -d` copies each file's owner and mode from the host tree (e2fsprogs 1.47.0 has
no owner mapping), and a process that is not root can neither chown nor mknod. So an
unprivileged unpack keeps what each entry *should* be in an `OwnerLedger` and leaves a
plain stand-in on disk, and after `mkfs.ext4 -d` one `debugfs -w` run sets the real
metadata in the image (`ext4_fixup`):

- every inode the layers make is recorded (type, permission bits with setuid/setgid/
  sticky, uid, gid, device numbers) by inode number while unpacking; creating an inode
  overwrites any stale record for a reused number;
- on disk it gets a *stand-in mode* (`DIR_STANDIN` 0711 for directories, `STANDIN` 0400
  for everything else): owner-readable so mkfs can copy it, never setuid/setgid (a
  setuid-to-the-daemon binary from a hostile image would be a gift), directories
  owner-writable so later layers can write into them; a character or block device is an
  empty regular file;
- `freeze` (end of the unpack) turns the records into path -> (inode, metadata) by walking
  the tree. A record then applies to a path only while that path still holds the same
  inode, of the same type, with the stand-in mode still on it: anything stoker's own
  post-processing replaced (`SafeTree` writes new inodes and renames them over) or chmod'ed
  in place is taken as it is on disk, owned 0:0, which is what a root daemon gets;
- everything without a record is 0:0 with its disk mode (directories the unpack had to
  make, stoker's injected files), as a root daemon would have made them.

`vm commit` (`commit.py`) reads the owners from the disks' listings instead and hands the
fix-up a `PathOwners` (path -> metadata); both are an `OwnerSource`.

debugfs commands are lines of space-separated words; `_quote` puts a name in double quotes
and doubles any quote inside (debugfs's `ss` parser reads `""` as one quote), so a name
cannot end its word early. A name with a newline or carriage return (debugfs reads its
command file line by line and cuts a line at either) or a NUL cannot be written at all and
is refused (`UnquotableName`), as is a line longer than debugfs's line buffer.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from stoker.errors import CommandFailed, InvalidArgument
from stoker.runner import Runner

DIR_STANDIN = 0o711
STANDIN = 0o400
FIXUP_TIMEOUT = 1800.0
# debugfs reads its command file with fgets(BUFSIZ = 8192): keep well inside one buffer.
MAX_LINE = 8000
MAX_NAME = 3900  # two names (ea_set) and the words around them fit MAX_LINE
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DEVICES = (stat.S_IFCHR, stat.S_IFBLK)
_BANNER = re.compile(r"^debugfs \d")


class UnquotableName(InvalidArgument):
    """A name debugfs cannot be given safely (newline, carriage return, NUL, too long)."""


@dataclass(frozen=True, slots=True)
class Meta:
    """What one inode must be in the image."""

    kind: int  # S_IFMT bits in the image (S_IFCHR for a device whose stand-in is a file)
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    rdev: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()  # ones the unpack could not set (EPERM)

    def standin_kind(self) -> int:
        return stat.S_IFREG if self.kind in _DEVICES else self.kind

    def standin_mode(self) -> int:
        if self.kind == stat.S_IFLNK:
            return 0o777
        return DIR_STANDIN if self.kind == stat.S_IFDIR else STANDIN


def standin_mode(kind: int) -> int:
    """The mode an unprivileged unpack leaves on disk for an entry of type `kind`."""
    return Meta(kind, 0, 0, 0).standin_mode()


@dataclass
class OwnerLedger:
    """The real metadata of an unprivileged unpack, by inode while unpacking, then by path."""

    live: dict[int, Meta] = field(default_factory=dict)
    frozen: dict[str, tuple[int, Meta]] | None = None

    def record(self, ino: int, meta: Meta) -> None:
        self.live[ino] = meta

    def forget(self, ino: int) -> None:
        self.live.pop(ino, None)

    def freeze(self, root: Path) -> None:
        """Bind each live record to the path(s) holding its inode now (end of the unpack)."""
        frozen: dict[str, tuple[int, Meta]] = {}
        for rel, st in walk_paths(root):
            meta = self.live.get(st.st_ino)
            if meta is not None and _matches(meta, st):
                frozen[rel] = (st.st_ino, meta)
        self.frozen = frozen
        self.live = {}

    def lookup(self, rel: str, st: os.stat_result) -> Meta | None:
        """The recorded metadata for `rel` if it still holds the recorded inode untouched."""
        if self.frozen is None:
            raise RuntimeError("OwnerLedger.lookup before freeze")
        hit = self.frozen.get(rel)
        if hit is None or hit[0] != st.st_ino or not _matches(hit[1], st):
            return None
        return hit[1]


class OwnerSource(Protocol):
    """What `fixup_commands` asks: the metadata `rel` must have in the image, or None."""

    def lookup(self, rel: str, st: os.stat_result) -> Meta | None: ...


@dataclass
class PathOwners:
    """Metadata by path, read from ext4 images (`vm commit`: `debugfs ls -p` of the base
    and the upper dir), for a tree `debugfs rdump` wrote as a user that is not root. A
    path applies while its type on disk is the recorded one."""

    by_path: dict[str, Meta] = field(default_factory=dict)

    def lookup(self, rel: str, st: os.stat_result) -> Meta | None:
        meta = self.by_path.get(rel)
        if meta is None or stat.S_IFMT(st.st_mode) != meta.kind:
            return None
        return meta


def _matches(meta: Meta, st: os.stat_result) -> bool:
    return stat.S_IFMT(st.st_mode) == meta.standin_kind() and (
        meta.kind == stat.S_IFLNK or stat.S_IMODE(st.st_mode) == meta.standin_mode()
    )


def walk_paths(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to `root`, lstat) of everything below `root`, parents first.

    Iterative, symlinks never followed, directories entered by `O_NOFOLLOW` fds relative
    to their parent (like `safetree.walk_lstat`), so depth and PATH_MAX do not matter.
    """
    stack: list[tuple[int, str]] = [(os.open(root, _DIR_FLAGS), "")]
    try:
        while stack:
            fd, prefix = stack.pop()
            try:
                for name in sorted(os.listdir(fd)):
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    rel = f"{prefix}/{name}" if prefix else name
                    yield rel, st
                    if stat.S_ISDIR(st.st_mode):
                        stack.append((os.open(name, _DIR_FLAGS, dir_fd=fd), rel))
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)


def _quote(text: str) -> bytes:
    if any(c in text for c in "\n\r\x00"):
        raise UnquotableName(
            f"name {text!r} has a newline, carriage return or NUL: a non-root stokerd "
            "cannot set its owner in the image (debugfs reads commands line by line); "
            "refusing it"
        )
    quoted = b'"' + text.encode("utf-8", "surrogateescape").replace(b'"', b'""') + b'"'
    if len(quoted) > MAX_NAME:
        raise UnquotableName(
            f"a path of {len(quoted)} bytes is too long for debugfs's command line: refusing it"
        )
    return quoted


def _line(*words: bytes) -> bytes:
    line = b" ".join(words)
    if len(line) >= MAX_LINE:
        raise UnquotableName(
            f"a path of {len(line)} bytes is too long for debugfs's command line: refusing it"
        )
    return line + b"\n"


def fixup_commands(
    ledger: OwnerSource, tree: Path, src: Path | None = None, *, xattr_dir: Path | None = None
) -> list[bytes]:
    """The debugfs lines that give the ext4 built from `src` (default `tree`, or a
    directory inside it) the owners, modes and devices `ledger` recorded for `tree`.

    `xattr_dir` receives one file per extended attribute the unpack could not set; without
    it such attributes are an error.
    """
    src = tree if src is None else src
    base = "" if src == tree else str(src.relative_to(tree))
    done: set[int] = set()
    out: list[bytes] = []
    n_attr = 0
    for rel, st in walk_paths(src):
        key = f"{base}/{rel}" if base else rel
        meta = ledger.lookup(key, st)
        disk_kind = stat.S_IFMT(st.st_mode)
        if meta is None:
            meta = Meta(disk_kind, stat.S_IMODE(st.st_mode), 0, 0)
        path = _quote("/" + rel)
        if meta.kind in _DEVICES:
            # One device node per path: a hardlinked device becomes separate nodes.
            parent, _, name = ("/" + rel).rpartition("/")
            kind = b"c" if meta.kind == stat.S_IFCHR else b"b"
            out += [
                _line(b"cd", _quote(parent or "/")),
                _line(b"rm", _quote(name)),
                _line(
                    b"mknod",
                    _quote(name),
                    kind,
                    str(os.major(meta.rdev)).encode(),
                    str(os.minor(meta.rdev)).encode(),
                ),
                _line(b"sif", path, b"mode", f"0{meta.kind | meta.mode:o}".encode()),
                _line(b"sif", path, b"uid", str(meta.uid).encode()),
                _line(b"sif", path, b"gid", str(meta.gid).encode()),
            ]
            continue
        if st.st_nlink > 1 and disk_kind != stat.S_IFDIR:
            if st.st_ino in done:
                continue
            done.add(st.st_ino)
        if meta.kind != stat.S_IFLNK and meta.mode != stat.S_IMODE(st.st_mode):
            out.append(_line(b"sif", path, b"mode", f"0{meta.kind | meta.mode:o}".encode()))
        if meta.uid != st.st_uid:
            out.append(_line(b"sif", path, b"uid", str(meta.uid).encode()))
        if meta.gid != st.st_gid:
            out.append(_line(b"sif", path, b"gid", str(meta.gid).encode()))
        for name, value in meta.xattrs:
            if xattr_dir is None:
                raise InvalidArgument(f"/{rel} has extended attributes and no place to stage them")
            f = xattr_dir / str(n_attr)
            n_attr += 1
            f.write_bytes(value)
            out.append(_line(b"ea_set", b"-f", _quote(str(f)), path, _quote(name)))
    return out


async def ext4_fixup(
    runner: Runner, image: Path, ledger: OwnerSource, tree: Path, src: Path | None = None
) -> int:
    """Apply `fixup_commands` to the ext4 `image` in one debugfs run; -> commands run.

    debugfs reports failures on stderr and still exits 0: any stderr line but its banner
    is an error (naming the first ones).
    """
    with tempfile.TemporaryDirectory(prefix="stoker-owners-") as tmp:
        cmds = fixup_commands(ledger, tree, src, xattr_dir=Path(tmp))
        if not cmds:
            return 0
        script = Path(tmp) / "commands"
        script.write_bytes(b"".join(cmds))
        res = await runner.run(
            ["debugfs", "-w", "-f", str(script), str(image)], timeout=FIXUP_TIMEOUT
        )
    bad = [line for line in res.err.splitlines() if line.strip() and not _BANNER.match(line)]
    if bad:
        raise CommandFailed(
            f"setting owners and modes in {image} failed: {'; '.join(bad[:5])[-1000:]}"
        )
    return len(cmds)
