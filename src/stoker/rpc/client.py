"""Synchronous RPC client for the CLI (stdlib only: it runs on every keystroke)."""

from __future__ import annotations

import json
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

from stoker.errors import PermissionDenied, StokerError, Unavailable, error_from_code
from stoker.rpc.protocol import MAX_RESPONSE_LINE, encode

TYPE_CHECKING = False  # no `typing` import at start-up
if TYPE_CHECKING:
    from typing import Any

ProgressFn = Callable[[dict[str, "Any"]], None]


class DaemonNotRunning(Unavailable):
    """Nothing answers on the socket."""


CONNECT_TIMEOUT = 5.0


class Client:
    """One connection to stokerd. Requests run one after another on it.

    Connecting retries with backoff, up to `connect_timeout` seconds, while the daemon's
    listen queue is full (EAGAIN) and, when `daemon_starting()` says a daemon holds its
    lock, while the socket is missing or refuses (it is still starting). If the server
    closed the connection for being idle, the next `call` reconnects first.
    """

    def __init__(
        self,
        socket_path: Path,
        timeout: float | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        daemon_starting: Callable[[], bool] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._daemon_starting = daemon_starting
        self._sock = self._connect()
        self._buf = b""
        self._next_id = 1

    def _connect(self) -> socket.socket:
        path = self.socket_path
        deadline = time.monotonic() + self.connect_timeout
        backoff = _Backoff(self.connect_timeout)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # A timeout makes connect() non-blocking inside: a full listen queue is
            # EAGAIN at once, which is retried below rather than blocking forever.
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect(str(path))
            except BlockingIOError:
                sock.close()
                why = "busy"
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if self._daemon_starting is None or not self._daemon_starting():
                    raise DaemonNotRunning(
                        f"stokerd is not running on {path}: {e.strerror}"
                    ) from None
                why = "starting"
            except PermissionError:
                sock.close()
                raise PermissionDenied(_denied(path)) from None
            except OSError:
                sock.close()
                raise
            else:
                # The caller's timeout (None: wait as long as a request runs) applies
                # from here on, never to connect().
                sock.settimeout(self.timeout)
                return sock
            if not backoff.wait():
                if why == "busy":
                    raise Unavailable(
                        f"stokerd on {path} did not accept a connection within "
                        f"{self.connect_timeout:g}s (its listen queue stayed full: it is "
                        "overloaded or stuck): retry, or see `stoker daemon status`"
                    )
                raise Unavailable(
                    f"stokerd is starting but did not answer on {path} within "
                    f"{self.connect_timeout:g}s: retry, or see its log (stoker daemon status)"
                )

    def _closed_by_server(self) -> bool:
        """True when the server has hung up on this connection (e.g. idle timeout)."""
        try:
            r, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        if not r:
            return False
        try:
            peek = self._sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        # Between requests nothing but the server's closing error line (id null) or EOF
        # can be waiting.
        return peek == b"" or peek.startswith(b'{"id":null')

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise Unavailable(
                    "stokerd closed the connection (see its log: stoker daemon status)"
                )
            self._buf += chunk
            if len(self._buf) > MAX_RESPONSE_LINE:
                raise StokerError("response from stokerd is too large")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def call(
        self, method: str, params: dict[str, Any] | None = None, progress: ProgressFn | None = None
    ) -> Any:
        """Send a request, stream progress to `progress`, return the result or raise."""
        rid = self._next_id
        self._next_id += 1
        if rid > 1 and not self._buf and self._closed_by_server():
            self._sock.close()
            self._sock = self._connect()
        line = encode({"id": rid, "method": method, "params": params or {}})
        self._send(line)
        resends = _Backoff(self.connect_timeout)
        while True:
            msg = json.loads(self._readline())
            if "progress" in msg:
                if progress is not None:
                    progress(msg["progress"])
                continue
            if "error" in msg:
                e = msg["error"]
                # At its connection cap the server refuses before reading anything, so
                # the request is resent on a new connection (with backoff, for a while).
                if e.get("code") == "too_many_connections" and resends.wait():
                    self._sock.close()
                    self._buf = b""
                    self._sock = self._connect()
                    self._send(line)
                    continue
                raise error_from_code(
                    e.get("code", "internal"), e.get("message", "?"), e.get("detail")
                )
            return msg.get("result")

    def _send(self, line: bytes) -> None:
        try:
            self._sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            # The server may refuse a peer before reading anything (another uid, the
            # connection cap) and hang up; its error line is still readable, and says why.
            pass


class _Backoff:
    """Sleeps of 10 ms doubling to 200 ms, until `budget` seconds have passed."""

    def __init__(self, budget: float) -> None:
        self.deadline = time.monotonic() + budget
        self.delay = 0.01

    def wait(self) -> bool:
        """Sleep the next delay and return True, or return False if past the budget."""
        if time.monotonic() + self.delay > self.deadline:
            return False
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 0.2)
        return True


def _denied(path: Path) -> str:
    """Why a connect() was refused, and what to do: the socket (or its directory) is
    group-owned when the daemon admits a group."""
    import grp
    import pwd

    try:
        me = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        me = str(os.getuid())
    for p in (path, path.parent):
        try:
            st = os.stat(p)
        except OSError:
            continue
        if st.st_mode & 0o070:
            try:
                g = grp.getgrgid(st.st_gid).gr_name
            except KeyError:
                g = str(st.st_gid)
            return (
                f"permission denied on {path}: user {me} is not in group {g}, whose members "
                f"may use this stokerd: ask an admin to run `usermod -aG {g} {me}`, then log "
                "in again (or run stoker as the daemon's user)"
            )
    return (
        f"permission denied on {path}: user {me} may not use this stokerd: run stoker as "
        "the daemon's user"
    )
