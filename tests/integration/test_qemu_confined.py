"""A confined QEMU for real: started paused (-S, no guest boot), as an unprivileged user the
test creates (and removes), under seccomp, in its own cgroup, with every file and the tap
handed over as descriptors. The tap lives in a network namespace the test creates."""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import signal
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from stoker.daemon.hostnet import Links
from stoker.daemon.vmm.base import Disk, MachineConfig, pid_alive
from stoker.daemon.vmm.confine import MiB, plan
from stoker.daemon.vmm.exits import exit_status, seccomp_record
from stoker.daemon.vmm.qemu import QemuDriver, QMPClient
from stoker.runner import Runner

pytestmark = pytest.mark.integration

QEMU = shutil.which("qemu-system-x86_64")


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return path
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


def fake_bzimage(path: Path) -> None:
    """Just enough of a bzImage header for QEMU to load it; a paused guest never runs it."""
    b = bytearray(64 * 1024)
    b[0x1F1] = 4  # setup sectors
    b[0x1FE:0x200] = b"\x55\xaa"
    b[0x202:0x206] = b"HdrS"
    b[0x206:0x208] = struct.pack("<H", 0x020F)
    b[0x211] = 0x01  # loaded high
    b[0x22C:0x230] = struct.pack("<I", 0x37FFFFFF)  # highest initrd address
    path.write_bytes(bytes(b))


