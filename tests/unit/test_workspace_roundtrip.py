"""Workspace leaf, both sides: prepare into a local directory standing in for the guest,
change things there, export, `git apply` on the host side, compare trees byte for byte.

The guest scripts run for real with `bash -c SCRIPT` and the payload on stdin, exactly as
the service runs them over SSH; the "guest" directory is a separate directory from the host
repository. Guest-side git gets its own HOME so nothing leaks between the two.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from stoker.daemon.workspace import (
    EMPTY_TREE,
    SHIPPED_REF,
    ExportResult,
    GuestState,
    Plan,
    build_payload,
    check_import_result,
    guest_export_script,
    guest_import_script,
    guest_state_script,
    inspect_repo,
    list_files,
    parse_export_output,
    parse_guest_state,
    plan_transfer,
    remote_command,
)
from stoker.daemon.workspace import payload as payload_mod
from stoker.errors import CommandFailed, Conflict, InvalidArgument, NotFound
from stoker.runner import Runner

pytestmark = pytest.mark.unit

GUEST_ENV: dict[str, str] = {}


# --- harness -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Host git and guest git each get an empty global config of their own."""
    home = tmp_path / "home"
    home.mkdir()
    ghome = tmp_path / "guest-home"
    ghome.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for k in ("GIT_DIR", "GIT_INDEX_FILE", "GIT_WORK_TREE", "GIT_OBJECT_DIRECTORY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setitem(GUEST_ENV, "HOME", str(ghome))
    monkeypatch.setitem(GUEST_ENV, "GIT_CONFIG_GLOBAL", str(ghome / ".gitconfig"))
    yield home


def git(cwd: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    full = {**os.environ, **(env or {})}
    r = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=full)
    return r.stdout.decode("utf-8", "surrogateescape").rstrip("\n")


def ggit(cwd: Path, *args: str) -> str:
    """git as the guest runs it."""
    return git(cwd, *args, env=GUEST_ENV)


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "Host User")
    git(path, "config", "user.email", "host@example.org")
    return path


def commit(repo: Path, msg: str = "c", env: Mapping[str, str] | None = None) -> str:
    git(repo, "add", "-A", env=env)
    git(repo, "commit", "-q", "-m", msg, env=env)
    return git(repo, "rev-parse", "HEAD", env=env)


async def run_guest(
    script: str, payload: AsyncIterator[bytes] | None = None, timeout: float = 120
) -> tuple[int, bytes, bytes]:
    """Run a guest script locally as sshd would (`sh -c remote_command(script)`), streaming
    `payload` to its stdin."""
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        remote_command(script),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **GUEST_ENV},
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin = proc.stdin

    async def feed() -> None:
        try:
            if payload is not None:
                async for chunk in payload:
                    stdin.write(chunk)
                    await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            stdin.close()

    out, err, _ = await asyncio.wait_for(
        asyncio.gather(proc.stdout.read(), proc.stderr.read(), feed()), timeout
    )
    return await proc.wait(), out, err


@dataclass
class Prepared:
    plan: Plan
    state: GuestState
    payload_size: int
    target: str | None


async def probe(guest: Path) -> GuestState:
    return parse_guest_state(*(await run_guest(guest_state_script(str(guest)))))


async def prepare(
    host: Path,
    guest: Path,
    *,
    include_untracked: bool = False,
    branch: str | None = None,
    from_ref: str | None = None,
    depth: int | None = 50,
) -> Prepared:
    """The whole two-round-trip prepare, as the service does it."""
    runner = Runner()
    info = await inspect_repo(runner, host)
    files = await list_files(runner, info.root, include_untracked)
    state = await probe(guest)
    plan = await plan_transfer(
        runner, info, files, state, branch=branch, from_ref=from_ref, depth=depth
    )
    size = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal size
        async for chunk in build_payload(runner, plan):
            size += len(chunk)
            yield chunk

    res = await run_guest(guest_import_script(str(guest), plan), counted())
    return Prepared(plan, state, size, check_import_result(*res))


