"""Workspace leaf, host side: repository inspection, file listing, script argument checks."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stoker.daemon.workspace import (
    check_guest_path,
    guest_export_script,
    inspect_repo,
    list_files,
    parse_export_output,
    parse_guest_state,
)
from stoker.errors import CommandFailed, InvalidArgument, NotFound
from stoker.runner import Runner

pytestmark = pytest.mark.unit

ODD_NAMES = ["with space.txt", "new\nline.txt", "ünïcødé.txt", "-leading-dash", "tab\there"]


@pytest.fixture(autouse=True)
def git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Isolate git from the machine's global and system configuration."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for k in ("GIT_DIR", "GIT_INDEX_FILE", "GIT_WORK_TREE"):
        monkeypatch.delenv(k, raising=False)
    yield home


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def make_repo(
    path: Path, name: str | None = "Host User", email: str | None = "host@example.org"
) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    if name:
        git(path, "config", "user.name", name)
    if email:
        git(path, "config", "user.email", email)
    return path


def commit(repo: Path, msg: str = "c") -> str:
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD")


async def test_inspect_reads_head_branch_identity_origin(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    (repo / "f").write_text("x")
    head = commit(repo)
    git(repo, "remote", "add", "origin", "https://example.invalid/team/r.git")
    (repo / "sub").mkdir()
    info = await inspect_repo(Runner(), repo / "sub")
    assert info.root == repo
    assert info.head == head
    assert info.branch == "main"
    assert (info.user_name, info.user_email) == ("Host User", "host@example.org")
    assert info.origin == "https://example.invalid/team/r.git"


async def test_inspect_identity_falls_back_to_global_config(tmp_path: Path, git_home: Path) -> None:
    (git_home / ".gitconfig").write_text("[user]\n\tname = Global Name\n\temail = g@example.org\n")
    repo = make_repo(tmp_path / "r", name=None, email=None)
    info = await inspect_repo(Runner(), repo)
    assert (info.user_name, info.user_email) == ("Global Name", "g@example.org")


async def test_inspect_empty_repo_detached_and_no_origin(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", name=None, email=None)
    info = await inspect_repo(Runner(), repo)
    assert info.head is None and info.branch == "main" and info.origin is None
    assert info.user_name is None and info.user_email is None
    (repo / "f").write_text("1")
    first = commit(repo)
    (repo / "f").write_text("2")
    commit(repo)
    git(repo, "checkout", "-q", "--detach", first)
    info = await inspect_repo(Runner(), repo)
    assert info.head == first and info.branch is None


@pytest.mark.parametrize("case", ["missing", "file", "plain", "bare", "gitdir"])
async def test_inspect_refuses_what_it_cannot_ship(tmp_path: Path, case: str) -> None:
    target = tmp_path / "x"
    if case == "file":
        target.write_text("not a dir")
    elif case == "plain":
        target.mkdir()
    elif case == "bare":
        subprocess.run(["git", "init", "-q", "--bare", str(target)], check=True)
    elif case == "gitdir":
        make_repo(tmp_path / "r")
        target = tmp_path / "r" / ".git"
    with pytest.raises(InvalidArgument) as ei:
        await inspect_repo(Runner(), target)
    msg = str(ei.value)
    assert str(target) in msg
    want = {
        "missing": "does not exist",
        "file": "not a directory",
        "plain": "not inside a git repository",
        "bare": "bare git repository",
        "gitdir": "not inside a git work tree",
    }[case]
    assert want in msg


async def test_inspect_refuses_submodules(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    (repo / "f").write_text("x")
    head = commit(repo)
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{head},vendored")
    with pytest.raises(InvalidArgument, match="submodules \\(vendored\\)"):
        await inspect_repo(Runner(), repo)
    git(repo, "rm", "-q", "--cached", "vendored")
    await inspect_repo(Runner(), repo)
    (repo / ".gitmodules").write_text('[submodule "x"]\n\tpath = x\n\turl = ../x\n')
    with pytest.raises(InvalidArgument, match="submodules"):
        await inspect_repo(Runner(), repo)


async def test_list_files_tracked_untracked_ignored_and_odd_names(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    (repo / ".gitignore").write_text("*.log\nsecret/\n")
    for n in [*ODD_NAMES, "keep.txt", "gone.txt"]:
        (repo / n).write_text(n)
    (repo / "d").mkdir()
    (repo / "d" / "inner file").write_text("i")
    commit(repo)
    (repo / "gone.txt").unlink()
    (repo / "untracked new\nline").write_text("u")
    (repo / "-untracked").write_text("u")
    (repo / "debug.log").write_text("ignored")
    (repo / "secret").mkdir()
    (repo / "secret" / "key").write_text("ignored")
    nested = repo / "nested"
    nested.mkdir()
    git(nested, "init", "-q")
    (nested / "n").write_text("n")
    tracked = await list_files(Runner(), repo, include_untracked=False)
    assert sorted(tracked) == sorted([".gitignore", *ODD_NAMES, "keep.txt", "d/inner file"])
    every = await list_files(Runner(), repo, include_untracked=True)
    assert sorted(every) == sorted([*tracked, "untracked new\nline", "-untracked"])
    assert not any(p.endswith(".log") or p.startswith(("secret", "nested")) for p in every)


async def test_list_files_non_utf8_name(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    raw = b"latin1-\xe9.txt"
    with open(os.path.join(os.fsencode(repo), raw), "wb") as f:
        f.write(b"x")
    commit(repo)
    files = await list_files(Runner(), repo, include_untracked=False)
    assert [os.fsencode(p) for p in files] == [raw]


@pytest.mark.parametrize(
    "bad", ["", "relative/path", "/", "/root", "/etc", "/a/../b", "/a//b", "/x\ny"]
)
def test_guest_path_is_checked(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        check_guest_path(bad)


def test_guest_path_accepts_normal_paths() -> None:
    assert check_guest_path("/root/repo") == "/root/repo"
    assert check_guest_path("/srv/work space/r/") == "/srv/work space/r"


def test_export_script_rejects_odd_base() -> None:
    for bad in ["", "-x", "a b", "a\nb"]:
        with pytest.raises(InvalidArgument):
            guest_export_script("/root/repo", bad)


def test_parsers_reject_garbage_and_report_failures() -> None:
    with pytest.raises(CommandFailed, match="bash"):
        parse_guest_state(0, b"something else\n", b"")
    with pytest.raises(CommandFailed, match="boom"):
        parse_guest_state(1, b"", b"stoker: boom\n")
    with pytest.raises(CommandFailed, match="truncated"):
        parse_export_output(0, b"STOKER-EXPORT 1\nfiles 100\nM\0a\0", b"")
    with pytest.raises(NotFound, match="prepare"):
        parse_export_output(10, b"", b"stoker: the workspace /root/repo does not exist in the VM\n")
    with pytest.raises(InvalidArgument, match="base-commit"):
        parse_export_output(12, b"", b"stoker: base abc is not in the VM's repository\n")
