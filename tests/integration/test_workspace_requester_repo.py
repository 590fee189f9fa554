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