async def export(guest: Path, base: str) -> ExportResult:
    return parse_export_output(*(await run_guest(guest_export_script(str(guest), base))))


Snapshot = dict[str, tuple[str, ...]]


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> Snapshot:
    """Every file and link under root (not .git), with content and exec bit."""
    out: Snapshot = {}
    for d, dirs, files in os.walk(root):
        rel_d = os.path.relpath(d, root)
        if rel_d == ".":
            dirs[:] = [x for x in dirs if x != ".git"]
        for name in dirs + files:
            full = os.path.join(d, name)
            rel = os.path.normpath(os.path.join(rel_d, name))
            if rel.startswith(skip):
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    data = f.read()
                out[rel] = ("file", "x" if st.st_mode & 0o100 else "-", data.hex())
    return out


def status_paths(repo: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Path -> 'untracked' / 'changed' per `git status` (staged and unstaged are one)."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "-z", "--untracked-files=all"],
        cwd=repo,
        check=True,
        capture_output=True,
        env={**os.environ, **(env or {})},
    ).stdout
    res: dict[str, str] = {}
    for rec in out.split(b"\0"):
        if rec:
            res[os.fsdecode(rec[3:])] = "untracked" if rec[:2] == b"??" else "changed"
    return res


ODD = ["with space.txt", "new\nline.txt", "ünïcødé.txt", "-leading-dash.txt", "tab\tq'\"$x.txt"]
NON_UTF8 = os.fsdecode(b"latin1-\xe9.txt")


