"""The prepare payload: one byte stream the guest's import script reads from stdin.

    STOKER-PAYLOAD 1
    tree LEN NAME    a pack of the checked-out commit's tree objects, undeltified; repeated,
    treeidx LEN      each followed by its index (built on the host: the guest hashes nothing)
    tree 0           end of the tree packs (the only one when the guest needs none)
    pack LEN         a thin pack of the commits and other objects the guest lacks (LEN 0: none)
    shallow LEN      commit ids to add to the guest's .git/shallow, one a line
    delete LEN       NUL-terminated paths to remove
    rmdir LEN        NUL-terminated directories to remove when left empty
    restore LEN      NUL-terminated paths to write from the checked-out commit
    exec LEN         NUL-terminated paths to make executable
    noexec LEN       NUL-terminated paths to make non-executable
    ita LEN          NUL-terminated new paths to mark intent-to-add (`git add -N`)
    tar -1 | tar 0   a tar of the host files to overlay, to the end of the stream (or nothing)

The packs carry the history (a shallow cut, `.git/shallow` in the guest says where), so the
guest has real commits to diff against; the tar only carries files that differ from what the
guest can produce itself. The tree packs are the bulk of a fresh prepare and are built for a
cheap checkout (no deltas to resolve, no compression by default, index included); history
comes as a thin pack with git's existing deltas, completed by `index-pack --fix-thin`.
Symlinks travel as links (never followed), file modes as git sees them (0755 when the owner
may execute, else 0644).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tarfile
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

from stoker.daemon.workspace.framing import frame, frame_header
from stoker.daemon.workspace.gitcmd import MODE_EXEC, MODE_LINK, git, join_z
from stoker.daemon.workspace.plan import Plan, ShipItem
from stoker.errors import CommandFailed, Conflict, StokerError
from stoker.runner import Runner

PAYLOAD_MAGIC = b"STOKER-PAYLOAD 1\n"
CHUNK = 1 << 20
PACK_TIMEOUT = 1800.0
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
FIRST_BATCH = 16 << 20  # bytes of blobs in the first tree pack; later ones double
MAX_BATCH = 256 << 20
_SMALL = 256 << 10  # reads below this size stay on the event loop thread


def _objects_env(tmp: Path, objects: Path) -> dict[str, str]:
    """Write new objects to `tmp` (never into the user's repository) while reading both."""
    who = {"GIT_AUTHOR_NAME": "stoker", "GIT_AUTHOR_EMAIL": "stoker@localhost"}
    who |= {"GIT_COMMITTER_NAME": "stoker", "GIT_COMMITTER_EMAIL": "stoker@localhost"}
    return {
        "GIT_OBJECT_DIRECTORY": str(tmp),
        # C-quoted, so a ':' in the repository's path is not taken for a list separator.
        "GIT_ALTERNATE_OBJECT_DIRECTORIES": '"'
        + str(objects).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        + '"',
        **who,
    }


def _sends_tree(plan: Plan) -> bool:
    """Whether the checked-out commit's tree travels as tree packs (fresh and reset mode)."""
    return plan.mode != "update" and plan.target is not None and plan.target in plan.pack_tips


async def _tree_objects(runner: Runner, plan: Plan) -> list[tuple[str, int]]:
    """(object id, size) of every tree and blob of the checked-out commit, trees first."""
    assert plan.target is not None
    root = plan.root
    tree = (await git(runner, root, "rev-parse", f"{plan.target}^{{tree}}")).out.strip()
    listing = await git(runner, root, "ls-tree", "-r", "-t", "-l", "-z", "--full-tree", plan.target)
    trees: list[tuple[str, int]] = [(tree, 0)]
    blobs: list[tuple[str, int]] = []
    for rec in listing.stdout.split(b"\0"):
        meta = rec.partition(b"\t")[0].split()
        if len(meta) != 4:
            continue
        oid = meta[2].decode("ascii")
        if meta[1] == b"tree":
            trees.append((oid, 0))
        elif meta[1] == b"blob":
            blobs.append((oid, int(meta[3])))
    return list(dict.fromkeys(trees + blobs))


def _batches(objects: list[tuple[str, int]]) -> list[list[str]]:
    """Split the tree's objects into packs of doubling size (the first small, so sending
    starts early; later ones large, so the guest handles few packs)."""
    out: list[list[str]] = []
    cur: list[str] = []
    size, limit = 0, FIRST_BATCH
    for oid, n in objects:
        cur.append(oid)
        size += n
        if size >= limit:
            out.append(cur)
            cur, size, limit = [], 0, min(limit * 2, MAX_BATCH)
    if cur:
        out.append(cur)
    return out


def _objects_writable(root: Path) -> bool:
    """git pack-objects DIR/BASE writes its temporary pack in the repository's own
    objects/pack first: only possible when this user may write there."""
    objects = root / ".git" / "objects" / "pack"
    return not objects.is_dir() or os.access(objects, os.W_OK | os.X_OK)


async def _pack_batch(
    runner: Runner, root: Path, oids: list[str], tmp: Path, n: int, compression: int
) -> tuple[str, Path, Path]:
    if not _objects_writable(root):
        return await _pack_batch_readonly(runner, root, oids, tmp, n, compression)
    res = await git(
        runner,
        root,
        "-c",
        f"pack.compression={compression}",
        "pack-objects",
        "-q",
        "--no-reuse-object",
        "--window=0",
        str(tmp / f"tree{n}"),
        input="".join(o + "\n" for o in oids).encode(),
        timeout=PACK_TIMEOUT,
    )
    name = res.out.strip()
    if len(name) != 40:
        raise CommandFailed(f"git pack-objects in {root} printed no pack name")
    return name, tmp / f"tree{n}-{name}.pack", tmp / f"tree{n}-{name}.idx"


async def _pack_batch_readonly(
    runner: Runner, root: Path, oids: list[str], tmp: Path, n: int, compression: int
) -> tuple[str, Path, Path]:
    """`_pack_batch` for a repository this user may only read (a system install's member
    owns it): the pack goes to stdout, `git index-pack` writes its index in `tmp`."""
    raw = tmp / f"tree{n}.pack.tmp"
    await git(
        runner,
        root,
        "-c",
        f"pack.compression={compression}",
        "pack-objects",
        "-q",
        "--no-reuse-object",
        "--window=0",
        "--stdout",
        input="".join(o + "\n" for o in oids).encode(),
        timeout=PACK_TIMEOUT,
        stdout_to=raw,
    )
    idx_tmp = tmp / f"tree{n}.idx.tmp"
    res = await runner.run(
        ["git", "-C", str(tmp), "index-pack", "-o", str(idx_tmp), str(raw)],
        timeout=PACK_TIMEOUT,
    )
    name = res.out.strip()
    if len(name) != 40:
        raise CommandFailed(f"git index-pack of a pack from {root} printed no pack name")
    pack, idx = tmp / f"tree{n}-{name}.pack", tmp / f"tree{n}-{name}.idx"
    os.replace(raw, pack)
    os.replace(idx_tmp, idx)
    return name, pack, idx


async def _tree_packs(
    runner: Runner, plan: Plan, tmp: Path, compression: int
) -> AsyncGenerator[tuple[str, Path, Path], None]:
    """The checked-out commit's tree as packs without deltas, each with its index.

    This is the bulk of a fresh prepare. Stored without deltas (and by default without
    compression) the guest's checkout is little more than a copy, and the index built here
    spares the guest hashing every object. The next pack is built while the previous one is
    being sent, so packing overlaps the transfer.
    """
    if not _sends_tree(plan):
        return
    batches = _batches(await _tree_objects(runner, plan))
    nxt = asyncio.create_task(_pack_batch(runner, plan.root, batches[0], tmp, 0, compression))
    try:
        for i in range(len(batches)):
            done = await nxt
            if i + 1 < len(batches):
                nxt = asyncio.create_task(
                    _pack_batch(runner, plan.root, batches[i + 1], tmp, i + 1, compression)
                )
            yield done
            for p in done[1:]:
                p.unlink()
    finally:
        if not nxt.done():
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError, StokerError):
                await nxt


