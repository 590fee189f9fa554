"""QEMU driver without QEMU: the command line it builds, and its QMP client against a
fake QMP server on a unix socket."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from stoker.daemon.vmm.base import Disk, MachineConfig
from stoker.daemon.vmm.qemu import (
    QemuDriver,
    QMPClient,
    guest_cmdline,
    host_tsc_khz,
    pvh_bootable,
    qemu_argv,
)
from stoker.errors import CommandFailed, Timeout, Unavailable
from stoker.runner import Runner

pytestmark = pytest.mark.unit


def machine(tmp_path: Path, **kw: Any) -> MachineConfig:
    base: dict[str, Any] = dict(
        vm_id="abc",
        name="t1",
        vm_dir=tmp_path,
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        cmdline="console=ttyS0 root=/dev/vda ro",
        vcpu=1,
        memory_mib=1024,
        disks=[
            Disk(tmp_path / "rootfs.ext4", True, "rootfs"),
            Disk(tmp_path / "overlay.ext4", False, "overlay"),
            Disk(tmp_path / "work.ext4", False, "work"),
        ],
        tap="tap0",
        mac="06:00:ac:1e:00:02",
        serial_log=tmp_path / "serial.log",
        agent_socket=tmp_path / "agent.sock",
    )
    base.update(kw)
    return MachineConfig(**base)


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_has_the_guest_boot_contract_devices(tmp_path: Path) -> None:
    cfg = machine(tmp_path)
    argv = qemu_argv(cfg, "qemu-system-x86_64", "tcg", tmp_path / "qmp.sock", tmp_path / "p")
    assert values(argv, "-M") == ["microvm"]
    assert values(argv, "-accel") == ["tcg"] and values(argv, "-cpu") == ["max"]
    assert values(argv, "-m") == ["1024"] and values(argv, "-smp") == ["1"]
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    assert values(argv, "-kernel") == [str(cfg.kernel)]
    assert values(argv, "-initrd") == [str(cfg.initrd)]
    assert values(argv, "-append") == [
        f"{cfg.cmdline} tsc=reliable module_blacklist=kvm,kvm_amd,kvm_intel"
    ]
    drives = values(argv, "-drive")
    # vda, vdb, vdc in config order, the base read-only.
    assert drives == [
        f"if=none,id=rootfs,file={tmp_path}/rootfs.ext4,format=raw,readonly=on",
        f"if=none,id=overlay,file={tmp_path}/overlay.ext4,format=raw,readonly=off",
        f"if=none,id=work,file={tmp_path}/work.ext4,format=raw,readonly=off",
    ]
    devices = values(argv, "-device")
    assert devices[:3] == [f"virtio-blk-device,drive={d}" for d in ("rootfs", "overlay", "work")]
    assert values(argv, "-netdev") == ["tap,id=net0,ifname=tap0,script=no,downscript=no"]
    assert "virtio-net-device,netdev=net0,mac=06:00:ac:1e:00:02" in devices
    assert "virtio-serial-device" in devices
    assert "virtserialport,chardev=agent,name=org.stoker.agent" in devices
    chardevs = values(argv, "-chardev")
    assert f"file,id=serial0,path={cfg.serial_log},append=on" in chardevs
    assert f"socket,id=agent,path={cfg.agent_socket},server=on,wait=off" in chardevs
    assert values(argv, "-serial") == ["chardev:serial0"]
    # Host entropy for the guest from the start (virtio-rng backed by /dev/urandom).
    assert values(argv, "-object") == ["rng-random,id=rng0,filename=/dev/urandom"]
    assert "virtio-rng-device,rng=rng0" in devices
    assert values(argv, "-qmp") == [f"unix:{tmp_path}/qmp.sock,server=on,wait=off"]
    assert values(argv, "-pidfile") == [str(tmp_path / "p")]


def test_argv_kvm_no_nic_no_agent_no_initrd_and_comma_escaping(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    cfg = machine(
        tmp_path,
        initrd=None,
        tap=None,
        agent_socket=None,
        vcpu=2,
        disks=[Disk(odd / "disk.ext4", False, "work")],
        serial_log=odd / "serial.log",
    )
    argv = qemu_argv(cfg, "/usr/bin/qemu-system-x86_64", "kvm", odd / "qmp.sock", odd / "pid")
    assert values(argv, "-accel") == ["kvm"] and values(argv, "-cpu") == ["host"]
    assert values(argv, "-smp") == ["2"]
    assert "-initrd" not in argv and "-netdev" not in argv
    assert not any("virtio-serial" in a or "virtio-net" in a for a in argv)
    assert values(argv, "-drive") == [
        f"if=none,id=work,file={tmp_path}/a,,b/disk.ext4,format=raw,readonly=off"
    ]
    assert f"file,id=serial0,path={tmp_path}/a,,b/serial.log,append=on" in values(argv, "-chardev")
    assert values(argv, "-qmp") == [f"unix:{tmp_path}/a,,b/qmp.sock,server=on,wait=off"]


def test_argv_incoming_waits_paused_for_a_saved_state(tmp_path: Path) -> None:
    cfg = machine(tmp_path)
    plain = qemu_argv(cfg, "qemu", "tcg", tmp_path / "q", tmp_path / "p")
    assert "-incoming" not in plain and "-S" not in plain
    argv = qemu_argv(cfg, "qemu", "tcg", tmp_path / "q", tmp_path / "p", incoming=True)
    i = argv.index("-incoming")
    assert argv[i - 1 : i + 2] == ["-S", "-incoming", "defer"]
    assert argv[: i - 1] + argv[i + 2 :] == plain


def test_tcg_guests_get_the_tsc_rate_preset(tmp_path: Path) -> None:
    cfg = machine(tmp_path)
    argv = qemu_argv(cfg, "qemu", "tcg", tmp_path / "q", tmp_path / "p", tsc_khz=2100000)
    tcg_extra = "tsc=reliable module_blacklist=kvm,kvm_amd,kvm_intel"
    assert values(argv, "-append") == [f"{cfg.cmdline} tsc_early_khz=2100000 {tcg_extra}"]
    # KVM guests calibrate fine (kvmclock); an explicit value in the cmdline wins.
    argv = qemu_argv(cfg, "qemu", "kvm", tmp_path / "q", tmp_path / "p", tsc_khz=2100000)
    assert values(argv, "-append") == [cfg.cmdline]
    assert guest_cmdline("a tsc_early_khz=5", "tcg", 7) == f"a tsc_early_khz=5 {tcg_extra}"
    assert guest_cmdline("a", "tcg", None) == f"a {tcg_extra}"
    assert guest_cmdline("a tsc=unstable module_blacklist=x", "tcg", None) == (
        "a tsc=unstable module_blacklist=x"
    )
    khz = host_tsc_khz()
    assert khz is None or 100_000 < khz < 10_000_000
    assert QemuDriver(Runner(), accel="tcg").tsc_khz == khz
    assert QemuDriver(Runner(), accel="tcg", tsc_khz=0).tsc_khz == 0
    assert QemuDriver(Runner(), accel="kvm").tsc_khz is None


class RecordThenFail(Runner):
    """Records the spawn argv, then fails like a missing binary would."""

    def __init__(self) -> None:
        super().__init__()
        self.argv: list[str] = []

    async def spawn(self, argv: Sequence[str], **kw: Any) -> int:
        self.argv = [str(a) for a in argv]
        raise Unavailable("qemu-system-x86_64 is not installed")


async def test_start_runs_inside_the_netns_and_fails_cleanly(tmp_path: Path) -> None:
    for name in ("vmlinuz", "initrd.img", "rootfs.ext4", "overlay.ext4", "work.ext4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "qmp.sock").write_text("stale")
    runner = RecordThenFail()
    with pytest.raises(Unavailable):
        await QemuDriver(runner).start(machine(tmp_path, netns="stoker-t1"))
    assert runner.argv[:5] == ["ip", "netns", "exec", "stoker-t1", "qemu-system-x86_64"]
    assert not (tmp_path / "qmp.sock").exists(), "a stale QMP socket must be removed first"


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def qmp_server(tmp_path: Path) -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.AbstractServer] = []

    async def serve(handler: Handler) -> str:
        path = str(tmp_path / f"qmp{len(servers)}.sock")
        servers.append(await asyncio.start_unix_server(handler, path))
        return path

    yield serve
    for s in servers:
        s.close()
        await s.wait_closed()


async def send(w: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    w.write(json.dumps(msg).encode() + b"\r\n")
    await w.drain()


async def fake_qemu(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Greets, negotiates, answers query-status (after an event), refuses the rest."""
    await send(w, {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}})
    while line := await r.readline():
        cmd = json.loads(line)["execute"]
        if cmd == "qmp_capabilities":
            await send(w, {"return": {}})
        elif cmd == "query-status":
            await send(w, {"event": "RTC_CHANGE", "data": {}})
            await send(w, {"return": {"status": "running", "running": True}})
        elif cmd == "hang":
            await asyncio.sleep(1)
        else:
            await send(w, {"error": {"class": "CommandNotFound", "desc": f"{cmd} not found"}})
    w.close()


