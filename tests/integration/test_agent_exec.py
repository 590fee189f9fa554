"""Exec through the real guest agent (a local process), reached by the host client.

The agent serves a pty behind `FakeChardev` (QEMU's one-client virtio-serial chardev, see
agentrig.py) or its `--listen-unix` socket; the host side is the daemon's
`AgentClient.exec`. Processes run here, as the test's user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import agentrig
import pytest
from agentrig import FakeChardev, wait_for
from agentrig import StartAgent as Start

from stoker.daemon.agent import (
    AgentClient,
    AgentUnavailable,
    ExecRefused,
    ExecSession,
    ExecSpec,
    ExitStatus,
    SerialTransport,
    UnixTransport,
    execchan,
)

pytestmark = pytest.mark.integration

work = agentrig.work  # the rig's fixtures
start_agent = agentrig.start_agent
chardev = agentrig.chardev


@pytest.fixture
async def serial(chardev: FakeChardev, start_agent: Start) -> AsyncIterator[AgentClient]:
    start_agent("--serial", str(chardev.port_path))
    client = AgentClient(SerialTransport(chardev.sock_path), name="t")
    assert (await client.healthz(10)).can_exec
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def unix(work: Path, start_agent: Start) -> AsyncIterator[AgentClient]:
    sock = work / "agent.sock"
    start_agent("--no-serial", "--listen-unix", str(sock))
    await wait_for(sock)
    client = AgentClient(UnixTransport(sock), name="u")
    try:
        yield client
    finally:
        await client.close()


async def collect(s: ExecSession) -> tuple[bytes, bytes, ExitStatus]:
    out = {1: bytearray(), 2: bytearray()}
    async for fd, data in s.output():
        out[fd] += data
    assert s.status is not None
    return bytes(out[1]), bytes(out[2]), s.status


async def run(client: AgentClient, spec: ExecSpec) -> tuple[bytes, bytes, ExitStatus]:
    return await collect(await client.exec(spec, 10))


def sh(line: str, **kw: object) -> ExecSpec:
    return ExecSpec(shell=line, **kw)  # type: ignore[arg-type]


# --- the basics, over the serial channel --------------------------------------------------


async def test_stdout_stderr_and_exit_code_are_separate(serial: AgentClient) -> None:
    out, err, st = await run(serial, sh("echo out; echo err >&2; printf 'x\\0y'; exit 7"))
    assert out == b"out\nx\0y" and err == b"err\n"
    assert (st.code, st.signal, st.timed_out, st.exit_code) == (7, None, False, 7)


async def test_argv_words_are_not_reparsed(serial: AgentClient, work: Path) -> None:
    (work / "my file").write_text("spaced")
    out, _, st = await run(serial, ExecSpec(argv=["cat", "my file"], cwd=str(work)))
    assert out == b"spaced" and st.exit_code == 0


async def test_environment_is_the_documented_one(serial: AgentClient) -> None:
    line = 'echo "$PATH|$HOME|$USER|$LANG|$TERM|$EXTRA|$PWD"'
    out, _, _ = await run(serial, ExecSpec(argv=["sh", "-c", line], env={"EXTRA": "1"}, cwd="/"))
    path, home, user, lang, term, extra, pwd = out.decode().strip().split("|")
    import pwd as pwdmod

    me = pwdmod.getpwuid(os.getuid())
    assert path == execchan_default_path() and home == me.pw_dir and user == me.pw_name
    assert (lang, term, extra, pwd) == ("C.UTF-8", "dumb", "1", "/")
    out, _, _ = await run(serial, ExecSpec(argv=["sh", "-c", "echo $TERM"], env={"TERM": "xterm"}))
    assert out == b"xterm\n"


def execchan_default_path() -> str:
    from stoker.guest.agent import stoker_agent

    return stoker_agent.DEFAULT_PATH


async def test_stdin_is_streamed_and_closed(serial: AgentClient) -> None:
    s = await serial.exec(ExecSpec(argv=["sh", "-c", "wc -c; echo done"], stdin=True), 10)
    payload = os.urandom(700_000)  # several stdin windows
    assert await s.write_stdin(payload)
    await s.close_stdin()
    out, _, st = await collect(s)
    assert out == b"700000\ndone\n" and st.exit_code == 0


async def test_missing_program_is_127_with_a_clear_message(serial: AgentClient) -> None:
    _, err, st = await run(serial, ExecSpec(argv=["no-such-program-xyz"]))
    assert st.exit_code == 127 and b"no-such-program-xyz: command not found" in err
    _, err, st = await run(serial, sh("no-such-program-xyz"))
    assert st.exit_code == 127 and b"not found" in err


async def test_killed_by_a_signal_is_reported_as_such(serial: AgentClient) -> None:
    _, _, st = await run(serial, sh("kill -KILL $$"))
    assert (st.code, st.signal, st.exit_code) == (None, 9, 137)


async def test_timeout_kills_the_process_group(serial: AgentClient, work: Path) -> None:
    marker = work / "child.pid"
    t0 = time.monotonic()
    line = f"sleep 60 & echo $! > {marker}; wait"
    _, _, st = await run(serial, ExecSpec(argv=["sh", "-c", line], timeout=2.0))
    assert st.timed_out and st.exit_code == 124
    assert time.monotonic() - t0 < 10
    child = int(marker.read_text())
    await asyncio.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or _zombie(child), "the background child lived on"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_signal_is_delivered_to_the_group(serial: AgentClient) -> None:
    s = await serial.exec(sh("trap 'echo caught; exit 42' INT; echo ready; sleep 30 & wait"), 10)
    it = s.output()
    _, data = await anext(it)
    assert data == b"ready\n"
    s.signal("INT")
    rest = b"".join([d async for _, d in it])
    assert b"caught" in rest and s.status is not None and s.status.exit_code == 42


async def test_bad_requests_are_refused_clearly(serial: AgentClient) -> None:
    with pytest.raises(ExecRefused, match="working directory /nonexistent/dir does not exist"):
        await serial.exec(ExecSpec(argv=["true"], cwd="/nonexistent/dir"), 10)
    with pytest.raises(ExecRefused, match="no user 'nobody-such'"):
        await serial.exec(ExecSpec(argv=["true"], user="nobody-such"), 10)
    # The channel is fine afterwards, for GETs and execs alike.
    assert (await serial.healthz(5)).ok
    assert (await run(serial, ExecSpec(argv=["true"])))[2].exit_code == 0


async def test_gets_share_the_channel_with_running_execs(serial: AgentClient) -> None:
    s = await serial.exec(sh("for i in 1 2 3 4 5; do echo $i; sleep 0.1; done"), 10)
    healths = await asyncio.gather(*(serial.healthz(5) for _ in range(5)))
    assert all(h.ok for h in healths)
    out, _, st = await collect(s)
    assert out == b"1\n2\n3\n4\n5\n" and st.exit_code == 0


async def test_100_concurrent_execs_on_one_channel(serial: AgentClient) -> None:
    async def one(i: int) -> tuple[bytes, int]:
        out, _, st = await run(serial, ExecSpec(argv=["sh", "-c", f"echo {i}; exit {i % 7}"]))
        return out, st.exit_code

    results = await asyncio.gather(*(one(i) for i in range(100)))
    assert results == [(f"{i}\n".encode(), i % 7) for i in range(100)]


# --- flow control and bounded memory ------------------------------------------------------


async def test_slow_reader_backpressures_the_guest_process(unix: AgentClient) -> None:
    s = await unix.exec(sh("head -c 50000000 /dev/zero; echo end >&2"), 10)
    it = s.output()
    fd, first = await anext(it)
    await asyncio.sleep(1.0)  # not reading: the agent must stop at its window
    assert s._queued <= execchan.EXEC_WINDOW + execchan.WINDOW_SLACK
    total = len(first)
    async for fd, data in it:
        if fd == 1:
            total += len(data)
    assert total == 50_000_000 and s.status is not None and s.status.exit_code == 0


async def test_large_output_streams_in_bounded_memory(unix: AgentClient, work: Path) -> None:
    size = int(os.environ.get("STOKER_TEST_EXEC_BYTES", str(128 << 20)))
    agent_pid = int(subprocess.check_output(["pgrep", "-n", "-f", str(work / "agent.sock")]))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = await unix.exec(sh(f"head -c {size} /dev/urandom | tee >(sha256sum >&2) "), 10)
    import hashlib

    h, n = hashlib.sha256(), 0
    err = b""
    async for fd, data in s.output():
        if fd == 1:
            h.update(data)
            n += len(data)
        else:
            err += data
    assert n == size and err.split()[0].decode() == h.hexdigest()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    agent_rss_mib = int(Path(f"/proc/{agent_pid}/statm").read_text().split()[1]) * 4 / 1024
    assert grown_mib < 64, f"the host side grew {grown_mib:.0f} MiB for {size >> 20} MiB output"
    assert agent_rss_mib < 64, f"the agent holds {agent_rss_mib:.0f} MiB"


# --- faults -------------------------------------------------------------------------------


async def test_host_gone_mid_exec_kills_the_process(work: Path, start_agent: Start) -> None:
    sock = work / "agent.sock"
    start_agent("--no-serial", "--listen-unix", str(sock))
    await wait_for(sock)
    client = AgentClient(UnixTransport(sock))
    marker = work / "pid"
    s = await client.exec(sh(f"echo $$ > {marker}; sleep 60 & echo $! >> {marker}; wait"), 10)
    for _ in range(100):
        if marker.exists() and len(marker.read_text().split()) == 2:
            break
        await asyncio.sleep(0.05)
    pids = [int(p) for p in marker.read_text().split()]
    assert s.status is None
    await client.close()  # the daemon went away: its session ends
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in pids):
        assert time.monotonic() < deadline, "the guest processes outlived their host session"
        await asyncio.sleep(0.05)


async def test_agent_restart_mid_exec_is_a_clear_error(
    chardev: FakeChardev, start_agent: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(execchan, "PING_INTERVAL", 0.2)
    agent = start_agent("--serial", str(chardev.port_path))
    client = AgentClient(SerialTransport(chardev.sock_path))
    try:
        s = await client.exec(sh("sleep 30"), 10)
        agent.send_signal(signal.SIGKILL)  # systemd would restart it; its children die
        agent.wait()
        start_agent("--serial", str(chardev.port_path))
        with pytest.raises(AgentUnavailable, match=r"restarted|no longer knows|lost track"):
            async with asyncio.timeout(15):
                await collect(s)
    finally:
        await client.close()


async def test_stray_output_for_an_unknown_exec_gets_it_killed(unix: AgentClient) -> None:
    s = await unix.exec(sh("sleep 0.3; while :; do echo spam; sleep 0.05; done"), 10)
    ch = s.channel
    ch.forget(s)  # as if an earlier daemon had started it
    deadline = time.monotonic() + 5
    while s.id not in ch._killed:
        assert time.monotonic() < deadline, "output for an unknown exec did not get it killed"
        await asyncio.sleep(0.05)
    ch._ping_seq += 1
    with contextlib.suppress(Exception):
        ch.send({"t": "ping", "seq": ch._ping_seq})
