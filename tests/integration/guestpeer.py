"""A stand-in for the guests' sshd and agent, for the lifecycle rig (no guest boots).

`GuestPeer` serves SSH (asyncssh) on each VM's guest address inside the rig's network
namespace, the way the booted guest would: with the host key stoker injected into the VM's
overlay disk and the client key stoker wrote onto its work disk (both read back from the
disks with debugfs), so stoker's pinned known_hosts and managed key are what make the
connection work. It records every command and what the guest did with it (`sync`,
`poweroff`), and whether the VMM was still alive at that moment; a `poweroff` ends the
VMM as a real guest would.

`StandInAgent` answers the agent protocol on a VM's agent socket with a canned /stats
(the idle time a test sets), for the auto-stop ticker.

`in_netns` moves the calling thread (the event loop's) into a named network namespace:
sockets the daemon and the peer open there live in the namespace, so the guest addresses
are reachable without touching the host's network.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from stoker.daemon.imagemgr import ext4
from stoker.daemon.vmm.base import pid_alive
from stoker.runner import Runner

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the calling thread inside network namespace `ns` (back out on exit)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


@dataclass
class Event:
    vm: str
    what: str  # "exec" (any command), "sync", "poweroff"
    command: str
    vmm_alive: bool
    at: float


@dataclass
class GuestState:
    name: str
    ip: str
    vmm_pid: int
    acceptor: Any = None
    accepted: int = 0
    open: int = 0
    conns: list[Any] = field(default_factory=list)


@dataclass
class GuestPeer:
    """SSH peers for the rig's VMs; `mode[name]` picks how a VM's 'guest' behaves:
    ok (sshd up), down (nothing listens: refused), blackhole (accepts TCP, never speaks),
    wrong-key (sshd with another host key than the one stoker pinned)."""

    ns: str
    runner: Runner = field(default_factory=Runner)
    mode: dict[str, str] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    guests: dict[str, GuestState] = field(default_factory=dict)
    exec_hook: Callable[[str, str], bytes] | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def commands(self, name: str) -> list[str]:
        return [e.command for e in self.events if e.vm == name and e.what == "exec"]

    async def boot(self, name: str, ip: str, vmm_pid: int, vm_dir: Path) -> None:
        """The 'guest' of VM `name` comes up (called by the stand-in VMM after spawn)."""
        await self.halt(name)
        subprocess.run(
            ["ip", "-n", self.ns, "addr", "replace", f"{ip}/32", "dev", "lo"], check=True
        )
        g = GuestState(name, ip, vmm_pid)
        self.guests[name] = g
        mode = self.mode.get(name, "ok")
        if mode == "down":
            return
        if mode == "blackhole":
            g.acceptor = await asyncio.start_server(self._blackhole, ip, 22, reuse_address=True)
            return
        if mode == "wrong-key":
            host_key = asyncssh.generate_private_key("ssh-ed25519")
        else:
            raw = await ext4.read_file(
                self.runner, vm_dir / "overlay.ext4", "/upper/etc/ssh/ssh_host_ed25519_key"
            )
            host_key = asyncssh.import_private_key(raw)
        authorized = await ext4.read_file(
            self.runner, vm_dir / "work.ext4", "/.ssh/authorized_keys"
        )
        peer = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                g.accepted += 1
                g.open += 1
                g.conns.append(conn)

            def connection_lost(self, exc: Exception | None) -> None:
                g.open -= 1

        async def process(p: asyncssh.SSHServerProcess[bytes]) -> None:
            await peer._run(g, p)

        g.acceptor = await asyncssh.listen(
            ip,
            22,
            server_host_keys=[host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(authorized.decode()),
            server_factory=Server,
            process_factory=process,
            encoding=None,
            reuse_address=True,
        )

    async def _blackhole(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await r.read()  # never answers; the client gives up
        w.close()

    async def _run(self, g: GuestState, p: asyncssh.SSHServerProcess[bytes]) -> None:
        cmd = p.command or ""
        alive = pid_alive(g.vmm_pid)
        self.events.append(Event(g.name, "exec", cmd, alive, time.monotonic()))
        poweroff = False
        # A tiny model of the shell: `;`-separated statements in order.
        for stmt in cmd.split(";"):
            s = stmt.strip()
            if s == "sync":
                self.events.append(
                    Event(g.name, "sync", cmd, pid_alive(g.vmm_pid), time.monotonic())
                )
            elif "poweroff" in s:
                self.events.append(
                    Event(g.name, "poweroff", cmd, pid_alive(g.vmm_pid), time.monotonic())
                )
                poweroff = True
        out = b""
        if self.exec_hook is not None and cmd not in ("true",) and not poweroff:
            out = self.exec_hook(g.name, cmd)
        p.stdout.write(out)
        p.exit(0)
        if poweroff:
            t = asyncio.ensure_future(self._power_off(g))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _power_off(self, g: GuestState) -> None:
        await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(g.vmm_pid, signal.SIGTERM)
        await self.halt(g.name)

    async def halt(self, name: str) -> None:
        """The guest is gone (powered off, or its VMM was killed): stop its sshd."""
        g = self.guests.pop(name, None)
        if g is None or g.acceptor is None:
            return
        g.acceptor.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(g.acceptor.wait_closed(), 2)
        for conn in g.conns:  # the guest is gone: so are its TCP connections
            conn.abort()

    def state(self, name: str) -> GuestState | None:
        return self.guests.get(name)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for name in list(self.guests):
            await self.halt(name)


class StandInAgent:
    """Answers the agent's framed HTTP on a unix socket with a canned health and /stats;
    `idle_s` is the guest's last_activity_age_s."""

    def __init__(self, path: Path, idle_s: float) -> None:
        self.path = path
        self.idle_s = idle_s
        self.requests: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    def _body(self, path: str) -> dict[str, Any]:
        if path == "/stats":
            return {
                "time": time.time(),
                "uptime_s": 100.0,
                "cpu": {"user": 1, "system": 1, "idle": 1000},
                "clk_tck": 100,
                "ncpu": 1,
                "load": [0.0, 0.0, 0.0],
                "mem_total": 1 << 30,
                "mem_available": 1 << 29,
                "disks": [],
                "last_login_age_s": self.idle_s,
                "last_busy_age_s": self.idle_s,
                "last_activity_age_s": self.idle_s,
            }
        return {"ok": True, "agent_version": "stand-in", "uptime_s": 100.0, "load": [0, 0, 0]}

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await r.readline()
                if not line:
                    return
                if not line.startswith(b"GET "):
                    continue
                path = line.split()[1].decode()
                rid = b""
                while True:
                    h = await r.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.partition(b":")
                    if k.strip().lower() == b"x-stoker-id":
                        rid = v.strip()
                self.requests.append(path)
                body = json.dumps(self._body(path)).encode()
                w.write(
                    b"HTTP/1.1 200 OK\r\nX-Stoker-Id: " + rid + b"\r\nContent-Type: "
                    b"application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
