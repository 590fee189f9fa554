"""The daemon's side of the helper: one request per connection, blocking (call it from a
thread, or through `call`), retried once when the helper goes away mid-request.

Every helper operation is idempotent (creating a tap that is already the caller's is
success, deleting a missing one is `deleted: false`, rules are replaced whole), so a retry
after the helper died between doing the work and answering is safe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from stoker.errors import StokerError, Unavailable, error_from_code
from stoker.helper import protocol

log = logging.getLogger("stoker.helper.client")

RETRY_DELAY = 1.0


class HelperGone(Unavailable):
    """The helper was not there, or went away before it answered (after one retry)."""

    code = "helper_unavailable"


class HelperClient:
    """Talks to stoker-helper at `socket_path`."""

    def __init__(
        self, socket_path: Path, *, timeout: float = 60.0, retry_delay: float = RETRY_DELAY
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.retries = 0  # how many requests needed their one retry (status, tests)

    def _once(self, method: str, params: dict[str, Any]) -> tuple[Any, list[int]]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(str(self.socket_path))
            protocol.send(s, {"method": method, "params": params})
            line, fds = protocol.read_line(s, protocol.MAX_ANSWER)
        finally:
            s.close()
        if not line:
            raise ConnectionResetError("the helper closed the connection without answering")
        try:
            ans = json.loads(line)
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise Unavailable(f"stoker-helper sent a malformed answer to {method}") from None
        if isinstance(ans, dict) and isinstance(ans.get("error"), dict):
            for fd in fds:
                os.close(fd)
            err = ans["error"]
            raise error_from_code(
                str(err.get("code")), f"stoker-helper refused {method}: {err.get('message')}"
            )
        if not isinstance(ans, dict) or "result" not in ans:
            for fd in fds:
                os.close(fd)
            raise Unavailable(f"stoker-helper sent a malformed answer to {method}")
        return ans["result"], fds

    def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[Any, list[int]]:
        """(result, passed fds). Raises the helper's error, or `HelperGone` when it was not
        reachable or died before answering, twice."""
        p = params or {}
        first: OSError | None = None
        for attempt in (1, 2):
            try:
                return self._once(method, p)
            except OSError as e:
                if attempt == 2:
                    raise HelperGone(
                        f"stoker-helper at {self.socket_path} {_what(first)}, and again on "
                        f"the retry ({_what(e)}) during {method}: is it running? "
                        "(`systemctl status stoker-helper`, or `stoker system install`)"
                    ) from None
                first = e
                self.retries += 1
                log.warning("stoker-helper %s during %s: retrying once", _what(e), method)
                time.sleep(self.retry_delay)
        raise AssertionError("unreachable")

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """The result of one request (fds, if any were passed, are closed)."""
        result, fds = await asyncio.to_thread(self.request, method, params)
        for fd in fds:
            os.close(fd)
        return result

    async def call_fds(self, method: str, params: dict[str, Any] | None = None) -> list[int]:
        _result, fds = await asyncio.to_thread(self.request, method, params)
        return fds


def _what(e: OSError | None) -> str:
    if e is None:
        return "failed"
    if isinstance(e, FileNotFoundError):
        return "is not there (no socket)"
    if isinstance(e, ConnectionRefusedError):
        return "is not listening"
    if isinstance(e, ConnectionResetError | BrokenPipeError):
        return "went away before answering"
    if isinstance(e, TimeoutError | socket.timeout):
        return "did not answer in time"
    return f"failed ({e})"


__all__ = ["HelperClient", "HelperGone", "StokerError"]
