"""Decide what a prepare sends: which commits, which files, which deletions.

The guest ends up with the host's commit checked out (history `depth` commits deep) and the
host's work tree on top, so `git status` in the guest shows the host's uncommitted changes
(all unstaged: the staged/unstaged split is not carried over). Three modes:

- fresh: nothing usable at the guest path. Send the shallow history of the commit(s) and
  the files that differ from the commit; the guest checks out and overlays them.
- update: a workspace stoker made, whose base commit the host knows. Send only commits the
  guest lacks and only files whose content or mode in the guest differs from the host's work
  tree; content the guest can take from the new commit is restored there, mode-only changes
  are a chmod, and everything the host no longer has is deleted.
- reset: a workspace whose state cannot be trusted (an import was cut short, or its base is
  unknown to the host). The guest hard-resets to the commit, removes untracked non-ignored
  files, and the host's changes are sent as on a fresh prepare.

A re-prepare mirrors the host: tracked content and untracked non-ignored files in the guest
end up exactly as a fresh prepare would leave them (guest-only edits are overwritten and
guest-only untracked files removed); ignored files in the guest are never touched, and a
guest HEAD that would be lost stays reachable as `refs/stoker/previous-head`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stoker.daemon.workspace.gitcmd import (
    EMPTY_TREE,
    MODE_EXEC,
    MODE_FILE,
    MODE_LINK,
    NULL_SHA,
    Entry,
    existing_commits,
    git,
    ls_tree,
    parse_raw_diff,
    resolve_commit,
)
from stoker.daemon.workspace.inspect import RepoInfo
from stoker.daemon.workspace.state import GuestState
from stoker.errors import Conflict, InvalidArgument
from stoker.runner import Runner

DEFAULT_DEPTH = 50
Mode = Literal["fresh", "update", "reset"]


@dataclass(frozen=True)
class ShipItem:
    """A host work-tree file sent in the payload's tar, with the mode git gives it."""

    path: str
    mode: str


@dataclass(frozen=True)
class Plan:
    """Everything one prepare does, computed on the host before any byte is sent."""

    root: Path
    mode: Mode
    target: str | None  # the commit checked out in the guest (export base); None: no commits
    host_head: str | None
    branch: str | None  # the branch the guest's HEAD names; None: detached HEAD
    extra_branch: str | None  # the host's branch, set at host_head when --branch names another
    origin: str | None
    user_name: str | None
    user_email: str | None
    pack_tips: tuple[str, ...]  # empty: the guest has every commit already
    pack_exclude: tuple[str, ...]  # commits the guest has: what they reach is not sent
    pack_grafts: tuple[str, ...]  # commits treated as parentless while packing
    shallow_add: tuple[str, ...]  # commits the guest records in .git/shallow
    ship: tuple[ShipItem, ...]
    delete: tuple[str, ...]
    restore: tuple[str, ...]  # paths the guest writes from the new commit
    make_exec: tuple[str, ...]
    make_noexec: tuple[str, ...]
    intent_to_add: tuple[str, ...] = ()  # new files in the host's index: `git add -N` in the guest

    @property
    def rmdirs(self) -> tuple[str, ...]:
        """Parent directories of deleted paths, deepest first (removed when left empty)."""
        dirs: set[str] = set()
        for p in self.delete:
            parent = os.path.dirname(p)
            while parent:
                dirs.add(parent)
                parent = os.path.dirname(parent)
        return tuple(sorted(dirs, key=lambda d: (-d.count("/"), d)))


