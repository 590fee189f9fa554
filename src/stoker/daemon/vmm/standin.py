"""Stand-in backend: a real detached process per VM that boots no guest. A test backend.

It goes through the same `ProcessVMM` templates as Firecracker and QEMU (spawn detached
through the runner, pidfile and handle file in the VM directory, adopt after a restart,
pid-reuse guard, soft-then-hard shutdown, leftovers removed), so integration tests exercise
the daemon's lifecycle, teardown and reconcile for real without a guest boot. The process
is the daemon's Python sleeping, tagged in its argv with `stoker-standin-vmm <vm_dir>`;
its "poweroff" is SIGTERM. The agent channel is the virtio-serial kind, a unix socket at
`MachineConfig.agent_socket` (a test may serve it).

Never chosen by the `vmm` config key: tests construct `StandInDriver` and hand it to the
daemon through `VMService.driver_factory`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from stoker.daemon.vmm.base import (
    HANDLE_FILE,
    PIDFILE,
    VMM_LOG,
    KernelFiles,
    Launch,
    MachineConfig,
    ProcessVMM,
    VMMHandle,
    netns_prefix,
    write_file_atomic,
)
from stoker.runner import Runner

TAG = "stoker-standin-vmm"


class StandInDriver(ProcessVMM):
    """The stand-in VMM (see module docstring). `started` records every config it ran."""

    name = "standin"
    label = "stand-in VMM"

    def __init__(self, runner: Runner | None = None, logger: logging.Logger | None = None) -> None:
        super().__init__(
            runner or Runner(), "python", logger or logging.getLogger("stoker.vmm.standin")
        )
        self.started: list[MachineConfig] = []

    def boot_kernel(self, kernel: KernelFiles) -> Path | None:
        f = kernel.vmlinux or kernel.bzimage
        return Path(f) if f else None

    def _matches_pid(self, handle: VMMHandle, argv: list[str]) -> bool:
        return TAG in argv and handle.vm_dir in argv

    def _default_handle(self, vm_dir: Path, pid: int) -> VMMHandle:
        return VMMHandle(kind=self.name, pid=pid, api_socket=None, vm_dir=str(vm_dir))

    def _prepare(self, cfg: MachineConfig) -> Launch:
        self.started.append(cfg)
        argv = [
            *netns_prefix(cfg.netns),
            sys.executable,
            "-c",
            "import time; time.sleep(3600)",
            TAG,
            str(cfg.vm_dir),
        ]
        return Launch(
            argv=argv,
            stdout=cfg.vm_dir / VMM_LOG,
            stderr=None,
            api_socket=None,
            extra={
                "vm_id": cfg.vm_id,
                "agent_socket": str(cfg.agent_socket) if cfg.agent_socket else None,
            },
        )

    async def _configure(self, handle: VMMHandle, cfg: MachineConfig, launch: Launch) -> None:
        write_file_atomic(Path(handle.vm_dir) / PIDFILE, f"{handle.pid}\n")

    async def _request_poweroff(self, handle: VMMHandle, timeout: float) -> None:
        os.kill(handle.pid, signal.SIGTERM)

    def _leftover_paths(self, handle: VMMHandle) -> list[Path | str | None]:
        vm_dir = Path(handle.vm_dir)
        return [handle.extra.get("agent_socket"), vm_dir / PIDFILE, vm_dir / HANDLE_FILE]

    async def describe(self, handle: VMMHandle) -> dict[str, Any]:
        running = self.is_running(handle)
        return {"kind": self.name, "running": running, "state": "Running" if running else None}
