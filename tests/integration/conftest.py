"""Fixtures for integration tests that run real stoker processes in an isolated layout.

Every stokerd a test starts is found through the layout's pid and lock files at teardown
and stopped; nothing is killed by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from stoker.layout import Layout

if TYPE_CHECKING:
    from stoker.daemon.daemon import Daemon
    from stoker.rpc.server import RPCServer

BIN = Path(sys.executable).parent


def stoker_argv() -> list[str]:
    exe = BIN / "stoker"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stoker.cli.main"]


def stokerd_argv() -> list[str]:
    exe = BIN / "stokerd"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stoker.daemon.main"]


def _state(stat_path: str) -> str | None:
    try:
        stat = Path(stat_path).read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def pid_state(pid: int) -> str | None:
    """The /proc state letter of `pid`, or None when there is no such process."""
    return _state(f"/proc/{pid}/stat")


def alive(pid: int) -> bool:
    """True while any thread of `pid` is not yet dead.

    The leader's own state is not enough: after SIGKILL a multithreaded process (stokerd
    keeps asyncio's worker threads) can show a zombie leader while a sibling thread is
    still exiting, and the shared fd table (the listening socket, the lock) is only
    closed when the last thread is done."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(_state(f"/proc/{pid}/task/{t}/stat") not in (None, "Z", "X") for t in tasks)


def is_stokerd(pid: int) -> bool:
    if not alive(pid):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"stoker.daemon.main" in cmd or b"stokerd" in cmd


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def kill_daemon_of(layout: Layout) -> None:
    """Stop any stokerd serving `layout`, found through its pid and lock files only."""
    pids: set[int] = set()
    for f in (layout.pid_path, layout.lock_path):
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(f.read_text().strip()))
    for pid in pids:
        if pid == os.getpid() or not is_stokerd(pid):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, 3):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 3)


@dataclass
class StokerEnv:
    """An isolated HOME/XDG layout and helpers to run the real CLI and daemon in it."""

    root: Path
    env: dict[str, str]
    layout: Layout

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*stoker_argv(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def run_stokerd(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*stokerd_argv(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def daemon_pid(self) -> int:
        return int(self.layout.pid_path.read_text().strip())

    # process helpers, exposed here because test modules cannot import a conftest
    alive = staticmethod(alive)
    is_stokerd = staticmethod(is_stokerd)
    wait_gone = staticmethod(wait_gone)

    def stokerd_argv(self) -> list[str]:
        return stokerd_argv()

    def write_config(self, text: str) -> Path:
        self.layout.config_dir.mkdir(parents=True, exist_ok=True)
        self.layout.config_file.write_text(text)
        return self.layout.config_file


@pytest.fixture
def stk(short_tmp: Path) -> Iterator[StokerEnv]:
    """Isolated environment for subprocesses; any stokerd started in it is stopped after."""
    env = dict(os.environ)
    env.update(
        HOME=str(short_tmp / "h"),
        XDG_CONFIG_HOME=str(short_tmp / "c"),
        XDG_STATE_HOME=str(short_tmp / "s"),
        XDG_CACHE_HOME=str(short_tmp / "k"),
        XDG_RUNTIME_DIR=str(short_tmp / "r"),
    )
    for k in ("STOKER_CONFIG", "STOKER_SYSTEM", "STOKER_LOG_LEVEL"):
        env.pop(k, None)
    layout = Layout.resolve(env=env)
    se = StokerEnv(short_tmp, env, layout)
    try:
        yield se
    finally:
        kill_daemon_of(layout)


ServeFn = Callable[["Daemon"], Awaitable["RPCServer"]]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFn]:
    """Start an RPCServer for a daemon in this test's event loop; closed at teardown."""
    from stoker.rpc.server import RPCServer

    started: list[RPCServer] = []

    async def start(d: Daemon) -> RPCServer:
        assert d.layout is not None
        server = RPCServer(d.layout.socket_path, d.dispatch)
        await server.start()
        started.append(server)
        return server

    yield start
    for s in started:
        await s.close()
