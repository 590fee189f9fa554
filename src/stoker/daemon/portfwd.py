"""TCP port forwards from the host to a running VM: `vm port-forward NAME [ADDR:]PORT:GUEST`.

The daemon holds each forward: an asyncio listener on HOST_ADDR:HOST_PORT (127.0.0.1 by
default) that, per accepted connection, connects to GUEST_IP:GUEST_PORT over the bridge
and copies bytes both ways (half-closes are passed on). Forwards live in the daemon's
memory only: they end when the VM stops or is deleted (a cleanup hook), and when the
daemon exits (VMs keep running; forward again after a daemon restart).

Network namespaces: the guest is reachable only from the daemon's namespace (its bridge),
but the user's browser may live in another one (the daemon in a container or a netns of
its own, the CLI on the host). A listener's namespace is the one its socket was created
in, so the daemon creates it in the *requesting client's* namespace: it learns the
client's pid from SO_PEERCRED, opens /proc/PID/ns/net and creates and binds the socket
from a short-lived thread that `setns()`ed into it (needs CAP_SYS_ADMIN, i.e. a root
daemon), then serves it from its own event loop. The connections to the guest are made
from the daemon's namespace. When client and daemon share a namespace nothing special
happens. `127.0.0.1:PORT` is therefore the *client's* loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stoker.errors import Conflict, InvalidArgument, NotFound, StokerError
from stoker.model.wire import PortForwardInfo

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT = 10.0
COPY_CHUNK = 64 << 10


@dataclass(frozen=True)
class ForwardSpec:
    """A parsed `[HOST_ADDR:]HOST_PORT:GUEST_PORT`."""

    host_addr: str
    host_port: int
    guest_port: int


def _port(s: str, what: str, spec: str, lo: int) -> int:
    if not s.isdigit() or not lo <= int(s) <= 65535:
        raise InvalidArgument(
            f"port forward {spec!r}: {what} {s!r} is not a port number ({lo}-65535); use "
            "[HOST_ADDR:]HOST_PORT:GUEST_PORT, e.g. 8080:80 or 127.0.0.1:8080:80"
        )
    return int(s)


def parse_spec(spec: str) -> ForwardSpec:
    """`8080:80`, `0.0.0.0:8080:80`, `[::1]:8080:80`; HOST_PORT 0 picks a free port."""
    s = spec.strip()
    addr = "127.0.0.1"
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1 : end + 2] != ":":
            raise InvalidArgument(f"port forward {spec!r}: unclosed [IPv6] host address")
        addr, s = s[1:end], s[end + 2 :]
    parts = s.split(":")
    if len(parts) == 3 and addr == "127.0.0.1" and not spec.strip().startswith("["):
        addr, parts = parts[0], parts[1:]
    if len(parts) != 2:
        raise InvalidArgument(
            f"port forward {spec!r}: expected [HOST_ADDR:]HOST_PORT:GUEST_PORT, e.g. 8080:80"
        )
    if addr == "localhost":
        addr = "127.0.0.1"
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise InvalidArgument(
            f"port forward {spec!r}: host address {addr!r} is not an IP address (default 127.0.0.1)"
        ) from None
    return ForwardSpec(
        addr, _port(parts[0], "host port", spec, 0), _port(parts[1], "guest port", spec, 1)
    )


def _same_netns(pid: int) -> bool:
    try:
        a, b = os.stat(f"/proc/{pid}/ns/net"), os.stat("/proc/self/ns/net")
    except OSError:
        return True  # cannot tell (no /proc, pid gone): use the daemon's own namespace
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _bind(spec: ForwardSpec) -> socket.socket:
    family = socket.AF_INET6 if ":" in spec.host_addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.host_addr, spec.host_port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _SetnsFailed(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


def _in_netns(ns_path: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread that has entered the network namespace at `ns_path`.

    Sockets `fn` creates belong to that namespace for their whole life; the thread goes
    back to its own namespace (and ends) afterwards.
    """
    result: dict[str, Any] = {}

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(ns_path, os.O_RDONLY)
        except OSError as e:
            result["error"] = e
            return
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                result["error"] = _SetnsFailed(ctypes.get_errno())
                return
            try:
                result["value"] = fn()
            except BaseException as e:
                result["error"] = e
            finally:
                libc.setns(own, CLONE_NEWNET)  # this thread ends now either way
        finally:
            os.close(target)
            os.close(own)

    t = threading.Thread(target=work, name="portfwd-netns", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]  # type: ignore[no-any-return]


def _bind_in_netns(spec: ForwardSpec, pid: int) -> socket.socket:
    """Create and bind the listener inside pid's network namespace."""
    try:
        return _in_netns(f"/proc/{pid}/ns/net", lambda: _bind(spec))
    except _SetnsFailed as e:
        raise StokerError(
            "the daemon runs in another network namespace than this client and may not enter "
            f"it ({e}; setns needs CAP_SYS_ADMIN): run stokerd as root, or run the CLI in the "
            "daemon's namespace"
        ) from None


@dataclass
class Forward:
    """One held forward."""

    vm_id: str
    vm_name: str
    guest_ip: str
    spec: ForwardSpec
    host_port: int
    server: asyncio.base_events.Server
    client_netns: bool  # the listener lives in the client's (not the daemon's) namespace
    conns: set[asyncio.Task[None]] = field(default_factory=set)
    connections: int = 0

    def info(self) -> PortForwardInfo:
        addr = self.spec.host_addr
        shown = f"[{addr}]" if ":" in addr else addr
        return PortForwardInfo(
            vm=self.vm_name,
            proto="tcp",
            host_addr=addr,
            host_port=self.host_port,
            guest_port=self.spec.guest_port,
            guest=f"{self.guest_ip}:{self.spec.guest_port}",
            listen=f"{shown}:{self.host_port}",
            namespace="client" if self.client_netns else "daemon",
            connections=self.connections,
        )


