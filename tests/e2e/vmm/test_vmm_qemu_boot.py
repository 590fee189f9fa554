"""The QEMU driver booting a real guest: the Debian cloud kernel under TCG with a tiny
busybox initramfs that reports the devices it got, echoes over the agent port and powers
off on the ACPI power button. Each guest runs inside a network namespace made here."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _vmm_e2e import (
    GuestKernel,
    NetNS,
    netns_with_tap,
    ns_pids,
    short_tmpdir,
    sparse_ext4,
    vmm_pids_for,
)

from stoker.daemon.vmm.base import Disk, MachineConfig, VMMHandle, pid_alive
from stoker.daemon.vmm.qemu import QemuDriver
from stoker.runner import Runner

pytestmark = pytest.mark.e2e

READY = "STOKER-TEST ready"
BOOT_TIMEOUT = 120.0


def machine(
    vm_dir: Path, kernel: GuestKernel, ns: NetNS, initrd: Path | None, cmdline: str
) -> MachineConfig:
    vm_dir.mkdir(exist_ok=True)
    return MachineConfig(
        vm_id="stk0qm01",
        name="qm1",
        vm_dir=vm_dir,
        kernel=kernel.vmlinuz,
        initrd=initrd,
        cmdline=cmdline,
        vcpu=1,
        memory_mib=256,
        disks=[
            Disk(sparse_ext4(vm_dir / "rootfs.ext4"), True, "rootfs"),
            Disk(sparse_ext4(vm_dir / "overlay.ext4"), False, "overlay"),
            Disk(sparse_ext4(vm_dir / "work.ext4"), False, "work"),
        ],
        tap=ns.tap,
        mac="06:00:ac:1e:00:09",
        serial_log=vm_dir / "serial.log",
        agent_socket=vm_dir / "agent.sock",
        netns=ns.name,
    )


def serial(cfg: MachineConfig) -> str:
    try:
        return cfg.serial_log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_serial(drv: QemuDriver, h: VMMHandle, cfg: MachineConfig, text: str) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while text not in serial(cfg):
        if not drv.is_running(h):
            raise AssertionError(f"QEMU exited before {text!r}:\n{serial(cfg)[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} after {BOOT_TIMEOUT:.0f}s:\n{serial(cfg)[-3000:]}")
        time.sleep(0.1)


@dataclass
class Booted:
    drv: QemuDriver
    cfg: MachineConfig
    handle: VMMHandle
    ns: NetNS


@pytest.fixture(scope="module")
def booted(guest_kernel: GuestKernel, test_initrd: Path) -> Iterator[Booted]:
    """One guest shared by the tests of this module (boots cost seconds under TCG)."""
    with netns_with_tap() as ns, short_tmpdir() as d:
        drv = QemuDriver(Runner(), accel="tcg")
        cfg = machine(d / "vm", guest_kernel, ns, test_initrd, "console=ttyS0 panic=-1")
        h = asyncio.run(drv.start(cfg))
        try:
            wait_serial(drv, h, cfg, READY)
            yield Booted(drv, cfg, h, ns)
        finally:
            asyncio.run(drv.kill(h))


def test_qemu_runs_detached_inside_the_namespace(booted: Booted) -> None:
    h = booted.handle
    assert booted.drv.is_running(h)
    assert os.getsid(h.pid) == h.pid != os.getsid(0), "QEMU must lead its own session"
    assert os.readlink(f"/proc/{h.pid}/fd/0") == "/dev/null"
    ns_ino = os.stat(f"/run/netns/{booted.ns.name}").st_ino
    assert os.stat(f"/proc/{h.pid}/ns/net").st_ino == ns_ino
    assert h.extra["accel"] == "tcg" and h.extra["netns"] == booted.ns.name


async def test_qmp_reports_running(booted: Booted) -> None:
    d = await booted.drv.describe(booted.handle)
    assert d["running"] is True and d["state"] == "running"


def test_guest_sees_the_contract_devices(booted: Booted) -> None:
    log = serial(booted.cfg)
    assert "Linux version" in log, "kernel output must reach the serial log"
    assert "STOKER-TEST disks: vda=ro1 vdb=ro0 vdc=ro0" in log, "disk order / read-only flags"
    assert f"STOKER-TEST mac: {booted.cfg.mac}" in log


async def test_agent_channel_reaches_the_guest(booted: Booted) -> None:
    assert booted.cfg.agent_socket is not None
    reader, writer = await asyncio.open_unix_connection(str(booted.cfg.agent_socket))
    try:
        writer.write(b"ping\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
    assert line == b"echo: ping\n"


def test_adopt_after_a_daemon_restart(booted: Booted) -> None:
    fresh = QemuDriver(Runner())  # a new daemon has no memory of the spawn
    h = fresh.adopt(booted.cfg.vm_dir)
    assert h is not None and h.pid == booted.handle.pid and h.api_socket == booted.handle.api_socket
    assert fresh.is_running(h)


async def test_graceful_shutdown_then_nothing_is_left(booted: Booted) -> None:
    """Last test of the module: powers the shared guest off."""
    drv, cfg, h = booted.drv, booted.cfg, booted.handle
    t0 = time.monotonic()
    await drv.shutdown(h, timeout=30)
    elapsed = time.monotonic() - t0
    assert "STOKER-TEST power button" in serial(cfg), "the guest never saw the power button"
    assert elapsed < 30, "QEMU had to be killed: the guest did not power off"
    assert not pid_alive(h.pid) and not drv.is_running(h)
    for leftover in ("qmp.sock", "agent.sock", "vmm.pid", "vmm.json"):
        assert not (cfg.vm_dir / leftover).exists(), f"{leftover} left behind"
    assert vmm_pids_for(cfg.vm_dir) == [] and ns_pids(booted.ns.name) == []
    assert drv.adopt(cfg.vm_dir) is None
    # A stale pidfile now naming an unrelated live process is not taken for QEMU.
    other = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        (cfg.vm_dir / "vmm.pid").write_text(f"{other.pid}\n")
        assert drv.adopt(cfg.vm_dir) is None
        assert not drv.is_running(VMMHandle("qemu", other.pid, h.api_socket, h.vm_dir, h.extra))
    finally:
        other.kill()
        await other.wait()


SPAWN_AND_EXIT = """
import asyncio, json, os, sys
from pathlib import Path
from stoker.daemon.vmm.base import Disk, MachineConfig
from stoker.daemon.vmm.qemu import QemuDriver
from stoker.runner import Runner
a = json.loads(sys.argv[1])
cfg = MachineConfig(
    vm_id="stk0qm02", name="qm2", vm_dir=Path(a["vm_dir"]), kernel=Path(a["kernel"]),
    initrd=Path(a["initrd"]), cmdline="console=ttyS0 panic=-1", vcpu=1, memory_mib=256,
    disks=[Disk(Path(a["disk"]), False, "work")], tap=a["tap"], mac="06:00:ac:1e:00:0a",
    serial_log=Path(a["vm_dir"]) / "serial.log", netns=a["netns"])
