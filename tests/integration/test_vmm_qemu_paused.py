"""The QEMU driver against the real qemu-system-x86_64, paused before the guest runs.

QEMU starts from the driver's own argv with `-S` appended (a wrapper named like the real
binary execs it, so the driver's identity checks see QEMU), inside a network namespace the
test makes, with a tap there. With `-S` no guest code executes, so placeholder kernel and
initrd files and blank disks do; QEMU still parses and validates every option, opens every
disk and chardev and creates every device, and the driver's QMP client then reads back
what QEMU made of the command line. The booting counterpart is tests/e2e.
"""

from __future__ import annotations

import os
import secrets
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from prereq import require
from stoker.daemon.vmm.base import Disk, MachineConfig, pid_alive
from stoker.daemon.vmm.qemu import QemuDriver, QMPClient
from stoker.runner import Runner

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"
TAP = "stkq0"
MAC = "06:53:ac:1e:00:07"


@pytest.fixture
def ns_with_tap() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace and a tap)")
    ns = f"stoker-q-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", TAP, "up"], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stkq", dir="/tmp"))  # short: unix socket paths
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def paused_qemu(bin_dir: Path) -> Path:
    """`qemu-system-x86_64` that runs the real one with the driver's argv plus -S."""
    real = shutil.which(QEMU)
    require(real, f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    bin_dir.mkdir()
    w = bin_dir / QEMU
    w.write_text(f'#!/bin/sh\nexec {real} "$@" -S\n')
    w.chmod(0o755)
    return w


def placeholder_bzimage() -> bytes:
    """Just enough of a Linux boot-protocol header for QEMU to load it (and an initrd)."""
    setup = bytearray(5 * 512)
    setup[0x1F1] = 4  # setup sectors after the boot sector
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)  # boot protocol 2.15
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<I", setup, 0x238, 2048)  # cmdline_size
    return bytes(setup) + b"\xf4" * 4096  # the "kernel": hlt


async def test_driver_argv_and_qmp_against_a_paused_real_qemu(
    ns_with_tap: str, vm_dir: Path
) -> None:
    wrapper = paused_qemu(vm_dir / "bin")
    (vm_dir / "vmlinuz").write_bytes(placeholder_bzimage())  # never executed: -S
    (vm_dir / "initrd.img").write_bytes(b"\0" * 4096)
    disks = []
    for i, (ident, ro) in enumerate((("rootfs", True), ("overlay", False), ("work", False))):
        p = vm_dir / f"{ident},d{i}.ext4"  # a comma: the driver must escape it for QEMU
        with open(p, "wb") as f:
            f.truncate((8 + i) * 1024 * 1024)
        disks.append(Disk(path=p, read_only=ro, id=ident))
    cfg = MachineConfig(
        vm_id="q" * 32,
        name="paused",
        vm_dir=vm_dir,
        kernel=vm_dir / "vmlinuz",
        initrd=vm_dir / "initrd.img",
        cmdline="console=ttyS0 root=/dev/vda ro",
        vcpu=2,
        memory_mib=192,
        disks=disks,
        tap=TAP,
        mac=MAC,
        serial_log=vm_dir / "serial.log",
        agent_socket=vm_dir / "agent.sock",
        netns=ns_with_tap,
    )
    drv = QemuDriver(Runner(), qemu_bin=str(wrapper), accel="tcg", ready_timeout=30)
    h = await drv.start(cfg)
    try:
        assert drv.is_running(h)
        adopted = drv.adopt(vm_dir)
        assert adopted is not None and adopted.pid == h.pid
        desc = await drv.describe(h)
        assert desc["running"] is False and desc["state"] == "prelaunch"
        assert h.api_socket is not None
        async with QMPClient(h.api_socket) as c:
            assert (await c.execute("query-name"))["name"] == "stoker-paused"
            assert len(await c.execute("query-cpus-fast")) == cfg.vcpu
            mem = await c.execute("query-memory-size-summary")
            assert mem["base-memory"] == cfg.memory_mib * 1024 * 1024
            blocks = {b["device"]: b for b in await c.execute("query-block")}
            assert set(blocks) == {"rootfs", "overlay", "work"}
            for d in disks:
                ins = blocks[d.id]["inserted"]
                assert ins["file"] == str(d.path), ins
                assert ins["ro"] is d.read_only, (d.id, ins["ro"])
                assert ins["drv"] == "raw"
            chardevs = {c["label"]: c["filename"] for c in await c.execute("query-chardev")}
            assert chardevs["serial0"] == "file" and cfg.serial_log.exists()
            assert str(cfg.agent_socket) in chardevs["agent"] and "server" in chardevs["agent"]
            nics = await c.execute("query-rx-filter")
            assert [n["main-mac"] for n in nics] == [MAC]
            net = await c.execute("human-monitor-command", {"command-line": "info network"})
            assert f"ifname={TAP}" in net, net
            ports = await c.execute("qom-list", {"path": "/machine/peripheral-anon"})
            assert ports, "no devices were created"
        assert cfg.agent_socket.exists() and (vm_dir / "qmp.sock").exists()
        # The QEMU runs in the test's namespace (where the tap is), not on the host.
        pids = subprocess.run(
            ["ip", "netns", "pids", ns_with_tap], capture_output=True, text=True
        ).stdout.split()
        assert str(h.pid) in pids
    finally:
        await drv.shutdown(h, timeout=1.0)  # powerdown does nothing while paused: then a kill
    assert not pid_alive(h.pid)
    assert not (vm_dir / "qmp.sock").exists() and not cfg.agent_socket.exists()
    assert not (vm_dir / "qemu.pid").exists()
