"""The runner: C locale for parsed output, and what `CommandFailed` carries."""

from __future__ import annotations

import asyncio

import pytest

from stoker.errors import CommandFailed
from stoker.runner import Runner

pytestmark = pytest.mark.unit


def test_run_forces_the_c_locale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Output the daemon parses must not be translated: a user's LANG/LC_ALL is overridden."""
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    res = asyncio.run(Runner().run(["sh", "-c", 'printf %s "$LC_ALL"']))
    assert res.out == "C"
    # also under a runner with its own environment, which keeps the rest of it
    res = asyncio.run(Runner(env={"X_T": "1"}).run(["sh", "-c", 'printf %s/%s "$LC_ALL" "$X_T"']))
    assert res.out == "C/1"


def test_explicit_env_may_set_the_locale() -> None:
    res = asyncio.run(Runner().run(["sh", "-c", 'printf %s "$LC_ALL"'], env={"LC_ALL": "C.UTF-8"}))
    assert res.out == "C.UTF-8"


def test_command_failed_carries_argv_status_and_stderr() -> None:
    argv = ["sh", "-c", "echo out; echo 'bad thing' >&2; exit 3"]
    with pytest.raises(CommandFailed) as ei:
        asyncio.run(Runner().run(argv))
    e = ei.value
    assert e.argv == tuple(argv)
    assert e.returncode == 3
    assert e.stderr == "bad thing\n"
    assert e.code == "command_failed"
    assert e.message.startswith("sh -c ") and "(exit 3): bad thing" in e.message


def test_command_failed_message_names_a_signal_and_falls_back_to_stdout() -> None:
    with pytest.raises(CommandFailed) as ei:
        asyncio.run(Runner().run(["sh", "-c", "echo only-stdout; kill -KILL $$"]))
    assert ei.value.returncode == -9
    assert "(killed by SIGKILL): only-stdout" in ei.value.message


def test_command_failed_message_stays_short_for_huge_argv() -> None:
    argv = ["sh", "-c", "exit 1", *(["x" * 100] * 50)]
    with pytest.raises(CommandFailed) as ei:
        asyncio.run(Runner().run(argv))
    assert len(ei.value.message) < 400 and ei.value.message.endswith("(exit 1): no output")
    assert ei.value.argv == tuple(argv)  # the whole command is still there


def test_check_false_returns_the_result() -> None:
    res = asyncio.run(Runner().run(["sh", "-c", "exit 4"], check=False))
    assert res.returncode == 4
