"""Completion driven through each real shell: bash (COMP_WORDS/compgen harness), zsh (the
generated function run by zsh with compinit loaded, and typed into an interactive zsh on a
pty through zsh/zpty) and fish (`complete -C`, fish's own completion engine). The shells run
`stoker __complete` from this tree against an in-process daemon, so live names are real.

zsh and fish are installed by scripts/setup: under CI=true a missing shell fails the test,
elsewhere it is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import stoker
from prereq import require
from stoker.cli import completion

pytestmark = pytest.mark.unit

SRC = Path(stoker.__file__).resolve().parents[1]


def need(shell: str) -> str:
    exe = shutil.which(shell)
    require(exe, f"{shell} is not installed (scripts/setup installs it)")
    assert exe is not None
    return exe


@pytest.fixture
def env(short_tmp: Path, isolated_env: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """PATH with a `stoker` that runs this tree, and a cwd holding a dir and a file; the
    isolated layout's XDG dirs, so the shells reach the test's daemon (or none)."""
    bindir = short_tmp / "bin"
    bindir.mkdir()
    exe = bindir / "stoker"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} -m stoker.cli.main "$@"\n')
    exe.chmod(0o755)
    work = short_tmp / "work"
    (work / "proj").mkdir(parents=True)
    (work / "notes.txt").write_text("x")
    monkeypatch.chdir(work)
    e = dict(os.environ)
    e["PATH"] = f"{bindir}:{e.get('PATH', '/usr/bin:/bin')}"
    e["PYTHONPATH"] = str(SRC)
    return e


@pytest.fixture
def names(threaded_daemon: Any) -> None:
    """A VM `web`, an image `img` and a kernel `kern` in the daemon the shells ask."""
    from stoker.model.records import Image, Kernel, VMRecord, VMSpec, VMState
    from stoker.store.db import now

    store = threaded_daemon.daemon.store
    store.upsert_image(Image("img", True, "/r", None, None, "test", 5 << 30, now()))
    store.upsert_kernel(
        Kernel("kern", "6.1", "x86_64", "/k", None, "/k/bz", None, None, "test", now())
    )
    store.insert_vm(
        VMRecord(
            id="web0123456789abcdef",
            name="web",
            state=VMState.STOPPED,
            image="img",
            spec=VMSpec(2, 2048, 8 << 30, 8 << 30),
            guest_ip="172.30.0.2",
            dns_name="web.vm",
            vm_dir="/nonexistent/web",
            created_at=now(),
            updated_at=now(),
        )
    )


def bash_complete(env: dict[str, str], line: str) -> list[str]:
    """Complete `line` (the cursor at its end) as bash's programmable completion would."""
    words = line.split(" ")
    arr = " ".join(f"'{w}'" for w in words)
    probe = (
        completion.script("bash")
        + f"\nCOMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}; _stoker; "
        + 'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = subprocess.run(
        ["bash", "--norc", "-c", probe], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.splitlines() if ln]


def zsh_complete(env: dict[str, str], line: str) -> list[str]:
    """Run the generated zsh function under zsh with compinit; compadd/_files record what
    it offers (@FILES / @DIRS for the file completers)."""
    zsh = need("zsh")
    words = line.split(" ")
    arr = " ".join(f"'{w}'" for w in words)
    script = Path(env["PATH"].split(":", 1)[0]) / "_stoker.zsh"
    script.write_text(completion.script("zsh"))
    probe = f"""
autoload -U compinit && compinit -u -D
source {script}
[[ "$_comps[stoker]" == _stoker ]] || {{ print -u2 "compdef did not register"; exit 3; }}
compadd() {{ while [[ $# -gt 0 && "$1" != "--" ]]; do shift; done; shift; print -rl -- "$@"; }}
_files() {{ if [[ "$1" == "-/" ]]; then print @DIRS; else print @FILES; fi; }}
words=({arr}); CURRENT={len(words)}
_stoker
"""
    r = subprocess.run(
        [zsh, "-f", "-c", probe], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.splitlines() if ln]


