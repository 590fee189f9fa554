"""The descriptors a confined QEMU is handed (see `stoker.hostprobe.confine` for the
plan: user, seccomp, cgroups; its names are re-exported here for the driver)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stoker.hostprobe.confine import (
    CGROUP_PARENT,
    CGROUP_ROOT,
    CPU_PERIOD_US,
    OVERHEAD_MIB,
    SANDBOX,
    VMM_USER,
    Cgroups,
    Confinement,
    MiB,
    cpu_quota_us,
    drop_argv,
    ensure_user,
    find_cgroups,
    join_argv,
    memory_limit,
    mount_argv,
    plan,
    qemu_has_sandbox,
)

__all__ = [
    "CGROUP_PARENT",
    "CGROUP_ROOT",
    "CPU_PERIOD_US",
    "OVERHEAD_MIB",
    "SANDBOX",
    "VMM_USER",
    "Cgroups",
    "Confinement",
    "Handover",
    "MiB",
    "cpu_quota_us",
    "drop_argv",
    "ensure_user",
    "find_cgroups",
    "join_argv",
    "memory_limit",
    "mount_argv",
    "open_tap",
    "plan",
    "qemu_has_sandbox",
    "set_tap_owner",
]

# --- descriptors handed to a QEMU that is not root --------------------------------------

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
_NETNS = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _esc(value: str | os.PathLike[str]) -> str:
    return str(value).replace(",", ",,")


@dataclass
class Handover:
    """Descriptors opened for one QEMU start (child fd -> ours) and the argv values that
    name them. `close()` once QEMU is spawned (it holds its own copies)."""

    fds: dict[int, int] = field(default_factory=dict)
    add_fd: list[str] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)  # "kernel", "initrd", "disk:<id>", ...
    tap_fd: int | None = None
    qmp_fd: int | None = None
    agent_fd: int | None = None
    _sets: int = 0
    _owned: list[int] = field(default_factory=list)

    def _child(self, fd: int) -> int:
        self._owned.append(fd)
        n = 3 + len(self.fds)
        self.fds[n] = fd
        return n

    def fdset(self, *fds: int, opaque: str) -> str:
        """Put `fds` into a new fd set; the `/dev/fdset/N` path QEMU opens them by."""
        self._sets += 1
        for fd in fds:
            self.add_fd.append(f"fd={self._child(fd)},set={self._sets},opaque={_esc(opaque)}")
        return f"/dev/fdset/{self._sets}"

    def reopenable(self, path: Path, what: str) -> str:
        """A `/proc/self/fd/N` path for a file QEMU reads by name (kernel, initrd)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_mode & 0o004 == 0:
            # Not world-readable: QEMU's user could not reopen it; give it a private copy.
            mem = os.memfd_create(f"stoker-{what}", os.MFD_CLOEXEC)
            try:
                with os.fdopen(os.dup(fd), "rb") as src, os.fdopen(os.dup(mem), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            finally:
                os.close(fd)
            fd = mem
        return f"/proc/self/fd/{self._child(fd)}"

    def listening(self, path: Path) -> int:
        """A unix socket bound and listening at `path` (QEMU serves it: `fd=N`)."""
        import socket

        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(path))
            s.listen(8)
        except BaseException:
            s.close()
            raise
        return self._child(s.detach())

    def close(self) -> None:
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned.clear()


# Set once at wiring when stokerd is not root: stoker-helper opens the tap and passes the
# descriptor (/dev/net/tun is root's). None: open it here.
TAP_OPENER: Callable[[str, str | None], int] | None = None


def open_tap(name: str, netns: str | None = None) -> int:
    """/dev/net/tun attached to the existing tap `name` (in `netns` when given)."""
    if TAP_OPENER is not None:
        return TAP_OPENER(name, netns)
    return open_tap_direct(name, netns)


def open_tap_direct(name: str, netns: str | None = None) -> int:
    """open_tap in this process (root, or a user /dev/net/tun lets in)."""
    import fcntl
    import struct

    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except BaseException:
            os.close(fd)
            raise
        return fd

    if netns is None:
        return attach()
    if not _NETNS.match(netns):
        raise ValueError(f"{netns!r} is not a network namespace name")
    return _in_netns(netns, attach)


def _in_netns(netns: str, fn: Callable[[], int]) -> int:
    """Run `fn` in a fresh thread that entered `netns` (setns is per thread)."""
    import ctypes
    import threading

    box: dict[str, object] = {}

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(target, 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(target)
            try:
                box["fd"] = fn()
            finally:
                libc.setns(orig, 0x40000000)
        except BaseException as e:
            box["error"] = e
        finally:
            os.close(orig)

    t = threading.Thread(target=work, name=f"netns-tap-{netns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    fd = box["fd"]
    assert isinstance(fd, int)
    return fd


TUNSETOWNER = 0x400454CC


def set_tap_owner(name: str, netns: str | None, uid: int) -> None:
    """Make the persistent tap `name` (in `netns`) owned by `uid`, so a VMM running as
    that user may attach it by name (Firecracker under the jailer). Root only."""
    import fcntl

    fd = open_tap_direct(name, netns)
    try:
        fcntl.ioctl(fd, TUNSETOWNER, uid)
    finally:
        os.close(fd)