@pytest.fixture
def vmm_user() -> Iterator[str]:
    """A user name of the test's own (stoker creates the user at the first start, as it
    creates stoker-vmm); removed, with its group, afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (creates a user, a netns, cgroups)")
    for tool in ("useradd", "userdel", "setpriv", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    name = f"stkvmm-{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)
        with pytest.raises(KeyError):
            pwd.getpwnam(name)
        assert subprocess.run(["getent", "group", name], capture_output=True).returncode != 0


@pytest.fixture
def netns() -> Iterator[str]:
    ns = f"stoker-test-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
async def confined(
    vmm_user: str, netns: str, tmp_path: Path
) -> AsyncIterator[tuple[QemuDriver, MachineConfig]]:
    assert QEMU is not None
    c = plan(QEMU, user=vmm_user)
    if c.cgroups is None:
        pytest.skip(f"no cgroup here: {c.off.get('cgroup')}")
    assert c.pending_user == vmm_user and c.uid is None and c.sandbox, c.describe()
    with pytest.raises(KeyError):
        pwd.getpwnam(vmm_user)  # planning created nothing
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir(mode=0o700)  # root-only, like every VM directory
    kernel, initrd = vm_dir / "kernel", vm_dir / "initrd"
    fake_bzimage(kernel)
    kernel.chmod(0o600)  # not world-readable: handed over as a memfd copy
    initrd.write_bytes(b"\0" * 4096)
    initrd.chmod(0o644)  # world-readable: reopened through /proc/self/fd
    for name in ("root.ext4", "work.ext4"):
        with open(vm_dir / name, "wb") as f:
            f.truncate(16 * MiB)
        (vm_dir / name).chmod(0o600)
    await Links(netns).create_tap("tap-stk-conf")
    cfg = MachineConfig(
        vm_id=f"conf{secrets.token_hex(4)}",
        name="conf",
        vm_dir=vm_dir,
        kernel=kernel,
        initrd=initrd,
        cmdline="console=ttyS0",
        vcpu=1,
        memory_mib=256,
        disks=[
            Disk(vm_dir / "root.ext4", read_only=True, id="rootfs"),
            Disk(vm_dir / "work.ext4", read_only=False, id="work"),
        ],
        tap="tap-stk-conf",
        mac="06:53:ac:1e:00:02",
        serial_log=vm_dir / "serial.log",
        agent_socket=vm_dir / "agent.sock",
        netns=netns,
    )
    drv = QemuDriver(Runner(), QEMU, accel="tcg", confine=c, start_paused=True)
    yield drv, cfg
    h = drv.adopt(vm_dir)
    if h is not None:
        await drv.kill(h)
    c.cgroups.remove(cfg.vm_id)
    assert not any(d.exists() for d in c.cgroups.dirs(cfg.vm_id).values())


async def test_qemu_runs_unprivileged_sandboxed_and_limited(
    confined: tuple[QemuDriver, MachineConfig],
) -> None:
    drv, cfg = confined
    h = await drv.start(cfg)
    pw = pwd.getpwnam(drv.confine.user or "")  # made by the first start
    assert pw.pw_name.startswith("stkvmm-") and pw.pw_uid == drv.confine.uid != 0
    assert pw.pw_shell == "/usr/sbin/nologin"
    st = _status(h.pid)
    uid = str(drv.confine.uid)
    assert st["Uid"].split() == [uid] * 4 and st["Gid"].split() == [str(drv.confine.gid)] * 4
    assert st["Seccomp"] == "2"
    assert st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0
    assert st["Groups"] == ""

    cg = drv.confine.cgroups
    assert cg is not None
    dirs = cg.dirs(cfg.vm_id)
    if cg.version == 1:
        assert _cgroup_of(h.pid, "memory").endswith(f"/stoker-vms/{cfg.vm_id}")
        assert _cgroup_of(h.pid, "cpu").endswith(f"/stoker-vms/{cfg.vm_id}")
        limit = (dirs["memory"] / "memory.limit_in_bytes").read_text().strip()
        quota = (dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip()
    else:
        assert _cgroup_of(h.pid, "").endswith(f"/stoker-vms/{cfg.vm_id}")
        limit = (dirs["unified"] / "memory.max").read_text().strip()
        quota = (dirs["unified"] / "cpu.max").read_text().split()[0]
    assert int(limit) == (256 + 512) * MiB  # guest RAM + TCG overhead
    assert int(quota) == 150_000  # 1 vCPU + half a core per 100 ms

    # Paused, answering QMP over the socket the daemon bound; identified as this VM's QEMU.
    d = await drv.describe(h)
    assert d["state"] == "prelaunch" and not d["running"]
    assert "runs as" in (d["confinement"] or "")
    assert drv.is_running(h)
    again = QemuDriver(Runner(), drv.qemu_bin, confine=drv.confine).adopt(cfg.vm_dir)
    assert again is not None and again.pid == h.pid
    # QEMU created nothing by name: the VM directory is still root's alone.
    assert all(p.stat().st_uid == 0 for p in cfg.vm_dir.iterdir())

    # Its own mount namespace: empty private /tmp, the state dir (here the VM dir's
    # parent) covered up; the host's view is unchanged.
    assert drv.confine.mountns == "root" and "own mount namespace" in drv.confine.describe()
    assert os.readlink(f"/proc/{h.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    marker = Path("/tmp") / f"stoker-host-{secrets.token_hex(3)}"
    marker.write_text("host\n")
    try:
        qroot = Path(f"/proc/{h.pid}/root")
        assert os.listdir(qroot / "tmp") == [] and marker.exists()
        assert not (qroot / str(cfg.vm_dir / "root.ext4").lstrip("/")).exists()
        assert (cfg.vm_dir / "root.ext4").exists()  # ours still sees it
        assert (qroot / "usr/bin").is_dir()  # the rest of the host is there (read by uid)
    finally:
        marker.unlink()

    await drv.kill(h)
    assert not pid_alive(h.pid)
    assert not any(p.exists() for p in dirs.values())
    assert not (cfg.vm_dir / "qmp.sock").exists() and not (cfg.vm_dir / "agent.sock").exists()


async def test_a_forbidden_syscall_kills_qemu_not_the_host(
    confined: tuple[QemuDriver, MachineConfig],
) -> None:
    drv, cfg = confined
    h = await drv.start(cfg)
    assert h.api_socket is not None
    async with QMPClient(h.api_socket) as c:
        # `exec:` migration forks a shell: spawn=deny makes that a fatal SIGSYS
        with pytest.raises(Exception):  # noqa: B017 - QEMU dies mid-command
            await c.execute("migrate", {"uri": "exec:true"})
            for _ in range(50):
                await c.execute("query-status")
                await asyncio.sleep(0.05)
    for _ in range(200):  # the daemon's way: reap it when it is seen dead
        if not pid_alive(h.pid):
            break
        await asyncio.sleep(0.05)
    status = exit_status(h.pid)
    assert status is not None and os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGSYS
    assert not drv.is_running(h)
    why = drv.exit_reason(h.pid)
    assert f"QEMU (pid {h.pid}) was killed by its seccomp sandbox (SIGSYS)" in why
    # As root the kernel's audit record is readable: the call and its class are named.
    rec = seccomp_record(h.pid)
    if os.access("/dev/kmsg", os.R_OK):
        assert rec is not None, "no audit record of the seccomp kill in /dev/kmsg"
        assert rec.sandbox_class == "spawn" and rec.name in ("clone", "clone3", "fork", "vfork")
        assert "'spawn=deny' forbids" in why and rec.name in why
    await drv.kill(h)  # what VMService's cleanup does: files and cgroups go
    cg = drv.confine.cgroups
    assert cg is not None and not any(d.exists() for d in cg.dirs(cfg.vm_id).values())


async def test_a_confined_qemu_saves_and_restores_through_handed_over_fds(
    confined: tuple[QemuDriver, MachineConfig],
) -> None:
    """seccomp spawn=deny refuses `exec:` migration and QEMU's user cannot open the root-only
    VM directory: the daemon opens the state file and hands the descriptor over (getfd)."""
    drv, cfg = confined
    h = await drv.start(cfg)
    state = cfg.vm_dir / "state.bin"
    try:
        size = await drv.save_state(h, state)
        assert size == state.stat().st_size > 0
        assert state.stat().st_uid == 0  # written by QEMU through our descriptor
        await drv.resume(h)  # the source goes on (a snapshot, not a move)
        async with QMPClient(h.api_socket or "") as c:
            assert (await c.execute("query-status"))["status"] in ("running", "prelaunch")
    finally:
        await drv.kill(h)
    assert not pid_alive(h.pid)
    r = await drv.restore(cfg, state)
    try:
        assert _status(r.pid)["Seccomp"] == "2"
        async with QMPClient(r.api_socket or "") as c:
            assert (await c.execute("query-status"))["status"] == "running"
    finally:
        await drv.kill(r)
