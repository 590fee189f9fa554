"""Workload roots, host side: roles, the per-VM enter files and exec defaults."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from stoker.daemon.imagemgr import workload
from stoker.daemon.imagemgr.workload import DEFAULT_PATH, WorkloadConfig

pytestmark = pytest.mark.unit


def test_role_follows_the_ssh_server() -> None:
    assert workload.role_for(True) == "system" and workload.role_for(False) == "workload"


def test_meta_round_trip_and_old_images_get_defaults() -> None:
    cfg = WorkloadConfig([("PATH", "/bin"), ("A", "b=c")], "/srv", "app", 1000, 50, "/home/app")
    assert WorkloadConfig.from_meta({"workload": cfg.to_meta()}) == cfg
    old = WorkloadConfig.from_meta({})  # pulled before workload roots: no config kept
    assert (old.env, old.working_dir, old.uid, old.home) == (
        [("PATH", DEFAULT_PATH)],
        "/",
        0,
        "/root",
    )
    no_path = WorkloadConfig.from_meta({"workload": {"env": ["A=1"]}})
    assert no_path.env == [("PATH", DEFAULT_PATH), ("A", "1")]


def test_enter_files_are_safe_shell_words(tmp_path: Path) -> None:
    """workload.conf is sourced by stoker-enter: hostile values stay data."""
    evil = "/srv/$(touch pwned)'; touch pwned2 #"
    cfg = WorkloadConfig([("PATH", "/bin"), ("X", "$(id) `id` 'q'")], evil, "", 7, 8, "/h")
    files = workload.guest_files(cfg)
    conf = files[workload.CONF_FILE].decode()
    (tmp_path / "conf").write_text(conf)
    out = subprocess.run(
        [
            "sh",
            "-c",
            '. ./conf; printf "%s|%s|%s|%s" "$WORKLOAD_UID" "$WORKLOAD_GID" '
            '"$WORKLOAD_CWD" "$WORKLOAD_HOME"',
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == f"7|8|{evil}|/h"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    assert files[workload.ENV_FILE] == b"PATH=/bin\nX=$(id) `id` 'q'\n"
    assert f"WORKLOAD_CWD={shlex.quote(evil)}\n" in conf
    dropin = files[workload.SSHD_DROPIN].decode()
    assert dropin == "AcceptEnv STOKER_ROOT\nForceCommand /usr/lib/stoker/stoker-enter\n"


def test_exec_defaults_precedence() -> None:
    cfg = WorkloadConfig([("PATH", "/bin"), ("FOO", "img")], "/work", "app", 1000, 1000, "/h")
    env, cwd, user = workload.exec_defaults(cfg, {}, None, None, None)
    assert env == {"PATH": "/bin", "FOO": "img"} and cwd == "/work" and user == "1000:1000"
    env, cwd, user = workload.exec_defaults(cfg, {"FOO": "mine"}, None, "root", "/root/repo")
    assert env["FOO"] == "mine" and cwd == "/root/repo" and user == "root"
    _, cwd, _ = workload.exec_defaults(cfg, {}, "/tmp", None, "/root/repo")
    assert cwd == "/tmp"
