"""Host-side git plumbing shared by the workspace helpers.

Every call goes through the daemon's `Runner`. Paths travel NUL-separated and are decoded with
the filesystem encoding (surrogateescape), so any byte a file name may hold survives the
round trip. Commands run with `--no-optional-locks` so that reading the user's repository never
rewrites its index (lesson 8: export or prepare must not change the user's repo).
"""

from __future__ import annotations

import contextvars
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stoker.errors import CommandFailed, PermissionDenied
from stoker.runner import Result, Runner

# The well-known id of the empty tree: git resolves it without the object being stored.
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
NULL_SHA = "0" * 40

MODE_FILE = "100644"
MODE_EXEC = "100755"
MODE_LINK = "120000"
MODE_GITLINK = "160000"

GIT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Entry:
    """A path's content as git names it: mode ("100644", "100755", "120000") and blob id."""

    mode: str
    sha: str


def split_z(data: bytes) -> list[str]:
    """Split NUL-terminated git output into file-system-decoded strings."""
    return [os.fsdecode(p) for p in data.split(b"\0") if p]


def join_z(paths: Sequence[str]) -> bytes:
    """The inverse of `split_z`: NUL-terminated, file-system-encoded."""
    return b"".join(os.fsencode(p) + b"\0" for p in paths)


def _dubious(res: Result) -> bool:
    return b"dubious ownership" in res.stderr


# The uid of the client whose request is being served (set per request by the daemon's
# dispatch from SO_PEERCRED). A repository that uid owns may be read by a stokerd running
# as another user (a system install's member): see `_owner_overrides`.
REQUESTER: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "stoker_git_requester", default=None
)

# Config keys under which a repository's own config makes git run a command or read more
# config. Refused in a repository read for another user: its config must not run code as
# stokerd's user (what git's safe.directory check protects against).
_RUNS_CODE = re.compile(
    r"^(include\.|includeif\.|filter\.|diff\..*\.(textconv|command)$|diff\.external$|"
    r"merge\..*\.driver$|core\.(fsmonitor|hookspath|sshcommand|gitproxy|pager|editor|"
    r"askpass|attributesfile|worktree)$|uploadpack\.|gpg\.|credential\.|alias\.|"
    r"sequence\.editor$|protocol\.|remote\..*\.(uploadpack|receivepack|vcs)$|"
    r"extensions\.worktreeconfig$)",
    re.IGNORECASE,
)


def _toplevel(start: Path) -> Path | None:
    """The directory holding `.git` (a real directory, not a gitfile) at or above `start`."""
    for d in (start, *start.parents):
        try:
            st = os.lstat(d / ".git")
        except OSError:
            continue
        return d if stat.S_ISDIR(st.st_mode) else None
    return None


async def _owner_overrides(runner: Runner, root: Path) -> list[str]:
    """`-c` options that let git read a repository the requesting client owns while
    stokerd runs as another user, or [] when that does not apply. The repository (its
    top directory and `.git`) must belong to the requester; its own config must name no
    key that runs a command (`_RUNS_CODE`), and the command line switches the hooks,
    fsmonitor and external diff off whatever the config says later."""
    uid = REQUESTER.get()
    if uid is None or uid == os.geteuid():
        return []
    top = _toplevel(Path(os.path.abspath(root)))
    if top is None:
        return []
    try:
        owners = {os.lstat(top).st_uid, os.lstat(top / ".git").st_uid}
    except OSError:
        return []
    if owners != {uid}:
        return []
    cfg = top / ".git" / "config"
    res = await runner.run(
        ["git", "config", "--file", str(cfg), "--no-includes", "--null", "--name-only", "--list"],
        check=False,
        timeout=GIT_TIMEOUT,
    )
    if res.returncode not in (0, 1) and cfg.exists():
        raise PermissionDenied(f"cannot read the git config of {top}: {res.err.strip()}")
    bad = sorted({k for k in split_z(res.stdout) if _RUNS_CODE.match(k)})
    if bad:
        raise PermissionDenied(
            f"{top} belongs to another user than stokerd's, and its .git/config sets "
            f"{', '.join(bad[:5])}, which would run commands as stokerd's user: remove "
            "them, or prepare a clone without them"
        )
    return [
        "-c",
        f"safe.directory={top}",
        "-c",
        "core.fsmonitor=false",
        "-c",
        "core.hooksPath=/dev/null",
        "-c",
        "diff.external=",
    ]