def _worktree_entry(root: Path, path: str) -> Entry | None:
    """The mode git would give a work-tree path (sha unknown), or None if not a file/link."""
    try:
        st = os.lstat(os.path.join(root, path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        return Entry(MODE_LINK, NULL_SHA)
    if stat.S_ISREG(st.st_mode):
        return Entry(MODE_EXEC if st.st_mode & stat.S_IXUSR else MODE_FILE, NULL_SHA)
    return None


def blob_id(root: Path, path: str, mode: str) -> str:
    """git's blob id of a work-tree file's raw bytes (a link's target for symlinks)."""
    full = os.path.join(root, path)
    try:
        if mode == MODE_LINK:
            data = os.fsencode(os.readlink(full))
            header = b"blob %d\0" % len(data)
            return hashlib.sha1(header + data, usedforsecurity=False).hexdigest()
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise Conflict(f"{full} changed while stoker read it: run prepare again") from None
    try:
        size = os.fstat(fd).st_size
        h = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
        left = size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        if left:
            raise Conflict(f"{full} changed while stoker read it: run prepare again")
        return h.hexdigest()
    finally:
        os.close(fd)


async def _depth_walk(
    runner: Runner, root: Path, tips: Sequence[str], depth: int
) -> tuple[set[str], set[str]]:
    """Commits within `depth` generations of `tips`, and those among them to mark shallow
    (the ones with a parent left out), the way `git clone --depth` cuts history."""
    n = max(256, depth * 4)
    while True:
        res = await git(runner, root, "rev-list", "--parents", f"--max-count={n}", *tips)
        parents: dict[str, list[str]] = {}
        for line in res.out.splitlines():
            parts = line.split()
            if parts:
                parents[parts[0]] = parts[1:]
        exhausted = len(parents) < n
        dist = dict.fromkeys(tips, 0)
        queue = deque(tips)
        missing = False
        while queue:
            c = queue.popleft()
            if c not in parents:
                missing = True
                break
            if dist[c] >= depth - 1:
                continue
            for p in parents[c]:
                if p not in dist:
                    dist[p] = dist[c] + 1
                    queue.append(p)
        if missing and not exhausted:
            n *= 4
            continue
        included = set(dist)
        boundary = {c for c in included if any(p not in included for p in parents.get(c, ()))}
        return included, boundary


async def _host_shallow(runner: Runner, root: Path) -> set[str]:
    """The host repository's own shallow boundary (empty for a full clone)."""
    rel = (await git(runner, root, "rev-parse", "--git-path", "shallow")).out.strip()
    path = Path(rel) if os.path.isabs(rel) else root / rel
    try:
        return set(path.read_text().split())
    except FileNotFoundError:
        return set()


async def _is_ancestor(runner: Runner, root: Path, a: str, b: str) -> bool:
    res = await git(runner, root, "merge-base", "--is-ancestor", a, b, check=False)
    return res.returncode == 0


async def _check_branch(runner: Runner, root: Path, name: str) -> None:
    res = await git(runner, root, "check-ref-format", f"refs/heads/{name}", check=False)
    if res.returncode != 0 or name.startswith("-") or name == "HEAD":
        raise InvalidArgument(f"--branch {name!r} is not a valid git branch name: pick another")


async def _desired(
    runner: Runner, root: Path, files: Iterable[str], target: str | None
) -> tuple[dict[str, Entry], dict[str, Entry], list[str]]:
    """The commit's tree; the host work tree as path -> Entry (sha NULL_SHA when git has not
    hashed the file: stat-dirty tracked files and untracked ones); and the shipped paths the
    host's index adds (new files staged or marked intent-to-add)."""
    tree = await ls_tree(runner, root, target)
    raw = await git(runner, root, "diff-index", "--raw", "-z", "--no-renames", target or EMPTY_TREE)
    changed = parse_raw_diff(raw.stdout)
    want: dict[str, Entry] = {}
    for p in files:
        if p in changed:
            new = changed[p][1]
            e = new if new is not None else _worktree_entry(root, p)
        elif p in tree:
            e = tree[p]
        else:
            e = _worktree_entry(root, p)
        if e is not None:
            want[p] = e
    added = [p for p in want if p in changed and changed[p][0] is None]
    return tree, want, added


@dataclass
class _FilesPlan:
    ship: list[ShipItem]
    delete: list[str]
    restore: list[str]
    make_exec: list[str]
    make_noexec: list[str]


async def _update_files(
    runner: Runner, root: Path, tree: dict[str, Entry], want: dict[str, Entry], guest: GuestState
) -> _FilesPlan:
    """File actions that turn the guest's work tree (its base commit's tree plus what it
    reported as changed) into the host's, sending only content the guest cannot produce."""
    base_tree = await ls_tree(runner, root, guest.base)
    cand = set(guest.dirty)
    cand.update(p for p, e in want.items() if e.sha == NULL_SHA or tree.get(p) != e)
    cand.update(p for p in tree if p not in want)
    cand.update(p for p in base_tree.keys() | tree.keys() if base_tree.get(p) != tree.get(p))
    unknown = [p for p in cand if p in want and want[p].sha == NULL_SHA]
    shas = await asyncio.gather(
        *(asyncio.to_thread(blob_id, root, p, want[p].mode) for p in unknown)
    )
    for p, sha in zip(unknown, shas, strict=True):
        want[p] = Entry(want[p].mode, sha)
    out = _FilesPlan([], [], [], [], [])
    for p in sorted(cand):
        cur = guest.dirty[p] if p in guest.dirty else base_tree.get(p)
        des = want.get(p)
        if des == cur:
            continue
        if des is None:
            if cur is not None:
                out.delete.append(p)
        elif (
            cur is not None
            and cur.sha == des.sha
            and {cur.mode, des.mode} == {MODE_FILE, MODE_EXEC}
        ):
            (out.make_exec if des.mode == MODE_EXEC else out.make_noexec).append(p)
        elif des == tree.get(p):
            out.restore.append(p)
        else:
            out.ship.append(ShipItem(p, des.mode))
    return out


async def _plan_history(
    runner: Runner,
    root: Path,
    tips: tuple[str, ...],
    known: set[str],
    guest: GuestState | None,
    depth: int | None,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Which commits to pack: (tips, excluded, grafts for the packing walk, commits the guest
    adds to .git/shallow). No tips: the guest has every commit it needs."""
    # Commits the guest verifiably has: objects reachable from them are not sent. Their
    # history in the guest stops at the guest's shallow commits, so the packing walk must
    # stop there too or it would leave out objects only that older history holds.
    exclude = tuple(sorted(known))
    if all(t in known for t in tips):
        return (), (), (), ()
    grafts: set[str] = set()
    if exclude and guest is not None:
        grafts.update(await existing_commits(runner, root, guest.shallow))
    host_shallow = await _host_shallow(runner, root)
    fast_forward = bool(exclude)
    for t in tips:
        if fast_forward and not any([await _is_ancestor(runner, root, e, t) for e in exclude]):
            fast_forward = False
    shallow_add: set[str] = set()
    if fast_forward or depth is None:
        # New commits on top of what the guest has: send them all, as `git fetch` does.
        if host_shallow:
            res = await git(runner, root, "rev-list", *tips, "--not", *exclude)
            shallow_add = host_shallow & set(res.out.split())
    else:
        included, boundary = await _depth_walk(runner, root, tips, depth)
        shallow_add = boundary | (host_shallow & included)
    grafts |= shallow_add
    return tips, exclude, tuple(sorted(grafts)), tuple(sorted(shallow_add))


async def plan_transfer(
    runner: Runner,
    repo: RepoInfo,
    files: Sequence[str],
    guest: GuestState | None,
    *,
    branch: str | None = None,
    from_ref: str | None = None,
    depth: int | None = DEFAULT_DEPTH,
) -> Plan:
    """Plan a prepare of `repo` (shipping exactly `files`, as `list_files` returned them) into
    a guest whose state is `guest` (None: nothing there yet).

    `branch` makes the guest check out a guest-only branch of that name, at `from_ref` (a
    host ref or commit) or at HEAD. `depth` limits the history sent (None: all of it).
    """
    root = repo.root
    if guest is not None and guest.status == "notdir":
        raise Conflict("the guest path is a file, not a directory: remove it or pick --guest-path")
    if guest is not None and guest.status == "foreign":
        raise Conflict(
            "the guest path holds a directory stoker did not create: remove it in the VM "
            "or pick another --guest-path"
        )
    if from_ref is not None and branch is None:
        raise InvalidArgument("--from needs --branch: name the guest branch to create")
    if branch is not None:
        await _check_branch(runner, root, branch)
    target = repo.head
    if from_ref is not None:
        target = await resolve_commit(runner, root, from_ref)
        if target is None:
            raise InvalidArgument(
                f"--from {from_ref!r} names no commit in {root}: give a branch, tag or commit id"
            )
    head_branch = branch or repo.branch
    extra = repo.branch if branch and repo.branch and repo.branch != branch and repo.head else None
    if depth is not None and depth < 1:
        raise InvalidArgument("history depth must be at least 1 (or unlimited)")

    tree, want, added = await _desired(runner, root, files, target)

    mode: Mode = "fresh"
    known: set[str] = set()
    if guest is not None and guest.status == "incomplete":
        mode = "reset"
    elif guest is not None and guest.status == "ok":
        known = await existing_commits(
            runner, root, [c for c in (guest.base, guest.host_head, guest.head) if c]
        )
        mode = "update" if guest.base is None or guest.base in known else "reset"

    if mode == "update":
        assert guest is not None
        files_plan = await _update_files(runner, root, tree, want, guest)
    else:
        ship = [
            ShipItem(p, e.mode) for p, e in want.items() if e.sha == NULL_SHA or tree.get(p) != e
        ]
        files_plan = _FilesPlan(ship, [p for p in tree if p not in want], [], [], [])
    tips = tuple(dict.fromkeys(c for c in (target, repo.head) if c))
    tips, exclude, grafts, shallow_add = await _plan_history(
        runner, root, tips, known, guest, depth
    )
    return Plan(
        root=root,
        mode=mode,
        target=target,
        host_head=repo.head,
        branch=head_branch,
        extra_branch=extra,
        origin=repo.origin,
        user_name=repo.user_name,
        user_email=repo.user_email,
        pack_tips=tips,
        pack_exclude=exclude,
        pack_grafts=grafts,
        shallow_add=shallow_add,
        ship=tuple(files_plan.ship),
        delete=tuple(files_plan.delete),
        restore=tuple(files_plan.restore),
        make_exec=tuple(files_plan.make_exec),
        make_noexec=tuple(files_plan.make_noexec),
        intent_to_add=tuple(added),
    )
