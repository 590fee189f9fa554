"""A peer with another uid (SO_PEERCRED) is refused; the daemon keeps serving root."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from stoker.rpc.client import Client

pytestmark = pytest.mark.integration

NOBODY = 65534


def _child_connect(path: str, wfd: int) -> None:
    """Runs in the forked child: drop to nobody, connect, report what happened, _exit."""
    code = 0
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        report: dict[str, Any] = {"uid": os.getuid(), "gid": os.getgid()}
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
        except OSError as e:
            report["connect_error"] = e.errno
        else:
            try:
                s.sendall(b'{"id": 1, "method": "vm.list"}\n')
            except BrokenPipeError:
                pass  # refused before the server read anything: the error line is there
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            report["line"] = buf.decode(errors="replace")
            # after the error line the server hangs up
            try:
                report["eof_after"] = s.recv(1) == b""
            except OSError:
                report["eof_after"] = True
        os.write(wfd, json.dumps(report).encode())
    except BaseException as e:
        os.write(wfd, json.dumps({"child_error": repr(e)}).encode())
        code = 1
    finally:
        os._exit(code)


async def as_nobody(path: Path) -> dict[str, Any]:
    """Fork a child that becomes uid/gid 65534 and connects to `path`."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        _child_connect(str(path), w)
    os.close(w)

    def collect() -> bytes:
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        return data

    raw = await asyncio.wait_for(asyncio.to_thread(collect), 20)
    out: dict[str, Any] = json.loads(raw)
    assert "child_error" not in out, out
    return out


async def test_other_uid_is_refused_and_root_still_served(
    daemon_factory: Any, serve: Any, short_tmp: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch a child to another uid")
    d = daemon_factory()
    server = await serve(d)
    path = server.socket_path
    # let nobody reach the socket through the private dirs (search permission only)
    p = path.parent
    while True:
        os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) | 0o111)
        if p == short_tmp:
            break
        p = p.parent

    # First defence: the socket file is 0600, so nobody cannot even connect.
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    out = await as_nobody(path)
    assert out["uid"] == NOBODY
    assert out.get("connect_error") == 13  # EACCES

    # Second defence: with the file opened up, the peer-uid check still refuses.
    os.chmod(path, 0o666)
    out = await as_nobody(path)
    assert out["uid"] == NOBODY and "connect_error" not in out
    msg = json.loads(out["line"])
    assert msg["error"]["code"] == "permission_denied"
    assert f"uid {NOBODY}" in msg["error"]["message"]
    assert out["eof_after"] is True

    # The daemon keeps serving root, on new connections.
    def as_root() -> Any:
        with Client(path, timeout=5) as c:
            return c.call("vm.list"), c.call("daemon.status")["pid"]

    vms, pid = await asyncio.to_thread(as_root)
    assert vms == [] and pid == os.getpid()
    for _ in range(100):
        if not server._conns:
            break
        await asyncio.sleep(0.01)
    assert not server._conns
