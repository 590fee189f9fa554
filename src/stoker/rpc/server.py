"""Asyncio unix-socket RPC server: framing, peer checks, limits, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.errors import (
    Cancelled,
    ConfigError,
    InvalidRequest,
    PermissionDenied,
    RequestTooLarge,
    StokerError,
    Timeout,
    TooManyConnections,
)
from stoker.rpc.protocol import (
    IDLE_TIMEOUT,
    LISTEN_BACKLOG,
    MAX_CONNECTIONS,
    MAX_ID_LENGTH,
    MAX_NESTING,
    MAX_REQUEST_BYTES,
    encode,
)

log = logging.getLogger("stoker.rpc")


@dataclass
class RequestContext:
    """Per-request handle given to handlers: who asked, and a way to stream progress."""

    peer_uid: int
    peer_pid: int
    _writer: asyncio.StreamWriter | None = None
    _rid: Any = None
    progress_log: list[dict[str, Any]] = field(default_factory=list)

    def progress(self, stage: str, message: str = "", **fields: Any) -> None:
        """Stream one progress event to the caller (dropped if it has gone)."""
        event = {"stage": stage, "message": message, **fields}
        self.progress_log.append(event)
        w = self._writer
        if w is None or w.is_closing():
            return
        with contextlib.suppress(Exception):
            w.write(encode({"id": self._rid, "progress": event}))

    async def stream(self, event: dict[str, Any]) -> bool:
        """Send one progress event and wait until the socket has taken it (flow control
        for bulk streams such as exec output); not kept in progress_log. False once the
        caller has gone."""
        w = self._writer
        if w is None or w.is_closing():
            return False
        try:
            w.write(encode({"id": self._rid, "progress": event}))
            await w.drain()
        except (ConnectionError, OSError):
            return False
        return True


Dispatch = Callable[[str, dict[str, Any], RequestContext], Awaitable[Any]]


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def peer_groups(sock: socket.socket) -> set[int]:
    """The peer's supplementary groups as of connect() (SO_PEERGROUPS, Linux 4.13+;
    SO_PEERCRED carries only the primary one). Empty when the kernel cannot say."""
    size = 64 * 4
    for _ in range(4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                size *= 8
                continue
            return set()
        n = len(raw) // 4
        return set(struct.unpack(f"{n}I", raw[: n * 4]))
    return set()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class RPCServer:
    """Serves `dispatch` on a unix socket; one request at a time per connection."""

    def __init__(
        self,
        socket_path: Path,
        dispatch: Dispatch,
        allowed_uids: set[int] | None = None,
        max_request: int = MAX_REQUEST_BYTES,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        group: str = "",
    ) -> None:
        self.socket_path = socket_path
        self._dispatch = dispatch
        self.allowed_uids = allowed_uids if allowed_uids is not None else {os.getuid(), 0}
        # `socket_group`: its members may connect too (socket 0660, group-owned).
        self.group = group
        self.allowed_gid: int | None = None
        self.max_request = max_request
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_conn,
                path=str(self.socket_path),
                limit=self.max_request + 1,
                backlog=LISTEN_BACKLOG,
            )
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        if self.group:
            self._open_to_group()

    def _open_to_group(self) -> None:
        import grp

        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise ConfigError(
                f"socket_group {self.group!r} does not exist: create it (stoker system "
                "install does) or unset socket_group"
            ) from None
        rt = self.socket_path.parent
        # The directory must let the group reach the socket; it never is the state dir
        # (the daemon refuses that layout with socket_group set).
        os.chown(rt, -1, gid)
        os.chmod(rt, 0o750)
        os.chown(self.socket_path, -1, gid)
        os.chmod(self.socket_path, 0o660)
        self.allowed_gid = gid

    def admits(self, sock: socket.socket, uid: int, gid: int) -> bool:
        """The daemon's own uid and root, and members of `socket_group` (the peer's
        primary group, or a supplementary group of the connecting process)."""
        if uid in self.allowed_uids:
            return True
        if self.allowed_gid is None:
            return False
        if gid == self.allowed_gid:
            return True
        return self.allowed_gid in peer_groups(sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.wait(self._conns, timeout=2.0)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= self.max_connections:
            log.warning("refused a connection: %d already open", len(self._conns))
            err = TooManyConnections(
                f"stokerd already serves {len(self._conns)} connections, its limit: retry "
                "shortly, or look for a client that opens connections without closing them"
            )
            with contextlib.suppress(Exception):
                writer.write(encode({"id": None, "error": _err(err)}))
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        self._conns.add(task)
        try:
            await self._serve_conn(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            return e.partial or None if e.partial.strip() else None
        except asyncio.LimitOverrunError:
            raise RequestTooLarge(
                f"request is larger than {self.max_request} bytes: send less data per call"
            ) from None
        return line

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, gid = peer_credentials(sock)
        if not self.admits(sock, uid, gid):
            log.warning("refused connection from pid %d uid %d", pid, uid)
            who = f"uids {sorted(self.allowed_uids)}" + (
                f" and members of group {self.group}" if self.allowed_gid is not None else ""
            )
            writer.write(
                encode(
                    {
                        "id": None,
                        "error": {
                            "code": PermissionDenied.code,
                            "message": f"uid {uid} may not use this stokerd (it serves {who}): "
                            "run stoker as the daemon's user"
                            + (
                                f", or ask an admin to add you to group {self.group} "
                                f"(usermod -aG {self.group} USER; then log in again)"
                                if self.allowed_gid is not None
                                else ""
                            ),
                        },
                    }
                )
            )
            await writer.drain()
            return

        pending: asyncio.Future[bytes | None] | None = None
        while True:
            if pending is None:
                pending = asyncio.ensure_future(self._read_request(reader))
            # No request is in flight here: the idle clock runs only now, from the end
            # of the last request, never while a handler works (however long).
            if not pending.done():
                await asyncio.wait({pending}, timeout=self.idle_timeout)
                if not pending.done():
                    pending.cancel()
                    writer.write(
                        encode(
                            {
                                "id": None,
                                "error": _err(
                                    Timeout(
                                        f"no request for {self.idle_timeout:g}s: closing the "
                                        "idle connection (reconnect to send more)"
                                    )
                                ),
                            }
                        )
                    )
                    await writer.drain()
                    return
            try:
                line = await pending
            except RequestTooLarge as e:
                writer.write(encode({"id": None, "error": _err(e)}))
                await writer.drain()
                return  # the stream is out of sync: drop the connection
            pending = None
            if line is None:
                return
            rid, method, params, bad = _parse(line)
            if bad is not None:
                writer.write(encode({"id": rid, "error": _err(bad)}))
                await writer.drain()
                continue
            ctx = RequestContext(peer_uid=uid, peer_pid=pid, _writer=writer, _rid=rid)
            handler = asyncio.ensure_future(self._dispatch(method, params, ctx))
            # Watch for the next line (or EOF) while the handler runs: EOF means the
            # client went away, and its request is cancelled.
            pending = asyncio.ensure_future(self._read_request(reader))
            try:
                done, _ = await asyncio.wait(
                    {handler, pending}, return_when=asyncio.FIRST_COMPLETED
                )
                if handler not in done:
                    eof = False
                    if pending in done:
                        try:
                            eof = pending.result() is None
                        except RequestTooLarge:
                            eof = True
                    if eof:
                        log.info("client of %s disconnected: cancelling the request", method)
                        handler.cancel()
                        with contextlib.suppress(BaseException):
                            await handler
                        return
                    await asyncio.wait({handler})
            except asyncio.CancelledError:
                # The server is closing: the request goes down with its connection
                # instead of running on against a store that is about to close.
                for t in (handler, pending):
                    t.cancel()
                await asyncio.wait({handler, pending}, timeout=2.0)
                raise
            try:
                result = handler.result()
                msg: dict[str, Any] = {"id": rid, "result": result}
            except StokerError as e:
                msg = {"id": rid, "error": _err(e)}
            except asyncio.CancelledError:
                msg = {"id": rid, "error": _err(Cancelled(f"{method} was cancelled"))}
            except Exception as e:
                log.exception("%s failed", method)
                msg = {
                    "id": rid,
                    "error": {
                        "code": "internal",
                        "message": f"{method} failed unexpectedly: {type(e).__name__}: {e} "
                        "(see the daemon log)",
                    },
                }
            if writer.is_closing():
                return
            try:
                writer.write(encode(msg))
            except (TypeError, ValueError) as e:
                writer.write(
                    encode(
                        {
                            "id": rid,
                            "error": {"code": "internal", "message": f"unserialisable result: {e}"},
                        }
                    )
                )
            await writer.drain()
            if pending.done():
                try:
                    nxt = pending.result()
                except RequestTooLarge as e:
                    writer.write(encode({"id": None, "error": _err(e)}))
                    await writer.drain()
                    return
                if nxt is None:
                    return
                # Re-queue the already-read line.
                fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
                fut.set_result(nxt)
                pending = fut


def _err(e: StokerError) -> dict[str, Any]:
    return {"code": e.code, "message": e.message, "detail": e.detail}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _too_deep(obj: Any, limit: int) -> bool:
    """True when `obj` nests deeper than `limit` (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, dict):
            o = list(o.values())
        elif not isinstance(o, list):
            continue
        if depth >= limit:
            return True
        stack.extend((v, depth + 1) for v in o if isinstance(v, (dict, list)))
    return False


