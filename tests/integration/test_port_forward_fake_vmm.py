"""`vm port-forward` against the stand-in VMM rig: a real bridge in a test namespace, a
"guest" namespace plugged into that bridge by a veth (holding the VM's guest IP), and a
TCP server there standing in for the guest's service.

Bytes go both ways through the daemon's forward: from a client in the daemon's own
namespace, and from a client in a third namespace (the user's), where the listener must
live (and not in the daemon's namespace). Then the bad inputs: a host port already bound,
a stopped VM, a malformed spec; and stop/delete remove the forwards.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import test_vm_lifecycle_fake_vmm as lifecycle
from test_vm_lifecycle_fake_vmm import Rig, req

from stoker.errors import Conflict, InvalidArgument
from stoker.rpc.server import RequestContext

pytestmark = pytest.mark.integration

netns = lifecycle.netns  # the rig's fixtures
rig = lifecycle.rig

GUEST_PORT = 8080
# The stand-in guest service: greets first (guest -> host before the host says anything),
# then answers every line with "echo:" + the line upper-cased (host -> guest -> host).
SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((sys.argv[1], int(sys.argv[2])))
    srv.listen(8)
    print("ready", flush=True)
    def serve(c):
        c.sendall(b"hello from the guest\\n")
        f = c.makefile("rb")
        for line in f:
            c.sendall(b"echo:" + line.upper())
        c.close()
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    """
)
CLIENT = textwrap.dedent(
    """
    import socket, sys
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    f = c.makefile("rb")
    greeting = f.readline()
    c.sendall(b"ping " + b"x" * 100000 + b"\\n")
    reply = f.readline()
    sys.stdout.write(greeting.decode() + reply.decode()[:20] + " %d\\n" % len(reply))
    """
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def other_ns() -> Iterator[str]:
    """One more namespace, created and removed by the test (the guest's, the user's)."""
    ns = f"stoker-f-{secrets.token_hex(3)}"
    _ip("netns", "add", ns)
    _ip("-n", ns, "link", "set", "lo", "up")
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def user_ns() -> Iterator[str]:
    ns = f"stoker-u-{secrets.token_hex(3)}"
    _ip("netns", "add", ns)
    _ip("-n", ns, "link", "set", "lo", "up")
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _plug_guest(rig: Rig, guest_ns: str, guest_ip: str, prefix: int) -> subprocess.Popen[str]:
    """veth from the rig's bridge to `guest_ns`, guest IP on it, the service listening."""
    assert rig.d.config is not None
    veth = f"vf{secrets.token_hex(3)}"
    _ip("-n", rig.ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0")
    _ip("-n", rig.ns, "link", "set", "eth0", "netns", guest_ns)
    _ip("-n", rig.ns, "link", "set", veth, "master", rig.d.config.bridge_name, "up")
    _ip("-n", guest_ns, "addr", "add", f"{guest_ip}/{prefix}", "dev", "eth0")
    _ip("-n", guest_ns, "link", "set", "eth0", "up")
    srv = subprocess.Popen(
        ["ip", "netns", "exec", guest_ns, sys.executable, "-c", SERVER, guest_ip, str(GUEST_PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
    return srv


def _ctx(pid: int) -> RequestContext:
    return RequestContext(peer_uid=0, peer_pid=pid)


def _client_in(ns: str | None, port: int) -> str:
    argv = [sys.executable, "-c", CLIENT, str(port)]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


def _listening_here(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_bytes_both_ways_and_lifecycle(rig: Rig, other_ns: str, user_ns: str) -> None:
    d, vm = rig.d, rig.d.vm
    assert vm is not None and d.config is not None
    rec = await vm.create_vm(req(name="web"), lambda *a, **k: None)
    srv = _plug_guest(rig, other_ns, rec.guest_ip, d.config.bridge_network.prefixlen)
    holder: subprocess.Popen[str] | None = None
    try:
        # 1. A client in the daemon's own namespace.
        fwd = await d.dispatch(
            "vm.port_forward", {"ref": "web", "specs": ["127.0.0.1:0:8080"]}, _ctx(0)
        )
        port = fwd[0]["host_port"]
        assert fwd[0]["namespace"] == "daemon" and fwd[0]["listen"] == f"127.0.0.1:{port}"
        out = await asyncio.to_thread(_client_in, None, port)
        assert out.splitlines() == ["hello from the guest", f"echo:PING {'X' * 10} 100011"]

        # 2. A client in another namespace: the listener is created in *its* namespace.
        holder = subprocess.Popen(["ip", "netns", "exec", user_ns, "sleep", "60"])  # noqa: ASYNC220
        await asyncio.sleep(0.3)  # the `sleep` has entered the namespace
        fwd2 = await d.dispatch(
            "vm.port_forward", {"ref": "web", "specs": ["0:8080"]}, _ctx(holder.pid)
        )
        uport = fwd2[0]["host_port"]
        assert fwd2[0]["namespace"] == "client"
        out = await asyncio.to_thread(_client_in, user_ns, uport)
        assert out.startswith("hello from the guest\necho:PING")
        if uport != port:
            assert not _listening_here(uport), "the forward must not listen in the daemon's ns"

        # Listed in `vm show` and by the list call.
        shown = await d.dispatch("vm.show", {"ref": "web"}, _ctx(0))
        assert {f["host_port"] for f in shown["port_forwards"]} == {port, uport}
        assert all(f["connections"] >= 1 for f in shown["port_forwards"])

        # Bad input: the port is taken (by our own first forward's listener here).
        with pytest.raises(Conflict, match=f"127.0.0.1:{port} is already in use"):
            await d.dispatch("vm.port_forward", {"ref": "web", "specs": [f"{port}:22"]}, _ctx(0))
        with pytest.raises(InvalidArgument, match="HOST_PORT:GUEST_PORT"):
            await d.dispatch("vm.port_forward", {"ref": "web", "specs": ["80"]}, _ctx(0))
        with pytest.raises(InvalidArgument, match="guest port"):
            await d.dispatch("vm.port_forward", {"ref": "web", "specs": ["8081:0"]}, _ctx(0))
        # All or none: one bad spec binds nothing.
        with pytest.raises(Conflict):
            await d.dispatch(
                "vm.port_forward", {"ref": "web", "specs": ["0:80", f"{port}:80"]}, _ctx(0)
            )
        assert len(await d.dispatch("vm.port_forward.list", {"refs": ["web"]}, _ctx(0))) == 2

        # Remove one by host port.
        await d.dispatch("vm.port_forward.remove", {"ref": "web", "host_port": port}, _ctx(0))
        assert not _listening_here(port)

        # Stop removes the rest; a stopped VM refuses new forwards.
        await vm.stop_vm("web")
        assert await d.dispatch("vm.port_forward.list", {"refs": ["web"]}, _ctx(0)) == []
        r = subprocess.run(
            ["ip", "netns", "exec", user_ns, sys.executable, "-c", CLIENT, str(uport)],
            capture_output=True,
            timeout=30,
        )
        assert r.returncode != 0, "the forward outlived the VM"
        with pytest.raises(Conflict, match="web is stopped: ports forward only to a running VM"):
            await d.dispatch("vm.port_forward", {"ref": "web", "specs": ["0:8080"]}, _ctx(0))
    finally:
        srv.kill()
        srv.wait()
        if holder is not None:
            holder.kill()
            holder.wait()


async def test_delete_removes_forwards(rig: Rig) -> None:
    d, vm = rig.d, rig.d.vm
    assert vm is not None and d.forwards is not None
    await vm.create_vm(req(name="gone"), lambda *a, **k: None)
    fwd: list[dict[str, Any]] = await d.dispatch(
        "vm.port_forward", {"ref": "gone", "specs": ["0:80"]}, _ctx(0)
    )
    port = fwd[0]["host_port"]
    assert _listening_here(port)
    rec = vm.resolve("gone")
    await vm.delete_vm("gone")
    assert not _listening_here(port)
    assert d.forwards.for_vm(rec.id) == []
