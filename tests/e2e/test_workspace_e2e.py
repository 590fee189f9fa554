"""Workspace round trip on a real guest: prepare a repo with staged, unstaged, untracked and
deleted changes, edit and commit in the guest, export, `git apply` on a copy of the host
repo, compare trees byte for byte. Plus `vm run PATH -- CMD` and the stop/start check."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from stokerenv import StokerEnv

pytestmark = pytest.mark.e2e

# Prints {path: [exec_bit, sha256]} of a work tree, .git excluded (host and guest alike).
TREE_PY = r"""
import hashlib, json, os, sys
root = sys.argv[1]
out = {}
for d, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if not (d == root and x == ".git")]
    for f in files:
        p = os.path.join(d, f)
        rel = os.path.relpath(p, root)
        if os.path.islink(p):
            out[rel] = ["link", os.readlink(p)]
        else:
            with open(p, "rb") as fh:
                out[rel] = [bool(os.stat(p).st_mode & 0o100), hashlib.sha256(fh.read()).hexdigest()]
print(json.dumps(out, sort_keys=True))
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def host_tree(root: Path) -> dict[str, list[object]]:
    out = subprocess.run(
        ["python3", "-c", TREE_PY, str(root)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def make_repo(root: Path) -> Path:
    repo = root / "proj"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Test Dev")
    git(repo, "config", "user.email", "dev@example.invalid")
    (repo / "README.md").write_text("hello\n")
    (repo / "keep.txt").write_text("keep\n")
    (repo / "gone.txt").write_text("to be deleted on the host\n")
    (repo / "name with spaces.txt").write_text("spaces\n")
    (repo / "bin.dat").write_bytes(bytes(range(256)) * 64)
    (repo / ".gitignore").write_text("secret.env\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    (repo / "README.md").write_text("hello\nstaged line\n")
    git(repo, "add", "README.md")
    (repo / "keep.txt").write_text("keep\nunstaged edit\n")
    (repo / "gone.txt").unlink()
    (repo / "untracked.txt").write_text("untracked\n")
    (repo / "secret.env").write_text("TOKEN=never-ship-me\n")
    return repo


def test_round_trip(env: StokerEnv) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="stk-ws-"))
    try:
        repo = make_repo(tmp)
        r = env.run("vm", "run", str(repo), "--name", "w1", "--include-untracked", "-d")
        assert "w1 is running" in r.stdout
        status = env.run("vm", "exec", "w1", "--", "git", "status", "--short").stdout
        assert "README.md" in status and "keep.txt" in status and "gone.txt" in status
        assert "untracked.txt" in status
        ls = env.run("vm", "exec", "w1", "--", "ls", "-a").stdout.split()
        assert "secret.env" not in ls, "an ignored file was shipped"
        assert (
            env.run("vm", "exec", "w1", "--", "git", "log", "--format=%an").stdout.strip()
            == "Test Dev"
        )
        # The workspace survives a stop/start (the prior art lost it).
        before = env.run("vm", "exec", "w1", "--", "python3", "-c", TREE_PY, ".").stdout
        env.run("vm", "stop", "w1")
        env.run("vm", "start", "w1")
        after = env.run("vm", "exec", "w1", "--", "python3", "-c", TREE_PY, ".").stdout
        assert json.loads(after) == json.loads(before)
        # Work in the guest: a commit, an edit, a new file, a deletion, binary + mode changes.
        script = (
            "set -e; echo 'guest commit' >> README.md; git add README.md;"
            " git -c user.name=G -c user.email=g@x.invalid commit -qm guest;"
            " echo 'uncommitted' >> keep.txt; echo new > 'new file.txt'; rm untracked.txt;"
            " head -c 5000 /dev/urandom > bin.dat; printf '#!/bin/sh\\necho hi\\n' > run.sh;"
            " chmod +x run.sh; chmod +x 'name with spaces.txt'"
        )
        env.run("vm", "exec", "w1", "--", "bash", "-c", script)
        guest_tree = json.loads(
            env.run("vm", "exec", "w1", "--", "python3", "-c", TREE_PY, ".").stdout
        )
        guest_index = env.run("vm", "exec", "w1", "--", "sha256sum", ".git/index").stdout
        patch = tmp / "out.patch"
        env.run("vm", "workspace", "export", "w1", "--output", str(patch))
        # Export never touches the guest repo.
        assert env.run("vm", "exec", "w1", "--", "sha256sum", ".git/index").stdout == guest_index
        # The patch is against the prepared commit (it carries the host's uncommitted
        # changes too): apply it on a clean copy of the host repo at that commit.
        copy = tmp / "copy"
        subprocess.run(["git", "clone", "-q", str(repo), str(copy)], check=True)
        subprocess.run(["git", "-C", str(copy), "apply", "--binary", str(patch)], check=True)
        assert host_tree(copy) == guest_tree
        # Nothing changed since: an empty patch, exit 0.
        env.run(
            "vm",
            "exec",
            "w1",
            "--",
            "bash",
            "-c",
            "git add -A && git -c user.name=G -c user.email=g@x.invalid commit -qm all",
        )
        r = env.run("vm", "workspace", "export", "w1", "--base-commit", "HEAD")
        assert r.stdout == ""
        # The guest repo deleted: a clear error.
        env.run("vm", "exec", "w1", "--", "rm", "-rf", "/root/repo")
        r = env.run("vm", "workspace", "export", "w1", check=False)
        assert r.returncode == 1 and "prepare" in r.stderr
    finally:
        env.run("vm", "delete", "w1", check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def test_vm_run_shows_uncommitted_edit_and_exit_code(env: StokerEnv) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="stk-self-"))
    try:
        # This project's own checkout, with an uncommitted edit.
        src = Path(__file__).resolve().parents[2]
        clone = tmp / "self"
        subprocess.run(["git", "clone", "-q", str(src), str(clone)], check=True)
        with open(clone / "README.md", "a") as f:
            f.write("\nan uncommitted edit\n")
        before = env.run("vm", "list", "--json").stdout
        r = env.run(
            "vm", "run", str(clone), "--rm", "--", "git", "-C", "/root/repo", "status", "--short"
        )
        assert " M README.md" in r.stdout
        # The guest command's exit code is ours; --rm deleted the VM.
        r = env.run("vm", "run", "--rm", "--", "bash", "-c", "exit 7", check=False)
        assert r.returncode == 7
        names = {v["name"] for v in json.loads(env.run("vm", "list", "--json").stdout)}
        assert names == {v["name"] for v in json.loads(before)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_run_bad_input_creates_nothing(env: StokerEnv, tmp_path: Path) -> None:
    before = env.run("vm", "list", "--json").stdout
    cases = [
        (["vm", "run", str(tmp_path / "missing"), "--", "true"], "does not exist"),
        (["vm", "run", str(tmp_path), "--", "true"], "not inside a git repository"),
        (["vm", "run", "-d", "--rm"], "-d and --rm"),
        (["vm", "run", "-d", "--", "true"], "-d and -- CMD"),
    ]
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    cases.append((["vm", "run", str(bare), "--", "true"], "bare"))
    for argv, msg in cases:
        r = env.run(*argv, check=False)
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        assert msg in r.stderr, (argv, r.stderr)
    assert env.run("vm", "list", "--json").stdout == before
    # --dry-run prints the file list and creates nothing.
    repo = make_repo(tmp_path)
    r = env.run("vm", "run", str(repo), "--dry-run")
    assert "keep.txt" in r.stdout and "untracked.txt" not in r.stdout
    assert "secret.env" not in r.stdout
    assert env.run("vm", "list", "--json").stdout == before
