"""Synchronous RPC client for the CLI (stdlib only: it runs on every keystroke)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stoker.errors import StokerError, Unavailable, error_from_code
from stoker.rpc.protocol import MAX_RESPONSE_LINE, encode

ProgressFn = Callable[[dict[str, Any]], None]


class DaemonNotRunning(Unavailable):
    """Nothing answers on the socket."""


class Client:
    """One connection to stokerd. Requests run one after another on it."""

    def __init__(self, socket_path: Path, timeout: float | None = None) -> None:
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout if timeout is not None else 5.0)
        try:
            self._sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self._sock.close()
            raise DaemonNotRunning(
                f"stokerd is not running on {socket_path}: {e.strerror}"
            ) from None
        except PermissionError:
            self._sock.close()
            raise StokerError(
                f"permission denied on {socket_path}: run stoker as the daemon's user"
            ) from None
        self._sock.settimeout(timeout)
        self._buf = b""
        self._next_id = 1

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
        try:
            self._sock.sendall(encode({"id": rid, "method": method, "params": params or {}}))
        except (BrokenPipeError, ConnectionResetError):
            # The server may refuse a peer before reading anything (another uid) and hang
            # up; its error line is still readable, and says why.
            pass
        while True:
            msg = json.loads(self._readline())
            if "progress" in msg:
                if progress is not None:
                    progress(msg["progress"])
                continue
            if "error" in msg:
                e = msg["error"]
                raise error_from_code(
                    e.get("code", "internal"), e.get("message", "?"), e.get("detail")
                )
            return msg.get("result")