def fish_complete(env: dict[str, str], line: str) -> list[str]:
    fish = need("fish")
    script = Path(env["PATH"].split(":", 1)[0]) / "stoker.fish"
    script.write_text(completion.script("fish"))
    e = {**env, "XDG_CONFIG_HOME": str(script.parent), "XDG_DATA_HOME": str(script.parent)}
    r = subprocess.run(
        [fish, "--no-config", "-c", f"source {script}; complete -C '{line}'"],
        env=e,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return [ln.split("\t", 1)[0] for ln in r.stdout.splitlines() if ln]


# (typed line, must offer, must not offer). The cases issue 15 listed as wrong come first.
CASES = [
    ("stoker vm workspace ", {"prepare", "export"}, {"web"}),
    ("stoker image cache ", {"prune"}, set()),
    ("stoker completion ", {"bash", "zsh", "fish"}, set()),
    ("stoker -", {"--version", "--debug", "--config", "--system"}, {"__names"}),
    ("stoker vm create --image ", {"img"}, {"web"}),
    ("stoker kernel import k --from ", {"notes.txt"}, {"kern"}),
    ("stoker ", {"vm", "image", "kernel", "completion"}, {"__names", "__complete"}),
    ("stoker vm show ", {"web"}, {"img"}),
    ("stoker vm start web ", {"web"}, set()),
    ("stoker image show ", {"img"}, {"web"}),
    ("stoker image register x --kernel ", {"kern"}, set()),
    ("stoker vm list --format na", {"name"}, set()),
    ("stoker vm list -", {"-q", "--quiet", "--format", "--json"}, set()),
    ("stoker vm exec web -- ", {"notes.txt"}, {"web"}),
]


def _dirs(offered: list[str]) -> set[str]:
    return {o.rstrip("/") for o in offered}


@pytest.mark.parametrize(("line", "want", "unwanted"), CASES)
def test_bash(
    env: dict[str, str], names: None, line: str, want: set[str], unwanted: set[str]
) -> None:
    got = set(bash_complete(env, line))
    assert want <= got and not unwanted & got, got


@pytest.mark.parametrize(("line", "want", "unwanted"), CASES)
def test_fish(
    env: dict[str, str], names: None, line: str, want: set[str], unwanted: set[str]
) -> None:
    got = _dirs(fish_complete(env, line))
    assert want <= got and not unwanted & got, got


def test_bash_paths_are_dirs_or_files(env: dict[str, str], names: None) -> None:
    # `vm run PATH` wants a work tree: directories only, and no VM names.
    assert bash_complete(env, "stoker vm run ") == ["proj"]
    assert set(bash_complete(env, "stoker kernel import k --from ")) == {"proj", "notes.txt"}
    assert bash_complete(env, "stoker vm workspace prepare web ") == ["proj"]
    # --opt=value, which bash splits at `=` (COMP_WORDS --image, =, i)
    assert bash_complete(env, "stoker vm create --image =") == ["img"]
    assert bash_complete(env, "stoker vm create --image = i") == ["img"]


def test_fish_paths(env: dict[str, str], names: None) -> None:
    assert _dirs(fish_complete(env, "stoker vm run ")) == {"proj"}
    assert _dirs(fish_complete(env, "stoker vm create --image=")) == {"--image=img"}


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("stoker vm workspace ", ["prepare", "export"]),
        ("stoker image cache ", ["prune"]),
        ("stoker completion ", ["bash", "zsh", "fish"]),
        ("stoker vm create --image ", ["img"]),
        ("stoker vm show ", ["web"]),
        ("stoker vm run ", ["@DIRS"]),
        ("stoker kernel import k --from ", ["@FILES"]),
        ("stoker vm exec web -- ", ["@FILES"]),
    ],
)
def test_zsh(env: dict[str, str], names: None, line: str, want: list[str]) -> None:
    assert zsh_complete(env, line) == want


def zsh_interactive(env: dict[str, str], typed: str, expect: str) -> bool:
    """Type `typed` (with its TABs) into a real interactive zsh on a pty (zsh/zpty), with
    compinit and the script loaded; True once `expect` shows on the screen."""
    zsh = need("zsh")
    script = Path(env["PATH"].split(":", 1)[0]) / "_stoker.zsh"
    script.write_text(completion.script("zsh"))
    probe = f"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1='%% '; autoload -U compinit; compinit -u -D; source {script}"
zpty -w -n z $'{typed}'
zpty -r z out '*{expect}*' && print -r -- FOUND
zpty -d z
"""
    try:
        r = subprocess.run(
            [zsh, "-f", "-c", probe], env=env, capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return False
    return "FOUND" in r.stdout


@pytest.mark.parametrize(
    ("typed", "expect"),
    [
        ("stoker vm works\\t", "workspace"),
        ("stoker vm workspace \\t\\t", "prepare"),
        ("stoker image cac\\t", "cache"),
        ("stoker vm create --image \\t", "--image img"),
        ("stoker vm run \\t", "run proj"),
        ("stoker kernel import k --from no\\t", "notes.txt"),
    ],
)
def test_zsh_interactive(env: dict[str, str], names: None, typed: str, expect: str) -> None:
    assert zsh_interactive(env, typed, expect), f"{typed!r} did not show {expect!r}"


def test_zsh_flags(env: dict[str, str]) -> None:
    got = zsh_complete(env, "stoker -")
    assert {"--version", "--debug"} <= set(got) and not any("__" in g for g in got)


def test_no_daemon_means_no_names_and_no_autostart(env: dict[str, str], isolated_env: Any) -> None:
    t0 = time.monotonic()
    assert bash_complete(env, "stoker vm show ") == []
    assert time.monotonic() - t0 < 10
    assert not isolated_env.socket_path.exists(), "completion started a daemon"
    assert bash_complete(env, "stoker vm workspace ") == ["prepare", "export"]


def test_scripts_parse() -> None:
    for shell, check in (("bash", ["bash", "-n"]), ("zsh", None), ("fish", None)):
        exe = shutil.which(shell)
        if exe is None:
            continue
        r = subprocess.run(
            check or [exe, "-n"],
            input=completion.script(shell),
            text=True,
            capture_output=True,
            timeout=10,
        )
        assert r.returncode == 0, (shell, r.stderr)
