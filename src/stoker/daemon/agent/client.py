"""Host side of the guest agent channel: transports, bounded HTTP framing, typed answers.

The guest runs `stoker-agent` (package data, `stoker/guest/files/usr/lib/stoker/stoker-agent`;
its docstring is the protocol reference). The host reaches it over one of:

* `SerialTransport(path)`: QEMU's virtio-serial port `org.stoker.agent`, whose host side is
  the unix socket of `-chardev socket,server=on,wait=off`. One byte stream per VM with no
  connection boundaries, so one request at a time (a lock per transport: share one instance
  per VM) and every request carries a fresh id the response echoes; stale or garbage output
  is skipped line by line until the response with our id (the marker) arrives. After any
  failure the socket is closed, so the next request starts a new host session.
* `FirecrackerVsockTransport(uds_path, port)`: Firecracker's vsock device; the host side is
  a unix socket where each connection starts with `CONNECT <port>\\n` / `OK <n>\\n`.
* `HostVsockTransport(cid, port)`: AF_VSOCK from the host (QEMU with vhost-vsock).
* `UnixTransport(path)`: the agent's `--listen-unix` test mode (plain HTTP on a socket).

Every read is bounded (line length, header count, response size, bytes skipped while
resynchronising) and every call has a timeout, so a guest that floods or babbles costs a
clear error, never memory or a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from stoker.errors import StokerError, Timeout, Unavailable

if TYPE_CHECKING:
    from stoker.daemon.agent.execchan import ExecSession, ExecSpec, FrameChannel

AGENT_VSOCK_PORT = 10700
SERIAL_PORT_NAME = "org.stoker.agent"
MAX_RESPONSE = 1 << 20  # bytes of one response body
MAX_LINE = 8192  # bytes of one status/header line
MAX_HEADERS = 32
SKIP_BUDGET = 8 * MAX_RESPONSE  # bytes one serial request may read past before giving up
MAX_HANDSHAKE_LINE = 128
READ_CHUNK = 65536
ID_HEADER = b"x-stoker-id"


class AgentError(StokerError):
    """The guest agent could not be asked (base of the agent's errors)."""


class AgentUnavailable(AgentError, Unavailable):
    """No channel to the agent: socket missing, refused, closed, or nobody listening."""


class AgentTimeout(AgentError, Timeout):
    """The agent did not answer in time."""


class AgentProtocolError(AgentError, Unavailable):
    """The guest side sent something that is not a valid agent response."""


@dataclass(frozen=True)
class AgentResponse:
    """One raw HTTP response from the agent."""

    status: int
    headers: Mapping[bytes, bytes]
    body: bytes


# --- bounded framing --------------------------------------------------------------------


class _EOF(Exception):
    """The channel closed."""


class _Budget(Exception):
    """More bytes arrived than the request may consume."""


class BoundedReader:
    """Line and exact-length reads over a StreamReader that never buffer more than
    MAX_LINE + one chunk for lines or `n` + one chunk for bodies, and that count what they
    take so a caller can cap the bytes one request consumes (`start(limit)`)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._r = reader
        self._buf = bytearray()
        self._taken = 0
        self._limit: int | None = None

    def start(self, limit: int | None) -> None:
        """Begin a new request: reset the byte count and set its cap (None: no cap)."""
        self._taken = 0
        self._limit = limit

    async def _fill(self) -> None:
        chunk = await self._r.read(READ_CHUNK)
        if not chunk:
            raise _EOF
        self._buf += chunk

    def _take(self, n: int) -> bytes:
        self._taken += n
        if self._limit is not None and self._taken > self._limit:
            raise _Budget
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def line(self, max_line: int = MAX_LINE) -> bytes | None:
        """The next line without CR/LF, or None for a line longer than `max_line` (its bytes
        are consumed and dropped as they arrive)."""
        overlong = False
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                raw = self._take(nl + 1)
                return None if overlong or nl > max_line else raw[:-1].rstrip(b"\r")
            if len(self._buf) > max_line:
                self._take(len(self._buf))
                overlong = True
            await self._fill()

    async def exactly(self, n: int) -> bytes:
        """Exactly `n` bytes."""
        while len(self._buf) < n:
            await self._fill()
        return self._take(n)


@dataclass
class _Conn:
    reader: BoundedReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def aclose(self) -> None:
        """Close and wait (briefly) until the peer can see it."""
        self.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


def _parse_status(line: bytes) -> int | None:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    code = parts[1]
    return int(code) if len(code) == 3 and code.isdigit() else None


async def _read_headers(r: BoundedReader) -> dict[bytes, bytes] | None:
    """Header lines up to the blank line; None when one is malformed or there are too many."""
    headers: dict[bytes, bytes] = {}
    while True:
        line = await r.line()
        if line is None:
            return None
        if not line:
            return headers
        name, sep, value = line.partition(b":")
        if not sep or not name or b" " in name or len(headers) >= MAX_HEADERS:
            return None
        headers[name.strip().lower()] = value.strip()


def _request_bytes(path: str, request_id: str, *, lead: bool) -> bytes:
    # The leading CRLF ends any half line an earlier, abandoned write left on a serial
    # port, so the agent sees our request line whole.
    return (
        ("\r\n" if lead else "")
        + f"GET {path} HTTP/1.1\r\nHost: stoker-agent\r\nX-Stoker-Id: {request_id}\r\n\r\n"
    ).encode("ascii")


async def exchange(conn: _Conn, path: str, *, resync: bool, max_response: int) -> AgentResponse:
    """Send one GET and read its response.

    `resync=False` (a fresh stream): the first thing read must be our response. `resync=True`
    (a serial port): skip blank lines, garbage, and whole responses to other requests until a
    response carrying our id arrives, reading at most SKIP_BUDGET + max_response bytes.
    """
    rid = secrets.token_hex(8)
    conn.writer.write(_request_bytes(path, rid, lead=resync))
    await conn.writer.drain()
    r = conn.reader
    framing = MAX_LINE * (MAX_HEADERS + 2)
    r.start(max_response + framing + (SKIP_BUDGET if resync else 0))
    while True:
        line = await r.line()
        if line == b"" or (line is None and resync):
            continue
        status = _parse_status(line) if line is not None else None
        if status is None:
            if resync:
                continue
            raise AgentProtocolError(f"not an HTTP response: {_show(line)}")
        headers = await _read_headers(r)
        if headers is None:
            if resync:
                continue
            raise AgentProtocolError("malformed or oversized response headers")
        if headers.get(ID_HEADER) != rid.encode():
            if resync:
                continue  # a stale answer to an abandoned request; its body is one line
            raise AgentProtocolError(f"response for another request ({headers.get(ID_HEADER)!r})")
        length = headers.get(b"content-length", b"")
        if not length.isdigit():
            raise AgentProtocolError("response without a valid Content-Length")
        n = int(length)
        if n > max_response:
            raise AgentProtocolError(f"response of {n} bytes exceeds the {max_response} byte limit")
        body = await r.exactly(n)
        return AgentResponse(status, headers, body)


def _show(line: bytes | None) -> str:
    return "an overlong line" if line is None else repr(line[:80])


async def _open_unix(path: Path, what: str) -> _Conn:
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=READ_CHUNK)
    except FileNotFoundError:
        raise AgentUnavailable(
            f"{what} {path} does not exist: the VM is not running (start it) or its VMM was "
            "started without an agent channel"
        ) from None
    except OSError as e:
        raise AgentUnavailable(f"cannot connect to {what} {path}: {e.strerror or e}") from None
    return _Conn(BoundedReader(reader), writer)


# --- transports -------------------------------------------------------------------------


class AgentTransport(Protocol):
    """One host<->guest channel to the agent (callers wrap `request` in a timeout)."""

    def describe(self) -> str:
        """Human-readable channel name for error messages."""
        ...

    async def request(self, path: str, max_response: int) -> AgentResponse:
        """One GET round trip. Raises AgentError (or OSError / _EOF / _Budget, which the
        client translates) and may be cancelled at any await."""
        ...

    async def close(self) -> None:
        """Drop any open connection."""
        ...

    async def exec_channel(self) -> FrameChannel:
        """The frame channel that exec sessions share (opened on demand)."""
        ...


class SerialTransport:
    """QEMU virtio-serial port `org.stoker.agent` behind a unix socket (one per VM).

    The connection is kept between requests (one QEMU chardev accepts one client at a
    time); a lock serialises requests; any failure or timeout closes it.
    """

    def __init__(self, socket_path: Path | str) -> None:
        self.path = Path(socket_path)
        self._lock = asyncio.Lock()
        self._conn: _Conn | None = None
        self._channel: FrameChannel | None = None

    def describe(self) -> str:
        """e.g. `virtio-serial via /run/.../agent.sock`."""
        return f"virtio-serial via {self.path}"

    async def exec_channel(self) -> FrameChannel:
        """The frame demultiplexer on the kept connection (started on first use). From
        then on it owns the connection's reader, and GETs go through it too."""
        from stoker.daemon.agent.execchan import FrameChannel

        async with self._lock:
            if self._channel is None or self._channel.closed:
                if self._conn is None:
                    self._conn = await _open_unix(self.path, "agent socket")
                conn = self._conn

                def closed(ch: FrameChannel) -> None:
                    if self._channel is ch:
                        self._channel = None
                    if self._conn is conn:
                        self._conn = None

                self._channel = FrameChannel(conn, self.describe(), closed)
            return self._channel

    async def request(self, path: str, max_response: int) -> AgentResponse:
        """One request under the lock; closes the connection on any error or cancellation
        (through the frame channel instead once exec has used the connection)."""
        ch = self._channel
        if ch is not None and not ch.closed:
            return await ch.request(path, max_response)
        async with self._lock:
            ch = self._channel
            if ch is not None and not ch.closed:
                pass  # exec started the channel while we waited for the lock
            else:
                return await self._request_locked(path, max_response)
        return await ch.request(path, max_response)

    async def _request_locked(self, path: str, max_response: int) -> AgentResponse:
        reused = self._conn is not None
        try:
            return await self._attempt(path, max_response)
        except (_EOF, ConnectionError):
            if not reused:
                raise
            # A kept connection can be dead without our knowing (the VMM restarted
            # behind the same socket path): GETs are idempotent, so try once afresh.
        return await self._attempt(path, max_response)

    async def _attempt(self, path: str, max_response: int) -> AgentResponse:
        try:
            if self._conn is None:
                self._conn = await _open_unix(self.path, "agent socket")
            return await exchange(self._conn, path, resync=True, max_response=max_response)
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        """Close the connection (the next request reconnects)."""
        async with self._lock:
            ch, self._channel = self._channel, None
            conn, self._conn = self._conn, None
            if ch is not None:
                await ch.aclose()
            if conn is not None:
                await conn.aclose()


class _StreamExecChannel:
    """For stream transports: GETs take a connection each, while every exec shares one
    kept connection (the agent caps stream connections; frames multiplex)."""

    _channel: FrameChannel | None = None
    _channel_lock: asyncio.Lock | None = None

    def describe(self) -> str:
        raise NotImplementedError

    async def _connect(self) -> _Conn:
        raise NotImplementedError

    async def exec_channel(self) -> FrameChannel:
        """The kept exec connection, opened (or reopened) on demand."""
        from stoker.daemon.agent.execchan import FrameChannel

        if self._channel_lock is None:
            self._channel_lock = asyncio.Lock()
        async with self._channel_lock:
            if self._channel is None or self._channel.closed:
                self._channel = FrameChannel(await self._connect(), self.describe())
            return self._channel

    async def _close_channel(self) -> None:
        ch, self._channel = self._channel, None
        if ch is not None:
            await ch.aclose()


class FirecrackerVsockTransport(_StreamExecChannel):
    """Firecracker's vsock: a connection to `uds_path` per request, opened with
    `CONNECT <port>`."""

    def __init__(self, uds_path: Path | str, port: int = AGENT_VSOCK_PORT) -> None:
        self.path = Path(uds_path)
        self.port = port

    def describe(self) -> str:
        """e.g. `vsock port 10700 via .../vsock.sock`."""
        return f"vsock port {self.port} via {self.path}"

    async def request(self, path: str, max_response: int) -> AgentResponse:
        """Handshake, then one request on the fresh connection."""
        conn = await self._connect()
        try:
            return await exchange(conn, path, resync=False, max_response=max_response)
        finally:
            conn.close()

    async def _connect(self) -> _Conn:
        conn = await _open_unix(self.path, "vsock socket")
        try:
            conn.writer.write(f"CONNECT {self.port}\n".encode())
            await conn.writer.drain()
            conn.reader.start(MAX_HANDSHAKE_LINE * 2)
            try:
                line = await conn.reader.line(MAX_HANDSHAKE_LINE)
            except _EOF:
                raise AgentUnavailable(
                    f"nothing listens on vsock port {self.port} in the guest (Firecracker "
                    "closed the connection): the guest is still booting or its agent is stopped"
                ) from None
            if line is None or not line.startswith(b"OK "):
                raise AgentProtocolError(
                    f"unexpected vsock handshake reply {_show(line)} from {self.path}"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Close the exec channel, if one is open (GET connections are per request)."""
        await self._close_channel()


class HostVsockTransport(_StreamExecChannel):
    """AF_VSOCK from the host to guest `cid` (QEMU with vhost-vsock-device)."""

    def __init__(self, cid: int, port: int = AGENT_VSOCK_PORT) -> None:
        self.cid = cid
        self.port = port

    def describe(self) -> str:
        """e.g. `vsock cid 3 port 10700`."""
        return f"vsock cid {self.cid} port {self.port}"

    async def request(self, path: str, max_response: int) -> AgentResponse:
        """One request on a fresh vsock connection."""
        conn = await self._connect()
        try:
            return await exchange(conn, path, resync=False, max_response=max_response)
        finally:
            conn.close()

    async def _connect(self) -> _Conn:
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except OSError as e:
            raise AgentUnavailable(
                f"this host cannot open vsock sockets: {e.strerror or e}"
            ) from None
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (self.cid, self.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=READ_CHUNK)
        except OSError as e:
            sock.close()
            raise AgentUnavailable(
                f"cannot connect to {self.describe()}: {e.strerror or e} (is the guest up and "
                "vhost-vsock loaded on the host?)"
            ) from None
        except BaseException:
            sock.close()
            raise
        return _Conn(BoundedReader(reader), writer)

    async def close(self) -> None:
        """Close the exec channel, if one is open (GET connections are per request)."""
        await self._close_channel()


class UnixTransport(_StreamExecChannel):
    """Plain HTTP on a unix stream socket (the agent's `--listen-unix` mode)."""

    def __init__(self, socket_path: Path | str) -> None:
        self.path = Path(socket_path)

    def describe(self) -> str:
        """e.g. `unix socket /tmp/agent.sock`."""
        return f"unix socket {self.path}"

    async def request(self, path: str, max_response: int) -> AgentResponse:
        """One request on a fresh connection."""
        conn = await self._connect()
        try:
            return await exchange(conn, path, resync=False, max_response=max_response)
        finally:
            conn.close()

    async def _connect(self) -> _Conn:
        return await _open_unix(self.path, "agent socket")

    async def close(self) -> None:
        """Close the exec channel, if one is open (GET connections are per request)."""
        await self._close_channel()


# --- typed answers ----------------------------------------------------------------------


def _field(
    obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    if key not in obj or obj[key] is None:
        if default is ...:
            raise AgentProtocolError(f"agent response lacks {key!r}")
        return default
    v = obj[key]
    # bool is an int subclass: `true` is not a number here.
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise AgentProtocolError(f"agent response field {key!r} has the wrong type")
    if isinstance(v, float) and not math.isfinite(v):
        raise AgentProtocolError(f"agent response field {key!r} is not a finite number")
    return v


_NUM = (int, float)


def _object(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise AgentProtocolError(f"agent {what} is not a JSON object")
    return data


def _load(data: Any) -> tuple[float, float, float]:
    if (
        not isinstance(data, list)
        or len(data) != 3
        or not all(isinstance(x, _NUM) and not isinstance(x, bool) for x in data)
    ):
        raise AgentProtocolError("agent load average is not three numbers")
    return float(data[0]), float(data[1]), float(data[2])


@dataclass(frozen=True)
class Health:
    """`GET /healthz`: the guest is up, and who it is."""

    ok: bool
    uptime_s: float
    boot_id: str
    load: tuple[float, float, float]
    mem_total: int
    mem_available: int
    hostname: str
    agent_version: str
    sshd_running: bool  # sshd's pidfile names a live process (it writes it once listening)
    features: tuple[str, ...] = ()  # e.g. ("exec",): what the agent serves beyond the GETs

    @classmethod
    def from_json(cls, data: Any) -> Health:
        """Validate the agent's JSON (unknown fields are ignored)."""
        o = _object(data, "health")
        return cls(
            ok=_field(o, "ok", bool),
            uptime_s=float(_field(o, "uptime_s", _NUM)),
            boot_id=_field(o, "boot_id", str, ""),
            load=_load(o.get("load", [0, 0, 0])),
            mem_total=_field(o, "mem_total", int, 0),
            mem_available=_field(o, "mem_available", int, 0),
            hostname=_field(o, "hostname", str, ""),
            agent_version=_field(o, "agent_version", str, ""),
            sshd_running=_field(o, "sshd_running", bool, False),
            features=tuple(
                f for f in (o.get("features") or []) if isinstance(f, str) and len(f) < 64
            )[:32],
        )

    @property
    def can_exec(self) -> bool:
        """The agent runs commands (agent 1.1+); older ones only answer GETs."""
        return "exec" in self.features


@dataclass(frozen=True)
class ListeningSocket:
    """One entry of `GET /ports`: a listening TCP socket or bound unconnected UDP socket."""

    proto: str  # "tcp" or "udp"
    addr: str  # "0.0.0.0", "127.0.0.1", "::", ...
    port: int
    pid: int | None
    process: str | None  # the process's comm, e.g. "python3"
    cmdline: str | None = None

    @property
    def loopback_only(self) -> bool:
        """Bound to a loopback address: unreachable from the host."""
        return self.addr.startswith("127.") or self.addr in ("::1", "::ffff:127.0.0.1")

    @classmethod
    def from_json(cls, data: Any) -> ListeningSocket:
        """Validate one entry."""
        o = _object(data, "port entry")
        proto = _field(o, "proto", str)
        port = _field(o, "port", int)
        if proto not in ("tcp", "udp") or not 0 <= port <= 65535:
            raise AgentProtocolError(f"agent port entry is invalid: {proto!r} port {port!r}")
        return cls(
            proto=proto,
            addr=_field(o, "addr", str),
            port=port,
            pid=_field(o, "pid", int, None),
            process=_field(o, "process", str, None),
            cmdline=_field(o, "cmdline", str, None),
        )


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass(frozen=True)
class CPUTimes:
    """Aggregate jiffies of all guest CPUs since boot (/proc/stat)."""

    user: int
    nice: int
    system: int
    idle: int
    iowait: int
    irq: int
    softirq: int
    steal: int

    @property
    def total(self) -> int:
        return (
            self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
        )

    @property
    def busy(self) -> int:
        return self.total - self.idle - self.iowait


@dataclass(frozen=True)
class DiskUsage:
    """statvfs of a guest path, in bytes."""

    path: str
    total: int
    used: int
    free: int
    mounted: bool


@dataclass(frozen=True)
class GuestStats:
    """`GET /stats`. Ages are seconds measured by the guest's own clock (None: unknown)."""

    time: float
    uptime_s: float
    cpu: CPUTimes
    clk_tck: int
    ncpu: int
    load: tuple[float, float, float]
    mem_total: int
    mem_available: int
    disks: tuple[DiskUsage, ...]
    last_activity_age_s: float | None
    last_login_age_s: float | None
    last_busy_age_s: float | None

    @property
    def mem_used(self) -> int:
        return max(0, self.mem_total - self.mem_available)

    def disk(self, path: str) -> DiskUsage | None:
        """Usage of `/` or `/root`, if reported."""
        return next((d for d in self.disks if d.path == path), None)

    @classmethod
    def from_json(cls, data: Any) -> GuestStats:
        """Validate the agent's JSON."""
        o = _object(data, "stats")
        cpu = _object(o.get("cpu"), "cpu times")
        disks = o.get("disks", [])
        if not isinstance(disks, list) or len(disks) > 16:
            raise AgentProtocolError("agent disk list is invalid")
        parsed_disks = []
        for d in disks:
            do = _object(d, "disk entry")
            parsed_disks.append(
                DiskUsage(
                    path=_field(do, "path", str),
                    total=_field(do, "total", int),
                    used=_field(do, "used", int),
                    free=_field(do, "free", int),
                    mounted=_field(do, "mounted", bool, True),
                )
            )

        def age(key: str) -> float | None:
            v = _field(o, key, _NUM, None)
            return None if v is None else float(v)

        return cls(
            time=float(_field(o, "time", _NUM)),
            uptime_s=float(_field(o, "uptime_s", _NUM)),
            cpu=CPUTimes(**{k: _field(cpu, k, int, 0) for k in CPU_FIELDS}),
            clk_tck=_field(o, "clk_tck", int, 100),
            ncpu=max(1, _field(o, "ncpu", int, 1)),
            load=_load(o.get("load", [0, 0, 0])),
            mem_total=_field(o, "mem_total", int, 0),
            mem_available=_field(o, "mem_available", int, 0),
            disks=tuple(parsed_disks),
            last_activity_age_s=age("last_activity_age_s"),
            last_login_age_s=age("last_login_age_s"),
            last_busy_age_s=age("last_busy_age_s"),
        )


def cpu_percent(prev: GuestStats, cur: GuestStats) -> float | None:
    """Guest CPU use between two samples in percent of one CPU (like `top`: 2 busy CPUs =
    200). None when the samples are not comparable (same sample, or the guest rebooted)."""
    dt = cur.cpu.total - prev.cpu.total
    if dt <= 0 or cur.uptime_s < prev.uptime_s:
        return None
    return 100.0 * (cur.cpu.busy - prev.cpu.busy) / dt * cur.ncpu


# --- the client -------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestIdentity:
    """What a restored clone gets through the agent's `identity` frame."""

    hostname: str
    ip: str
    prefix: int
    gateway: str
    mac: str
    dns: tuple[str, ...]
    host_key: str  # OpenSSH private key text (host-generated)
    host_key_pub: str
    machine_id: str  # 32 hex digits
    entropy: bytes  # host randomness for the guest kernel's pool

    def frame(self) -> dict[str, Any]:
        import base64
        import time

        return {
            "t": "identity",
            "hostname": self.hostname,
            "ip": self.ip,
            "prefix": self.prefix,
            "gateway": self.gateway,
            "mac": self.mac,
            "dns": list(self.dns),
            "host_key": self.host_key,
            "host_key_pub": self.host_key_pub,
            "machine_id": self.machine_id,
            "entropy": base64.b64encode(self.entropy).decode("ascii"),
            "time": time.time(),  # last: the guest sets its clock from it on arrival
        }


class AgentClient:
    """Asks one VM's guest agent for health, listening ports and stats.

    Every call takes a timeout covering everything (waiting for the transport's lock,
    connecting, the handshake, the response) and raises an `AgentError` subclass:
    `AgentTimeout`, `AgentUnavailable` or `AgentProtocolError`.
    """

    def __init__(
        self, transport: AgentTransport, *, name: str = "", max_response: int = MAX_RESPONSE
    ) -> None:
        self.transport = transport
        self.name = name
        self.max_response = max_response

    def _who(self) -> str:
        return f"VM {self.name}" if self.name else "the VM"

    def _logs_hint(self) -> str:
        return f"`stoker vm logs {self.name}`" if self.name else "`stoker vm logs NAME`"

    async def get(self, path: str, timeout: float) -> Any:
        """GET `path` and return its decoded JSON (status 200 only)."""
        where = self.transport.describe()
        try:
            async with asyncio.timeout(timeout):
                resp = await self.transport.request(path, self.max_response)
        except TimeoutError:
            raise AgentTimeout(
                f"the guest agent of {self._who()} did not answer {path} within {timeout:g}s "
                f"({where}): the guest may still be booting or its agent is stopped; see "
                f"{self._logs_hint()}"
            ) from None
        except AgentError as e:
            raise type(e)(f"guest agent of {self._who()}: {e.message}") from None
        except _EOF:
            raise AgentUnavailable(
                f"the guest agent channel of {self._who()} closed before answering {path} "
                f"({where}): the VM may be shutting down; see {self._logs_hint()}"
            ) from None
        except _Budget:
            raise AgentProtocolError(
                f"the guest agent channel of {self._who()} is flooding ({where}): more than "
                f"{SKIP_BUDGET + self.max_response} bytes without a valid answer to {path}; "
                "the guest is misbehaving, restart the VM"
            ) from None
        except OSError as e:
            raise AgentUnavailable(
                f"the guest agent channel of {self._who()} failed ({where}): {e.strerror or e}"
            ) from None
        return self._decode(path, resp)

    def _decode(self, path: str, resp: AgentResponse) -> Any:
        try:
            data = json.loads(resp.body)
        except (ValueError, UnicodeDecodeError):
            raise AgentProtocolError(
                f"the guest agent of {self._who()} sent invalid JSON for {path}"
            ) from None
        if resp.status == 200:
            return data
        detail = data.get("error") if isinstance(data, dict) else None
        hint = (
            ": the agent in this image is too old, rebuild the image" if resp.status == 404 else ""
        )
        raise AgentProtocolError(
            f"the guest agent of {self._who()} answered {resp.status} for {path}"
            f"{f' ({str(detail)[:200]})' if detail else ''}{hint}"
        )

    async def healthz(self, timeout: float = 2.0) -> Health:
        """`GET /healthz`."""
        return Health.from_json(await self.get("/healthz", timeout))

    async def ports(self, timeout: float = 5.0) -> list[ListeningSocket]:
        """`GET /ports`: listening sockets in the guest, the agent's own excluded."""
        data = await self.get("/ports", timeout)
        if not isinstance(data, list):
            raise AgentProtocolError(f"the guest agent of {self._who()} sent a non-list /ports")
        return [ListeningSocket.from_json(e) for e in data]

    async def stats(self, timeout: float = 5.0) -> GuestStats:
        """`GET /stats`."""
        return GuestStats.from_json(await self.get("/stats", timeout))

    async def exec(self, spec: ExecSpec, timeout: float = 30.0) -> ExecSession:
        """Start a process in the guest; returns once it runs (its output may already be
        queued). Raises AgentUnavailable/AgentTimeout for the channel, ExecRefused when the
        agent would not start it (bad cwd or user); a missing program is exit code 127."""
        where = self.transport.describe()
        session: ExecSession | None = None
        try:
            async with asyncio.timeout(timeout):
                ch = await self.transport.exec_channel()
                session = await ch.open_exec(spec)
                await session.wait_started()
        except TimeoutError:
            if session is not None:
                session.kill()
            raise AgentTimeout(
                f"the guest agent of {self._who()} did not start the command within "
                f"{timeout:g}s ({where}); see {self._logs_hint()}"
            ) from None
        except AgentError as e:
            if session is not None:
                session.kill()
            raise type(e)(f"guest agent of {self._who()}: {e.message}") from None
        except (OSError, _EOF) as e:
            raise AgentUnavailable(
                f"the guest agent channel of {self._who()} failed ({where}): {e}"
            ) from None
        except BaseException:
            if session is not None:
                session.kill()
            raise
        return session

    async def set_identity(self, ident: GuestIdentity, timeout: float = 30.0) -> list[str]:
        """Give a restored clone its own identity (the agent's `identity` frame; see
        docs/protocol.md). Returns the steps the agent completed; raises AgentError with
        the agent's message when it refused or failed part-way."""
        where = self.transport.describe()
        try:
            async with asyncio.timeout(timeout):
                ch = await self.transport.exec_channel()
                msg = await ch.call(ident.frame())
        except TimeoutError:
            raise AgentTimeout(
                f"the guest agent of {self._who()} did not apply the identity within "
                f"{timeout:g}s ({where}); see {self._logs_hint()}"
            ) from None
        except AgentError as e:
            raise type(e)(f"guest agent of {self._who()}: {e.message}") from None
        except (OSError, _EOF) as e:
            raise AgentUnavailable(
                f"the guest agent channel of {self._who()} failed ({where}): {e}"
            ) from None
        done = [str(d) for d in msg.get("done") or [] if isinstance(d, str)][:16]
        if msg.get("ok") is not True:
            err = str(msg.get("error") or "no reason given")[:500]
            raise AgentProtocolError(
                f"the guest agent of {self._who()} could not apply the new identity: {err}"
            )
        return done

    async def alive(self, timeout: float = 2.0) -> bool:
        """True when /healthz answers ok in time; never raises an AgentError."""
        try:
            return (await self.healthz(timeout)).ok
        except AgentError:
            return False

    async def close(self) -> None:
        """Close the transport's connection, if it keeps one."""
        await self.transport.close()