def build_host(tmp: Path) -> Path:
    """A host repository with two commits and every kind of uncommitted change."""
    host = make_repo(tmp / "host")
    (host / ".gitignore").write_text("*.log\nsecret/\n")
    (host / "a.txt").write_text("alpha\n")
    (host / "dir" / "deep").mkdir(parents=True)
    (host / "dir" / "b.txt").write_text("bravo\n")
    (host / "dir" / "deep" / "c.txt").write_text("charlie\n")
    for n in [*ODD, NON_UTF8]:
        (host / n).write_text(f"content of {n!r}\n")
    (host / "bin.dat").write_bytes(bytes(range(256)) * 64)
    (host / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (host / "rm-me.txt").write_text("to be deleted\n")
    (host / "staged.txt").write_text("old\n")
    os.symlink("a.txt", host / "link-in")
    os.symlink("../../outside/target", host / "link-out")
    os.symlink("/etc/hostname", host / "link-abs")
    commit(host, "one")
    (host / "a.txt").write_text("alpha v2\n")
    commit(host, "two")
    git(host, "remote", "add", "origin", "https://example.invalid/team/host.git")
    # uncommitted: unstaged edit, staged edit, deletion, exec bit, binary edit, new files
    (host / "a.txt").write_text("alpha v3, not committed\n")
    (host / "staged.txt").write_text("new staged\n")
    git(host, "add", "staged.txt")
    (host / "rm-me.txt").unlink()
    os.chmod(host / "script.sh", 0o755)
    (host / "bin.dat").write_bytes(b"\0\1\2binary\xff" * 300)
    (host / "added.txt").write_text("staged new file\n")
    git(host, "add", "added.txt")
    (host / "untracked file.txt").write_text("untracked\n")
    (host / NON_UTF8).write_text("edited, not committed\n")
    (host / os.fsdecode(b"untracked-\xff")).write_text("untracked, not UTF-8\n")
    (host / "-untracked-dash").write_text("untracked\n")
    (host / "udir").mkdir()
    (host / "udir" / "nested new").write_text("untracked in new dir\n")
    (host / "debug.log").write_text("ignored, never shipped\n")
    (host / "secret").mkdir()
    (host / "secret" / "key").write_text("ignored, never shipped\n")
    return host


IGNORED = ("debug.log", "secret")
UNTRACKED = ("untracked file.txt", "-untracked-dash", "udir", os.fsdecode(b"untracked-\xff"))


# --- prepare -----------------------------------------------------------------------------


async def test_prepare_ships_history_worktree_identity_origin(tmp_path: Path) -> None:
    host = build_host(tmp_path / "host: a dir")  # ':' would split git's alternates list
    guest = tmp_path / "guest: $x 'q'" / "repo"
    host_index = (host / ".git" / "index").read_bytes()
    p = await prepare(host, guest, include_untracked=True)
    assert p.plan.mode == "fresh" and p.state.status == "absent"
    assert snapshot(guest) == snapshot(host, skip=IGNORED)
    assert not (guest / "debug.log").exists() and not (guest / "secret").exists()
    assert os.readlink(guest / "link-out") == "../../outside/target"
    assert os.readlink(guest / "link-abs") == "/etc/hostname"
    assert ggit(guest, "rev-parse", "HEAD") == git(host, "rev-parse", "HEAD") == p.target
    assert ggit(guest, "symbolic-ref", "--short", "HEAD") == "main"
    assert ggit(guest, "log", "--format=%s") == "two\none"
    assert ggit(guest, "config", "user.name") == "Host User"
    assert ggit(guest, "config", "user.email") == "host@example.org"
    assert ggit(guest, "remote", "get-url", "origin") == "https://example.invalid/team/host.git"
    assert status_paths(guest, GUEST_ENV) == {
        k: v for k, v in status_paths(host).items() if not k.startswith(IGNORED)
    }
    assert "A  added.txt" in git(host, "status", "--short")
    assert " A added.txt" in ggit(guest, "status", "--short")
    ggit(guest, "fsck", "--no-progress")
    # reading the host repository did not rewrite its index
    assert (host / ".git" / "index").read_bytes() == host_index


async def test_untracked_only_on_request_and_ignored_never(tmp_path: Path) -> None:
    host = build_host(tmp_path)
    guest = tmp_path / "g" / "repo"
    p = await prepare(host, guest)
    assert snapshot(guest) == snapshot(host, skip=IGNORED + UNTRACKED)
    assert not any(i.path.startswith(UNTRACKED + IGNORED) for i in p.plan.ship)
    assert set(status_paths(guest, GUEST_ENV)) == {
        k for k in status_paths(host) if not k.startswith(UNTRACKED + IGNORED)
    }


async def test_prepare_empty_repo_then_first_commit(tmp_path: Path) -> None:
    host = make_repo(tmp_path / "host")
    (host / "staged").write_text("s\n")
    git(host, "add", "staged")
    (host / "loose").write_text("l\n")
    guest = tmp_path / "g" / "repo"
    p = await prepare(host, guest, include_untracked=True)
    assert p.target is None
    assert snapshot(guest) == snapshot(host)
    assert ggit(guest, "status", "--short") == " A staged\n?? loose"
    assert ggit(guest, "symbolic-ref", "--short", "HEAD") == "main"
    # with no commit to diff against, an export is taken against the empty tree
    (guest / "loose").write_text("changed in the guest\n")
    res = await export(guest, EMPTY_TREE)
    assert sorted(res.files) == [("A", "loose"), ("A", "staged")]
    copy = tmp_path / "copy"
    make_repo(copy)
    apply_patch(copy, res.patch)
    assert snapshot(copy) == snapshot(guest)
    (guest / "loose").write_text("l\n")
    # the host makes its first commit: the guest follows
    head = commit(host, "first")
    p2 = await prepare(host, guest, include_untracked=True)
    assert p2.plan.mode == "update" and p2.target == head
    assert ggit(guest, "rev-parse", "HEAD") == head
    assert ggit(guest, "status", "--short") == ""
    assert p2.plan.ship == ()


async def test_prepare_detached_head(tmp_path: Path) -> None:
    host = build_host(tmp_path)
    first = git(host, "rev-parse", "HEAD~1")
    git(host, "stash", "-q", "--include-untracked")
    git(host, "checkout", "-q", "--detach", first)
    (host / "a.txt").write_text("edited on detached\n")
    guest = tmp_path / "g" / "repo"
    p = await prepare(host, guest)
    assert p.target == first and p.plan.branch is None
    assert ggit(guest, "rev-parse", "HEAD") == first
    with pytest.raises(subprocess.CalledProcessError):
        ggit(guest, "symbolic-ref", "-q", "HEAD")
    assert ggit(guest, "status", "--short") == " M a.txt"
    assert snapshot(guest) == snapshot(host, skip=IGNORED)


async def test_guest_only_branch_from_ref(tmp_path: Path) -> None:
    host = build_host(tmp_path)
    head = git(host, "rev-parse", "HEAD")
    first = git(host, "rev-parse", "HEAD~1")
    guest = tmp_path / "g" / "repo"
    p = await prepare(host, guest, include_untracked=True, branch="feature/x", from_ref="HEAD~1")
    assert p.target == first
    assert ggit(guest, "symbolic-ref", "--short", "HEAD") == "feature/x"
    assert ggit(guest, "rev-parse", "feature/x") == first
    assert ggit(guest, "rev-parse", "main") == head
    assert snapshot(guest) == snapshot(host, skip=IGNORED)
    with pytest.raises(InvalidArgument, match="branch name"):
        await prepare(host, guest, branch="bad..name")
    with pytest.raises(InvalidArgument, match="--from needs --branch"):
        await prepare(host, guest, from_ref="HEAD")
    with pytest.raises(InvalidArgument, match="names no commit"):
        await prepare(host, guest, branch="y", from_ref="no-such-ref")


async def test_shallow_history_depth_with_merges(tmp_path: Path) -> None:
    host = make_repo(tmp_path / "host")
    for i in range(6):
        (host / "f").write_text(f"{i}\n")
        commit(host, f"main {i}")
    git(host, "checkout", "-q", "-b", "side", "HEAD~3")
    for i in range(3):
        (host / f"side{i}").write_text(f"{i}\n")
        commit(host, f"side {i}")
    git(host, "checkout", "-q", "main")
    git(host, "merge", "-q", "--no-edit", "side")
    (host / "f").write_text("after\n")
    commit(host, "after merge")
    guest = tmp_path / "g" / "repo"
    await prepare(host, guest, depth=3)
    # depth 3 from the tip: tip, merge, and both parents of the merge
    assert ggit(guest, "rev-list", "--count", "HEAD") == "4"
    assert len((guest / ".git" / "shallow").read_text().split()) == 2
    ggit(guest, "fsck", "--no-progress")
    assert ggit(guest, "log", "--format=%s", "-1") == "after merge"
    guest2 = tmp_path / "g2" / "repo"
    await prepare(host, guest2, depth=None)
    assert ggit(guest2, "rev-list", "--count", "HEAD") == git(host, "rev-list", "--count", "HEAD")
    assert not (guest2 / ".git" / "shallow").exists()


# --- re-prepare --------------------------------------------------------------------------


def spread_repo(tmp: Path, n: int = 120) -> Path:
    host = make_repo(tmp / "host")
    for i in range(n):
        d = host / f"d{i % 6}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:03d}.txt").write_bytes(os.urandom(8000).hex().encode())
    commit(host, "bulk")
    return host


