"""Running stoker code as a throwaway non-root user (tests make the user, then remove it).

The venv's interpreter lives under /root here, which another user cannot execute; the
system Python of the same version runs the same code with the venv's site-packages on
its path.
"""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[3] / "src"


def nonroot_python() -> tuple[str, dict[str, str]]:
    """(interpreter, env) a non-root user can run stoker with."""
    site = sysconfig.get_paths()["purelib"]
    exe = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.access(exe, os.X_OK):
        pytest.skip(f"needs {exe} (the venv's interpreter is not reachable by other users)")
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": f"{SRC}:{site}",
        "LC_ALL": "C.UTF-8",
    }
    return exe, env


@dataclass
class NonRootUser:
    name: str
    uid: int
    gid: int
    home: Path

    def setpriv(self, *, groups: list[int] | None = None) -> list[str]:
        g = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", *g, "--"]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def make_user(prefix: str = "stkt") -> Iterator[NonRootUser]:
    """A system user with a home of its own, removed (with its home) afterwards."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    home = Path(f"/tmp/{name}-home")
    _run(
        "useradd", "--system", "--user-group", "--create-home", "--home-dir", str(home),
        "--shell", "/usr/sbin/nologin", name,
    )  # fmt: skip
    try:
        pw = pwd.getpwnam(name)
        yield NonRootUser(name, pw.pw_uid, pw.pw_gid, home)
    finally:
        subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=30)
        subprocess.run(["groupdel", name], capture_output=True, timeout=30)


@contextmanager
def make_group(prefix: str = "stkg") -> Iterator[tuple[str, int]]:
    import grp

    name = f"{prefix}-{secrets.token_hex(3)}"
    _run("groupadd", "--system", name)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], capture_output=True, timeout=30)
