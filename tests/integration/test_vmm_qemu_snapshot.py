"""QEMU driver snapshots (issue 13 item 2, the driver part) against the real QEMU.

A guest that only halts (a hand-made boot-protocol header whose real-mode entry is
`hlt; jmp`), the driver's own argv and devices: `save_state` pauses it and writes its
device state and RAM, `restore` starts a second QEMU with `-incoming defer`, loads that
state and runs it. A state saved from a machine of another shape is refused by QEMU and
the half-started QEMU is gone. No network: no tap.
"""

from __future__ import annotations

import os
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
from stoker.errors import CommandFailed
from stoker.runner import Runner

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stks", dir="/tmp"))  # short: unix socket paths
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def halting_bzimage() -> bytes:
    """A Linux boot-protocol header QEMU loads, whose real-mode entry halts forever."""
    setup = bytearray(5 * 512)
    setup[0x1F1] = 4
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x200:0x202] = b"\xeb\x7e"  # jmp 0x280 (over the header)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    setup[0x211] = 0x01
    struct.pack_into("<I", setup, 0x22C, 0x37FFFFFF)
    struct.pack_into("<I", setup, 0x238, 2048)
    setup[0x280:0x283] = b"\xf4\xeb\xfd"  # hlt; jmp hlt
    return bytes(setup) + b"\xf4" * 4096


def machine(d: Path, memory_mib: int = 128) -> MachineConfig:
    d.mkdir(exist_ok=True)
    (d / "vmlinuz").write_bytes(halting_bzimage())
    disk = d / "work.ext4"
    with open(disk, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    return MachineConfig(
        vm_id="s" * 32,
        name="snap",
        vm_dir=d,
        kernel=d / "vmlinuz",
        initrd=None,
        cmdline="console=ttyS0",
        vcpu=1,
        memory_mib=memory_mib,
        disks=[Disk(path=disk, read_only=False, id="work")],
        tap=None,
        mac="06:53:ac:1e:00:09",
        serial_log=d / "serial.log",
        agent_socket=d / "agent.sock",
    )


async def status(sock: str | None) -> str:
    assert sock is not None
    async with QMPClient(sock) as c:
        return str((await c.execute("query-status"))["status"])


async def test_save_then_restore_with_the_real_qemu(tmp: Path) -> None:
    require(shutil.which(QEMU), f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    drv = QemuDriver(Runner(), accel="tcg", ready_timeout=30)
    src_cfg = machine(tmp / "a")
    src = await drv.start(src_cfg)
    state = tmp / "state.bin"
    try:
        assert await status(src.api_socket) == "running"
        size = await drv.save_state(src, state)
        assert size == state.stat().st_size > 0
        # Paused (QEMU calls it postmigrate) while the caller copies the disks.
        assert await status(src.api_socket) == "postmigrate"
        assert not list(tmp.glob(".state.bin.tmp-*"))
        await drv.resume(src)
        assert await status(src.api_socket) == "running"
    finally:
        await drv.kill(src)

    dst = await drv.restore(machine(tmp / "b"), state)
    try:
        assert await status(dst.api_socket) == "running"
    finally:
        await drv.kill(dst)
    assert not pid_alive(dst.pid)

    # Another machine shape (RAM size) cannot take this state: refused, nothing left.
    with pytest.raises(CommandFailed, match="could not load the VM state") as err:
        await drv.restore(machine(tmp / "c", memory_mib=256), state)
    assert "exited" in err.value.message
    assert drv.adopt(tmp / "c") is None
    assert not (tmp / "c" / "qmp.sock").exists()


async def test_failed_save_leaves_no_file_and_the_guest_running(tmp: Path) -> None:
    require(shutil.which(QEMU), f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    drv = QemuDriver(Runner(), accel="tcg", ready_timeout=30)
    h = await drv.start(machine(tmp / "a"))
    try:
        dest = tmp / "no-such-dir" / "state.bin"  # `cat >` fails: migration fails
        with pytest.raises(CommandFailed, match="could not save"):
            await drv.save_state(h, dest)
        assert not dest.exists() and not dest.parent.exists()
        assert await status(h.api_socket) == "running"
    finally:
        await drv.kill(h)


async def test_a_full_disk_during_save_leaves_no_state_and_the_guest_running(tmp: Path) -> None:
    """ENOSPC for real: the state goes to a tmpfs of the test's own, far too small."""
    require(shutil.which(QEMU), f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a small tmpfs of its own)")
    full = tmp / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "stoker-test", full], check=True)
    drv = QemuDriver(Runner(), accel="tcg", ready_timeout=30)
    try:
        h = await drv.start(machine(tmp / "a"))
        try:
            with pytest.raises(CommandFailed, match="could not save"):
                await drv.save_state(h, full / "state.bin")
            assert list(full.iterdir()) == []
            assert await status(h.api_socket) == "running"
        finally:
            await drv.kill(h)
    finally:
        subprocess.run(["umount", full], check=True)


async def test_a_fork_restore_keeps_the_saved_mac_until_the_guest_sets_one_and_the_link_down(
    tmp: Path,
) -> None:
    """With a NIC (a tap in a namespace of the test's own): `restore(link_down=True)` puts
    the link down before the guest runs and `set_link` brings it up; the NIC's MAC after
    the load is the saved device's, not the new `-device` line's (why a fork's guest sets
    its MAC itself, docs/ARCHITECTURE.md "Forks")."""
    require(shutil.which(QEMU), f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace and taps)")
    import secrets

    ns = f"stoker-q-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for tap in ("stkqa", "stkqb"):
            subprocess.run(["ip", "-n", ns, "tuntap", "add", tap, "mode", "tap"], check=True)
        drv = QemuDriver(Runner(), accel="tcg", ready_timeout=30)
        a = machine(tmp / "a")
        a.tap, a.netns, a.mac = "stkqa", ns, "06:53:ac:1e:00:0a"
        src = await drv.start(a)
        state = tmp / "state.bin"
        try:
            await drv.save_state(src, state)
        finally:
            await drv.kill(src)
        b = machine(tmp / "b")
        b.tap, b.netns, b.mac = "stkqb", ns, "06:53:ac:1e:00:0b"
        dst = await drv.restore(b, state, link_down=True)
        try:
            assert dst.api_socket is not None
            async with QMPClient(dst.api_socket) as c:
                assert (await c.execute("query-status"))["status"] == "running"
                nic = (await c.execute("query-rx-filter"))[0]
                assert nic["main-mac"] == "06:53:ac:1e:00:0a"
            await drv.set_link(dst, up=True)
            await drv.set_link(dst, up=False)
            with pytest.raises(CommandFailed, match="not found"):
                async with QMPClient(dst.api_socket) as c:
                    await c.execute("set_link", {"name": "nosuch", "up": True})
        finally:
            await drv.kill(dst)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