async def test_reprepare_sends_only_the_changed_file(tmp_path: Path) -> None:
    host = spread_repo(tmp_path)
    guest = tmp_path / "g" / "repo"
    first = await prepare(host, guest)
    assert first.payload_size > 120 * 8000  # the first prepare carried everything
    (host / "d1" / "f001.txt").write_text("changed on the host\n")
    (host / "d2" / "f002.txt").unlink()
    (host / "d3" / "f003.txt").unlink()  # the last file of... no: d3 keeps others
    again = await prepare(host, guest)
    assert again.plan.mode == "update" and again.plan.pack_tips == ()
    assert [i.path for i in again.plan.ship] == ["d1/f001.txt"]
    assert sorted(again.plan.delete) == ["d2/f002.txt", "d3/f003.txt"]
    assert again.payload_size < 16 * 1024
    assert snapshot(guest) == snapshot(host)
    assert status_paths(guest, GUEST_ENV) == status_paths(host)
    # nothing changed: nothing but the frame headers and an empty tar marker
    idle = await prepare(host, guest)
    assert idle.plan.ship == () and idle.plan.delete == () and idle.payload_size < 200


async def test_tree_split_into_several_packs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(payload_mod, "FIRST_BATCH", 50_000)
    monkeypatch.setattr(payload_mod, "MAX_BATCH", 200_000)
    host = spread_repo(tmp_path)
    (host / "d0" / "f000.txt").write_text("uncommitted\n")
    guest = tmp_path / "g" / "repo"
    await prepare(host, guest)
    packs = list((guest / ".git" / "objects" / "pack").glob("*.idx"))
    assert len(packs) >= 5  # ~1.9 MB of blobs in packs of 50 kB, 100 kB, 200 kB...
    assert snapshot(guest) == snapshot(host)
    ggit(guest, "fsck", "--no-progress")
    assert status_paths(guest, GUEST_ENV) == {"d0/f000.txt": "changed"}