async def git(
    runner: Runner,
    root: Path,
    *args: str,
    check: bool = True,
    input: bytes | None = None,
    timeout: float = GIT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    stdout_to: Path | None = None,
) -> Result:
    """Run `git -C root ARGS` through the runner; refuse clearly on git's ownership check.

    `stdout_to` sends git's stdout to that file instead of memory (for packs).
    """
    argv = ["git", "--no-optional-locks", *await _owner_overrides(runner, root), "-C", str(root)]
    argv += args
    if stdout_to is not None:
        argv = ["sh", "-c", 'f=$1; shift; exec "$@" > "$f"', "sh", str(stdout_to), *argv]
    res = await runner.run(argv, check=False, input=input, timeout=timeout, env=env)
    if res.returncode != 0 and _dubious(res):
        raise PermissionDenied(
            f"git refuses to read {root}: the repository belongs to another user than the one "
            f"stokerd runs as (uid {os.getuid()}); run stokerd as the repository's owner or "
            "prepare a checkout that this user owns"
        )
    if check and res.returncode != 0:
        raise CommandFailed(
            f"git {' '.join(args[:3])} in {root} failed (exit {res.returncode}): "
            f"{res.err.strip()[-2000:] or 'no output'}"
        )
    return res


def parse_raw_diff(data: bytes) -> dict[str, tuple[Entry | None, Entry | None, str]]:
    """Parse `git diff-* --raw -z --no-renames` output into path -> (old, new, status).

    A side whose mode is 000000 is None (absent). A new side whose id is all zeros (worktree
    content git has not hashed) keeps the NULL_SHA id; callers hash it when they need it.
    """
    out: dict[str, tuple[Entry | None, Entry | None, str]] = {}
    fields = data.split(b"\0")
    i = 0
    while i + 1 < len(fields):
        head = fields[i].decode("ascii")
        if not head:
            i += 1
            continue
        path = os.fsdecode(fields[i + 1])
        i += 2
        # ":100644 100644 <old> <new> M"
        srcmode, dstmode, srcsha, dstsha, status = head.lstrip(":").split(" ")
        old = None if srcmode == "000000" else Entry(srcmode, srcsha)
        new = None if dstmode == "000000" else Entry(dstmode, dstsha)
        out[path] = (old, new, status[:1])
    return out


def parse_ls_tree(data: bytes) -> dict[str, Entry]:
    """Parse `git ls-tree -r -z --full-tree` output into path -> Entry (blobs and links)."""
    out: dict[str, Entry] = {}
    for rec in data.split(b"\0"):
        if not rec:
            continue
        meta, _, path = rec.partition(b"\t")
        mode, _kind, sha = meta.decode("ascii").split(" ")
        out[os.fsdecode(path)] = Entry(mode, sha)
    return out


async def ls_tree(runner: Runner, root: Path, treeish: str | None) -> dict[str, Entry]:
    """Every blob, link and gitlink of a commit's tree (empty for None)."""
    if treeish is None:
        return {}
    res = await git(runner, root, "ls-tree", "-r", "-z", "--full-tree", treeish)
    return parse_ls_tree(res.stdout)


async def existing_commits(runner: Runner, root: Path, shas: Sequence[str]) -> set[str]:
    """The subset of `shas` that name commits present in the repository at `root`."""
    want = [s for s in dict.fromkeys(shas) if s]
    if not want:
        return set()
    res = await git(
        runner,
        root,
        "cat-file",
        "--batch-check=%(objectname) %(objecttype)",
        input="".join(s + "\n" for s in want).encode(),
    )
    found: set[str] = set()
    for line in res.out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == "commit":
            found.add(parts[0])
    return found


async def resolve_commit(runner: Runner, root: Path, ref: str) -> str | None:
    """The commit id `ref` names, or None."""
    argv = ["rev-parse", "--verify", "-q", "--end-of-options", ref + "^{commit}"]
    res = await git(runner, root, *argv, check=False)
    return (res.out.strip() or None) if res.returncode == 0 else None
