"""The prepare payload: one byte stream the guest's import script reads from stdin.

    STOKER-PAYLOAD 1
    pack LEN NAME    the pack of commits the guest lacks (LEN 0: none), named like git names it
    idx LEN          its index, built on the host so the guest does not re-hash every object
    shallow LEN      commit ids to add to the guest's .git/shallow, one a line
    delete LEN       NUL-terminated paths to remove
    rmdir LEN        NUL-terminated directories to remove when left empty
    restore LEN      NUL-terminated paths to write from the checked-out commit
    exec LEN         NUL-terminated paths to make executable
    noexec LEN       NUL-terminated paths to make non-executable
    ita LEN          NUL-terminated new paths to mark intent-to-add (`git add -N`)
    tar -1 | tar 0   a tar of the host files to overlay, to the end of the stream (or nothing)

The pack carries the history (a shallow cut, `.git/shallow` in the guest says where), so the
guest has real commits to diff against; the tar only carries files that differ from what the
guest can produce itself. Symlinks travel as links (never followed), file modes as git sees
them (0755 when the owner may execute, else 0644).
"""

from __future__ import annotations

import asyncio
import os
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from stoker.daemon.workspace.framing import frame, frame_header
from stoker.daemon.workspace.gitcmd import MODE_EXEC, MODE_LINK, git, join_z
from stoker.daemon.workspace.plan import Plan, ShipItem
from stoker.errors import CommandFailed, Conflict
from stoker.runner import Runner

PAYLOAD_MAGIC = b"STOKER-PAYLOAD 1\n"
CHUNK = 1 << 20
PACK_TIMEOUT = 1800.0
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_SMALL = 256 << 10  # reads below this size stay on the event loop thread


async def _pack(
    runner: Runner, plan: Plan, tmp: Path, compression: int, window: int
) -> tuple[str, Path, Path] | None:
    """Write the pack (+ index) of what the guest lacks into `tmp`; None when empty."""
    if not plan.pack_tips:
        return None
    revs = [*plan.pack_tips, *(f"--shallow {c}" for c in plan.pack_grafts)]
    if plan.pack_exclude:
        revs += ["--not", *plan.pack_exclude]
    res = await git(
        runner,
        plan.root,
        "-c",
        f"pack.compression={compression}",
        "pack-objects",
        "--revs",
        "-q",
        f"--window={window}",
        "--delta-base-offset",
        str(tmp / "pack"),
        input="".join(r + "\n" for r in revs).encode(),
        timeout=PACK_TIMEOUT,
    )
    name = res.out.strip()
    if len(name) != 40:
        raise CommandFailed(f"git pack-objects in {plan.root} printed no pack name")
    pack, idx = tmp / f"pack-{name}.pack", tmp / f"pack-{name}.idx"
    with open(pack, "rb") as f:
        header = f.read(12)
    if int.from_bytes(header[8:12], "big") == 0:
        return None
    return name, pack, idx


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while True:
            chunk = await asyncio.to_thread(f.read, CHUNK)
            if not chunk:
                return
            yield chunk


def _dir_info(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    return ti


def _header(ti: tarfile.TarInfo) -> bytes:
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _changed(path: str) -> Conflict:
    return Conflict(f"{path} changed while stoker was sending it: run prepare again")


async def _tar(root: Path, items: tuple[ShipItem, ...]) -> AsyncIterator[bytes]:
    """A tar stream of `items` read from `root`, parent directories before their files.

    Small pieces are coalesced into chunks of about CHUNK bytes; only large reads go to a
    worker thread, so thousands of small files do not pay a thread hop each.
    """
    made: set[str] = set()
    buf = bytearray()
    total = 0
    for item in items:
        parts = item.path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                buf += _header(_dir_info(d))
        full = os.path.join(root, item.path)
        ti = tarfile.TarInfo(item.path)
        try:
            st = os.lstat(full)
        except OSError:
            raise _changed(full) from None
        ti.mtime = int(st.st_mtime)
        if item.mode == MODE_LINK:
            if not stat.S_ISLNK(st.st_mode):
                raise _changed(full)
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.readlink(full)
            ti.mode = 0o777
            buf += _header(ti)
            continue
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise _changed(full) from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _changed(full)
            ti.size = st.st_size
            ti.mode = 0o755 if item.mode == MODE_EXEC else 0o644
            buf += _header(ti)
            left = ti.size
            while left > 0:
                want = min(left, CHUNK)
                if want < _SMALL:
                    chunk = f.read(want)
                else:
                    chunk = await asyncio.to_thread(f.read, want)
                if not chunk:
                    raise _changed(full)
                left -= len(chunk)
                buf += chunk
                if len(buf) >= CHUNK:
                    total += len(buf)
                    yield bytes(buf)
                    buf.clear()
            buf += b"\0" * (-ti.size % _BLOCK)
        if len(buf) >= CHUNK:
            total += len(buf)
            yield bytes(buf)
            buf.clear()
    buf += b"\0" * (2 * _BLOCK)
    buf += b"\0" * (-(total + len(buf)) % _RECORD)
    yield bytes(buf)


async def build_payload(
    runner: Runner,
    plan: Plan,
    *,
    tmp_dir: Path | None = None,
    compression: int = 0,
    window: int = 0,
) -> AsyncIterator[bytes]:
    """Yield the payload for `plan` in chunks of at most ~1 MiB.

    The pack is written to a temporary directory first (under `tmp_dir`, removed when the
    generator finishes or is closed). `compression` is the zlib level for objects git has
    to compress (0: fastest for the guest to unpack; objects already packed on the host are
    reused as they are); `window` is git's delta search window (0: reuse existing deltas only).
    """
    yield PAYLOAD_MAGIC
    with tempfile.TemporaryDirectory(prefix="stoker-pack-", dir=tmp_dir) as tmp:
        packed = await _pack(runner, plan, Path(tmp), compression, window)
        if packed is None:
            yield frame_header("pack", 0) + frame_header("idx", 0)
        else:
            name, pack, idx = packed
            yield frame_header("pack", pack.stat().st_size, name)
            async for chunk in _file_chunks(pack):
                yield chunk
            yield frame_header("idx", idx.stat().st_size)
            async for chunk in _file_chunks(idx):
                yield chunk
    yield frame("shallow", "".join(c + "\n" for c in plan.shallow_add).encode("ascii"))
    yield frame("delete", join_z(plan.delete))
    yield frame("rmdir", join_z(plan.rmdirs))
    yield frame("restore", join_z(plan.restore))
    yield frame("exec", join_z(plan.make_exec))
    yield frame("noexec", join_z(plan.make_noexec))
    yield frame("ita", join_z(plan.intent_to_add))
    if not plan.ship:
        yield frame_header("tar", 0)
        return
    yield frame_header("tar", -1)
    async for chunk in _tar(plan.root, plan.ship):
        yield chunk
