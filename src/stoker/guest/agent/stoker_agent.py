#!/usr/bin/python3
"""stoker-agent: the guest side of stoker's host<->guest agent channel.

A single-file program on the guest's own python3 (stdlib only, 3.11+). It answers three
read-only HTTP/1.1 GET endpoints with compact JSON:

    /healthz  uptime, boot id, load, memory, hostname, agent version, sshd running
    /ports    listening TCP/UDP sockets (from /proc/net) with the owning process
    /stats    CPU jiffies, memory, disk use of / and /root, last activity

It opens no TCP/UDP port and touches the guest network only when the host sends a restored
clone its identity (the `identity` frame: RNG reseed, clock, hostname, address, MAC, host
key). Transports, all served at once:

* virtio-serial port `org.stoker.agent` (QEMU; /dev/virtio-ports/org.stoker.agent, or the
  /dev/vportNpM whose sysfs name matches when udev has not made the link). A serial port is
  one byte stream with no connection boundaries and may carry leftovers of an earlier host
  session, so the framing is built to resynchronise: every message is preceded by an empty
  line (CRLF), the host sends `X-Stoker-Id: <id>` and the response echoes it, bodies are one
  line of JSON ending in LF (so a reader skipping stale output can do it line by line), and
  malformed lines get a 400 response without an id. When the host side is not connected the
  port reads EOF; the agent drops its partial input and waits for the next connection.
* AF_VSOCK stream on port 10700 (Firecracker: the host speaks `CONNECT 10700`, then HTTP).
* `--listen-unix PATH`: the same stream protocol on a unix socket (tests, local debugging).

Stream connections carry keep-alive HTTP/1.1; a malformed request is answered with 400 and
the connection is closed.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import select
import signal
import socket
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterable

TYPE_CHECKING = False
if TYPE_CHECKING:  # not imported at run time: start-up time matters
    from typing import Any

AGENT_VERSION = "1.2"
FEATURES = ["exec", "identity"]  # what /healthz advertises beyond the GET endpoints
SERIAL_NAME = "org.stoker.agent"
SERIAL_LINK = "/dev/virtio-ports/" + SERIAL_NAME
VSOCK_PORT = 10700
ID_HEADER = "x-stoker-id"

MAX_LINE = 8192  # bytes in one request or header line
MAX_HEADERS = 32
SERIAL_EARLY_PERIOD = 300.0  # seconds after start during which a missing port is polled at 1 Hz
WRITE_TIMEOUT = 10.0  # a host that stops reading loses the response after this
STREAM_IDLE_TIMEOUT = 300.0
MAX_STREAM_CONNECTIONS = 16
MAX_ERRORS_PER_SECOND = 20  # 400 replies to garbage are rate-limited
ACTIVITY_INTERVAL = 10.0
BUSY_FRACTION = 0.05  # of one CPU, averaged over ACTIVITY_INTERVAL, counts as activity
DISK_PATHS = ("/", "/root")
SSHD_PIDFILE = "/run/sshd.pid"
LOGIN_FILES = ("/run/utmp", "/var/log/wtmp", "/var/log/lastlog")

_REQUEST_LINE = re.compile(r"^([A-Z]{1,16}) (/[\x21-\x7e]{0,2047}) HTTP/1\.[01]$")
_HEADER_LINE = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}):[ \t]*(.*?)[ \t]*$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}

# Imports are kept few and light: under TCG emulation every millisecond of interpreter
# start-up costs tens, and the agent is what tells the host the guest is up. Hence no
# dataclasses, typing, logging or ipaddress; JSON values are typed `object`.
Json = object


def log(message: str, *, exc: bool = False) -> None:
    """One line on stderr (the journal under systemd)."""
    if exc:
        import traceback  # only on failures: it is not cheap to import

        message += ": " + traceback.format_exc().strip().replace("\n", " | ")
    print(f"stoker-agent: {message}", file=sys.stderr, flush=True)


# --- wire format ------------------------------------------------------------------------


class Request:
    """One complete request."""

    def __init__(self, method: str, path: str, headers: dict[str, str] | None = None) -> None:
        self.method = method
        self.path = path
        self.headers: dict[str, str] = headers if headers is not None else {}

    @property
    def request_id(self) -> str | None:
        rid = self.headers.get(ID_HEADER)
        return rid if rid is not None and _REQUEST_ID.match(rid) else None

    @property
    def wants_close(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class BadRequest:
    """Input that is not a request; answered with 400 (rate-limited)."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        self.reason = reason
        self.request_id = request_id


class Frame:
    """One exec-protocol frame: a line of JSON (see `Agent.handle_frame`)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


class RequestParser:
    """Incremental, bounded request parser: `feed` bytes, get requests, frames and errors.

    Memory is bounded by MAX_LINE (MAX_FRAME for a line starting with `{`, an exec frame):
    an overlong line is dropped as it streams past. A request
    line seen while headers are expected means the earlier request was cut short (a host
    that gave up mid-write); it is reported and the new request wins. Lines that look like
    HTTP responses are ignored silently so an echoing channel cannot loop.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._discarding = False
        self._current: Request | None = None

    def reset(self) -> None:
        """Forget partial input (the host side of the channel went away)."""
        self._buf.clear()
        self._discarding = False
        self._current = None

    def feed(self, data: bytes) -> list[Request | BadRequest | Frame]:
        """Consume bytes; return the requests, frames and errors they completed, in order."""
        out: list[Request | BadRequest | Frame] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            limit = MAX_FRAME if self._current is None and self._buf[:1] == b"{" else MAX_LINE
            if self._discarding:
                if nl < 0:
                    self._buf.clear()
                    break
                del self._buf[: nl + 1]
                self._discarding = False
                out.extend(self._line(None))
                continue
            if nl < 0:
                if len(self._buf) > limit:
                    self._buf.clear()
                    self._discarding = True
                break
            if nl > limit:
                del self._buf[: nl + 1]
                out.extend(self._line(None))
                continue
            raw = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            out.extend(self._line(raw.rstrip(b"\r")))
        return out

    def _line(self, raw: bytes | None) -> list[Request | BadRequest | Frame]:
        cur = self._current
        if raw is None:
            self._current = None
            rid = cur.request_id if cur is not None else None
            return [BadRequest("line too long", rid)]
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            line = None
        if cur is None:
            if not raw:
                return []
            if raw[:1] == b"{":
                return [Frame(raw)]
            if line is not None and line.startswith("HTTP/"):
                return []
            m = _REQUEST_LINE.match(line) if line is not None else None
            if m is None:
                return [BadRequest("malformed request line")]
            self._current = Request(m.group(1), m.group(2))
            return []
        if not raw:
            self._current = None
            return [cur]
        m = _REQUEST_LINE.match(line) if line is not None else None
        if m is not None:
            self._current = Request(m.group(1), m.group(2))
            return [BadRequest("request cut short by a new request", cur.request_id)]
        h = _HEADER_LINE.match(line) if line is not None else None
        if h is None or len(cur.headers) >= MAX_HEADERS:
            self._current = None
            why = "malformed header line" if h is None else "too many headers"
            return [BadRequest(why, cur.request_id)]
        cur.headers[h.group(1).lower()] = h.group(2)
        return []