class PortForwards:
    """Every forward the daemon holds, by VM id."""

    def __init__(
        self, logger: logging.Logger | None = None, guest_netns: str | None = None
    ) -> None:
        self.log = logger or logging.getLogger("stoker.portfwd")
        # The named namespace the bridge lives in when it is not the daemon's own.
        self.guest_netns = guest_netns
        self._by_vm: dict[str, list[Forward]] = {}

    def for_vm(self, vm_id: str) -> list[PortForwardInfo]:
        return [f.info() for f in self._by_vm.get(vm_id, [])]

    async def add(
        self,
        vm_id: str,
        vm_name: str,
        guest_ip: str,
        specs: list[str],
        peer_pid: int | None,
    ) -> list[PortForwardInfo]:
        """Bind every spec (all or none), then serve them; the caller checked the VM runs."""
        parsed = [parse_spec(s) for s in specs]
        if not parsed:
            raise InvalidArgument("give at least one [HOST_ADDR:]HOST_PORT:GUEST_PORT")
        in_client = peer_pid is not None and peer_pid > 0 and not _same_netns(peer_pid)
        bound: list[tuple[ForwardSpec, socket.socket]] = []
        try:
            for sp in parsed:
                try:
                    sock = (
                        await asyncio.to_thread(_bind_in_netns, sp, peer_pid)  # type: ignore[arg-type]
                        if in_client
                        else _bind(sp)
                    )
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        held = [
                            f"{f.vm_name}:{f.spec.guest_port}"
                            for fs in self._by_vm.values()
                            for f in fs
                            if f.host_port == sp.host_port and f.client_netns == in_client
                        ]
                        by = f"stoker's forward to {held[0]}" if held else "another program"
                        raise Conflict(
                            f"host port {sp.host_addr}:{sp.host_port} is already in use (by "
                            f"{by}): pick another HOST_PORT (or 0 for any free one)"
                        ) from None
                    if e.errno == errno.EADDRNOTAVAIL:
                        raise InvalidArgument(
                            f"host address {sp.host_addr} is not an address of this host: use "
                            "127.0.0.1 (the default) or one of the host's addresses"
                        ) from None
                    if e.errno == errno.EACCES:
                        raise StokerError(
                            f"binding {sp.host_addr}:{sp.host_port} is not allowed (ports "
                            "below 1024 need root): pick a HOST_PORT of 1024 or more"
                        ) from None
                    raise StokerError(
                        f"cannot listen on {sp.host_addr}:{sp.host_port}: {e.strerror or e}"
                    ) from None
                bound.append((sp, sock))
        except BaseException:
            for _, s in bound:
                s.close()
            raise
        out = []
        for sp, sock in bound:
            fwd = await self._serve(vm_id, vm_name, guest_ip, sp, sock, in_client)
            self._by_vm.setdefault(vm_id, []).append(fwd)
            self.log.info("forward %s -> %s:%d", fwd.info().listen, vm_name, sp.guest_port)
            out.append(fwd.info())
        return out

    async def _serve(
        self,
        vm_id: str,
        vm_name: str,
        guest_ip: str,
        sp: ForwardSpec,
        sock: socket.socket,
        in_client: bool,
    ) -> Forward:
        holder: dict[str, Forward] = {}

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            fwd = holder["f"]
            fwd.connections += 1
            task = asyncio.current_task()
            assert task is not None
            fwd.conns.add(task)
            try:
                await _splice(reader, writer, guest_ip, sp.guest_port, self.guest_netns)
            finally:
                fwd.conns.discard(task)

        server = await asyncio.start_server(on_conn, sock=sock)
        fwd = Forward(
            vm_id=vm_id,
            vm_name=vm_name,
            guest_ip=guest_ip,
            spec=sp,
            host_port=int(sock.getsockname()[1]),
            server=server,
            client_netns=in_client,
        )
        holder["f"] = fwd
        return fwd

    async def remove(self, vm_id: str, host_port: int | None = None) -> list[PortForwardInfo]:
        """Close one forward (by host port) or all of a VM's; returns what was removed."""
        fwds = self._by_vm.get(vm_id, [])
        gone = [f for f in fwds if host_port is None or f.host_port == host_port]
        if host_port is not None and not gone:
            raise NotFound(f"no port forward from host port {host_port}: see `stoker vm ports`")
        keep = [f for f in fwds if f not in gone]
        if keep:
            self._by_vm[vm_id] = keep
        else:
            self._by_vm.pop(vm_id, None)
        for f in gone:
            f.server.close()
            for t in list(f.conns):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(f.server.wait_closed(), 2.0)
        return [f.info() for f in gone]

    async def close(self) -> None:
        for vm_id in list(self._by_vm):
            await self.remove(vm_id)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(COPY_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _connect(ip: str, port: int, netns: str | None) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        return s

    sock = (
        make() if netns is None else await asyncio.to_thread(_in_netns, f"/run/netns/{netns}", make)
    )
    try:
        await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    ip: str,
    port: int,
    netns: str | None = None,
) -> None:
    try:
        try:
            sock = await asyncio.wait_for(_connect(ip, port, netns), CONNECT_TIMEOUT)
            g_reader, g_writer = await asyncio.open_connection(sock=sock)
        except (OSError, TimeoutError, _SetnsFailed):
            return  # the guest does not listen (yet): close the client's connection
        try:
            await asyncio.gather(_pipe(reader, g_writer), _pipe(g_reader, writer))
        finally:
            g_writer.close()
    finally:
        writer.close()
