"""The Firecracker driver against the real Firecracker v1.12.1 binary (and its jailer).

Everything up to `InstanceStart` is real: the process, its API socket, every configuration
PUT, the state read back. The guest boot itself needs working KVM, which these machines
lack (nested PVM), so the boot test only runs with STOKER_KVM_BOOTS=1.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from _vmm_e2e import GuestKernel, NetNS, ns_pids, sparse_ext4, vmm_pids_for

from stoker.daemon.vmm.base import Disk, MachineConfig, pid_alive
from stoker.daemon.vmm.firecracker import FirecrackerDriver, JailerOptions
from stoker.errors import CommandFailed
from stoker.runner import Runner

pytestmark = pytest.mark.e2e


def machine(
    vm_dir: Path, kernel: Path, ns: NetNS, *, initrd: Path | None = None, tap: str | None = None
) -> MachineConfig:
    vm_dir.mkdir(exist_ok=True)
    if initrd is None:
        initrd = vm_dir / "initrd.img"
        initrd.write_bytes(os.urandom(4096))
    return MachineConfig(
        vm_id="stk0fc01",
        name="fc1",
        vm_dir=vm_dir,
        kernel=kernel,
        initrd=initrd,
        cmdline="console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1",
        vcpu=2,
        memory_mib=256,
        disks=[
            Disk(sparse_ext4(vm_dir / "rootfs.ext4"), True, "rootfs"),
            Disk(sparse_ext4(vm_dir / "overlay.ext4"), False, "overlay"),
            Disk(sparse_ext4(vm_dir / "work.ext4"), False, "work"),
        ],
        tap=tap or ns.tap,
        mac="06:00:ac:1e:00:07",
        serial_log=vm_dir / "serial.log",
        vsock_cid=3,
        agent_socket=vm_dir / "agent.sock",
        netns=ns.name,
    )


def same_netns(pid: int, ns: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino


async def test_full_configuration_is_accepted_and_read_back(
    firecracker_dir: Path, guest_kernel: GuestKernel, netns_tap: NetNS, short_dir: Path
) -> None:
    drv = FirecrackerDriver(Runner(), str(firecracker_dir / "firecracker"))
    cfg = machine(short_dir / "vm", guest_kernel.vmlinux, netns_tap)
    h = await drv.start(cfg)
    try:
        assert drv.is_running(h)
        assert os.getsid(h.pid) == h.pid != os.getsid(0), "the VMM must have its own session"
        assert same_netns(h.pid, netns_tap.name) and h.extra["netns"] == netns_tap.name

        d = await drv.describe(h)
        assert d["state"] == "Running" and d["running"], "InstanceStart was not accepted"
        got = d["config"]
        assert got["boot-source"] == {
            "kernel_image_path": str(cfg.kernel),
            "initrd_path": str(cfg.initrd),
            "boot_args": cfg.cmdline,
        }
        assert [
            (x["drive_id"], x["path_on_host"], x["is_read_only"], x["is_root_device"])
            for x in got["drives"]
        ] == [(k.id, str(k.path), k.read_only, False) for k in cfg.disks]
        assert [
            (n["iface_id"], n["host_dev_name"], n["guest_mac"]) for n in got["network-interfaces"]
        ] == [("eth0", netns_tap.tap, cfg.mac)]
        mc = got["machine-config"]
        assert (mc["vcpu_count"], mc["mem_size_mib"]) == (cfg.vcpu, cfg.memory_mib)
        assert got["vsock"]["guest_cid"] == 3
        assert got["vsock"]["uds_path"] == str(cfg.agent_socket)
        assert "InstanceStart" in (cfg.vm_dir / "firecracker.log").read_text()

        again = drv.adopt(cfg.vm_dir)
        assert again is not None and again.pid == h.pid and again.api_socket == h.api_socket
    finally:
        t0 = time.monotonic()
        await drv.shutdown(h, timeout=1.0)
    # No guest here can act on Ctrl-Alt-Del, so shutdown fell back to kill within bounds.
    assert time.monotonic() - t0 < 8
    assert not pid_alive(h.pid) and not drv.is_running(h)
    for leftover in ("fc.sock", "agent.sock", "vmm.pid", "vmm.json"):
        assert not (cfg.vm_dir / leftover).exists(), f"{leftover} left behind"
    assert (cfg.vm_dir / "firecracker.log").exists(), "the VMM log is kept after stop"
    assert ns_pids(netns_tap.name) == [] and vmm_pids_for(cfg.vm_dir) == []
    assert drv.adopt(cfg.vm_dir) is None


async def test_refusal_names_the_fault_and_leaves_nothing(
    firecracker_dir: Path, netns_tap: NetNS, short_dir: Path
) -> None:
    # A truncated vmlinux: every PUT is accepted, InstanceStart fails to load it.
    broken = short_dir / "vmlinux"
    broken.write_bytes(b"\x7fELF" + os.urandom(4092))
    drv = FirecrackerDriver(Runner(), str(firecracker_dir / "firecracker"))
    cfg = machine(short_dir / "vm", broken, netns_tap)
    with pytest.raises(CommandFailed) as ei:
        await drv.start(cfg)
    msg = str(ei.value)
    assert "firecracker refused PUT /actions (HTTP 400)" in msg
    fault = msg.split("(HTTP 400): ", 1)[1]
    assert "kernel" in fault.lower(), f"Firecracker's fault_message is missing: {msg}"
    assert msg.endswith("/dev/kvm is usable (details in the VMM log)")
    assert vmm_pids_for(cfg.vm_dir) == [] and ns_pids(netns_tap.name) == []
    for leftover in ("fc.sock", "agent.sock", "vmm.pid", "vmm.json"):
        assert not (cfg.vm_dir / leftover).exists(), f"{leftover} left behind"


async def test_jailed_firecracker(
    firecracker_dir: Path, guest_kernel: GuestKernel, netns_tap: NetNS, short_dir: Path
) -> None:
    # The jail hard-links the kernel: it must be on the jail's filesystem.
    kernel = short_dir / "vmlinux"
    try:
        os.link(guest_kernel.vmlinux, kernel)
    except OSError:
        kernel.write_bytes(guest_kernel.vmlinux.read_bytes())
    # A cgroup where the hierarchy is there (cgroup v1 cpu here); none where it is not.
    cgroups = ("cpu.shares=512",) if Path("/sys/fs/cgroup/cpu/cpu.shares").exists() else ()
    drv = FirecrackerDriver(
        Runner(),
        str(firecracker_dir / "firecracker"),
        jailer=JailerOptions(jailer_bin=str(firecracker_dir / "jailer"), cgroups=cgroups),
    )
    cfg = machine(short_dir / "vm", kernel, netns_tap)
    h = await drv.start(cfg)
    chroot = Path(h.extra["chroot"])
    cg_dirs = [Path(d) for d in h.extra.get("cgroup_dirs", [])]
    try:
        if cgroups:
            assert cg_dirs == [Path(f"/sys/fs/cgroup/cpu/firecracker/{cfg.vm_id}")]
            assert (cg_dirs[0] / "cpu.shares").read_text().strip() == "512"
            assert str(h.pid) in (cg_dirs[0] / "tasks").read_text().split()
        else:
            assert cg_dirs == []
        assert h.extra["jailed"] and chroot.is_relative_to(cfg.vm_dir)
        assert drv.is_running(h) and same_netns(h.pid, netns_tap.name)
        assert os.getsid(h.pid) == h.pid != os.getsid(0)
        d = await drv.describe(h)
        assert d["state"] == "Running"
        got = d["config"]
        assert got["boot-source"]["kernel_image_path"] == "/vmlinux"
        assert [(x["path_on_host"], x["is_read_only"]) for x in got["drives"]] == [
            ("/rootfs.img", True),
            ("/overlay.img", False),
            ("/work.img", False),
        ]
        # The jail's entries are the VM's files, not copies.
        assert (chroot / "root" / "work.img").stat().st_ino == (
            cfg.vm_dir / "work.ext4"
        ).stat().st_ino
        assert cfg.agent_socket is not None and cfg.agent_socket.is_symlink()
        assert drv.adopt(cfg.vm_dir) is not None
    finally:
        await drv.kill(h)
    assert not pid_alive(h.pid)
    assert not chroot.exists() and not (cfg.vm_dir / "jail").exists()
    assert not any(d.exists() for d in cg_dirs), "the VM's cgroup was left behind"
    assert cfg.agent_socket is not None and not cfg.agent_socket.is_symlink()
    assert (cfg.vm_dir / "work.ext4").exists(), "removing the jail must keep the VM's disks"
    assert (cfg.vm_dir / "firecracker.log").read_text(), "the jailed VMM's log is kept"
    assert ns_pids(netns_tap.name) == []


@pytest.mark.skipif(
    os.environ.get("STOKER_KVM_BOOTS") != "1",
    reason="no KVM boots on this machine (set STOKER_KVM_BOOTS=1 where KVM guests boot)",
)
async def test_guest_boots_under_firecracker(
    firecracker_dir: Path,
    guest_kernel: GuestKernel,
    test_initrd: Path,
    netns_tap: NetNS,
    short_dir: Path,
) -> None:
    drv = FirecrackerDriver(Runner(), str(firecracker_dir / "firecracker"))
    cfg = machine(short_dir / "vm", guest_kernel.vmlinux, netns_tap, initrd=test_initrd)
    cfg.vcpu = 1
    h = await drv.start(cfg)
    try:
        deadline = time.monotonic() + 60
        while "STOKER-TEST ready" not in cfg.serial_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, cfg.serial_log.read_text(errors="replace")
            assert drv.is_running(h), "firecracker exited during boot"
            await asyncio.sleep(0.2)
        log = cfg.serial_log.read_text(errors="replace")
        assert "STOKER-TEST disks: vda=ro1 vdb=ro0 vdc=ro0" in log
        assert f"STOKER-TEST mac: {cfg.mac}" in log
    finally:
        await drv.shutdown(h, timeout=5)
    assert not pid_alive(h.pid)


@pytest.mark.skipif(
    os.environ.get("STOKER_KVM_BOOTS") != "1",
    reason="restore of a booted guest needs KVM guests that boot; this machine has none "
    "(set STOKER_KVM_BOOTS=1 where they do). The snapshot API calls themselves run for real "
    "in tests/integration/test_vmm_fc_snapshot.py",
)
async def test_snapshot_restore_of_a_booted_guest(
    firecracker_dir: Path,
    guest_kernel: GuestKernel,
    test_initrd: Path,
    netns_tap: NetNS,
    short_dir: Path,
) -> None:
    """A booted guest is saved, its VMM killed, and a fresh Firecracker resumes it: the
    guest does not boot again (no second "ready" line) and keeps running."""
    drv = FirecrackerDriver(Runner(), str(firecracker_dir / "firecracker"))
    cfg = machine(short_dir / "vm", guest_kernel.vmlinux, netns_tap, initrd=test_initrd)
    cfg.vcpu = 1
    snap = short_dir / "vm" / "snap"
    snap.mkdir()
    h = await drv.start(cfg)
    try:
        deadline = time.monotonic() + 60
        while "STOKER-TEST ready" not in cfg.serial_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, cfg.serial_log.read_text(errors="replace")
            await asyncio.sleep(0.2)
        await drv.save_state(h, snap / "state.bin")
        await drv.resume(h)
    finally:
        await drv.kill(h)
    before = cfg.serial_log.read_text(errors="replace").count("STOKER-TEST ready")
    r = await drv.restore(cfg, snap / "state.bin")
    try:
        await asyncio.sleep(2)
        assert drv.is_running(r) and (await drv.describe(r))["state"] == "Running"
        log = cfg.serial_log.read_text(errors="replace")
        assert log.count("STOKER-TEST ready") == before, "the restored guest booted again"
    finally:
        await drv.shutdown(r, timeout=5)
    assert not pid_alive(r.pid)
