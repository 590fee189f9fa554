"""Helper wire format: one JSON request line, one JSON answer line, per connection.

The answer may carry file descriptors (SCM_RIGHTS) with its first byte: an open tap, a
bound DNS socket. Requests are small (64 KiB at most); an answer is at most 1 MiB.
"""

from __future__ import annotations

import array
import json
import socket
from typing import Any

MAX_REQUEST = 64 * 1024
MAX_ANSWER = 1024 * 1024
MAX_FDS = 4


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def read_line(sock: socket.socket, limit: int) -> tuple[bytes, list[int]]:
    """Read up to the first newline (blocking socket); also collect passed descriptors.
    Returns (line without newline, fds); b"" when the peer closed before a full line."""
    buf = bytearray()
    fds: list[int] = []
    while b"\n" not in buf:
        if len(buf) > limit:
            for fd in fds:
                socket.close(fd)
            raise ValueError(f"message larger than {limit} bytes")
        fdbuf = array.array("i")
        data, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_LEN(MAX_FDS * fdbuf.itemsize))
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fdbuf.frombytes(payload[: len(payload) - (len(payload) % fdbuf.itemsize)])
                fds.extend(fdbuf)
        if not data:
            for fd in fds:
                socket.close(fd)
            return b"", []
        buf += data
    line, _, _rest = bytes(buf).partition(b"\n")
    return line, fds


def send(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = encode(obj)
    if fds:
        socket.send_fds(sock, [data[:1]], fds)
        sock.sendall(data[1:])
    else:
        sock.sendall(data)
