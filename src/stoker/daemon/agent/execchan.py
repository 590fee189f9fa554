"""Host side of exec over the agent channel: a frame demultiplexer and exec sessions.

The guest agent's docstring and its "exec over the channel" section are the protocol
reference; docs/protocol.md describes it with the daemon's RPC. In short: frames are lines
of ASCII JSON (preceded by an empty line, told apart from HTTP by their leading `{`), and
any number of execs share one connection, which on QEMU is the one virtio-serial chardev.

`FrameChannel` owns one connection's reader once exec is used on it: it routes `out`,
`exit`, ... frames to their `ExecSession` and HTTP responses (GETs still travel on the same
stream) to the request waiting for that id. It never blocks on a consumer: every session's
queue is bounded by the output window the agent honours (a guest that overruns it loses
the session). Consumers acknowledge output as they take it, which is what lets the agent
read more from the process's pipes: a slow reader stalls its own process, nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from stoker.daemon.agent.client import (
    _EOF,
    ID_HEADER,
    MAX_LINE,
    SKIP_BUDGET,
    AgentError,
    AgentProtocolError,
    AgentResponse,
    AgentUnavailable,
    BoundedReader,
    _Conn,
    _parse_status,
    _read_headers,
    _request_bytes,
)
from stoker.errors import InvalidArgument

MAX_FRAME_LINE = 256 * 1024  # bytes of one frame line from the guest (32 KiB -> base64 + JSON)
EXEC_WINDOW = 256 * 1024  # output bytes in flight per exec (the agent stops reading beyond)
WINDOW_SLACK = 64 * 1024  # what a guest may exceed the window by before it is cut off
STDIN_CHUNK = 32 * 1024
STDIN_WINDOW = 256 * 1024
PING_INTERVAL = 5.0  # seconds between liveness pings while execs run
MAX_UNKNOWN_KILLS = 1024  # ids of stray processes we asked the agent to kill, remembered


@dataclass(frozen=True)
class ExecSpec:
    """What to run. Exactly one of `argv` (words, no shell) and `shell` (one command line,
    run by `bash -lc`, or `sh -c` where the guest has no bash)."""

    argv: list[str] | None = None
    shell: str | None = None
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    stdin: bool = False
    timeout: float | None = None
    root: str | None = None  # "workload": run in the VM's workload root (docs/guest-boot.md)

    def frame(self, eid: str, window: int) -> dict[str, Any]:
        f: dict[str, Any] = {"t": "exec", "id": eid, "env": self.env, "window": window}
        if self.shell is not None:
            f["shell"] = self.shell
        else:
            f["argv"] = self.argv
        for k in ("cwd", "user", "timeout", "root"):
            v = getattr(self, k)
            if v is not None:
                f[k] = v
        if self.stdin:
            f["stdin"] = True
        return f


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: its exit code, or the signal that killed it."""

    code: int | None
    signal: int | None
    timed_out: bool = False

    @property
    def exit_code(self) -> int:
        """The shell convention: 124 after a timeout, 128+N for signal N, else the code."""
        if self.timed_out:
            return 124
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 255


class ExecRefused(AgentError, InvalidArgument):
    """The agent would not start the process (bad request, missing cwd, unknown user)."""