async def test_abandoned_payload_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(payload_mod, "FIRST_BATCH", 50_000)
    host = spread_repo(tmp_path)
    runner = Runner()
    info = await inspect_repo(runner, host)
    plan = await plan_transfer(runner, info, await list_files(runner, host, False), None)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    gen = build_payload(runner, plan, tmp_dir=scratch)
    got = b""
    async for chunk in gen:
        got += chunk
        if len(got) > 100_000:
            break
    assert any(scratch.iterdir())  # packs are being built there
    await gen.aclose()  # the SSH session died: the service closes the stream
    assert list(scratch.iterdir()) == []


async def test_reprepare_after_host_commit_sends_only_new_objects(tmp_path: Path) -> None:
    host = spread_repo(tmp_path)
    guest = tmp_path / "g" / "repo"
    await prepare(host, guest)
    (host / "d0" / "f000.txt").write_text("committed change\n")
    (host / "d4" / "f004.txt").unlink()
    head = commit(host, "small change")
    (host / "d5" / "f005.txt").write_text("and an uncommitted one\n")
    again = await prepare(host, guest)
    assert again.plan.mode == "update"
    assert again.plan.pack_exclude and again.plan.shallow_add == ()
    assert again.payload_size < 16 * 1024
    assert [i.path for i in again.plan.ship] == ["d5/f005.txt"]
    assert again.plan.restore == ("d0/f000.txt",)
    assert ggit(guest, "rev-parse", "HEAD") == head
    assert ggit(guest, "log", "--format=%s") == "small change\nbulk"
    assert snapshot(guest) == snapshot(host)
    assert status_paths(guest, GUEST_ENV) == {"d5/f005.txt": "changed"}
    ggit(guest, "fsck", "--no-progress")