def render_response(
    status: int, payload: Json, request_id: str | None, *, lead: bool, close: bool = False
) -> bytes:
    """One response. The body is a single line of ASCII JSON ending in LF (json escapes every
    control character), which is what lets a serial reader skip stale output by lines."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    data = (body + "\n").encode("ascii")
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
    ]
    if request_id is not None:
        head.append(f"X-Stoker-Id: {request_id}")
    if close:
        head.append("Connection: close")
    prefix = "\r\n" if lead else ""
    return (prefix + "\r\n".join(head) + "\r\n\r\n").encode("ascii") + data


# --- what the endpoints report ----------------------------------------------------------


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def meminfo(proc: str = "/proc") -> dict[str, int]:
    """/proc/meminfo values in bytes, keyed by their names (MemTotal, MemAvailable...)."""
    out: dict[str, int] = {}
    for line in _read(f"{proc}/meminfo").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
            out[name.strip()] = int(parts[0]) * scale
    return out


def loadavg(proc: str = "/proc") -> tuple[list[float], int, int]:
    """([1, 5, 15 minute load], running tasks, total tasks)."""
    parts = _read(f"{proc}/loadavg").split()
    running, _, total = parts[3].partition("/")
    return [float(x) for x in parts[:3]], int(running), int(total)


def uptime(proc: str = "/proc") -> float:
    """Seconds since the guest booted."""
    return float(_read(f"{proc}/uptime").split()[0])


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times(proc: str = "/proc") -> dict[str, int]:
    """Aggregate jiffies of all CPUs from the first line of /proc/stat."""
    for line in _read(f"{proc}/stat").splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(x) for x in parts[1 : 1 + len(CPU_FIELDS)]]
            values += [0] * (len(CPU_FIELDS) - len(values))
            return dict(zip(CPU_FIELDS, values, strict=True))
    raise ValueError("no aggregate cpu line in /proc/stat")


def decode_address(text: str, v6: bool) -> tuple[str, int]:
    """`0100007F:1F90` (as in /proc/net/tcp: 32-bit words in host order) -> ('127.0.0.1', 8080)."""
    addr_hex, _, port_hex = text.partition(":")
    raw = bytes.fromhex(addr_hex)
    # /proc prints each 32-bit word in host byte order; guests are little-endian (x86_64,
    # aarch64), so every word is byte-reversed.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if v6:
        if len(words) != 16:
            raise ValueError(f"bad IPv6 address {addr_hex!r}")
        addr = socket.inet_ntop(socket.AF_INET6, words)
    else:
        if len(words) != 4:
            raise ValueError(f"bad IPv4 address {addr_hex!r}")
        addr = socket.inet_ntop(socket.AF_INET, words)
    return addr, int(port_hex, 16)


TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"
_NET_TABLES = (
    ("tcp", "tcp", False),
    ("tcp", "tcp6", True),
    ("udp", "udp", False),
    ("udp", "udp6", True),
)


class RawSocket:
    """One listening socket from /proc/net before it is matched to a process."""

    def __init__(self, proto: str, addr: str, port: int, inode: int) -> None:
        self.proto = proto
        self.addr = addr
        self.port = port
        self.inode = inode


def parse_net_table(text: str, proto: str, v6: bool) -> list[RawSocket]:
    """Listening sockets in one /proc/net/{tcp,tcp6,udp,udp6} table.

    TCP: state LISTEN. UDP has no listen state: a bound, unconnected socket (state 07 with
    no remote port) is what receives datagrams from anyone.
    """
    out: list[RawSocket] = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        state = parts[3]
        try:
            if proto == "tcp":
                if state != TCP_LISTEN:
                    continue
            else:
                if state != UDP_UNCONNECTED or decode_address(parts[2], v6)[1] != 0:
                    continue
            addr, port = decode_address(parts[1], v6)
            inode = int(parts[9])
        except ValueError:
            continue
        out.append(RawSocket(proto, addr, port, inode))
    return out


def socket_owners(inodes: set[int], proc: str = "/proc") -> dict[int, int]:
    """inode -> lowest pid holding it, found through /proc/PID/fd links `socket:[N]`."""
    owners: dict[int, int] = {}
    if not inodes:
        return owners
    try:
        pids = sorted(int(n) for n in os.listdir(proc) if n.isdigit())
    except OSError:
        return owners
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or a kernel thread
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target.endswith("]"):
                with contextlib.suppress(ValueError):
                    inode = int(target[8:-1])
                    if inode in inodes and inode not in owners:
                        owners[inode] = pid
        if len(owners) == len(inodes):
            break
    return owners


def process_name(pid: int, proc: str = "/proc") -> tuple[str | None, str | None]:
    """(comm, command line truncated to 256 characters) of a process, None when gone."""
    try:
        comm = _read(f"{proc}/{pid}/comm").strip()
    except OSError:
        return None, None
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
        cmdline = " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)[:256]
    except OSError:
        cmdline = None
    return comm, cmdline or None


def listening_ports(proc: str = "/proc", exclude_pid: int | None = None) -> list[dict[str, Json]]:
    """Every listening TCP socket and bound unconnected UDP socket, with its process."""
    raw: list[RawSocket] = []
    for proto, table, v6 in _NET_TABLES:
        try:
            raw += parse_net_table(_read(f"{proc}/net/{table}"), proto, v6)
        except OSError:
            continue  # no IPv6 in this kernel, say
    owners = socket_owners({s.inode for s in raw if s.inode}, proc)
    seen: set[tuple[str, str, int, int | None]] = set()
    out: list[dict[str, Json]] = []
    names: dict[int, tuple[str | None, str | None]] = {}
    for s in raw:
        pid = owners.get(s.inode)
        if exclude_pid is not None and pid == exclude_pid:
            continue
        key = (s.proto, s.addr, s.port, pid)
        if key in seen:
            continue
        seen.add(key)
        if pid is not None and pid not in names:
            names[pid] = process_name(pid, proc)
        comm, cmdline = names.get(pid, (None, None)) if pid is not None else (None, None)
        out.append(
            {
                "proto": s.proto,
                "addr": s.addr,
                "port": s.port,
                "pid": pid,
                "process": comm,
                "cmdline": cmdline,
            }
        )
    out.sort(key=lambda e: (e["proto"], e["port"], e["addr"]))
    return out


def disk_usage(path: str) -> dict[str, Json] | None:
    """statvfs of a mount point in bytes (None when the path is missing)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return {
        "path": path,
        "total": st.f_blocks * st.f_frsize,
        "used": (st.f_blocks - st.f_bfree) * st.f_frsize,
        "free": st.f_bavail * st.f_frsize,
        "mounted": os.path.ismount(path),
    }