async def test_qmp_handshake_events_and_errors(
    qmp_server: Callable[[Handler], Awaitable[str]],
) -> None:
    path = await qmp_server(fake_qemu)
    async with QMPClient(path, timeout=0.3) as c:
        assert c.greeting["QMP"]["version"]["qemu"]["major"] == 7
        assert await c.execute("query-status") == {"status": "running", "running": True}
        assert [e["event"] for e in c.events] == ["RTC_CHANGE"]
        with pytest.raises(CommandFailed, match="frobnicate not found"):
            await c.execute("frobnicate")
        with pytest.raises(Timeout, match="hang did not answer"):
            await c.execute("hang")


async def test_qmp_refuses_a_socket_that_is_not_qmp(
    qmp_server: Callable[[Handler], Awaitable[str]], tmp_path: Path
) -> None:
    async def not_qmp(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await send(w, {"hello": "world"})
        w.close()

    path = await qmp_server(not_qmp)
    with pytest.raises(Unavailable, match="not a QMP socket"):
        await QMPClient(path).connect()
    with pytest.raises(Unavailable, match="not answering"):
        await QMPClient(str(tmp_path / "missing.sock")).connect()


async def test_qmp_connection_dropped_mid_command(
    qmp_server: Callable[[Handler], Awaitable[str]],
) -> None:
    async def dies(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await send(w, {"QMP": {"version": {}, "capabilities": []}})
        await r.readline()
        await send(w, {"return": {}})
        await r.readline()
        w.close()

    path = await qmp_server(dies)
    async with QMPClient(path, timeout=2) as c:
        with pytest.raises(Unavailable, match="broke during system_powerdown"):
            await c.execute("system_powerdown")


def _elf_with_notes(notes: list[tuple[bytes, int]]) -> bytes:
    """A minimal ELF64 whose one PT_NOTE segment holds `notes` (name, type)."""
    body = b""
    for name, ntype in notes:
        n = name + b"\0"
        body += struct.pack("<III", len(n), 8, ntype) + n + b"\0" * (-len(n) % 4) + b"\0" * 8
    phoff = 64
    head = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    head += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, 56, 1, 0, 0, 0)
    off = phoff + 56
    ph = struct.pack("<IIQQQQQQ", 4, 4, off, 0, 0, len(body), len(body), 4)
    return head + ph + body


def test_pvh_bootable_needs_the_xen_phys32_entry_note(tmp_path: Path) -> None:
    k = tmp_path / "vmlinux"
    k.write_bytes(_elf_with_notes([(b"GNU", 3), (b"Xen", 6), (b"Xen", 18)]))
    assert pvh_bootable(k)
    k.write_bytes(_elf_with_notes([(b"GNU", 18), (b"Xen", 6)]))
    assert not pvh_bootable(k)
    k.write_bytes(b"MZ" + b"\0" * 600)  # a bzImage
    assert not pvh_bootable(k)
    assert not pvh_bootable(tmp_path / "missing")