async def test_reprepare_mirrors_host_and_keeps_guest_commits_reachable(tmp_path: Path) -> None:
    host = build_host(tmp_path)
    guest = tmp_path / "g:1" / "repo"
    await prepare(host, guest, include_untracked=True)
    # the guest edits, commits, adds and ignores things
    (guest / "dir" / "b.txt").write_text("guest edit\n")
    guest_commit = commit(guest, "guest work", env=GUEST_ENV)
    (guest / "a.txt").write_text("guest uncommitted\n")
    (guest / "guest-untracked.txt").write_text("g\n")
    (guest / "build.log").write_text("ignored output survives\n")
    os.chmod(guest / "script.sh", 0o644)
    (guest / "with space.txt").unlink()
    # the host changes too: a file becomes a directory, a mode flips back
    (host / "dir" / "b.txt").unlink()
    (host / "dir" / "b.txt").mkdir()
    (host / "dir" / "b.txt" / "inside").write_text("now a directory\n")
    again = await prepare(host, guest, include_untracked=True)
    assert again.plan.mode == "update"
    assert snapshot(guest, skip=("build.log",)) == snapshot(host, skip=IGNORED)
    assert (guest / "build.log").read_text() == "ignored output survives\n"
    assert ggit(guest, "rev-parse", "refs/stoker/previous-head") == guest_commit
    assert ggit(guest, "rev-parse", "HEAD") == git(host, "rev-parse", "HEAD")
    assert status_paths(guest, GUEST_ENV) == {
        k: v for k, v in status_paths(host).items() if not k.startswith(IGNORED)
    }


async def test_interrupted_import_is_reset_next_time(tmp_path: Path) -> None:
    host = build_host(tmp_path)
    guest = tmp_path / "g" / "repo"
    await prepare(host, guest, include_untracked=True)
    runner = Runner()
    info = await inspect_repo(runner, host)
    files = await list_files(runner, host, True)
    (host / "a.txt").write_text("changed again\n")
    plan = await plan_transfer(runner, info, files, await probe(guest))
    payload = b"".join([c async for c in build_payload(runner, plan)])
    cut = payload[: payload.index(b"tar -1\n")]  # the guest starts, then the stream stops

    async def truncated() -> AsyncIterator[bytes]:
        yield cut

    res = await run_guest(guest_import_script(str(guest), plan), truncated())
    with pytest.raises(CommandFailed, match="payload ended early"):
        check_import_result(*res)
    assert (await probe(guest)).status == "incomplete"
    (guest / "stray.txt").write_text("left by the guest\n")
    again = await prepare(host, guest, include_untracked=True)
    assert again.plan.mode == "reset"
    assert snapshot(guest) == snapshot(host, skip=IGNORED)
    assert (await probe(guest)).status == "ok"


async def test_guest_path_occupied_by_something_else(tmp_path: Path) -> None:
    host = build_host(tmp_path)
    occupied = tmp_path / "g1" / "repo"
    occupied.mkdir(parents=True)
    (occupied / "precious").write_text("user data\n")
    with pytest.raises(Conflict, match="did not create"):
        await prepare(host, occupied)
    assert (occupied / "precious").read_text() == "user data\n"
    afile = tmp_path / "g2" / "repo"
    afile.parent.mkdir()
    afile.write_text("a file\n")
    with pytest.raises(Conflict, match="is a file"):
        await prepare(host, afile)
    empty = tmp_path / "g3" / "repo"
    empty.mkdir(parents=True)
    assert (await prepare(host, empty)).plan.mode == "fresh"


async def test_state_probe_changes_nothing(tmp_path: Path) -> None:
    host = build_host(tmp_path)
    guest = tmp_path / "g" / "repo"
    await prepare(host, guest, include_untracked=True)
    (guest / "a.txt").write_text("dirty in guest\n")
    (guest / "brand new").write_text("n\n")
    before = _repo_fingerprint(guest)
    state = await probe(guest)
    assert state.dirty["brand new"] is not None and "a.txt" in state.dirty
    assert _repo_fingerprint(guest) == before


# --- export ------------------------------------------------------------------------------