def newest_login_time(
    files: Iterable[str] = LOGIN_FILES, pts_dir: str = "/dev/pts"
) -> float | None:
    """Wall-clock time of the newest login/logout record or terminal input, if any.

    utmp/wtmp change on every login and logout; a pty's atime moves when its user types
    (what `w` shows as IDLE).
    """
    newest: float | None = None
    for path in files:
        with contextlib.suppress(OSError):
            t = os.stat(path).st_mtime
            newest = t if newest is None else max(newest, t)
    with contextlib.suppress(OSError):
        for name in os.listdir(pts_dir):
            if name.isdigit():
                with contextlib.suppress(OSError):
                    st = os.stat(f"{pts_dir}/{name}")
                    t = max(st.st_atime, st.st_mtime)
                    newest = t if newest is None else max(newest, t)
    return newest


def sshd_running(proc: str = "/proc", pidfile: str = SSHD_PIDFILE) -> bool:
    """sshd has written its pidfile (it does so once it listens) and that process lives.

    Cheap on purpose: /healthz is polled during boot, and /proc/net tables can take
    milliseconds to generate.
    """
    try:
        pid = int(_read(pidfile).strip())
    except (OSError, ValueError):
        return False
    return pid > 0 and os.path.exists(f"{proc}/{pid}")


class ActivityTracker:
    """Remembers when the guest last used CPU noticeably (sampled every ACTIVITY_INTERVAL)."""

    def __init__(self, proc: str = "/proc", interval: float = ACTIVITY_INTERVAL) -> None:
        self._proc = proc
        self.interval = interval
        self._lock = threading.Lock()
        self._last_busy: float | None = None  # time.monotonic()
        self._prev: tuple[int, int] | None = None
        self._ncpu = os.cpu_count() or 1

    def sample(self) -> None:
        """Take one sample; mark activity when busy time exceeds the threshold."""
        try:
            t = cpu_times(self._proc)
        except (OSError, ValueError):
            return
        total = sum(t.values())
        busy = total - t["idle"] - t["iowait"]
        prev, self._prev = self._prev, (busy, total)
        if prev is None or total <= prev[1]:
            return
        per_cpu_total = (total - prev[1]) / self._ncpu
        if (busy - prev[0]) / per_cpu_total >= BUSY_FRACTION:
            with self._lock:
                self._last_busy = time.monotonic()

    def busy_age(self) -> float | None:
        """Seconds since the last busy sample, None when none was seen since agent start."""
        with self._lock:
            last = self._last_busy
        return None if last is None else max(0.0, time.monotonic() - last)

    def run(self, stop: threading.Event) -> None:
        """Sample until `stop` is set."""
        self.sample()
        while not stop.wait(self.interval):
            self.sample()


class Agent:
    """The endpoints; one instance shared by every transport thread."""

    def __init__(self, proc: str = "/proc", activity_interval: float = ACTIVITY_INTERVAL) -> None:
        self.proc = proc
        self.pid = os.getpid()
        self.activity = ActivityTracker(proc, activity_interval)
        self.identity_system = IdentitySystem()
        self._routes: dict[str, Callable[[], Json]] = {
            "/healthz": self.healthz,
            "/ports": self.ports,
            "/stats": self.stats,
        }

    def handle(self, req: Request) -> tuple[int, Json]:
        """Status and JSON payload for one request; never raises."""
        path = req.path.split("?", 1)[0]
        route = self._routes.get(path)
        if route is None:
            return 404, {"error": f"no such endpoint {path}", "endpoints": sorted(self._routes)}
        if req.method != "GET":
            return 405, {"error": f"{req.method} not allowed, use GET"}
        try:
            return 200, route()
        except Exception as e:  # one bad /proc read must not take the agent down
            log(f"{path} failed", exc=True)
            return 500, {"error": f"{type(e).__name__}: {e}"}

    def healthz(self) -> dict[str, Json]:
        """Liveness and identity of the guest."""
        mem = meminfo(self.proc)
        load, _, _ = loadavg(self.proc)
        try:
            boot_id = _read(f"{self.proc}/sys/kernel/random/boot_id").strip()
        except OSError:
            boot_id = ""
        return {
            "ok": True,
            "uptime_s": uptime(self.proc),
            "boot_id": boot_id,
            "load": load,
            "mem_total": mem.get("MemTotal", 0),
            "mem_available": mem.get("MemAvailable", mem.get("MemFree", 0)),
            "hostname": socket.gethostname(),
            "agent_version": AGENT_VERSION,
            "features": FEATURES,
            "instance": INSTANCE,
            "sshd_running": sshd_running(self.proc),
        }

    def ports(self) -> list[dict[str, Json]]:
        """Listening sockets, the agent's own excluded."""
        return listening_ports(self.proc, exclude_pid=self.pid)

    def stats(self) -> dict[str, Json]:
        """Counters the host turns into CPU %, memory use, disk use and idle time."""
        mem = meminfo(self.proc)
        load, running, total = loadavg(self.proc)
        now = time.time()
        login = newest_login_time()
        login_age = None if login is None else max(0.0, now - login)
        busy_age = self.activity.busy_age()
        ages = [a for a in (login_age, busy_age) if a is not None]
        return {
            "time": now,
            "uptime_s": uptime(self.proc),
            "cpu": cpu_times(self.proc),
            "clk_tck": os.sysconf("SC_CLK_TCK"),
            "ncpu": os.cpu_count() or 1,
            "load": load,
            "procs_running": running,
            "procs_total": total,
            "mem_total": mem.get("MemTotal", 0),
            "mem_available": mem.get("MemAvailable", mem.get("MemFree", 0)),
            "swap_total": mem.get("SwapTotal", 0),
            "swap_free": mem.get("SwapFree", 0),
            "disks": [d for d in (disk_usage(p) for p in DISK_PATHS) if d is not None],
            "last_login_age_s": login_age,
            "last_busy_age_s": busy_age,
            "last_activity_age_s": min(ages) if ages else None,
        }

    def handle_frame(self, session: Session, frame: Frame) -> None:
        """Act on one exec-protocol frame from the host; never blocks, never raises."""
        try:
            msg = json.loads(frame.raw)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            session.send({"t": "error", "error": "frame is not a JSON object"})
            return
        t, eid = msg.get("t"), msg.get("id")
        if t == "ping":
            with session.lock:
                ids = sorted(session.execs)
            session.send({"t": "pong", "seq": msg.get("seq"), "agent": INSTANCE, "execs": ids})
            return
        if not isinstance(eid, str) or not _EXEC_ID.match(eid):
            session.send({"t": "error", "error": f"frame {t!r} lacks a valid id"})
            return
        if t == "exec":
            self.start_exec(session, eid, msg)
            return
        if t == "identity":
            self.start_identity(session, eid, msg)
            return
        with session.lock:
            ex = session.execs.get(eid)
        if t not in ("ack", "signal", "kill", "stdin"):
            session.send({"t": "error", "id": eid, "error": f"unknown frame type {t!r}"})
        elif ex is None:
            if t != "kill":
                session.send({"t": "gone", "id": eid})
        else:
            ex.on_frame(t, msg)

    def start_exec(self, session: Session, eid: str, msg: dict[str, Json]) -> None:
        """Validate an exec frame and start its process on a thread of its own."""
        with session.lock:
            busy = eid in session.execs
            full = len(session.execs) >= MAX_EXECS
        if busy or full:
            why = f"exec id {eid} is in use" if busy else f"more than {MAX_EXECS} execs at once"
            session.send({"t": "exit", "id": eid, "code": None, "error": why, "kind": "invalid"})
            return
        try:
            spec = ExecSpec(msg)
        except ValueError as e:
            session.send({"t": "exit", "id": eid, "code": None, "error": str(e), "kind": "invalid"})
            return
        ex = Exec(session, eid, spec)
        with session.lock:
            session.execs[eid] = ex
        ex.start()

    def start_identity(self, session: Session, eid: str, msg: dict[str, Json]) -> None:
        """Validate an identity frame and apply it on a thread; answers with a `result`."""
        try:
            spec = IdentitySpec(msg)
        except ValueError as e:
            session.send({"t": "result", "id": eid, "ok": False, "error": str(e), "done": []})
            return

        def run() -> None:
            done: list[str] = []
            try:
                self.identity_system.apply(spec, done)
                session.send({"t": "result", "id": eid, "ok": True, "error": None, "done": done})
            except Exception as e:
                log("identity failed", exc=True)
                err = f"{done[-1] + ' done, then ' if done else ''}{type(e).__name__}: {e}"
                session.send({"t": "result", "id": eid, "ok": False, "error": err, "done": done})

        threading.Thread(target=run, daemon=True).start()

    def respond(self, item: Request | BadRequest, *, lead: bool, close: bool = False) -> bytes:
        """The bytes that answer one parsed request or error."""
        if isinstance(item, BadRequest):
            return render_response(
                400, {"error": item.reason}, item.request_id, lead=lead, close=close
            )
        status, payload = self.handle(item)
        return render_response(status, payload, item.request_id, lead=lead, close=close)