def _parse(line: bytes) -> tuple[Any, str, dict[str, Any], StokerError | None]:
    """One request line -> (id, method, params, error). Never raises: every bad frame
    becomes an error to answer with, so the peer always gets a line back."""
    try:
        msg = json.loads(line, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, "", {}, InvalidRequest(f"request is not valid JSON: {e}")
    except RecursionError:
        return None, "", {}, InvalidRequest(f"request nests deeper than {MAX_NESTING} levels")
    except ValueError as e:
        # NaN/Infinity, or an integer past Python's digit limit (4300).
        return None, "", {}, InvalidRequest(f"request is not valid JSON: {str(e)[:200]}")
    if not isinstance(msg, dict):
        return None, "", {}, InvalidRequest("request must be a JSON object")
    rid = msg.get("id")
    if not _usable_id(rid):
        return (
            None,
            "",
            {},
            InvalidRequest(
                f'request "id" must be an integer of at most 64 bits, a string of at most '
                f"{MAX_ID_LENGTH} characters or null"
            ),
        )
    if _too_deep(msg, MAX_NESTING):
        return rid, "", {}, InvalidRequest(f"request nests deeper than {MAX_NESTING} levels")
    method = msg.get("method")
    if not isinstance(method, str) or not method:
        return rid, "", {}, InvalidRequest('request has no "method" string')
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return rid, method, {}, InvalidRequest('"params" must be a JSON object')
    return rid, method, params, None


def _usable_id(rid: Any) -> bool:
    """An id we can echo back as JSON every peer parses: null, a short string, an int64."""
    if rid is None:
        return True
    if isinstance(rid, str):
        return len(rid) <= MAX_ID_LENGTH
    if isinstance(rid, int) and not isinstance(rid, bool):
        return -(2**63) <= rid < 2**63
    return False
