"""Why a VMM ended: wait statuses, the kernel's seccomp audit record, the message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stoker.daemon.vmm import exits
from stoker.daemon.vmm.base import pid_alive

pytestmark = pytest.mark.unit

AUDIT = (
    "6,1234,460957729,-;audit: type=1326 audit(1796175376.258:3): auid=4294967295 uid=999 "
    'gid=995 ses=4294967295 pid={pid} comm="qemu-system-x86" exe="/usr/bin/qemu-system-x86_64" '
    "sig=31 arch=c000003e syscall={nr} compat=0 ip=0x7f7c0ec65353 code=0x80000000\n"
)


def _dead_child(sig: int) -> int:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    os.kill(p.pid, sig)
    p.returncode = 0  # keep Popen from reaping it: `reap` must
    while pid_alive(p.pid):
        pass
    return p.pid


def test_the_audit_record_names_the_call_and_its_sandbox_class(tmp_path: Path) -> None:
    log = tmp_path / "kmsg"
    log.write_text(AUDIT.format(pid=4242, nr=59))
    rec = exits.seccomp_record(4242, str(log))
    assert rec is not None and (rec.name, rec.sandbox_class) == ("execve", "spawn")
    assert exits.seccomp_record(4243, str(log)) is None
    assert exits.parse_audit(AUDIT.format(pid=7, nr=105), 7).sandbox_class == "elevateprivileges"  # type: ignore[union-attr]
    assert exits.seccomp_record(1, str(tmp_path / "missing")) is None
    # Not our child and no wait status: the audit record alone says it was seccomp.
    why = exits.explain_exit("QEMU", 4242, sandboxed=True, kmsg=str(log))
    assert "killed by its seccomp sandbox (SIGSYS)" in why
    assert "execve, which the sandbox class 'spawn=deny' forbids" in why


def test_a_reaped_sigsys_is_a_seccomp_kill_even_without_the_audit_record(tmp_path: Path) -> None:
    pid = _dead_child(signal.SIGSYS)
    st = exits.exit_status(pid)
    assert st is not None and os.WTERMSIG(st) == signal.SIGSYS
    why = exits.explain_exit("QEMU", pid, sandboxed=True, kmsg=str(tmp_path / "none"))
    assert f"QEMU (pid {pid}) was killed by its seccomp sandbox (SIGSYS)" in why
    assert "elevateprivileges, spawn, resourcecontrol" in why and "dmesg" in why
    exits.forget_exit(pid)
    assert exits.exit_status(pid) is None


def test_other_ends_are_named_plainly(tmp_path: Path) -> None:
    pid = _dead_child(signal.SIGKILL)
    why = exits.explain_exit("QEMU", pid, sandboxed=True, kmsg=str(tmp_path / "none"))
    assert why == f"the QEMU process (pid {pid}) exited unexpectedly (killed by SIGKILL)"
    assert exits.describe_status(3 << 8) == "exited with status 3"
    assert "killed or crashed" in exits.explain_exit("QEMU", 1, sandboxed=False)
