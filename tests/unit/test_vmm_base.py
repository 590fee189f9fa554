"""`ProcessVMM`: the backends' answers the daemon used to derive from driver names, and the
shutdown template (soft, then hard, then post-shutdown in a `finally`) on the stand-in
backend's real processes."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from stoker.daemon.vmm import base
from stoker.daemon.vmm.base import (
    HANDLE_FILE,
    PIDFILE,
    MachineConfig,
    VMMHandle,
    pid_alive,
    vsock_cid_for,
)
from stoker.daemon.vmm.firecracker import FirecrackerDriver
from stoker.daemon.vmm.qemu import QemuDriver
from stoker.daemon.vmm.standin import StandInDriver
from stoker.errors import Conflict, Timeout, Unavailable
from stoker.runner import Runner

pytestmark = pytest.mark.unit


@dataclass
class K:
    vmlinux: str | None
    bzimage: str | None


def test_backends_answer_boot_kernel_vsock_and_agent_channel() -> None:
    fc, qemu = FirecrackerDriver(Runner()), QemuDriver(Runner(), tsc_khz=0)
    both = K("/k/vmlinux", "/k/bzImage")
    assert fc.boot_kernel(both) == Path("/k/vmlinux")
    assert qemu.boot_kernel(both) == Path("/k/bzImage")
    assert fc.boot_kernel(K(None, "/k/bzImage")) == Path("/k/bzImage")  # refused at start
    assert qemu.boot_kernel(K(None, None)) is None
    assert fc.vsock_cid("172.30.0.5") == vsock_cid_for("172.30.0.5") >= 3
    assert qemu.vsock_cid("172.30.0.5") is None
    h = VMMHandle("qemu", 1, "/v/qmp.sock", "/v", {"agent_socket": "/v/agent.sock"})
    ch = qemu.agent_transport(h)
    assert ch is not None and ch.socket == "/v/agent.sock" and not ch.hybrid_vsock
    h = VMMHandle("firecracker", 1, "/v/fc.sock", "/v", {"agent_socket": "/v/agent.sock"})
    ch = fc.agent_transport(h)
    assert ch is not None and ch.socket == "/v/agent.sock" and ch.hybrid_vsock
    assert qemu.agent_transport(VMMHandle("qemu", 1, None, "/v", {})) is None


def _cfg(vm_dir: Path) -> MachineConfig:
    kernel = vm_dir / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    return MachineConfig(
        vm_id="vm1",
        name="one",
        vm_dir=vm_dir,
        kernel=kernel,
        initrd=None,
        cmdline="",
        vcpu=1,
        memory_mib=128,
        disks=[],
        tap=None,
        mac="02:00:00:00:00:01",
        serial_log=vm_dir / "serial.log",
        agent_socket=vm_dir / "agent.sock",
    )


class NoPoweroff(StandInDriver):
    """A guest that ignores the poweroff request (the VMM then has to be killed)."""

    async def _request_poweroff(self, handle: VMMHandle, timeout: float) -> None:
        raise Unavailable("no power button")


async def test_standin_start_adopt_soft_shutdown(tmp_path: Path) -> None:
    drv = StandInDriver()
    cfg = _cfg(tmp_path)
    h = await drv.start(cfg)
    try:
        assert drv.is_running(h) and (tmp_path / PIDFILE).exists()
        assert (tmp_path / HANDLE_FILE).exists()
        again = drv.adopt(tmp_path)
        assert again is not None and again.pid == h.pid
        with pytest.raises(Conflict, match="already running"):
            await drv.start(cfg)
        (tmp_path / "agent.sock").write_text("")
        await drv.shutdown(h, 5.0)  # SIGTERM is its poweroff
        assert not pid_alive(h.pid)
        assert not (tmp_path / PIDFILE).exists() and not (tmp_path / HANDLE_FILE).exists()
        assert not (tmp_path / "agent.sock").exists()
        assert drv.adopt(tmp_path) is None
    finally:
        if pid_alive(h.pid):
            os.kill(h.pid, signal.SIGKILL)


async def test_shutdown_goes_hard_when_the_poweroff_request_fails(tmp_path: Path) -> None:
    drv = NoPoweroff()
    h = await drv.start(_cfg(tmp_path))
    try:
        await drv.shutdown(h, 5.0)
        assert not pid_alive(h.pid) and not (tmp_path / PIDFILE).exists()
    finally:
        if pid_alive(h.pid):
            os.kill(h.pid, signal.SIGKILL)


async def test_post_shutdown_runs_even_when_the_hard_kill_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drv = NoPoweroff()
    h = await drv.start(_cfg(tmp_path))

    async def stuck(pid: int) -> None:
        raise Timeout(f"VMM pid {pid} did not exit")

    monkeypatch.setattr(base, "sigkill_and_wait", stuck)
    try:
        with pytest.raises(Timeout):
            await drv.kill(h)
        assert pid_alive(h.pid)  # the (pretend) stuck VMM is still there...
        assert not (tmp_path / PIDFILE).exists()  # ...but its leftovers were removed
        assert not (tmp_path / HANDLE_FILE).exists()
    finally:
        os.kill(h.pid, signal.SIGKILL)
        monkeypatch.undo()
        await base.wait_exit(h.pid, 5.0)


async def test_a_pid_reused_by_another_process_is_never_signalled(tmp_path: Path) -> None:
    drv = StandInDriver()
    h = await drv.start(_cfg(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    try:
        foreign = VMMHandle(drv.name, h.pid, None, str(other), {})
        assert not drv.is_running(foreign)
        await drv.kill(foreign)
        assert pid_alive(h.pid)
        assert not drv.is_running(VMMHandle("qemu", h.pid, None, str(tmp_path), {}))
    finally:
        await drv.kill(h)
    assert not pid_alive(h.pid)