h = asyncio.run(QemuDriver(Runner()).start(cfg))
print(json.dumps(h.to_dict()), flush=True)
os._exit(0)  # like a daemon that dies: no cleanup, no goodbye
"""


async def test_qemu_outlives_the_process_that_started_it(
    guest_kernel: GuestKernel, test_initrd: Path, netns_tap: NetNS, short_dir: Path
) -> None:
    vm_dir = short_dir / "vm"
    vm_dir.mkdir()
    args = {
        "vm_dir": str(vm_dir),
        "kernel": str(guest_kernel.vmlinuz),
        "initrd": str(test_initrd),
        "disk": str(sparse_ext4(vm_dir / "work.ext4")),
        "tap": netns_tap.tap,
        "netns": netns_tap.name,
    }
    r = subprocess.run(
        [sys.executable, "-c", SPAWN_AND_EXIT, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    started = VMMHandle.from_dict(json.loads(r.stdout))
    drv = QemuDriver(Runner())
    h = drv.adopt(vm_dir)
    try:
        assert h is not None, "the VMM died with the process that started it"
        assert h.pid == started.pid and drv.is_running(h)
        assert (await drv.describe(h))["running"] is True
    finally:
        await drv.kill(h or started)
    assert not drv.is_running(started) and not pid_alive(started.pid)
    assert vmm_pids_for(vm_dir) == [] and ns_pids(netns_tap.name) == []
    assert not (vm_dir / "qmp.sock").exists()


async def test_guest_panic_ends_qemu(
    guest_kernel: GuestKernel, netns_tap: NetNS, short_dir: Path
) -> None:
    """No initrd, no root: the kernel panics, panic=-1 reboots, -no-reboot ends QEMU. "The
    VMM exited" must mean "the guest is down" for VMService's liveness checks."""
    drv = QemuDriver(Runner())
    cfg = machine(short_dir / "vm", guest_kernel, netns_tap, None, "console=ttyS0 panic=-1")
    h = await drv.start(cfg)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while drv.is_running(h):
        assert time.monotonic() < deadline, f"QEMU still running:\n{serial(cfg)[-2000:]}"
        await asyncio.sleep(0.2)
    assert "Kernel panic" in serial(cfg)
    await drv.kill(h)  # nothing to kill: removes what the dead VMM left
    assert not (cfg.vm_dir / "qmp.sock").exists() and not (cfg.vm_dir / "vmm.pid").exists()
    assert ns_pids(netns_tap.name) == []
