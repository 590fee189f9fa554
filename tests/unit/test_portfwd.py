"""Port-forward specs and the forwarder itself on loopback (the netns cases are in
tests/integration/test_port_forward_fake_vmm.py)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from stoker.daemon.portfwd import ForwardSpec, PortForwards, parse_spec
from stoker.errors import Conflict, InvalidArgument

pytestmark = pytest.mark.unit


def test_parse_spec() -> None:
    assert parse_spec("8080:80") == ForwardSpec("127.0.0.1", 8080, 80)
    assert parse_spec("0.0.0.0:8443:443") == ForwardSpec("0.0.0.0", 8443, 443)
    assert parse_spec("[::1]:8080:80") == ForwardSpec("::1", 8080, 80)
    assert parse_spec("localhost:0:22") == ForwardSpec("127.0.0.1", 0, 22)
    for bad, why in (
        ("80", "HOST_PORT:GUEST_PORT"),
        ("a:b:c:d", "HOST_PORT:GUEST_PORT"),
        ("8080:0", "guest port"),
        ("70000:80", "host port"),
        ("x:80", "host port"),
        ("example.com:80:80", "not an IP address"),
        ("[::1:80:80", "unclosed"),
    ):
        with pytest.raises(InvalidArgument, match=why):
            parse_spec(bad)


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hi\n")
        while data := await r.read(65536):
            w.write(data[::-1])
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def test_forward_copies_both_ways_and_closes() -> None:
    srv, gport = await _echo_server()
    fw = PortForwards()
    try:
        (f,) = await fw.add("id1", "web", "127.0.0.1", [f"0:{gport}"], os.getpid())
        assert f.namespace == "daemon" and f.guest_port == gport
        r, w = await asyncio.open_connection("127.0.0.1", f.host_port)
        assert await r.readline() == b"hi\n"
        w.write(b"abc")
        await w.drain()
        assert await r.readexactly(3) == b"cba"
        w.close()
        assert fw.for_vm("id1")[0].connections == 1
        await fw.remove("id1")
        assert fw.for_vm("id1") == []
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", f.host_port)
    finally:
        await fw.close()
        srv.close()


async def test_port_in_use_is_a_clear_conflict_and_binds_nothing() -> None:
    fw = PortForwards()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(Conflict, match=f"127.0.0.1:{port} is already in use .*another"):
            await fw.add("id1", "web", "127.0.0.1", ["0:80", f"{port}:80"], None)
        assert fw.for_vm("id1") == []  # the first spec's listener was closed again
    finally:
        taken.close()
        await fw.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["vm", "port-forward", "web", "80"],
        ["vm", "create", "-p", "8080:99999"],
        ["vm", "run", "-p", "nope", "--", "true"],
    ],
)
def test_cli_refuses_a_bad_spec_before_asking_any_daemon(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from stoker.cli import connect, vm
    from stoker.cli.main import main

    def no_daemon(*a: Any, **k: Any) -> Any:
        raise AssertionError("a daemon was asked (or started) for a malformed spec")

    monkeypatch.setattr(connect, "client", no_daemon)
    monkeypatch.setattr(vm, "client", no_daemon)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    rc = main(argv)
    assert rc != 0
    assert "HOST_PORT:GUEST_PORT" in capsys.readouterr().err
