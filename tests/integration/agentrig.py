"""The guest agent as a local process, and a stand-in for QEMU's chardev in front of it:
the rig shared by test_agent_channel.py and test_agent_exec.py.

`FakeChardev` behaves like QEMU's `-chardev socket,server=on,wait=off` + `virtserialport`
over a pty: the port outlives host connections, and what the guest writes while no host
is connected waits for the next one. Fixtures are plain functions here; a test module
takes them by assigning them to names of its own (`work = agentrig.work`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stoker.guest.agent import agent_script


@pytest.fixture
def work() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stkagent", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)


StartAgent = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_agent(work: Path) -> Iterator[StartAgent]:
    """Run the shipped agent program here (never on vsock: this host is no guest)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        log = open(work / f"agent{len(procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(agent_script()), "--no-vsock", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        stop(p)


class FakeChardev:
    """QEMU's `-chardev socket,server=on,wait=off` + `virtserialport`, over a pty."""

    def __init__(self, d: Path) -> None:
        self.sock_path = d / "chardev.sock"
        self.port_path = d / "vport"
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.symlink(os.ttyname(self._slave), self.port_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.sock_path))
        self.listener.listen(4)
        self.replayed = 0  # bytes the guest wrote while no host was connected, delivered later
        self.held = 0  # such bytes waiting for the next host session right now
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client: socket.socket | None = None
        pending = bytearray()
        while True:
            # Like QEMU, accept one host at a time; later ones wait in the backlog.
            watch: list[int | socket.socket] = [self._wake_r, self.master]
            watch.append(self.listener if client is None else client)
            ready, _, _ = select.select(watch, [], [], 1.0)
            if self._wake_r in ready:
                break
            if self.listener in ready:
                client, _ = self.listener.accept()
                if pending:
                    self.replayed += len(pending)
                    client.sendall(pending)
                    pending.clear()
                    self.held = 0
            if self.master in ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    data = b""
                if client is not None:
                    try:
                        client.sendall(data)
                    except OSError:
                        client.close()
                        client = None
                        pending += data
                        self.held = len(pending)
                elif len(pending) < 1 << 20:
                    pending += data
                    self.held = len(pending)
            if client is not None and client in ready:
                try:
                    data = client.recv(65536)
                except OSError:
                    data = b""  # reset by a host that hung up with data unread
                if not data:
                    client.close()
                    client = None
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self.master, view) :]
        if client is not None:
            client.close()

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        self.listener.close()
        for fd in (self.master, self._slave, self._wake_r, self._wake_w):
            os.close(fd)


@pytest.fixture
def chardev(work: Path) -> Iterator[FakeChardev]:
    c = FakeChardev(work)
    try:
        yield c
    finally:
        c.close()


async def wait_for(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        await asyncio.sleep(0.02)
