"""Host-side repository inspection: what `workspace prepare` is about to ship.

Refuses what cannot be shipped faithfully (missing path, not a work tree, bare repository,
submodules) with a message naming the path and what to do. Lists files the way the transfer
ships them: tracked files still present in the work tree, untracked non-ignored files only on
request (lesson 7: shipping untracked files by default leaked credentials), ignored never.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stoker.daemon.workspace.gitcmd import MODE_GITLINK, git, split_z
from stoker.errors import InvalidArgument
from stoker.runner import Runner


@dataclass(frozen=True)
class RepoInfo:
    """A host checkout as prepare sees it."""

    root: Path
    head: str | None  # None: a repository with no commits yet
    branch: str | None  # None: detached HEAD
    user_name: str | None
    user_email: str | None
    origin: str | None


async def _config(runner: Runner, root: Path, key: str) -> str | None:
    res = await git(runner, root, "config", "--get", key, check=False)
    val = res.out.strip()
    return val if res.returncode == 0 and val else None


async def inspect_repo(runner: Runner, path: Path) -> RepoInfo:
    """Find the repository containing `path` and read HEAD, branch, identity and origin.

    Raises InvalidArgument for a missing path, a path outside any git work tree, a bare
    repository, and a repository with submodules.
    """
    path = Path(os.path.abspath(path))
    if not path.exists():
        raise InvalidArgument(f"{path} does not exist: pass the path of a git checkout")
    if not path.is_dir():
        raise InvalidArgument(f"{path} is not a directory: pass the path of a git checkout")
    res = await git(runner, path, "rev-parse", "--is-bare-repository", check=False)
    if res.returncode != 0:
        raise InvalidArgument(
            f"{path} is not inside a git repository: run `git init` there (and commit) "
            "or pass the path of a git checkout"
        )
    if res.out.strip() == "true":
        raise InvalidArgument(
            f"{path} is a bare git repository, which has no files to ship: clone it "
            f"(git clone {path} DIR) and prepare the clone"
        )
    res = await git(runner, path, "rev-parse", "--is-inside-work-tree", check=False)
    if res.returncode != 0 or res.out.strip() != "true":
        raise InvalidArgument(
            f"{path} is not inside a git work tree (is it inside a .git directory?): "
            "pass the checkout's top directory"
        )
    root = Path((await git(runner, path, "rev-parse", "--show-toplevel")).out.strip())
    await _refuse_submodules(runner, root)
    head_res = await git(runner, root, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
    head = head_res.out.strip() if head_res.returncode == 0 and head_res.out.strip() else None
    br = await git(runner, root, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    branch = br.out.strip() if br.returncode == 0 and br.out.strip() else None
    origin_res = await git(runner, root, "remote", "get-url", "origin", check=False)
    origin = origin_res.out.strip() if origin_res.returncode == 0 else None
    return RepoInfo(
        root=root,
        head=head,
        branch=branch,
        user_name=await _config(runner, root, "user.name"),
        user_email=await _config(runner, root, "user.email"),
        origin=origin or None,
    )


async def _refuse_submodules(runner: Runner, root: Path) -> None:
    res = await git(runner, root, "ls-files", "-s", "-z")
    gitlinks: list[str] = []
    has_gitmodules = (root / ".gitmodules").exists()
    for rec in res.stdout.split(b"\0"):
        if not rec:
            continue
        meta, _, name = rec.partition(b"\t")
        if name == b".gitmodules":
            has_gitmodules = True
        if meta.startswith(MODE_GITLINK.encode()):
            gitlinks.append(os.fsdecode(name))
    if gitlinks or has_gitmodules:
        which = f" ({', '.join(sorted(set(gitlinks))[:3])})" if gitlinks else ""
        raise InvalidArgument(
            f"{root} uses git submodules{which}, which stoker cannot ship: prepare a checkout "
            "without submodules (or vendor their files into the repository)"
        )


async def list_files(runner: Runner, root: Path, include_untracked: bool) -> list[str]:
    """The work-tree files a prepare ships, relative to `root`, in git's order.

    Tracked files minus those deleted in the work tree; with `include_untracked`, untracked
    files that no ignore rule matches. Ignored files never. An untracked nested repository is
    skipped (git lists it as `dir/`): it is not part of this repository's content.
    """
    cached = split_z((await git(runner, root, "ls-files", "-z", "--cached")).stdout)
    deleted = set(split_z((await git(runner, root, "ls-files", "-z", "--deleted")).stdout))
    # Unmerged paths are listed once per stage: keep the first.
    files = [p for p in dict.fromkeys(cached) if p not in deleted]
    if include_untracked:
        others = split_z(
            (await git(runner, root, "ls-files", "-z", "--others", "--exclude-standard")).stdout
        )
        known = set(files)
        files.extend(p for p in others if not p.endswith("/") and p not in known)
    return files