class FrameChannel:
    """Demultiplexes one agent connection (see the module docstring)."""

    def __init__(
        self, conn: _Conn, where: str, on_close: Callable[[FrameChannel], None] | None = None
    ) -> None:
        self._conn = conn
        self.where = where
        self._on_close = on_close
        self.sessions: dict[str, ExecSession] = {}
        self._waiters: dict[str, tuple[asyncio.Future[AgentResponse], int, int]] = {}
        self._calls: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._skipped = 0
        self._killed: dict[str, None] = {}
        self._ping_seq = 0
        self.closed = False
        self.error: str | None = None
        self._reader = asyncio.ensure_future(self._read_loop())
        self._pinger = asyncio.ensure_future(self._ping_loop())

    # -- sending --

    def send(self, obj: dict[str, Any]) -> None:
        """Queue one frame (a whole line, so frames never interleave)."""
        if self.closed:
            raise AgentUnavailable(f"the agent channel ({self.where}) is closed: {self.error}")
        self._conn.writer.write(
            b"\n" + json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
        )

    async def drain(self) -> None:
        try:
            await self._conn.writer.drain()
        except (ConnectionError, OSError) as e:
            self._close(f"write failed: {e}")
            raise AgentUnavailable(f"the agent channel ({self.where}) failed: {e}") from None

    # -- GETs on the same stream --

    async def request(self, path: str, max_response: int) -> AgentResponse:
        """One GET whose response the reader hands over by id."""
        if self.closed:
            raise _EOF
        rid = secrets.token_hex(8)
        fut: asyncio.Future[AgentResponse] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = (fut, max_response, self._skipped)
        try:
            self._conn.writer.write(_request_bytes(path, rid, lead=True))
            await self._conn.writer.drain()
            return await fut
        finally:
            self._waiters.pop(rid, None)

    # -- one-shot frames answered by a `result` frame (identity) --

    async def call(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send `frame` (its `t` and fields; the id is added) and wait for the agent's
        `result` frame of that id. An agent that does not know the frame type answers an
        `error` frame for the id, which fails the call with that message."""
        cid = secrets.token_hex(8)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[cid] = fut
        try:
            self.send({**frame, "id": cid})
            await self.drain()
            return await fut
        finally:
            self._calls.pop(cid, None)

    # -- execs --

    async def open_exec(self, spec: ExecSpec, window: int = EXEC_WINDOW) -> ExecSession:
        """Send the exec frame; the session's `wait_started` says whether it ran."""
        eid = secrets.token_hex(8)
        s = ExecSession(self, eid, window)
        s.ping_floor = self._ping_seq
        self.sessions[eid] = s
        try:
            self.send(spec.frame(eid, window))
            await self.drain()
        except BaseException:
            self.sessions.pop(eid, None)
            raise
        return s

    def forget(self, session: ExecSession) -> None:
        self.sessions.pop(session.id, None)

    # -- the reader --

    def _skip(self, n: int) -> None:
        from stoker.daemon.agent.client import _Budget

        self._skipped += n
        for rid, (fut, max_response, start) in list(self._waiters.items()):
            if self._skipped - start > SKIP_BUDGET + max_response and not fut.done():
                fut.set_exception(_Budget())
                self._waiters.pop(rid, None)

    async def _read_loop(self) -> None:
        r: BoundedReader = self._conn.reader
        r.start(None)
        reason = "the guest side closed it"
        try:
            while True:
                line = await r.line(MAX_FRAME_LINE)
                if line is None:
                    self._skip(MAX_FRAME_LINE)
                    continue
                if not line:
                    continue
                if line[:1] == b"{":
                    if not self._on_frame(line):
                        self._skip(len(line))
                    continue
                status = _parse_status(line) if len(line) <= MAX_LINE else None
                if status is None:
                    self._skip(len(line))
                    continue
                headers = await _read_headers(r)
                if headers is None:
                    self._skip(MAX_LINE)
                    continue
                rid = headers.get(ID_HEADER, b"").decode("ascii", "replace")
                waiter = self._waiters.pop(rid, None)
                if waiter is None or waiter[0].done():
                    continue  # a stale answer: its one-line body is skipped as a line
                fut, max_response, _ = waiter
                length = headers.get(b"content-length", b"")
                if not length.isdigit():
                    fut.set_exception(AgentProtocolError("response without a valid Content-Length"))
                    continue
                n = int(length)
                if n > max_response:
                    fut.set_exception(
                        AgentProtocolError(
                            f"response of {n} bytes exceeds the {max_response} byte limit"
                        )
                    )
                    reason = "a response exceeded its size limit"
                    return  # the stream cannot be trusted past this: drop it
                fut.set_result(AgentResponse(status, headers, await r.exactly(n)))
        except _EOF:
            pass
        except (ConnectionError, OSError) as e:
            reason = f"read failed: {e}"
        except asyncio.CancelledError:
            reason = "closed by the host"
            raise
        finally:
            self._close(reason)

    def _on_frame(self, line: bytes) -> bool:
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return False
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
            return False  # e.g. the body of a stale HTTP answer
        t: str = msg["t"]
        if t == "pong":
            self._on_pong(msg)
            return True
        eid = msg.get("id")
        if not isinstance(eid, str):
            return t == "error"
        call = self._calls.get(eid)
        if call is not None:
            if not call.done():
                if t == "result":
                    call.set_result(msg)
                else:
                    err = str(msg.get("error") or f"unexpected {t!r} frame")[:300]
                    call.set_exception(AgentProtocolError(f"the guest agent refused: {err}"))
            return True
        s = self.sessions.get(eid)
        if s is None:
            if t in ("started", "out", "stdin_ack") and eid not in self._killed:
                # A process nobody here waits for (an earlier daemon's, say): end it.
                self._killed[eid] = None
                if len(self._killed) > MAX_UNKNOWN_KILLS:
                    self._killed.pop(next(iter(self._killed)))
                with contextlib.suppress(AgentError):
                    self.send({"t": "kill", "id": eid})
            return True
        s._on_frame(t, msg)
        return True

    def _on_pong(self, msg: dict[str, Any]) -> None:
        seq, agent, ids = msg.get("seq"), msg.get("agent"), msg.get("execs")
        if not isinstance(seq, int) or not isinstance(ids, list):
            return
        alive = set(ids)
        for s in list(self.sessions.values()):
            if s.status is not None or s.agent is None or seq <= s.ping_floor:
                continue
            if agent != s.agent:
                s._fail(
                    AgentUnavailable(
                        "the guest agent restarted while the command ran: the process is gone"
                    )
                )
            elif s.id not in alive:
                s._fail(AgentUnavailable("the guest agent lost track of the process"))

    async def _ping_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(PING_INTERVAL)
            if self.sessions and not self.closed:
                self._ping_seq += 1
                with contextlib.suppress(AgentError):
                    self.send({"t": "ping", "seq": self._ping_seq})

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = reason
        self._conn.close()
        err = AgentUnavailable(
            f"the agent channel ({self.where}) closed while a command ran ({reason}): the VM "
            "may be stopping, or its agent restarted"
        )
        for s in list(self.sessions.values()):
            s._fail(err)
        for fut, _, _ in self._waiters.values():
            if not fut.done():
                fut.set_exception(_EOF())
        self._waiters.clear()
        for call in self._calls.values():
            if not call.done():
                call.set_exception(
                    AgentUnavailable(f"the agent channel ({self.where}) closed ({reason})")
                )
        if self._pinger is not asyncio.current_task():
            self._pinger.cancel()
        if self._on_close is not None:
            self._on_close(self)

    async def aclose(self) -> None:
        """Close the connection and stop the reader."""
        self._close("closed by the host")
        for t in (self._reader, self._pinger):
            if t is not asyncio.current_task():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t


_Item = tuple[int, bytes] | ExitStatus | BaseException


class ExecSession:
    """One process in the guest: its output as it comes, stdin, signals, its status."""

    def __init__(self, channel: FrameChannel, eid: str, window: int) -> None:
        self.channel = channel
        self.id = eid
        self.window = window
        self.pid: int | None = None
        self.agent: str | None = None
        self.status: ExitStatus | None = None
        self.ping_floor = 0
        self.started_at = time.monotonic()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queued = 0  # output bytes queued and not yet acknowledged
        self._offsets = {1: 0, 2: 0}
        self._started = asyncio.get_running_loop().create_future()
        self._stdin_inflight = 0
        self._stdin_ok = asyncio.Event()
        self._stdin_ok.set()
        self._stdin_closed = False
        self._done = False

    # -- frames from the reader (must not block) --

    def _on_frame(self, t: str, msg: dict[str, Any]) -> None:
        if self._done:
            return
        if t == "started":
            pid, agent = msg.get("pid"), msg.get("agent")
            self.pid = pid if isinstance(pid, int) else None
            self.agent = agent if isinstance(agent, str) else ""
            if not self._started.done():
                self._started.set_result(None)
        elif t == "out":
            self._on_out(msg)
        elif t == "stdin_ack":
            n = msg.get("n")
            if isinstance(n, int):
                self._stdin_inflight = max(0, self._stdin_inflight - n)
            if msg.get("closed") is True:
                self._stdin_closed = True
            if self._stdin_inflight + STDIN_CHUNK <= STDIN_WINDOW or self._stdin_closed:
                self._stdin_ok.set()
        elif t == "exit":
            self._on_exit(msg)
        elif t == "gone":
            self._fail(AgentUnavailable("the guest agent no longer knows the process"))
        elif t == "error":
            self._fail(AgentProtocolError(f"the guest agent refused a frame: {msg.get('error')}"))

    def _on_out(self, msg: dict[str, Any]) -> None:
        fd, off, d = msg.get("fd"), msg.get("o"), msg.get("d")
        if fd not in (1, 2) or not isinstance(d, str) or not isinstance(off, int):
            self._fail(AgentProtocolError("the guest agent sent a malformed output frame"))
            return
        try:
            data = base64.b64decode(d, validate=True)
        except (binascii.Error, ValueError):
            self._fail(AgentProtocolError("the guest agent sent output that is not base64"))
            return
        assert isinstance(fd, int)
        if off != self._offsets[fd]:
            self._fail(
                AgentProtocolError(
                    f"output of the command was lost on the agent channel (fd {fd}: expected "
                    f"offset {self._offsets[fd]}, got {off})"
                )
            )
            return
        self._offsets[fd] += len(data)
        self._queued += len(data)
        if self._queued > self.window + WINDOW_SLACK:
            self._fail(
                AgentProtocolError(
                    "the guest agent sent more output than the flow-control window allows"
                )
            )
            return
        if not self._started.done():
            self._started.set_result(None)
        self._queue.put_nowait((fd, data))

    def _on_exit(self, msg: dict[str, Any]) -> None:
        err = msg.get("error")
        code, sig = msg.get("code"), msg.get("signal")
        if msg.get("kind") in ("invalid", "cwd", "spawn") and code is None:
            self._fail(ExecRefused(f"the guest agent could not run the command: {err}"))
            return
        self._done = True
        st = ExitStatus(
            code=code if isinstance(code, int) else None,
            signal=sig if isinstance(sig, int) else None,
            timed_out=msg.get("timed_out") is True,
        )
        self.status = st
        if not self._started.done():
            self._started.set_result(None)
        self._queue.put_nowait(st)
        self._stdin_ok.set()
        self.channel.forget(self)

    def _fail(self, e: BaseException) -> None:
        if self._done:
            return
        self._done = True
        if not self._started.done():
            self._started.set_exception(e)
            self._started.exception()  # consumed here: wait_started re-raises it
        self._queue.put_nowait(e)
        self._stdin_ok.set()
        self.channel.forget(self)
        with contextlib.suppress(AgentError):
            self.channel.send({"t": "kill", "id": self.id})

    # -- the consumer's side --

    async def wait_started(self) -> None:
        """Return once the process runs (or already ended); raise when it never started."""
        await asyncio.shield(self._started)

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        """(fd, bytes) chunks as they come; ends when the process has ended (`status`).
        A chunk is acknowledged to the agent when the next one is asked for."""
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, ExitStatus):
                return
            yield item
            self._ack(len(item[1]))

    def _ack(self, n: int) -> None:
        self._queued -= n
        if not self._done:
            with contextlib.suppress(AgentError):
                self.channel.send({"t": "ack", "id": self.id, "n": n})

    async def write_stdin(self, data: bytes) -> bool:
        """Send stdin bytes, waiting while the window is full; False once the process
        closed its stdin (or ended)."""
        view = memoryview(data)
        while view:
            await self._stdin_ok.wait()
            if self._stdin_closed or self._done:
                return False
            chunk = bytes(view[:STDIN_CHUNK])
            view = view[STDIN_CHUNK:]
            self._stdin_inflight += len(chunk)
            if self._stdin_inflight + STDIN_CHUNK > STDIN_WINDOW:
                self._stdin_ok.clear()
            self.channel.send(
                {"t": "stdin", "id": self.id, "d": base64.b64encode(chunk).decode("ascii")}
            )
            await self.channel.drain()
        return not (self._stdin_closed or self._done)

    async def close_stdin(self) -> None:
        """End of input."""
        if not self._done:
            self.channel.send({"t": "stdin", "id": self.id, "eof": True})
            await self.channel.drain()

    def signal(self, sig: str | int) -> None:
        """Deliver a signal (name such as "INT", or number) to the process group."""
        if not self._done:
            self.channel.send({"t": "signal", "id": self.id, "sig": sig})

    def kill(self) -> None:
        """Give up on the process: the agent SIGKILLs its group; no more output comes."""
        if self._done:
            return
        self._done = True
        self.channel.forget(self)
        with contextlib.suppress(AgentError):
            self.channel.send({"t": "kill", "id": self.id})

    @property
    def done(self) -> bool:
        return self._done
