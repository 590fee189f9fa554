"""Fixtures for unit tests: an isolated XDG layout and in-process daemons.

Nothing here starts a `stokerd` process; the in-process daemon is a hand-built `Daemon`
(as the seed prescribes for tests) served by an `RPCServer` on a short socket path.
Helpers are exposed as fixtures (not imports) because several test folders have a
conftest.py and pytest gives them all the module name `conftest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
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


def _is_stokerd(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return b"stoker.daemon.main" in cmd or b"stokerd" in cmd


def kill_daemon_of(layout: Layout) -> None:
    """Stop any stokerd serving `layout`, found through its pid and lock files only."""
    pids: set[int] = set()
    for f in (layout.pid_path, layout.lock_path):
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(f.read_text().strip()))
    for pid in pids:
        if pid == os.getpid() or not _is_stokerd(pid):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _is_stokerd(pid):
            time.sleep(0.02)
        if _is_stokerd(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, short_tmp: Path) -> Iterator[Layout]:
    """HOME and every XDG dir point into a fresh short tmp dir; yields the user Layout."""
    env = {
        "HOME": str(short_tmp / "h"),
        "XDG_CONFIG_HOME": str(short_tmp / "c"),
        "XDG_STATE_HOME": str(short_tmp / "s"),
        "XDG_CACHE_HOME": str(short_tmp / "k"),
        "XDG_RUNTIME_DIR": str(short_tmp / "r"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("STOKER_CONFIG", "STOKER_SYSTEM", "STOKER_LOG_LEVEL"):
        monkeypatch.delenv(k, raising=False)
    layout = Layout.resolve()
    assert str(layout.state_dir).startswith(str(short_tmp))
    try:
        yield layout
    finally:
        kill_daemon_of(layout)


@dataclass
class Served:
    """A daemon and the RPC server serving it."""

    daemon: Daemon
    server: RPCServer
    socket_path: Path


ServeFn = Callable[["Daemon"], Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFn]:
    """Start an RPCServer for a daemon in this test's event loop; closed at teardown."""
    from stoker.rpc.server import RPCServer

    started: list[RPCServer] = []

    async def start(d: Daemon) -> Served:
        assert d.layout is not None
        server = RPCServer(d.layout.socket_path, d.dispatch)
        await server.start()
        started.append(server)
        return Served(d, server, d.layout.socket_path)

    yield start
    for s in started:
        await s.close()


@pytest.fixture
async def served(daemon_factory: Callable[..., Daemon], serve: ServeFn) -> Served:
    """A plain hand-built Daemon, served."""
    return await serve(daemon_factory())


class ThreadedDaemon:
    """An in-process daemon on its own event-loop thread, for driving the sync CLI."""

    def __init__(self, d: Daemon) -> None:
        self.daemon = d
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        from stoker.rpc.server import RPCServer

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        assert self.daemon.layout is not None
        server = RPCServer(self.daemon.layout.socket_path, self.daemon.dispatch)
        await server.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.close()

    def start(self) -> ThreadedDaemon:
        self._thread.start()
        assert self._ready.wait(5), "in-process daemon did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


@pytest.fixture
def threaded_daemon(isolated_env: Layout) -> Iterator[ThreadedDaemon]:
    """A hand-built daemon answering on the isolated layout's socket (the real CLI finds it)."""
    from stoker.config import parse_config
    from stoker.daemon.daemon import Daemon
    from stoker.store import Store

    isolated_env.ensure()
    d = Daemon(layout=isolated_env, config=parse_config({}), store=Store(isolated_env.db_path))
    td = ThreadedDaemon(d).start()
    try:
        yield td
    finally:
        td.stop()
        assert d.store is not None
        d.store.close()