def _repo_fingerprint(repo: Path) -> tuple[bytes, str, str, Snapshot]:
    objects = sorted(
        os.path.relpath(os.path.join(d, f), repo)
        for d, _, fs in os.walk(repo / ".git" / "objects")
        for f in fs
    )
    refs = ggit(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    return (repo / ".git" / "index").read_bytes(), "\n".join(objects), refs, snapshot(repo)


def guest_changes(guest: Path) -> None:
    """Edits, a commit, a new untracked file, a deletion, a binary change, mode changes."""
    (guest / "dir" / "deep" / "c.txt").write_text("charlie, edited in the guest\n")
    commit(guest, "guest commit", env=GUEST_ENV)
    (guest / "a.txt").write_text("alpha, edited after the guest commit\n")
    (guest / "guest new\nfile.txt").write_text("made in the guest\n")
    (guest / "ünïcødé.txt").unlink()
    (guest / "bin.dat").write_bytes(b"\xff\xfe changed binary \0\0" * 500)
    os.chmod(guest / "-leading-dash.txt", 0o755)
    os.chmod(guest / "script.sh", 0o644)
    os.symlink("dir/b.txt", guest / "guest-link")
    (guest / "guest-ignored.log").write_text("ignored: not exported\n")


def apply_patch(repo: Path, patch: bytes) -> None:
    r = subprocess.run(
        ["git", "apply", "--binary", "-"], cwd=repo, input=patch, capture_output=True
    )
    assert r.returncode == 0, r.stderr.decode()


async def test_export_round_trip_onto_prepared_commit(tmp_path: Path) -> None:
    host = build_host(tmp_path)
    guest = tmp_path / "g:1" / "repo"
    p = await prepare(host, guest, include_untracked=True)
    assert p.target is not None
    guest_changes(guest)
    before = _repo_fingerprint(guest)
    res = await export(guest, p.target)
    assert _repo_fingerprint(guest) == before  # index, objects, refs, work tree untouched
    assert b"GIT binary patch" in res.patch
    status = dict((path, st) for st, path in res.files)
    assert status["ünïcødé.txt"] == "D" and status["guest new\nfile.txt"] == "A"
    assert status["bin.dat"] == "M" and status["dir/deep/c.txt"] == "M"
    assert status["rm-me.txt"] == "D" and status["untracked file.txt"] == "A"
    assert "guest-ignored.log" not in status
    # a fresh copy of the host repository at the prepared commit
    copy = tmp_path / "copy"
    git(tmp_path, "clone", "-q", "--no-checkout", str(host), str(copy))
    git(copy, "checkout", "-q", "--detach", p.target)
    apply_patch(copy, res.patch)
    assert snapshot(copy) == snapshot(guest, skip=("guest-ignored.log",))


async def test_export_against_shipped_state_applies_on_host_work_tree(tmp_path: Path) -> None:
    host = build_host(tmp_path)
    guest = tmp_path / "g" / "repo"
    await prepare(host, guest, include_untracked=True)
    guest_changes(guest)
    res = await export(guest, SHIPPED_REF)
    status = {path for _st, path in res.files}
    assert "rm-me.txt" not in status and "untracked file.txt" not in status  # host's own
    copy = tmp_path / "copy"
    shutil.copytree(host, copy, symlinks=True)
    apply_patch(copy, res.patch)
    assert snapshot(copy, skip=IGNORED) == snapshot(guest, skip=("guest-ignored.log",))


async def test_export_with_nothing_changed_is_empty(tmp_path: Path) -> None:
    host = spread_repo(tmp_path, 10)
    guest = tmp_path / "g" / "repo"
    p = await prepare(host, guest)
    assert p.target is not None
    for base in (p.target, SHIPPED_REF):
        res = await export(guest, base)
        assert res.patch == b"" and res.files == []


async def test_export_errors_are_clear(tmp_path: Path) -> None:
    host = spread_repo(tmp_path, 5)
    guest = tmp_path / "g" / "repo"
    p = await prepare(host, guest)
    with pytest.raises(InvalidArgument, match="not in the VM's repository"):
        await export(guest, "0123456789012345678901234567890123456789")
    shutil.rmtree(guest)
    assert p.target is not None
    with pytest.raises(NotFound, match=f"{guest} does not exist.*prepare"):
        await export(guest, p.target)
    guest.mkdir()
    with pytest.raises(NotFound, match="not a git checkout"):
        await export(guest, p.target)