async def _history_pack(
    runner: Runner, plan: Plan, tmp: Path, compression: int, window: int, tree_sent: bool
) -> Path | None:
    """Commits and objects the guest lacks beyond the tree pack, as a thin pack.

    Thin: deltas may refer to objects the guest has (excluded commits' objects, and the tree
    pack's objects, named through a throwaway commit of that tree), which the guest's
    `index-pack --fix-thin` completes. Existing deltas and compression are reused.
    """
    if not plan.pack_tips:
        return None
    root = plan.root
    objects_rel = (await git(runner, root, "rev-parse", "--git-path", "objects")).out.strip()
    objects = Path(objects_rel) if os.path.isabs(objects_rel) else root / objects_rel
    scratch = tmp / "objects"
    scratch.mkdir()
    env = _objects_env(scratch, objects)
    exclude = list(plan.pack_exclude)
    if tree_sent:
        assert plan.target is not None
        tree = (await git(runner, root, "rev-parse", f"{plan.target}^{{tree}}")).out.strip()
        edge = await git(runner, root, "commit-tree", tree, "-m", "stoker edge", input=b"", env=env)
        exclude.append(edge.out.strip())
    revs = [*plan.pack_tips, *(f"--shallow {c}" for c in plan.pack_grafts)]
    if exclude:
        revs += ["--not", *exclude]
    out = tmp / "history.pack"
    await git(
        runner,
        root,
        "-c",
        f"pack.compression={compression}",
        "pack-objects",
        "--revs",
        "--thin",
        "--shallow",
        "--stdout",
        "-q",
        f"--window={window}",
        "--delta-base-offset",
        input="".join(r + "\n" for r in revs).encode(),
        timeout=PACK_TIMEOUT,
        env=env,
        stdout_to=out,
    )
    with open(out, "rb") as f:
        header = f.read(12)
    if len(header) < 12 or header[:4] != b"PACK":
        raise CommandFailed(f"git pack-objects in {root} wrote no pack")
    return None if int.from_bytes(header[8:12], "big") == 0 else out


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
        # The history pack is usually small: build it while the tree packs are being sent.
        history_task = asyncio.create_task(
            _history_pack(runner, plan, Path(tmp), compression, window, _sends_tree(plan))
        )
        try:
            async with contextlib.aclosing(
                _tree_packs(runner, plan, Path(tmp), compression)
            ) as packs:
                async for name, pack, idx in packs:
                    yield frame_header("tree", pack.stat().st_size, name)
                    async for chunk in _file_chunks(pack):
                        yield chunk
                    yield frame_header("treeidx", idx.stat().st_size)
                    async for chunk in _file_chunks(idx):
                        yield chunk
            yield frame_header("tree", 0)
            history = await history_task
        finally:
            if not history_task.done():
                history_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, StokerError):
                    await history_task
        if history is None:
            yield frame_header("pack", 0)
        else:
            yield frame_header("pack", history.stat().st_size)
            async for chunk in _file_chunks(history):
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
