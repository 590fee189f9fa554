"""Firecracker driver without the binary: the API client against a fake API server on a
unix socket, and the checks `start` makes before it spawns anything."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from stoker.daemon.vmm.base import Disk, MachineConfig
from stoker.daemon.vmm.firecracker import FirecrackerAPI, FirecrackerDriver
from stoker.errors import CommandFailed, InvalidArgument, Timeout, Unavailable
from stoker.runner import Runner

pytestmark = pytest.mark.unit


@pytest.fixture
async def fake_api(tmp_path: Path) -> AsyncIterator[tuple[str, list[tuple[str, str, Any]]]]:
    """A stand-in Firecracker API: records requests, refuses drives, stalls on /slow."""
    seen: list[tuple[str, str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        seen.append((request.method, request.path, body))
        if request.path == "/":
            return web.json_response({"id": "x", "state": "Not started"})
        if request.path.startswith("/drives/"):
            return web.json_response(
                {"fault_message": "Drive error: cannot open file: Permission denied"}, status=400
            )
        if request.path == "/slow":
            await asyncio.sleep(1)
        if request.path == "/garbled":
            return web.Response(status=500, text="kaputt")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    site = web.UnixSite(runner, sock)
    await site.start()
    try:
        yield sock, seen
    finally:
        await runner.cleanup()


async def test_api_sends_json_and_decodes_replies(
    fake_api: tuple[str, list[tuple[str, str, Any]]],
) -> None:
    sock, seen = fake_api
    async with FirecrackerAPI(sock) as api:
        assert (await api.request("GET", "/"))["state"] == "Not started"
        assert await api.request("PUT", "/machine-config", {"vcpu_count": 1}) is None
    assert seen == [("GET", "/", None), ("PUT", "/machine-config", {"vcpu_count": 1})]


async def test_refusal_carries_fault_message_and_hint(
    fake_api: tuple[str, list[tuple[str, str, Any]]],
) -> None:
    sock, _ = fake_api
    async with FirecrackerAPI(sock, log_hint="/vm/firecracker.log") as api:
        with pytest.raises(CommandFailed) as ei:
            await api.request("PUT", "/drives/rootfs", {"drive_id": "rootfs"}, "check the disk")
        with pytest.raises(CommandFailed, match=r"HTTP 500.*kaputt"):
            await api.request("GET", "/garbled")
    msg = str(ei.value)
    assert "PUT /drives/rootfs" in msg and "HTTP 400" in msg
    assert "Drive error: cannot open file: Permission denied" in msg
    assert msg.endswith("check the disk")


async def test_stalled_and_missing_api(
    fake_api: tuple[str, list[tuple[str, str, Any]]], tmp_path: Path
) -> None:
    sock, _ = fake_api
    async with FirecrackerAPI(sock, timeout=0.2) as api:
        with pytest.raises(Timeout, match="did not answer"):
            await api.request("GET", "/slow")
    async with FirecrackerAPI(str(tmp_path / "nothing.sock"), log_hint="LOG") as api:
        with pytest.raises(Unavailable, match=r"not answering.*LOG"):
            await api.request("GET", "/")


class NoSpawnRunner(Runner):
    """Fails the test if the driver gets as far as spawning."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[list[str]] = []

    async def spawn(self, argv: Sequence[str], **kw: Any) -> int:
        self.spawned.append([str(a) for a in argv])
        raise AssertionError("start() spawned a VMM for a config it should have refused")


def machine(tmp_path: Path, **kw: Any) -> MachineConfig:
    kernel = tmp_path / "vmlinux"
    if not kernel.exists():
        kernel.write_bytes(b"\x7fELF" + b"\0" * 60)
    disk = tmp_path / "rootfs.ext4"
    disk.write_bytes(b"")
    base: dict[str, Any] = dict(
        vm_id="abc123",
        name="t1",
        vm_dir=tmp_path,
        kernel=kernel,
        initrd=None,
        cmdline="console=ttyS0",
        vcpu=1,
        memory_mib=256,
        disks=[Disk(disk, True, "rootfs")],
        tap=None,
        mac="06:00:ac:1e:00:02",
        serial_log=tmp_path / "serial.log",
    )
    base.update(kw)
    return MachineConfig(**base)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vcpu": 3}, "1 or an even number"),
        ({"vcpu": 34}, "1 or an even number"),
        ({"vcpu": 0}, "at least 1"),
        ({"memory_mib": 0}, "at least 64 MiB"),
        ({"vm_id": "bad id!"}, "cannot be a Firecracker id"),
        ({"disks": [Disk(Path("/nonexistent/disk.ext4"), False, "work")]}, "does not exist"),
        ({"initrd": Path("/nonexistent/initrd")}, "initrd"),
    ],
)
async def test_start_refuses_bad_configs_before_spawning(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    runner = NoSpawnRunner()
    with pytest.raises(InvalidArgument, match=message):
        await FirecrackerDriver(runner).start(machine(tmp_path, **change))
    assert runner.spawned == []


async def test_start_refuses_a_bzimage(tmp_path: Path) -> None:
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(b"MZ" + b"\0" * 600)
    runner = NoSpawnRunner()
    with pytest.raises(InvalidArgument, match="not an ELF vmlinux"):
        await FirecrackerDriver(runner).start(machine(tmp_path, kernel=bz))
    assert runner.spawned == []


async def test_start_refuses_a_too_long_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    cfg = machine(tmp_path, vm_dir=deep)
    with pytest.raises(InvalidArgument, match="longer than 107 bytes"):
        await FirecrackerDriver(NoSpawnRunner()).start(cfg)
