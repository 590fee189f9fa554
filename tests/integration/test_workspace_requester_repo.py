"""A stokerd running as another user than the repository's owner (a system install's
member asks): git reads the repo only when the requesting client owns it, and never when
the repo's own config would make git run a command as stokerd's user."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from stoker.daemon.workspace.gitcmd import REQUESTER
from stoker.daemon.workspace.inspect import RepoInfo, inspect_repo
from stoker.errors import PermissionDenied
from stoker.runner import Runner

pytestmark = pytest.mark.integration

OWNER = 65534  # nobody: not us (root), never a real member


def _repo(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (chown to another uid)")
    r = tmp_path / "repo"
    r.mkdir()
    git = ["git", "-c", "user.email=t@e", "-c", "user.name=t", "-C", str(r)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (r / "a.txt").write_text("hello\n")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    subprocess.run(["chown", "-R", f"{OWNER}:{OWNER}", str(r)], check=True)
    tmp_path.chmod(0o755)
    return r


async def _inspect(r: Path, requester: int | None) -> RepoInfo:
    async def run() -> RepoInfo:
        REQUESTER.set(requester)
        return await inspect_repo(Runner(), r)

    return await asyncio.create_task(run())  # a fresh context, like one request


async def test_a_repo_the_requester_owns_is_read_for_it(tmp_path: Path) -> None:
    r = _repo(tmp_path)
    info = await _inspect(r, OWNER)
    assert info.root == r and info.branch == "main"
    # Anyone else asking (or no requester): git's own ownership check refuses, clearly.
    for who in (None, 12345):
        with pytest.raises(PermissionDenied, match="belongs to another user than the one"):
            await _inspect(r, who)


async def test_a_requester_repo_whose_config_runs_commands_is_refused(tmp_path: Path) -> None:
    r = _repo(tmp_path)
    marker = tmp_path / "ran"
    cfg = r / ".git" / "config"
    for key, value in (
        ("core.fsmonitor", f"touch {marker}"),
        ("filter.x.clean", f"touch {marker}"),
        ("include.path", "/etc/gitconfig"),
    ):
        subprocess.run(["git", "config", "--file", str(cfg), key, value], check=True)
        with pytest.raises(PermissionDenied, match=f"sets {key}.*would run commands"):
            await _inspect(r, OWNER)
        subprocess.run(["git", "config", "--file", str(cfg), "--unset", key], check=True)
    assert not marker.exists()
    assert (await _inspect(r, OWNER)).branch == "main"


async def test_packs_of_a_read_only_repo_are_made_outside_it(tmp_path: Path) -> None:
    """pack-objects DIR/BASE writes its temporary pack inside the repository: for one this
    user may only read, the pack goes to stdout and index-pack writes the index beside it.
    Same pack name (the objects' hash), a valid index, nothing written in the repo."""
    from stoker.daemon.workspace.payload import _pack_batch, _pack_batch_readonly

    r = _repo(tmp_path)
    listing = subprocess.run(
        ["git", "-c", f"safe.directory={r}", "-C", str(r), "rev-list", "--objects", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    oids = [line.split()[0] for line in listing.splitlines()]
    assert len(oids) == 3  # commit, tree, blob
    before = sorted(p.name for p in (r / ".git/objects/pack").iterdir())
    out = tmp_path / "out"
    out.mkdir()
    REQUESTER.set(OWNER)
    a = await _pack_batch(Runner(), r, oids, out, 0, 0)
    b = await _pack_batch_readonly(Runner(), r, oids, out, 1, 0)
    assert a[0] == b[0]
    for _, pack, idx in (a, b):
        assert pack.exists() and idx.exists()
        subprocess.run(["git", "verify-pack", str(idx)], check=True, cwd=out)
    assert sorted(p.name for p in (r / ".git/objects/pack").iterdir()) == before
    assert not list(out.glob("*.tmp"))
