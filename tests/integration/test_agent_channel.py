"""The real guest agent as a local process, reached through the host client.

No VM: the agent runs here with `--serial` pointing at a pty, which is what a QEMU chardev
looks like from the guest. Two bridges put a unix socket (QEMU's host side) on the other
end of the pty: `socat` (the real tool; one client, then it exits and the pty vanishes) and
`FakeChardev`, which behaves like QEMU's `-chardev socket,server=on,wait=off`: the port
outlives host connections, and what the guest writes while no host is connected waits for
the next one. Firecracker's vsock is emulated by a unix server doing the CONNECT handshake
in front of the agent's `--listen-unix` socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import agentrig
import pytest
from agentrig import FakeChardev, StartAgent, stop, wait_for

from prereq import require
from stoker.daemon.agent import (
    AgentClient,
    AgentTimeout,
    FirecrackerVsockTransport,
    SerialTransport,
    UnixTransport,
    cpu_percent,
)
from stoker.guest.agent.stoker_agent import AGENT_VERSION

pytestmark = pytest.mark.integration

work = agentrig.work  # the rig's fixtures
start_agent = agentrig.start_agent
chardev = agentrig.chardev


@pytest.fixture
def socat(work: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """`socat PTY UNIX-LISTEN`: a pty for the agent, a unix socket for the host (one client)."""
    require(shutil.which("socat"), "socat is not installed (apt-get install socat)")
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        for p in (work / "port", work / "host.sock"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        proc = subprocess.Popen(
            [
                "socat",
                f"PTY,link={work / 'port'},raw,echo=0",
                f"UNIX-LISTEN:{work / 'host.sock'},mode=600",
            ],
            stdin=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 5
        while not ((work / "port").exists() and (work / "host.sock").exists()):
            assert time.monotonic() < deadline, "socat did not create its pty and socket"
            assert proc.poll() is None, "socat exited"
            time.sleep(0.01)
        return proc

    yield start
    for p in procs:
        stop(p)


@pytest.fixture
def http_server() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`python -m http.server` on 127.0.0.1, an ephemeral port."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "http.server did not start"
        m = re.search(rb"port (\d+)", proc.stdout.readline())
        assert m is not None
        yield proc, int(m.group(1))
    finally:
        stop(proc)


# --- endpoints over the socat pty -------------------------------------------------------


async def test_healthz_over_a_pty_bridged_by_socat(
    work: Path, socat: Callable[[], subprocess.Popen[bytes]], start_agent: StartAgent
) -> None:
    socat()
    start_agent("--serial", str(work / "port"))
    client = AgentClient(SerialTransport(work / "host.sock"), name="local")
    h = await client.healthz(10)
    assert h.ok and h.agent_version == AGENT_VERSION and h.can_exec
    assert h.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert h.hostname == socket.gethostname()
    assert abs(h.uptime_s - float(Path("/proc/uptime").read_text().split()[0])) < 5
    mem_total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    assert h.mem_total == mem_total and 0 < h.mem_available <= mem_total
    assert all(x >= 0 for x in h.load)
    await client.close()


async def test_ports_lists_a_listener_with_its_process(
    work: Path,
    socat: Callable[[], subprocess.Popen[bytes]],
    start_agent: StartAgent,
    http_server: tuple[subprocess.Popen[bytes], int],
) -> None:
    server, port = http_server
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind(("::1", 0))
    udp_port = udp.getsockname()[1]
    socat()
    agent = start_agent("--serial", str(work / "port"))
    client = AgentClient(SerialTransport(work / "host.sock"))
    try:
        listed = await client.ports(10)
    finally:
        udp.close()
        await client.close()
    tcp = [p for p in listed if p.proto == "tcp" and p.port == port]
    assert len(tcp) == 1, listed
    comm = Path(f"/proc/{server.pid}/comm").read_text().strip()
    assert (tcp[0].addr, tcp[0].pid, tcp[0].process) == ("127.0.0.1", server.pid, comm)
    assert tcp[0].cmdline is not None and "http.server" in tcp[0].cmdline
    assert tcp[0].loopback_only
    mine = [p for p in listed if p.proto == "udp" and p.port == udp_port]
    assert [(p.addr, p.pid) for p in mine] == [("::1", os.getpid())]
    assert all(p.pid != agent.pid for p in listed)


async def test_stats_fields(
    work: Path, socat: Callable[[], subprocess.Popen[bytes]], start_agent: StartAgent
) -> None:
    socat()
    start_agent("--serial", str(work / "port"), "--activity-interval", "0.1")
    client = AgentClient(SerialTransport(work / "host.sock"))
    s1 = await client.stats(10)
    # burn CPU for a moment so the agent's sampler sees activity
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        pass
    s2 = await client.stats(5)
    await client.close()
    assert s2.cpu.total > s1.cpu.total > 0 and s2.uptime_s >= s1.uptime_s
    assert s2.ncpu == os.cpu_count() and s2.clk_tck == os.sysconf("SC_CLK_TCK")
    root = s2.disk("/")
    assert root is not None and root.mounted and 0 < root.used <= root.total
    st = os.statvfs("/")
    assert root.total == st.f_blocks * st.f_frsize
    assert 0 < s2.mem_available <= s2.mem_total
    assert s2.last_busy_age_s is not None and s2.last_busy_age_s < 5
    assert s2.last_activity_age_s is not None and s2.last_activity_age_s <= s2.last_busy_age_s
    pct = cpu_percent(s1, s2)
    assert pct is not None and 0 < pct <= 100 * s2.ncpu


async def test_agent_reopens_the_port_after_it_vanished(
    work: Path, socat: Callable[[], subprocess.Popen[bytes]], start_agent: StartAgent
) -> None:
    first = socat()
    agent = start_agent("--serial", str(work / "port"))
    client = AgentClient(SerialTransport(work / "host.sock"))
    assert (await client.healthz(10)).ok
    await client.close()  # socat serves one client: it exits and its pty goes away
    await asyncio.to_thread(first.wait, 5)
    socat()
    assert (await client.healthz(10)).ok
    assert agent.poll() is None
    await client.close()


# --- QEMU-like chardev: host sessions come and go, the port stays ----------------------


async def test_host_reconnects_and_skips_a_stale_answer(
    chardev: FakeChardev, start_agent: StartAgent
) -> None:
    agent = start_agent("--serial", str(chardev.port_path))
    client = AgentClient(SerialTransport(chardev.sock_path))
    assert (await client.healthz(10)).ok
    await client.close()
    assert (await client.healthz(5)).ok  # a new host session on the same port

    agent.send_signal(signal.SIGSTOP)  # the guest stalls mid-request
    try:
        t0 = time.monotonic()
        with pytest.raises(AgentTimeout):
            await client.healthz(0.3)
        assert time.monotonic() - t0 < 3.0  # the timeout, not a hang (slack for a busy host)
    finally:
        agent.send_signal(signal.SIGCONT)
    # The agent now answers the abandoned request with nobody connected; that answer is
    # delivered to the next host session, which must skip it.
    deadline = time.monotonic() + 10
    while chardev.held == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    h = await client.healthz(5)
    assert h.ok and chardev.replayed > 0
    await client.close()


async def test_garbage_from_the_host_does_not_hurt_the_agent(
    chardev: FakeChardev, start_agent: StartAgent
) -> None:
    agent = start_agent("--serial", str(chardev.port_path))
    client = AgentClient(SerialTransport(chardev.sock_path))
    assert (await client.healthz(10)).ok
    await client.close()
    _, writer = await asyncio.open_unix_connection(str(chardev.sock_path))
    writer.write(os.urandom(300_000) + b"\n" + b"A" * 200_000 + b"\nGET /x HTTP/1.1\r\nbad\r\n")
    writer.write(b"GET /healthz HTTP/1.1\r\nX-Stoker-Id: ")  # and hang up mid-request
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await writer.wait_closed()
    for _ in range(3):
        h = await client.healthz(5)
        assert h.ok
    assert agent.poll() is None
    await client.close()


# --- Firecracker vsock, emulated in front of the agent's unix socket ------------------


@contextlib.asynccontextmanager
async def fake_firecracker(uds: Path, agent_sock: Path) -> AsyncIterator[list[bytes]]:
    """Accepts `CONNECT <port>\\n`, replies `OK <n>\\n`, then relays to the agent."""
    seen: list[bytes] = []

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        finally:
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = await r.readline()
        seen.append(line)
        if line != b"CONNECT 10700\n":
            w.close()
            return
        ar, aw = await asyncio.open_unix_connection(str(agent_sock))
        w.write(b"OK 1073741824\n")
        await w.drain()
        await asyncio.gather(pipe(r, aw), pipe(ar, w), return_exceptions=True)

    server = await asyncio.start_unix_server(handle, str(uds))
    try:
        yield seen
    finally:
        server.close()


async def test_firecracker_vsock_handshake_to_the_real_agent(
    work: Path, start_agent: StartAgent
) -> None:
    agent_sock = work / "agent.sock"
    start_agent("--no-serial", "--listen-unix", str(agent_sock))
    await wait_for(agent_sock)
    async with fake_firecracker(work / "v.sock", agent_sock) as seen:
        client = AgentClient(FirecrackerVsockTransport(work / "v.sock", 10700))
        assert (await client.healthz(5)).ok
        assert isinstance(await client.ports(5), list)
        assert (await client.stats(5)).cpu.total > 0
    assert seen == [b"CONNECT 10700\n"] * 3


async def test_unix_mode_and_clean_exit(work: Path, start_agent: StartAgent) -> None:
    agent_sock = work / "agent.sock"
    agent = start_agent("--no-serial", "--listen-unix", str(agent_sock))
    await wait_for(agent_sock)
    results = await asyncio.gather(
        *(AgentClient(UnixTransport(agent_sock)).healthz(5) for _ in range(8))
    )
    assert all(h.ok for h in results)
    agent.terminate()
    assert agent.wait(5) == 0
    assert not agent_sock.exists()
