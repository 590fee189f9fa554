"""The host agent client against fake guests: framing, resync, limits, timeouts, vsock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stoker.daemon.agent import (
    AgentClient,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    FirecrackerVsockTransport,
    GuestStats,
    HostVsockTransport,
    SerialTransport,
    UnixTransport,
    cpu_percent,
)
from stoker.errors import Timeout, Unavailable

pytestmark = pytest.mark.unit

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

HEALTH = {
    "ok": True,
    "uptime_s": 12.5,
    "boot_id": "b-1",
    "load": [0.1, 0.2, 0.3],
    "mem_total": 1 << 30,
    "mem_available": 1 << 29,
    "hostname": "vm1",
    "agent_version": "1.0",
    "sshd_running": True,
}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stkag", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def fake_guest(path: Path, handler: Handler) -> AsyncIterator[asyncio.Server]:
    """A unix server standing in for the guest side of a channel."""
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)  # type: ignore[arg-type]
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    server = await asyncio.start_unix_server(wrapped, str(path))
    try:
        yield server
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def read_request(r: asyncio.StreamReader) -> tuple[str, str]:
    """(path, id) of the next request; skips blank lines before it."""
    path, rid = "", ""
    while True:
        line = (await r.readline()).decode().strip()
        if not line and not path:
            if r.at_eof():
                raise ConnectionError
            continue
        if not line:
            return path, rid
        if m := re.match(r"GET (\S+) HTTP/1\.1", line):
            path = m.group(1)
        elif line.lower().startswith("x-stoker-id:"):
            rid = line.split(":", 1)[1].strip()


def response(payload: Any, rid: str, status: int = 200, lead: bool = True) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode() + b"\n"
    return (
        (b"\r\n" if lead else b"")
        + f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n".encode()
        + f"X-Stoker-Id: {rid}\r\n\r\n".encode()
        + body
    )


def answering(payload: Any = HEALTH, status: int = 200) -> Handler:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            _, rid = await read_request(r)
            w.write(response(payload, rid, status))
            await w.drain()

    return handler


# --- happy paths ------------------------------------------------------------------------


async def test_healthz_over_serial_keeps_one_connection(sock_dir: Path) -> None:
    connections = 0
    inner = answering()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await inner(r, w)

    async with fake_guest(sock_dir / "a.sock", handler):
        client = AgentClient(SerialTransport(sock_dir / "a.sock"), name="vm1")
        for _ in range(3):
            h = await client.healthz(1.0)
        assert h.ok and h.boot_id == "b-1" and h.load == (0.1, 0.2, 0.3) and h.sshd_running
        assert connections == 1
        await client.close()


async def test_serial_requests_are_serialised(sock_dir: Path) -> None:
    in_flight, worst = 0, 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal in_flight, worst
        while True:
            _, rid = await read_request(r)
            in_flight += 1
            worst = max(worst, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            w.write(response(HEALTH, rid))
            await w.drain()
            # A second request already buffered would mean the client did not wait.
            await asyncio.sleep(0.005)

    async with fake_guest(sock_dir / "a.sock", handler):
        client = AgentClient(SerialTransport(sock_dir / "a.sock"))
        results = await asyncio.gather(*(client.healthz(5.0) for _ in range(10)))
        assert all(h.ok for h in results) and worst == 1


async def test_stale_answers_and_garbage_are_skipped_until_our_id(sock_dir: Path) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _, rid = await read_request(r)
        w.write(b"random \x00\xff junk without end")
        w.write(response({"stale": "x" * 100_000}, "oldid"))
        w.write(b"\r\nHTTP/1.1 200 OK\r\nX-Stoker-Id: cut")  # a response cut short
        w.write(response(HEALTH, "other", lead=False))
        w.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\n{}\n")
        w.write(b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n")
        w.write(response(HEALTH, rid))
        await w.drain()
        await asyncio.sleep(10)

    async with fake_guest(sock_dir / "a.sock", handler):
        h = await AgentClient(SerialTransport(sock_dir / "a.sock")).healthz(2.0)
        assert h.hostname == "vm1"


async def test_serial_reconnects_after_the_guest_side_drops(sock_dir: Path) -> None:
    served = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal served
        _, rid = await read_request(r)
        served += 1
        w.write(response(HEALTH, rid))
        await w.drain()
        # then hang up, like a VMM restarting behind the same socket path

    async with fake_guest(sock_dir / "a.sock", handler):
        client = AgentClient(SerialTransport(sock_dir / "a.sock"))
        assert (await client.healthz(1.0)).ok
        await asyncio.sleep(0.05)
        assert (await client.healthz(1.0)).ok
        assert served == 2


async def test_ports_and_stats_decode(sock_dir: Path) -> None:
    ports = [
        {"proto": "tcp", "addr": "0.0.0.0", "port": 8080, "pid": 7, "process": "python3"},
        {"proto": "udp", "addr": "127.0.0.1", "port": 53, "pid": None, "process": None},
    ]
    stats = {
        "time": 1.0,
        "uptime_s": 10.0,
        "cpu": {"user": 50, "nice": 0, "system": 50, "idle": 900, "iowait": 0},
        "ncpu": 2,
        "load": [0, 0, 0],
        "mem_total": 100,
        "mem_available": 40,
        "disks": [{"path": "/", "total": 10, "used": 4, "free": 6, "mounted": True}],
        "last_activity_age_s": 3.5,
        "last_login_age_s": None,
    }
    async with fake_guest(sock_dir / "p.sock", answering(ports)):
        got = await AgentClient(UnixTransport(sock_dir / "p.sock")).ports(1.0)
    assert [(p.proto, p.port, p.process, p.loopback_only) for p in got] == [
        ("tcp", 8080, "python3", False),
        ("udp", 53, None, True),
    ]
    async with fake_guest(sock_dir / "s.sock", answering(stats)):
        s1 = await AgentClient(UnixTransport(sock_dir / "s.sock")).stats(1.0)
    assert s1.mem_used == 60 and s1.disk("/") is not None and s1.disk("/root") is None
    assert s1.last_activity_age_s == 3.5 and s1.last_login_age_s is None
    s2 = GuestStats.from_json({**stats, "cpu": {"user": 150, "system": 50, "idle": 1000}})
    # 100 busy jiffies of 200 on 2 CPUs: one CPU's worth
    assert cpu_percent(s1, s2) == pytest.approx(100.0)
    assert cpu_percent(s2, s2) is None


# --- a guest that misbehaves ------------------------------------------------------------


async def _timed(coro: Awaitable[Any]) -> tuple[BaseException, float]:
    t0 = time.monotonic()
    try:
        await coro
    except BaseException as e:
        return e, time.monotonic() - t0
    raise AssertionError("expected an error")


async def test_never_answers_times_out_on_time(sock_dir: Path) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(60)

    async with fake_guest(sock_dir / "a.sock", handler):
        client = AgentClient(SerialTransport(sock_dir / "a.sock"), name="vm9")
        err, took = await _timed(client.healthz(0.3))
        assert isinstance(err, AgentTimeout) and isinstance(err, Timeout)
        assert "vm9" in str(err) and "stoker vm logs vm9" in str(err)
        assert took < 0.8


async def test_slow_drip_times_out(sock_dir: Path) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _, rid = await read_request(r)
        for b in response(HEALTH, rid):
            w.write(bytes([b]))
            await w.drain()
            await asyncio.sleep(0.05)

    async with fake_guest(sock_dir / "a.sock", handler):
        err, took = await _timed(AgentClient(SerialTransport(sock_dir / "a.sock")).healthz(0.4))
        assert isinstance(err, AgentTimeout) and took < 0.9


async def test_random_flood_is_a_clear_error_with_bounded_memory(sock_dir: Path) -> None:
    chunk = os.urandom(65536)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            w.write(chunk)
            await w.drain()

    async with fake_guest(sock_dir / "a.sock", handler):
        client = AgentClient(SerialTransport(sock_dir / "a.sock"), name="vm2")
        tracemalloc.start()
        try:
            err, took = await _timed(client.healthz(10.0))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert isinstance(err, AgentProtocolError) and isinstance(err, Unavailable)
    assert "flooding" in str(err) and "vm2" in str(err)
    assert took < 10.0
    assert peak < 4 << 20, f"peak {peak} bytes"


async def test_100mb_body_for_our_id_is_refused_without_reading_it(sock_dir: Path) -> None:
    sent = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        _, rid = await read_request(r)
        w.write(
            f"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\nX-Stoker-Id: {rid}\r\n\r\n".encode()
        )
        block = b"x" * 65536
        while sent < 100_000_000:
            w.write(block)
            sent += len(block)
            await w.drain()

    async with fake_guest(sock_dir / "a.sock", handler):
        tracemalloc.start()
        try:
            err, took = await _timed(AgentClient(SerialTransport(sock_dir / "a.sock")).healthz(5))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert isinstance(err, AgentProtocolError) and "exceeds" in str(err)
    assert took < 1.0 and peak < 4 << 20


async def test_100mb_stream_without_our_id_hits_the_skip_budget(sock_dir: Path) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 100000000\r\nX-Stoker-Id: nope\r\n\r\n")
        block = b"{" * 65536
        for _ in range(100_000_000 // len(block)):
            w.write(block)
            await w.drain()

    async with fake_guest(sock_dir / "a.sock", handler):
        tracemalloc.start()
        try:
            err, _ = await _timed(AgentClient(SerialTransport(sock_dir / "a.sock")).healthz(10))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert isinstance(err, AgentProtocolError) and "flooding" in str(err)
    assert peak < 4 << 20


async def test_stream_transport_is_strict(sock_dir: Path) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"SSH-2.0-OpenSSH\r\n")
        await w.drain()

    async with fake_guest(sock_dir / "a.sock", handler):
        err, _ = await _timed(AgentClient(UnixTransport(sock_dir / "a.sock")).healthz(1))
    assert isinstance(err, AgentProtocolError) and "not an HTTP response" in str(err)


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"error": "no such endpoint"}, 404, "too old"),
        ({"ok": "yes", "uptime_s": 1}, 200, "wrong type"),
        ({"uptime_s": 1}, 200, "lacks 'ok'"),
        ({"ok": True, "uptime_s": True}, 200, "wrong type"),
        ([1, 2], 200, "not a JSON object"),
    ],
)
async def test_bad_answers_are_protocol_errors(
    sock_dir: Path, payload: Any, status: int, needle: str
) -> None:
    async with fake_guest(sock_dir / "a.sock", answering(payload, status)):
        err, _ = await _timed(AgentClient(SerialTransport(sock_dir / "a.sock")).healthz(1))
    assert isinstance(err, AgentProtocolError) and needle in str(err), str(err)


async def test_invalid_json_and_missing_length(sock_dir: Path) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _, rid = await read_request(r)
        w.write(
            f"\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Stoker-Id: {rid}\r\n\r\n{{{{\n".encode()
        )
        _, rid = await read_request(r)
        w.write(f"\r\nHTTP/1.1 200 OK\r\nX-Stoker-Id: {rid}\r\n\r\n{{}}\n".encode())
        await w.drain()
        await asyncio.sleep(10)

    async with fake_guest(sock_dir / "a.sock", handler):
        client = AgentClient(SerialTransport(sock_dir / "a.sock"))
        err, _ = await _timed(client.healthz(1))
        assert isinstance(err, AgentProtocolError) and "invalid JSON" in str(err)
        err, _ = await _timed(client.healthz(1))
        assert isinstance(err, AgentProtocolError) and "Content-Length" in str(err)


async def test_missing_socket_is_unavailable(sock_dir: Path) -> None:
    client = AgentClient(SerialTransport(sock_dir / "nope.sock"), name="gone")
    err, took = await _timed(client.healthz(1))
    assert isinstance(err, AgentUnavailable) and "does not exist" in str(err) and took < 0.5
    assert await client.alive(0.5) is False


async def test_host_vsock_without_a_guest_fails_fast() -> None:
    err, took = await _timed(AgentClient(HostVsockTransport(4242)).healthz(0.3))
    assert isinstance(err, AgentUnavailable | AgentTimeout) and took < 0.8


# --- Firecracker's vsock handshake ------------------------------------------------------


def firecracker(reply: bytes | None, then: Handler | None = None) -> Handler:
    """A fake Firecracker vsock socket: checks the CONNECT line, sends `reply`."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = await r.readline()
        assert line == b"CONNECT 10700\n", line
        if reply is None:
            return  # no listener in the guest: Firecracker closes the connection
        w.write(reply)
        await w.drain()
        if then is not None:
            await then(r, w)

    return handler


async def test_firecracker_handshake_then_http(sock_dir: Path) -> None:
    async def once(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _, rid = await read_request(r)
        w.write(response(HEALTH, rid, lead=False))
        await w.drain()

    async with fake_guest(sock_dir / "v.sock", firecracker(b"OK 1073741824\n", once)):
        client = AgentClient(FirecrackerVsockTransport(sock_dir / "v.sock"))
        assert (await client.healthz(1)).hostname == "vm1"
        assert (await client.healthz(1)).ok  # a new connection per request


@pytest.mark.parametrize(
    ("reply", "error", "needle"),
    [
        (None, AgentUnavailable, "nothing listens on vsock port 10700"),
        (b"NOPE\n", AgentProtocolError, "handshake"),
        (b"x" * 100_000, AgentProtocolError, ""),
    ],
)
async def test_firecracker_handshake_failures(
    sock_dir: Path, reply: bytes | None, error: type[Exception], needle: str
) -> None:
    async def hang(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async with fake_guest(sock_dir / "v.sock", firecracker(reply, hang)):
        err, took = await _timed(
            AgentClient(FirecrackerVsockTransport(sock_dir / "v.sock")).healthz(1)
        )
    assert isinstance(err, error) and needle in str(err) and took < 1.0, repr(err)