class _ErrorBudget:
    """Allows at most MAX_ERRORS_PER_SECOND 400 replies, so garbage cannot amplify."""

    def __init__(self) -> None:
        self._window = 0.0
        self._count = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window, self._count = now, 0
        self._count += 1
        return self._count <= MAX_ERRORS_PER_SECOND


# --- identity of a restored clone ------------------------------------------------------
#
# A VM forked from a snapshot resumes with its source's memory: the same kernel RNG state,
# clock (stopped at the save), hostname, MAC, IP, SSH host key and machine-id. The host
# sends one `identity` frame before it lets the NIC carry frames (docs/guest-boot.md,
# "Identity of a fork"); the agent applies it and answers `result`.

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")
_PUBKEY = re.compile(r"^ssh-ed25519 [A-Za-z0-9+/=]{16,512}( [\x21-\x7e]{1,128})?\n?$")
PRIVKEY_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----\n"
PRIVKEY_END = "-----END OPENSSH PRIVATE KEY-----\n"
MAX_HOST_KEY = 16384
MIN_ENTROPY, MAX_ENTROPY = 32, 4096  # bytes of host entropy in one identity frame


def _ipv4(value: Json, what: str) -> str:
    if not isinstance(value, str) or not re.match(r"^\d{1,3}(\.\d{1,3}){3}$", value):
        raise ValueError(f"{what} must be a dotted IPv4 address, got {value!r}")
    if any(int(p) > 255 for p in value.split(".")):
        raise ValueError(f"{what} must be a dotted IPv4 address, got {value!r}")
    return value


class IdentitySpec:
    """A validated identity frame (every field is required)."""

    def __init__(self, msg: dict[str, Json]) -> None:
        import base64
        import binascii
        import math

        host = msg.get("hostname")
        if not isinstance(host, str) or not _HOSTNAME.match(host):
            raise ValueError(
                f"hostname must be 1-63 of a-z, 0-9 and '-' (not at the ends), got {host!r}"
            )
        self.hostname = host
        self.ip = _ipv4(msg.get("ip"), "ip")
        self.gateway = _ipv4(msg.get("gateway"), "gateway")
        prefix = msg.get("prefix")
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 8 <= prefix <= 30:
            raise ValueError(f"prefix must be an integer from 8 to 30, got {prefix!r}")
        self.prefix = prefix
        mac = msg.get("mac")
        if not isinstance(mac, str) or not _MAC.match(mac) or int(mac[:2], 16) & 1:
            raise ValueError(f"mac must be a unicast aa:bb:cc:dd:ee:ff (lower case), got {mac!r}")
        self.mac = mac
        dns = msg.get("dns")
        if not isinstance(dns, list) or not 1 <= len(dns) <= 8:
            raise ValueError("dns must be a list of 1 to 8 IPv4 addresses")
        self.dns = [_ipv4(d, "dns") for d in dns]
        t = msg.get("time")
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise ValueError(f"time must be a Unix time in seconds, got {t!r}")
        if not 1.6e9 < t < 1e11:
            raise ValueError(f"time {t!r} is not a plausible Unix time")
        self.time = float(t)
        ent = msg.get("entropy")
        try:
            if not isinstance(ent, str):
                raise ValueError
            self.entropy = base64.b64decode(ent.encode("ascii"), validate=True)
        except (ValueError, binascii.Error, UnicodeEncodeError):
            raise ValueError("entropy must be base64") from None
        if not MIN_ENTROPY <= len(self.entropy) <= MAX_ENTROPY:
            raise ValueError(
                f"entropy must be {MIN_ENTROPY} to {MAX_ENTROPY} bytes, got {len(self.entropy)}"
            )
        key = msg.get("host_key")
        if (
            not isinstance(key, str)
            or len(key) > MAX_HOST_KEY
            or not key.startswith(PRIVKEY_BEGIN)
            or not key.endswith(PRIVKEY_END)
            or not all(c.isalnum() or c in "+/=-\n " for c in key)
        ):
            raise ValueError("host_key must be an OpenSSH private key (PEM text, at most 16 KiB)")
        self.host_key = key
        pub = msg.get("host_key_pub")
        if not isinstance(pub, str) or not _PUBKEY.match(pub):
            raise ValueError("host_key_pub must be one 'ssh-ed25519 KEY [comment]' line")
        self.host_key_pub = pub.rstrip("\n") + "\n"
        mid = msg.get("machine_id")
        if not isinstance(mid, str) or not _MACHINE_ID.match(mid) or mid == "0" * 32:
            raise ValueError(f"machine_id must be 32 lower-case hex digits, got {mid!r}")
        self.machine_id = mid


