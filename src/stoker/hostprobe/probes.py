"""Facts about this host, each asked one way for the daemon and `doctor` alike."""

from __future__ import annotations

import fcntl
import os
import re
import shutil

from stoker.runner import Runner

KVM_GET_API_VERSION = 0xAE00
KVM_BOOTS_ENV = "STOKER_KVM_BOOTS"


def which(name: str) -> str | None:
    """Resolve a binary name (or check an absolute path), also looking in the sbin dirs."""
    if os.path.isabs(name):
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def nested_virt() -> bool:
    """True when this host is itself a virtual machine (cpuinfo 'hypervisor' flag)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " hypervisor" in line
    except OSError:
        pass
    return False


def kvm_usable() -> tuple[bool, str]:
    """Open /dev/kvm read-write and ask its API version (does not boot a guest)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, "/dev/kvm does not exist"
    except PermissionError:
        return False, "/dev/kvm exists but is not read-writable by this user"
    except OSError as e:
        return False, f"/dev/kvm cannot be opened: {e.strerror}"
    try:
        ver = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return False, f"KVM_GET_API_VERSION failed: {e.strerror}"
    finally:
        os.close(fd)
    if ver != 12:
        return False, f"unexpected KVM API version {ver}"
    return True, "opened /dev/kvm and KVM_GET_API_VERSION = 12"


def kvm_boots_vouched() -> bool:
    """The operator says KVM guests boot here despite nesting (STOKER_KVM_BOOTS=1)."""
    return os.environ.get(KVM_BOOTS_ENV) == "1"


def read_text(path: str) -> str:
    """A small kernel or config file's text, "" when it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The first `X.Y[.Z]` (optionally `vX.Y.Z`) in a `--version` line."""
    m = re.search(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


async def version_line(runner: Runner, binary: str) -> str | None:
    """The first line `BINARY --version` prints (stdout, else stderr), None if nothing."""
    try:
        r = await runner.run([binary, "--version"], check=False, timeout=10)
    except Exception:
        return None
    text = (r.out or r.err).strip()
    return text.splitlines()[0] if text else None


async def qemu_has_microvm(runner: Runner, qemu: str) -> bool:
    """`QEMU -machine help` lists the `microvm` machine type."""
    try:
        r = await runner.run([qemu, "-machine", "help"], check=False, timeout=10)
    except Exception:
        return False
    return "microvm" in r.out


def device_mapper_available() -> bool:
    """The device-mapper control node exists and the kernel has the driver."""
    return os.path.exists("/dev/mapper/control") and "device-mapper" in read_text("/proc/misc")


def free_bytes_under(path: os.PathLike[str] | str) -> tuple[str, int]:
    """(the nearest existing directory at or above `path`, bytes free there for us)."""
    target = os.path.abspath(path)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    sv = os.statvfs(target)
    return target, sv.f_bavail * sv.f_frsize
