"""Sockets bound inside a named network namespace (tests run the bridge in one).

`setns(2)` switches only the calling thread, and a socket stays in the namespace it was
created in: a fresh, short-lived thread enters the namespace, makes and binds the sockets,
and returns them; the event loop then serves them like any other. The thread is never
reused, so a failed switch back cannot leak the namespace into other work.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import socket
import threading
from concurrent.futures import Future

CLONE_NEWNET = 0x40000000
_NETNS = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.bind((host, port))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(64)
        except BaseException:
            tcp.close()
            raise
    except BaseException:
        udp.close()
        raise
    udp.setblocking(False)
    tcp.setblocking(False)
    return udp, tcp


def _in_netns(netns: str, host: str, port: int) -> tuple[socket.socket, socket.socket]:
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            return _bind_pair(host, port)
        finally:
            _setns(orig)
    finally:
        os.close(orig)


async def bind_udp_tcp(
    host: str, port: int, netns: str | None = None
) -> tuple[socket.socket, socket.socket]:
    """A bound UDP socket and a listening TCP socket on the same host:port (port 0: the
    kernel picks the UDP port, TCP takes the same), inside `netns` when given."""
    if netns is None:
        return _bind_pair(host, port)
    if not _NETNS.match(netns):
        raise ValueError(f"{netns!r} is not a network namespace name")
    fut: Future[tuple[socket.socket, socket.socket]] = Future()

    def work() -> None:
        try:
            fut.set_result(_in_netns(netns, host, port))
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=work, name=f"netns-bind-{netns}", daemon=True).start()
    return await asyncio.wrap_future(fut)