class IdentitySystem:
    """Where an identity is applied: the real guest by default; tests give a `root` for
    the files and replace the calls that change the whole system (RNG, clock, hostname,
    `ip`) by overriding the methods."""

    def __init__(self, root: str = "/") -> None:
        self.root = root

    def path(self, guest: str) -> str:
        return os.path.join(self.root, guest.lstrip("/"))

    def apply(self, s: IdentitySpec, done: list[str]) -> None:
        """RNG first (nothing after it may use the shared state), then the clock, files,
        hostname, network; `done` names each step as it completes."""
        self.add_entropy(s.entropy)
        done.append("rng")
        self.set_clock(s.time)
        done.append("clock")
        old_mac = self.env_value("STOKER_MAC")
        self.write("/etc/machine-id", s.machine_id + "\n", 0o444)
        done.append("machine-id")
        self.write("/etc/ssh/ssh_host_ed25519_key", s.host_key, 0o600)
        self.write("/etc/ssh/ssh_host_ed25519_key.pub", s.host_key_pub, 0o644)
        done.append("host-key")
        self.write("/etc/hostname", s.hostname + "\n", 0o644)
        self.write(
            "/etc/hosts",
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{s.hostname}\n{s.ip}\t{s.hostname}.vm "
            f"{s.hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        )
        self.set_hostname(s.hostname)
        done.append("hostname")
        self.write("/etc/resolv.conf", "".join(f"nameserver {d}\n" for d in s.dns), 0o644)
        self.write(
            "/etc/stoker/network.env",
            f"STOKER_IP={s.ip}\nSTOKER_PREFIX={s.prefix}\nSTOKER_GATEWAY={s.gateway}\n"
            f'STOKER_MAC={s.mac}\nSTOKER_DNS="{" ".join(s.dns)}"\nSTOKER_HOSTNAME={s.hostname}\n',
            0o644,
        )
        dev = self.find_nic(old_mac)
        self.run_ip(
            [
                f"link set dev {dev} address {s.mac}",
                f"addr flush dev {dev}",
                f"addr add {s.ip}/{s.prefix} dev {dev}",
                f"link set dev {dev} up",
                f"route replace default via {s.gateway} dev {dev}",
                f"neigh flush dev {dev}",
            ]
        )
        done.append("network")
        os.sync()
        done.append("sync")

    def env_value(self, key: str) -> str:
        try:
            with open(self.path("/etc/stoker/network.env")) as f:
                for line in f:
                    k, _, v = line.strip().partition("=")
                    if k == key:
                        return v.strip('"')
        except OSError:
            pass
        return ""

    def write(self, guest: str, text: str, mode: int) -> None:
        """Replace a file whole (temporary + rename), never through a link."""
        dest = self.path(guest)
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        tmp = f"{dest}.stoker-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, text.encode())
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)

    def find_nic(self, mac: str) -> str:
        """The NIC that has `mac` (the one the source was configured with), else eth0."""
        base = self.path("/sys/class/net")
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(base)):
                with contextlib.suppress(OSError), open(os.path.join(base, name, "address")) as f:
                    if mac and f.read().strip() == mac:
                        return name
        return "eth0"

    # The calls below change the running system; tests override them.

    def add_entropy(self, data: bytes) -> None:
        """Credit host entropy to the kernel pool and reseed the CRNG at once, so the
        clone's next random bytes differ from its siblings' (RNDADDENTROPY + RNDRESEEDCRNG;
        both need CAP_SYS_ADMIN, which the agent has as root)."""
        import fcntl
        import struct

        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)

    def set_clock(self, t: float) -> None:
        time.clock_settime(time.CLOCK_REALTIME, t)

    def set_hostname(self, name: str) -> None:
        socket.sethostname(name)

    def run_ip(self, batch: list[str]) -> None:
        import subprocess

        r = subprocess.run(
            ["ip", "-batch", "-"],
            input="\n".join(batch) + "\n",
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if r.returncode != 0:
            raise OSError(f"ip -batch failed ({r.returncode}): {r.stderr.strip()[:300]}")


# --- exec over the channel --------------------------------------------------------------
#
# Frames are single lines of ASCII JSON, each preceded by an empty line (so a reader can
# resynchronise after a cut-off write) and told apart from HTTP by their leading `{`. They
# share a channel with the GET endpoints and multiplex any number of processes over it:
# QEMU's chardev takes one host client, so everything travels on one byte stream.
#
# host -> agent                                   agent -> host
#   exec   {id, argv|shell, cwd, env, user,         started {id, pid, agent}
#           stdin, timeout, window}                 out     {id, fd, o, d}  (o = offset,
#   stdin  {id, d} | {id, eof: true}                                         d = base64)
#   ack    {id, n}       (output bytes consumed)    stdin_ack {id, n, closed}
#   signal {id, sig}     (to the process group)     exit    {id, code, signal, timed_out,
#   kill   {id}          (SIGKILL, host gave up)             error, kind}
#   ping   {seq}                                    pong    {seq, agent, execs}
#                                                   gone    {id}  (unknown id)
#
# Flow control: at most `window` output bytes per exec are unacknowledged; readers stop
# reading the process's pipes until the host acks, so a slow consumer blocks its own
# process, never the channel or other execs. The host's stdin is bounded the same way by
# stdin_ack. Execs belong to the host session that started them: when it ends (the port
# reads EOF, the stream closes) their process groups are killed.

MAX_FRAME = 192 * 1024  # bytes of one frame line from the host
EXEC_CHUNK = 32768  # bytes read from a pipe per output frame
EXEC_WINDOW = 256 * 1024
STDIN_LIMIT = 1 << 20  # queued stdin bytes beyond which the host broke the window
MAX_EXECS = 256
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL on timeout
EXIT_DRAIN = 2.0  # seconds output is still read after the process exited
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Tells the host this agent process apart from a restarted one. Not os.urandom: that can
# block this early in boot, before the kernel's random pool is ready.
INSTANCE = f"{os.getpid():x}-{time.time_ns():x}"
_EXEC_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}  # what main() waits for
_SIGNALS = {"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12, "TERM": 15}


def render_frame(obj: Json) -> bytes:
    """One frame: an empty line, then the JSON on one line."""
    return b"\n" + json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


class Session:
    """One host session on a channel; `write` is the channel's locked writer."""

    def __init__(self, write: Callable[[bytes], bool]) -> None:
        self._write = write
        self.execs: dict[str, Exec] = {}
        self.lock = threading.RLock()  # reentrant: a failed send under it closes the session
        self.closed = False

    def send(self, obj: Json) -> bool:
        """Write one frame; False when the host is gone or did not take it in time."""
        if self.closed:
            return False
        ok = self._write(render_frame(obj))
        if not ok:
            self.close()
        return ok

    def close(self) -> None:
        """The host went away: end every process it started."""
        self.closed = True
        with self.lock:
            execs = list(self.execs.values())
        for e in execs:
            e.abandon()


class ExecSpec:
    """A validated exec request."""

    def __init__(self, msg: dict[str, Json]) -> None:
        import pwd  # only when exec is used: start-up time matters

        argv, shell = msg.get("argv"), msg.get("shell")
        if shell is not None:
            if not isinstance(shell, str) or not shell or "\0" in shell:
                raise ValueError("shell must be a non-empty command line without NUL")
            if os.path.exists("/bin/bash"):
                self.argv = ["/bin/bash", "-lc", shell]
            else:
                self.argv = ["/bin/sh", "-c", shell]
        elif (
            isinstance(argv, list)
            and argv
            and all(isinstance(a, str) and "\0" not in a for a in argv)
            and argv[0]
        ):
            self.argv = [str(a) for a in argv]
        else:
            raise ValueError("give argv (a non-empty list of strings) or shell")
        user = msg.get("user") or "root"
        if not isinstance(user, str):
            raise ValueError("user must be a string")
        try:
            self.pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, ValueError):
            raise ValueError(f"no user {user!r} in the guest") from None
        env = msg.get("env")
        env = {} if env is None else env
        if not isinstance(env, dict):
            raise ValueError("env must be an object of strings")
        self.env = {
            "PATH": DEFAULT_PATH,
            "HOME": self.pw.pw_dir,
            "USER": self.pw.pw_name,
            "LOGNAME": self.pw.pw_name,
            "SHELL": self.pw.pw_shell or "/bin/sh",
            "LANG": "C.UTF-8",
            "TERM": "dumb",
        }
        for k, v in env.items():
            if not isinstance(v, str) or not k or "=" in k or "\0" in k or "\0" in v:
                raise ValueError(f"bad environment variable {k!r}")
            self.env[k] = v
        cwd = msg.get("cwd") or self.pw.pw_dir
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise ValueError("cwd must be an absolute path")
        self.cwd = cwd
        timeout = msg.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            raise ValueError("timeout must be a positive number of seconds")
        self.timeout = None if timeout is None else float(timeout)
        window = msg.get("window", EXEC_WINDOW)
        if isinstance(window, bool) or not isinstance(window, int) or window < EXEC_CHUNK:
            window = EXEC_WINDOW
        self.window = min(window, 16 * EXEC_WINDOW)
        self.stdin = msg.get("stdin") is True


