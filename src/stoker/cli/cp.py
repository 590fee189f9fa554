"""`stoker vm cp SRC DST`: files and directories in and out of a VM, as a tar stream
through the guest agent's exec (modes, symlinks and mtimes kept; nothing staged whole).

Guest paths are resolved in the guest, by the guest's own shell and tar. On the host side
the guest's tar stream is hostile input: it is unpacked by `tarfile` with the `data` filter
(no absolute paths, no `..`, no links out, no device files) into a fresh directory next to
the destination, and only moved into place once complete, so a failed copy leaves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import stat
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from stoker.cli.render import err

STOKER_FAILED = 125

# Guest side of a copy out: pack one path. $1 = the guest path.
PACK = r"""
p=$1
[ -e "$p" ] || [ -L "$p" ] || {
  echo "stoker: $p: no such file or directory in the guest" >&2; exit 3; }
case $p in */) p=${p%/}; [ -n "$p" ] || p=/ ;; esac
[ "$p" != / ] || { echo "stoker: refusing to copy the whole guest root" >&2; exit 3; }
cd "$(dirname -- "$p")" || exit 3
exec tar -c --numeric-owner -f - -- "$(basename -- "$p")"
"""

# Guest side of a copy in: unpack a stream holding one entry named $2 at $1, docker-cp
# style (into $1 when it is a directory). $3 = "dir" or "file" (what is coming).
UNPACK = r"""
dst=$1 name=$2 kind=$3
if [ -d "$dst" ]; then
  parent=$dst final=$dst/$name
else
  parent=$(dirname -- "$dst") final=$dst
  [ -d "$parent" ] || {
    echo "stoker: $parent: no such directory in the guest (create it first)" >&2; exit 3; }
fi
if [ -d "$final" ] && [ ! -L "$final" ]; then
  echo "stoker: $final already exists and is a directory:" \
    "remove it or copy to a new name" >&2; exit 3
fi
if [ "$kind" = dir ] && { [ -e "$final" ] || [ -L "$final" ]; }; then
  echo "stoker: $final exists and is not a directory" >&2; exit 3
