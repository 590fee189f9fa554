"""Why a VMM process ended, in plain words.

`base.reap` keeps the wait status of every VMM child it collects (`exit_status`); a VMM
the daemon adopted after a restart is not its child, so only the kernel's audit record can
say more. A QEMU under `-sandbox` that makes a system call of a denied class is killed by
seccomp with SIGSYS, and the kernel logs an audit record (type 1326, `SECCOMP`) naming the
pid and the syscall number; `seccomp_record` finds it in `/dev/kmsg` when the daemon may
read that (root, or `kernel.dmesg_restrict=0`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
from dataclasses import dataclass

# x86_64 syscall numbers of the classes QEMU's -sandbox denies (qemu-seccomp.c); the
# names and classes are what the message prints.
_SPAWN = {56: "clone", 57: "fork", 58: "vfork", 59: "execve", 322: "execveat", 435: "clone3"}
_ELEVATE = {
    105: "setuid",
    106: "setgid",
    113: "setreuid",
    114: "setregid",
    116: "setgroups",
    117: "setresuid",
    119: "setresgid",
    122: "setfsuid",
    123: "setfsgid",
}
_RESOURCE = {
    141: "setpriority",
    142: "sched_setparam",
    144: "sched_setscheduler",
    203: "sched_setaffinity",
    314: "sched_setattr",
}
_OBSOLETE = {
    134: "uselib",
    135: "personality",
    136: "ustat",
    139: "sysfs",
    156: "_sysctl",
    183: "afs_syscall",
    184: "tuxcall",
    185: "security",
    236: "vserver",
    181: "getpmsg",
    182: "putpmsg",
}
SANDBOX_CLASSES: dict[int, tuple[str, str]] = {
    **{n: (s, "spawn") for n, s in _SPAWN.items()},
    **{n: (s, "elevateprivileges") for n, s in _ELEVATE.items()},
    **{n: (s, "resourcecontrol") for n, s in _RESOURCE.items()},
    **{n: (s, "obsolete") for n, s in _OBSOLETE.items()},
}
_AUDIT_ARCH_X86_64 = "c000003e"

# Wait statuses of reaped VMM children, by pid (bounded: the oldest go first).
_EXITS: dict[int, int] = {}
_EXITS_MAX = 256


def record_exit(pid: int, status: int) -> None:
    _EXITS[pid] = status
    while len(_EXITS) > _EXITS_MAX:
        del _EXITS[next(iter(_EXITS))]


def exit_status(pid: int) -> int | None:
    """The wait status `reap` collected for `pid` (None: not our child, or not reaped)."""
    return _EXITS.get(pid)


def forget_exit(pid: int) -> None:
    _EXITS.pop(pid, None)


@dataclass(frozen=True)
class SeccompRecord:
    """The kernel's audit record of a seccomp kill."""

    pid: int
    syscall: int
    arch: str
    signal: int

    @property
    def name(self) -> str:
        if self.arch != _AUDIT_ARCH_X86_64:
            return f"syscall {self.syscall} (arch {self.arch})"
        got = SANDBOX_CLASSES.get(self.syscall)
        return got[0] if got else f"syscall {self.syscall}"

    @property
    def sandbox_class(self) -> str | None:
        if self.arch != _AUDIT_ARCH_X86_64:
            return None
        got = SANDBOX_CLASSES.get(self.syscall)
        return got[1] if got else None


_AUDIT = re.compile(
    r"type=1326 .*?\bpid=(?P<pid>\d+)\b.*?\bsig=(?P<sig>\d+)\b.*?\barch=(?P<arch>[0-9a-f]+)\b"
    r".*?\bsyscall=(?P<nr>\d+)\b"
)


def parse_audit(line: str, pid: int) -> SeccompRecord | None:
    m = _AUDIT.search(line)
    if m is None or int(m["pid"]) != pid:
        return None
    return SeccompRecord(pid, int(m["nr"]), m["arch"], int(m["sig"]))


def seccomp_record(
    pid: int, kmsg: str = "/dev/kmsg", max_records: int = 50_000
) -> SeccompRecord | None:
    """The newest audit record of a seccomp kill of `pid` in the kernel log, or None
    (none, or the log is not readable by this process)."""
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    found: SeccompRecord | None = None
    try:
        for _ in range(max_records):
            try:
                rec = os.read(fd, 8192)
            except OSError as e:
                if e.errno == errno.EPIPE:  # overwritten while we read: go on
                    continue
                break  # EAGAIN: the end; EPERM/EINVAL: unreadable
            if not rec:
                break
            if b"type=1326" in rec:
                got = parse_audit(rec.decode(errors="replace"), pid)
                if got is not None:
                    found = got
    finally:
        os.close(fd)
    return found


def describe_status(status: int) -> str:
    """'killed by SIGKILL', 'exited with status 1', ..."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(sig).name}"
        return f"killed by signal {sig}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


def explain_exit(label: str, pid: int, *, sandboxed: bool, kmsg: str = "/dev/kmsg") -> str:
    """What the VM's `last_error` and its log say about a VMM that ended by itself.
    `sandboxed`: it ran under QEMU's `-sandbox` (the classes are named)."""
    status = exit_status(pid)
    sigsys = status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
    rec = seccomp_record(pid, kmsg) if sigsys or (sandboxed and status is None) else None
    if sigsys or rec is not None:
        if rec is not None and rec.sandbox_class is not None and sandboxed:
            what = (
                f"it tried the system call {rec.name}, which the sandbox class "
                f"'{rec.sandbox_class}=deny' forbids"
            )
        elif rec is not None:
            what = f"it tried {rec.name}, which its seccomp filter does not allow"
        else:
            classes = (
                " (-sandbox classes obsolete, elevateprivileges, spawn, resourcecontrol)"
                if sandboxed
                else ""
            )
            what = (
                f"it tried a system call its seccomp filter forbids{classes}; the kernel's "
                f"audit record (`dmesg | grep 'type=1326.*pid={pid}'`, as root) names the call"
            )
        return (
            f"{label} (pid {pid}) was killed by its seccomp sandbox (SIGSYS): {what}. "
            "The host is unaffected: the sandbox stopped a buggy or compromised VMM, or a "
            "monitor command that needs a new process (e.g. `migrate exec:`), before it "
            "acted. Start the VM again; if it recurs, report it with `stoker vm logs` "
            "and the kernel's audit line"
        )
    how = describe_status(status) if status is not None else "killed or crashed"
    return f"the {label} process (pid {pid}) exited unexpectedly ({how})"