class Exec:
    """One process started for the host: its pipes, its flow-control window, its end."""

    def __init__(self, session: Session, eid: str, spec: ExecSpec) -> None:
        self.session = session
        self.id = eid
        self.spec = spec
        self.cond = threading.Condition()
        self.inflight = 0  # output bytes sent and not yet acknowledged
        self.detached = False  # the host is gone or gave up: output is dropped
        self.out_lock = threading.Lock()
        self.proc: Any = None
        self._stdin: list[bytes | None] = []  # None = EOF
        self._stdin_bytes = 0
        self._stdin_closed = False

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    # -- frames from the host (called on the channel's thread: never block) --

    def on_frame(self, t: str, msg: dict[str, Json]) -> None:
        if t == "ack":
            n = msg.get("n")
            if isinstance(n, int) and n > 0:
                with self.cond:
                    self.inflight = max(0, self.inflight - n)
                    self.cond.notify_all()
        elif t == "signal":
            sig = msg.get("sig")
            num = _SIGNALS.get(sig) if isinstance(sig, str) else sig
            if isinstance(num, int) and not isinstance(num, bool) and 0 < num < 65:
                self.signal(num)
        elif t == "kill":
            self.abandon()
        elif t == "stdin":
            self._queue_stdin(msg)

    def _queue_stdin(self, msg: dict[str, Json]) -> None:
        import binascii

        data: bytes | None
        if msg.get("eof") is True:
            data = None
        else:
            d = msg.get("d")
            try:
                data = binascii.a2b_base64(d) if isinstance(d, str) else b""
            except binascii.Error:
                data = b""
            if not data:
                return
        with self.cond:
            if self._stdin_closed:
                closed = True
            else:
                closed = False
                self._stdin.append(data)
                self._stdin_bytes += len(data or b"")
                over = self._stdin_bytes > STDIN_LIMIT
                self.cond.notify_all()
        if closed:
            self.session.send(
                {"t": "stdin_ack", "id": self.id, "n": len(data or b""), "closed": True}
            )
        elif over:
            log(f"exec {self.id}: host overran the stdin window; killing it")
            self.abandon()

    def signal(self, num: int) -> None:
        p = self.proc
        if p is not None and p.returncode is None:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, num)

    def abandon(self) -> None:
        """The host is gone or gave up: kill the process group, drop its output."""
        with self.cond:
            self.detached = True
            self._stdin_closed = True
            self.cond.notify_all()
        p = self.proc
        if p is not None:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)

    # -- the process's own threads --

    def _send_exit(self, **fields: Json) -> None:
        frame: dict[str, Json] = {"t": "exit", "id": self.id, "code": None, "signal": None}
        frame.update(fields)
        # Sent before the exec is forgotten, and atomically with it: a host frame for
        # this id (an ack in flight) then sees either the exec or, after the exit frame,
        # nothing, so "gone" can never overtake "exit".
        with self.session.lock:
            self.session.send(frame)
            self.session.execs.pop(self.id, None)

    def _spawn(self) -> Any:
        import subprocess  # only when exec is used: start-up time matters

        s = self.spec
        kw: dict[str, Any] = {}
        if s.pw.pw_uid != os.getuid():
            kw = {
                "user": s.pw.pw_uid,
                "group": s.pw.pw_gid,
                "extra_groups": os.getgrouplist(s.pw.pw_name, s.pw.pw_gid),
            }
        # main() blocks SIGTERM/SIGINT in every thread for sigwait(), and a child inherits
        # its forking thread's mask: unblock them around the fork so the process can be
        # interrupted, then block them again.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            return self._popen(subprocess, s, kw)
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def _popen(self, subprocess: Any, s: ExecSpec, kw: dict[str, Any]) -> Any:
        return subprocess.Popen(
            s.argv,
            cwd=s.cwd,
            env=s.env,
            stdin=subprocess.PIPE if s.stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            **kw,
        )

    def _run(self) -> None:
        s = self.spec
        if not os.path.isdir(s.cwd):
            self._send_exit(
                error=f"working directory {s.cwd} does not exist in the guest", kind="cwd"
            )
            return
        try:
            self.proc = proc = self._spawn()
        except FileNotFoundError:
            self._fail_spawn(127, f"{s.argv[0]}: command not found")
            return
        except PermissionError as e:
            self._fail_spawn(126, f"{s.argv[0]}: {e.strerror or e}")
            return
        except OSError as e:
            if e.errno == errno.ENOEXEC:
                self._fail_spawn(126, f"{s.argv[0]}: {e.strerror or e}")
            else:
                self._send_exit(error=f"cannot start {s.argv[0]}: {e.strerror or e}", kind="spawn")
            return
        if self.detached:  # the host gave up while we were forking
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        # The agent runs with a low OOM score; what it starts must not inherit that.
        with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/oom_score_adj", "w") as f:
            f.write("0")
        self.session.send({"t": "started", "id": self.id, "pid": proc.pid, "agent": INSTANCE})
        readers = [
            threading.Thread(target=self._pump, args=(1, proc.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(2, proc.stderr), daemon=True),
        ]
        if s.stdin:
            threading.Thread(target=self._feed_stdin, args=(proc.stdin,), daemon=True).start()
        for t in readers:
            t.start()
        timed_out = False
        import subprocess

        try:
            proc.wait(s.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.signal(signal.SIGTERM)
            try:
                proc.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                pass
        if timed_out or self.detached:
            # The whole group goes, so nothing it started holds the pipes open.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Output written before the exit is all delivered; a background process that keeps
        # the pipes open (a daemon it started) is not waited for beyond EXIT_DRAIN: it
        # keeps running, its later output is dropped.
        drain_until = time.monotonic() + EXIT_DRAIN
        for t in readers:
            t.join(max(0.0, drain_until - time.monotonic()))
        if any(t.is_alive() for t in readers):
            with self.out_lock, self.cond:
                self.detached = True
                self.cond.notify_all()
        with self.cond:
            self._stdin_closed = True
            self.cond.notify_all()
        rc = proc.returncode
        self._send_exit(
            code=rc if rc >= 0 else None,
            signal=-rc if rc < 0 else None,
            timed_out=timed_out,
        )

    def _fail_spawn(self, code: int, message: str) -> None:
        import binascii

        data = f"stoker-agent: {message}\n".encode(errors="replace")
        self.session.send(
            {
                "t": "out",
                "id": self.id,
                "fd": 2,
                "o": 0,
                "d": binascii.b2a_base64(data, newline=False).decode(),
            }
        )
        self._send_exit(code=code, error=message, kind="spawn")

    def _pump(self, fd: int, pipe: Any) -> None:
        import binascii

        offset = 0
        window = self.spec.window
        try:
            while True:
                with self.cond:
                    while self.inflight >= window and not self.detached:
                        self.cond.wait()
                try:
                    data = os.read(pipe.fileno(), EXEC_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    return
                frame = {
                    "t": "out",
                    "id": self.id,
                    "fd": fd,
                    "o": offset,
                    "d": binascii.b2a_base64(data, newline=False).decode("ascii"),
                }
                with self.out_lock:  # never after the exit frame
                    if not self.detached:
                        with self.cond:
                            self.inflight += len(data)
                        self.session.send(frame)
                offset += len(data)
        finally:
            pipe.close()

    def _feed_stdin(self, pipe: Any) -> None:
        broken = False
        try:
            while True:
                with self.cond:
                    while not self._stdin and not self._stdin_closed:
                        self.cond.wait()
                    if not self._stdin:
                        return
                    data = self._stdin.pop(0)
                    if data is not None:
                        self._stdin_bytes -= len(data)
                if data is None:
                    return
                if not broken:
                    try:
                        pipe.write(data)
                        pipe.flush()
                    except OSError:
                        broken = True  # the process closed its stdin: the rest is dropped
                self.session.send(
                    {"t": "stdin_ack", "id": self.id, "n": len(data), "closed": broken}
                )
        finally:
            with contextlib.suppress(OSError):
                pipe.close()


# --- virtio-serial transport ------------------------------------------------------------


def find_serial_device(sys_dir: str = "/sys/class/virtio-ports") -> str | None:
    """The agent's port: udev's stable link, else the /dev/vportNpM named so in sysfs."""
    if os.path.exists(SERIAL_LINK):
        return SERIAL_LINK
    with contextlib.suppress(OSError):
        for port in sorted(os.listdir(sys_dir)):
            with contextlib.suppress(OSError):
                if _read(f"{sys_dir}/{port}/name").strip() == SERIAL_NAME:
                    dev = f"/dev/{port}"
                    if os.path.exists(dev):
                        return dev
    return None


class SerialServer:
    """Serves requests on the virtio-serial port, reopening it whenever it fails."""

    # errnos that mean the device itself went away (unplug; a pty whose master closed)
    _GONE = (errno.EIO, errno.ENODEV, errno.ENXIO, errno.EBADF, errno.EPIPE)

    def __init__(self, agent: Agent, path: str | None, stop: threading.Event) -> None:
        self.agent = agent
        self.path = path
        self.stop = stop
        self._wlock = threading.Lock()

    def run(self) -> None:
        """Open the port and serve it, forever."""
        delay = 0.1
        reported: str | None = None
        started = time.monotonic()
        while not self.stop.is_set():
            dev = self.path or find_serial_device()
            fd = -1
            try:
                if dev is None:
                    raise FileNotFoundError(f"no virtio-serial port named {SERIAL_NAME}")
                fd = os.open(dev, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                if reported != str(e):
                    log(f"serial: waiting for the port: {e}")
                    reported = str(e)
                self.stop.wait(delay)
                # The port appears when its driver loads, early in boot: look often then;
                # a VMM without the port (Firecracker) costs a glance every 10 s later.
                early = time.monotonic() - started < SERIAL_EARLY_PERIOD
                delay = min(delay * 2, 1.0 if early else 10.0)
                continue
            log(f"serial: serving {dev}")
            reported, delay = None, 0.1
            try:
                self._serve(fd)
            except Exception:
                log(f"serial: {dev} failed; reopening", exc=True)
            finally:
                os.close(fd)
            self.stop.wait(0.2)

    def _serve(self, fd: int) -> None:
        is_tty = os.isatty(fd)
        if is_tty:
            # A pty (tests) or console: no echo, no line editing, bytes pass unchanged.
            # TCSANOW: the default TCSAFLUSH would discard a request already queued.
            with contextlib.suppress(OSError, termios.error):
                tty.setraw(fd, termios.TCSANOW)
        parser = RequestParser()
        budget = _ErrorBudget()
        session = Session(lambda data: self._write(fd, data))
        # Edge-triggered: a virtio-serial port whose host side is closed polls readable (EOF)
        # for ever; ET wakes us only on real changes (data, host connect/disconnect).
        ep = select.epoll()
        try:
            ep.register(fd, select.EPOLLIN | select.EPOLLET)
            while not self.stop.is_set():
                ep.poll(30.0)
                while True:
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno in self._GONE:
                            return
                        raise
                    if not data:
                        if is_tty:
                            return  # a hung-up tty (its other end closed) reads EOF: reopen
                        # virtio-serial reads EOF while the host side is not connected:
                        # whatever was half-received belonged to a session that is over,
                        # and so do the processes it started.
                        parser.reset()
                        if session.execs or session.closed:
                            session.close()
                            session = Session(lambda data: self._write(fd, data))
                        break
                    for item in parser.feed(data):
                        if isinstance(item, Frame):
                            if session.closed:  # a write failed: the host was gone
                                session = Session(lambda data: self._write(fd, data))
                            self.agent.handle_frame(session, item)
                            continue
                        if isinstance(item, BadRequest) and not budget.allow():
                            continue
                        if not self._write(fd, self.agent.respond(item, lead=True)):
                            parser.reset()
        finally:
            ep.close()
            session.close()

    def _write(self, fd: int, data: bytes) -> bool:
        """Write all of `data` (whole, under the channel's lock: exec threads write too);
        False when the host did not take it within WRITE_TIMEOUT."""
        with self._wlock:
            view = memoryview(data)
            deadline = time.monotonic() + WRITE_TIMEOUT
            stalls = 0
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    n = 0
                except OSError as e:
                    if e.errno in self._GONE:
                        return False
                    log(f"serial: write failed: {e}")
                    return False
                view = view[n:]
                if view and n == 0:
                    # The host is not reading, or not connected (writes would block until
                    # it reconnects, and poll() cannot wait for that): wait for POLLOUT,
                    # but sleep when the port claims writable and still refuses.
                    if time.monotonic() >= deadline:
                        log("serial: host did not read a response; dropped")
                        return False
                    stalls += 1
                    if stalls > 1:
                        time.sleep(0.01)
                    else:
                        select.select([], [fd], [], 0.01)
                else:
                    stalls = 0
            return True


# --- stream transports: vsock and unix --------------------------------------------------


def vsock_listener(port: int) -> socket.socket:
    """A listening AF_VSOCK socket on any CID (the guest's own)."""
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind((socket.VMADDR_CID_ANY, port))
        s.listen(MAX_STREAM_CONNECTIONS)
    except OSError:
        s.close()
        raise
    return s


def unix_listener(path: str) -> socket.socket:
    """A listening unix stream socket at `path` (mode 0600; a stale socket is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(path)
        os.chmod(path, 0o600)
        s.listen(MAX_STREAM_CONNECTIONS)
    except OSError:
        s.close()
        raise
    return s


class StreamServer:
    """Accepts stream connections (vsock or unix) and serves each on its own thread."""

    def __init__(
        self, agent: Agent, label: str, listen: Callable[[], socket.socket], stop: threading.Event
    ) -> None:
        self.agent = agent
        self.label = label
        self.listen = listen
        self.stop = stop
        self._slots = threading.BoundedSemaphore(MAX_STREAM_CONNECTIONS)

    def run(self) -> None:
        """Listen (retrying while the transport is missing, e.g. no vsock device yet)."""
        delay = 1.0
        reported: str | None = None
        while not self.stop.is_set():
            try:
                sock = self.listen()
            except OSError as e:
                if reported != str(e):
                    log(f"{self.label}: cannot listen yet: {e}")
                    reported = str(e)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            log(f"{self.label}: listening")
            try:
                self._accept_loop(sock)
            except Exception:
                log(f"{self.label}: listener failed; restarting", exc=True)
            finally:
                sock.close()
            self.stop.wait(1.0)

    def _accept_loop(self, sock: socket.socket) -> None:
        while not self.stop.is_set():
            conn, _ = sock.accept()
            if not self._slots.acquire(blocking=False):
                conn.close()  # too many clients: the host retries
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        wlock = threading.Lock()

        def write(data: bytes) -> bool:
            with wlock:
                try:
                    conn.sendall(data)
                except OSError:
                    return False
            return True

        # One timeout for both directions: exec threads write while this one reads, and
        # an exec's host pings at least every few seconds.
        session = Session(write)
        try:
            conn.settimeout(STREAM_IDLE_TIMEOUT)
            parser = RequestParser()
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for item in parser.feed(data):
                    if isinstance(item, Frame):
                        self.agent.handle_frame(session, item)
                        continue
                    close = isinstance(item, BadRequest) or item.wants_close
                    if not write(self.agent.respond(item, lead=False, close=close)) or close:
                        return
        except OSError:
            return  # timeouts and resets: the client is gone
        finally:
            session.close()
            conn.close()
            self._slots.release()


# --- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line; the defaults are what the guest unit runs."""
    p = argparse.ArgumentParser(prog="stoker-agent", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--serial",
        metavar="PATH",
        help=f"serial device to serve (default: the virtio port named {SERIAL_NAME})",
    )
    p.add_argument("--no-serial", action="store_true", help="do not serve a serial port")
    p.add_argument("--vsock-port", type=int, default=VSOCK_PORT, metavar="PORT")
    p.add_argument("--no-vsock", action="store_true", help="do not listen on vsock")
    p.add_argument("--listen-unix", metavar="PATH", help="also serve a unix stream socket")
    p.add_argument(
        "--activity-interval",
        type=float,
        default=ACTIVITY_INTERVAL,
        metavar="SECONDS",
        help="how often CPU use is sampled for last activity",
    )
    p.add_argument("--version", action="version", version=f"stoker-agent {AGENT_VERSION}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start every transport on its own thread; exit on SIGTERM/SIGINT."""
    args = parse_args(argv)
    # Threads inherit the blocked mask, so the signals reach sigwait() in this thread only.
    signals = STOP_SIGNALS
    # Default dispositions, not Python's handler or an inherited SIG_IGN: an ignored signal
    # is discarded (sigwait would never see it), and processes started by exec inherit
    # SIG_IGN and could not be interrupted.
    for sig in signals:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    stop = threading.Event()
    agent = Agent(activity_interval=max(0.05, args.activity_interval))
    workers: list[Callable[[], None]] = [lambda: agent.activity.run(stop)]
    if not args.no_serial:
        workers.append(SerialServer(agent, args.serial, stop).run)
    if not args.no_vsock:
        port = args.vsock_port
        workers.append(StreamServer(agent, f"vsock:{port}", lambda: vsock_listener(port), stop).run)
    if args.listen_unix:
        path = args.listen_unix
        workers.append(StreamServer(agent, f"unix:{path}", lambda: unix_listener(path), stop).run)
    threading.stack_size(512 * 1024)  # exec starts up to 4 threads per process
    for w in workers:
        threading.Thread(target=w, daemon=True).start()
    signal.sigwait(signals)
    stop.set()
    if args.listen_unix:
        with contextlib.suppress(OSError):
            os.unlink(args.listen_unix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