fi
tmp=$(mktemp -d "$parent/.stoker-cp.XXXXXX") || exit 3
trap 'rm -rf -- "$tmp"' EXIT
tar -x --no-same-owner -f - -C "$tmp" || exit 3
[ -e "$tmp/$name" ] || [ -L "$tmp/$name" ] || { echo "stoker: the copy arrived empty" >&2; exit 3; }
rm -f -- "$final"
mv -T -- "$tmp/$name" "$final"
"""


def split_ref(text: str) -> tuple[str | None, str]:
    """`NAME:/path` -> (NAME, /path); a host path -> (None, path). `./a:b` is a host path."""
    head, sep, rest = text.partition(":")
    if sep and head and "/" not in head:
        return head, rest
    return None, text


def register(vsub: Any) -> None:
    p = vsub.add_parser(
        "cp",
        help="copy files/directories between the host and a VM (NAME:/path)",
        description="stoker vm cp SRC DST, one side `NAME:/path` (a guest path, resolved in "
        "the guest). Files and directories, with modes, symlinks and mtimes; into DST when "
        "DST is an existing directory, else as DST (its parent must exist). Streamed "
        "through the guest agent.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="a host path, or NAME:/guest/path")
    p.add_argument("dst", help="a host path, or NAME:/guest/path (the other side of SRC)")
    p.set_defaults(func=vm_cp)


def vm_cp(args: argparse.Namespace) -> int:
    from stoker.errors import StokerError

    src_vm, src = split_ref(args.src)
    dst_vm, dst = split_ref(args.dst)
    if (src_vm is None) == (dst_vm is None):
        err(
            "give exactly one guest side as NAME:/path, e.g. `stoker vm cp ./f t1:/root/` or "
            "`stoker vm cp t1:/root/f .`"
        )
        return STOKER_FAILED
    try:
        if dst_vm is not None:
            return copy_in(args, Path(src), dst_vm, dst or "/root")
        assert src_vm is not None
        return copy_out(args, src_vm, src, Path(dst))
    except StokerError as e:
        err(e.message)
        return STOKER_FAILED
    except CopyError as e:
        err(str(e))
        return 1


class CopyError(Exception):
    """A copy that cannot be done; nothing was changed."""


def _exec(args: argparse.Namespace, name: str, params: dict[str, Any], **kw: Any) -> Any:
    """One agent exec for a copy; `kw` goes to AgentExec (out, err, feed, connect)."""
    from stoker.cli.vm import AgentExec

    ex = AgentExec(args, False, **kw)
    r = ex.run({"ref": name, **params})
    if r.get("transport") != "agent":
        raise CopyError(
            f"vm cp needs the guest agent, which cannot run commands here: {r.get('reason')}"
        )
    return r, ex


class _Capped:
    """Keeps the first 64 KiB written (the guest's stderr)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> int:
        if len(self.data) < 65536:
            self.data += b[: 65536 - len(self.data)]
        return len(b)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return self.data.decode(errors="replace").strip()


# --- host -> guest ------------------------------------------------------------------------


def _check_source(src: Path) -> str:
    """'dir' or 'file'; refuses special files anywhere in the tree."""
    try:
        st = src.lstat()
    except FileNotFoundError:
        raise CopyError(f"{src}: no such file or directory") from None
    if stat.S_ISDIR(st.st_mode):
        for root, dirs, files in os.walk(src):
            for n in dirs + files:
                _check_kind(Path(root) / n)
        return "dir"
    _check_kind(src)
    return "file"


def _check_kind(p: Path) -> None:
    m = p.lstat().st_mode
    if not (stat.S_ISREG(m) or stat.S_ISDIR(m) or stat.S_ISLNK(m)):
        raise CopyError(
            f"{p} is a special file (fifo, socket or device): vm cp copies regular files, "
            "directories and symlinks"
        )


class _StdinWriter:
    """A write-only file object for tarfile that sends 64 KiB chunks as exec stdin."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.buf = bytearray()
        self.closed_by_guest = False

    def write(self, b: bytes) -> int:
        self.buf += b
        while len(self.buf) >= 65536:
            self._flush(65536)
        return len(b)

    def _flush(self, n: int) -> None:
        chunk = bytes(self.buf[:n])
        del self.buf[:n]
        if not self.closed_by_guest and not self.send(chunk):
            self.closed_by_guest = True
            raise BrokenPipeError("the guest stopped reading")

    def close(self) -> None:
        if self.buf and not self.closed_by_guest:
            self._flush(len(self.buf))
        if not self.closed_by_guest:
            self.send(b"")


def copy_in(args: argparse.Namespace, src: Path, name: str, dst: str, connect: Any = None) -> int:
    kind = _check_source(src)
    arcname = src.resolve().name if src.name in ("", ".", "..") else src.name
    if not arcname:
        raise CopyError(f"{src}: cannot copy the host's root directory")

    def feed(send: Any) -> None:
        w = _StdinWriter(send)
        try:
            with tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
                tf.add(str(src), arcname=arcname, recursive=True)
        except BrokenPipeError:
            return
        w.close()

    errbuf = _Capped()
    r, ex = _exec(
        args,
        name,
        {"argv": ["sh", "-c", UNPACK, "sh", dst, arcname, kind]},
        out=_Capped(),
        err=errbuf,
        feed=feed,
        connect=connect,
    )
    if r["exit_code"] != 0:
        raise CopyError(errbuf.text() or f"the copy into {name}:{dst} failed ({r['exit_code']})")
    if ex.feed_error is not None:
        raise CopyError(f"reading {src} failed: {ex.feed_error}")
    return 0


# --- guest -> host ------------------------------------------------------------------------


class _Filter:
    """tarfile's `data` filter, except that symlinks may point anywhere (guest trees hold
    absolute and dangling links), modes keep their group/other write bits, and nothing is
    ever written at or through a symlink the stream itself made (which would let a link
    to /etc carry a later member out of the destination)."""

    def __init__(self) -> None:
        self.links: set[str] = set()

    def __call__(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        name = os.path.normpath(member.name.lstrip("/"))
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            if "/".join(parts[:i]) in self.links:
                raise tarfile.OutsideDestinationError(member, os.path.join(dest, name))
        if member.issym():
            # Check where the link itself lands with a harmless target, keep the real one.
            tarfile.data_filter(member.replace(linkname=".", deep=False), dest)
            self.links.add(name)
            return member.replace(mode=0o777, uid=0, gid=0, uname="", gname="", deep=False)
        m = tarfile.data_filter(member, dest)
        if m is not None and (member.isfile() or member.isdir()):
            m = m.replace(mode=member.mode & 0o777, deep=False)  # keep group/other write
        return m


def copy_out(args: argparse.Namespace, name: str, src: str, dst: Path, connect: Any = None) -> int:
    if dst.is_dir():
        parent, final = dst, None
    else:
        parent, final = dst.parent if str(dst.parent) else Path("."), dst.name
        if not parent.is_dir():
            raise CopyError(f"{parent}: no such directory on the host (create it first)")
    tmp = Path(tempfile.mkdtemp(prefix=".stoker-cp-", dir=parent))
    rfd, wfd = os.pipe()
    reader: IO[bytes] = os.fdopen(rfd, "rb")
    writer: IO[bytes] = os.fdopen(wfd, "wb")
    failure: list[BaseException] = []

    def unpack() -> None:
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tf:
                tf.extractall(str(tmp), filter=_Filter())
        except BaseException as e:
            failure.append(e)
        finally:
            with contextlib.suppress(OSError):
                while reader.read(65536):  # drain, so the stream never blocks
                    pass
            reader.close()

    t = threading.Thread(target=unpack, daemon=True)
    t.start()
    errbuf = _Capped()
    try:
        try:
            r, _ = _exec(
                args,
                name,
                {"argv": ["sh", "-c", PACK, "sh", src]},
                out=writer,
                err=errbuf,
                connect=connect,
            )
        finally:
            with contextlib.suppress(OSError):
                writer.close()
            t.join()
        if r["exit_code"] != 0:
            raise CopyError(
                errbuf.text() or f"the copy from {name}:{src} failed ({r['exit_code']})"
            )
        if failure:
            e = failure[0]
            why = str(e) if isinstance(e, (tarfile.TarError, OSError)) else repr(e)
            raise CopyError(f"refused what the guest sent for {name}:{src}: {why}")
        entries = os.listdir(tmp)
        if len(entries) != 1:
            raise CopyError(f"the guest sent {len(entries)} top-level entries for {name}:{src}")
        got = tmp / entries[0]
        target = parent / (final or entries[0])
        if target.is_dir() and not target.is_symlink():
            raise CopyError(
                f"{target} already exists and is a directory: remove it or copy to a new name"
            )
        if got.is_dir() and not got.is_symlink() and (target.exists() or target.is_symlink()):
            raise CopyError(f"{target} exists and is not a directory")
        os.replace(got, target)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
