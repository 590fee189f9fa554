"""Which VMM to use, and building its driver.

`vmm = auto` picks Firecracker only when its binary and a usable /dev/kvm are present and
this host is not itself a VM (nested KVM may open fine and still fail every boot); else
QEMU `microvm`, with KVM acceleration under the same condition and TCG otherwise.
`STOKER_KVM_BOOTS=1` in the daemon's environment vouches that KVM guests really boot on a
nested host. `doctor` shows the same choice and reason.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from typing import Protocol

from stoker.daemon.vmm.base import VMMDriver
from stoker.errors import InvalidArgument, Unavailable
from stoker.runner import Runner

KVM_GET_API_VERSION = 0xAE00
KVM_BOOTS_ENV = "STOKER_KVM_BOOTS"


class VMMConfig(Protocol):
    """The config keys this module reads (satisfied by `stoker.config.Config`)."""

    @property
    def vmm(self) -> str: ...
    @property
    def firecracker_bin(self) -> str: ...
    @property
    def jailer_bin(self) -> str: ...
    @property
    def qemu_bin(self) -> str: ...
    @property
    def use_jailer(self) -> bool: ...


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


def choose_vmm(
    config_vmm: str,
    fc_bin: str | None,
    qemu_bin: str | None,
    kvm_usable: bool,
    nested: bool,
) -> tuple[str, str]:
    """(name, reason): `firecracker`, `qemu`, or `none` when `auto` finds nothing usable.

    `fc_bin`/`qemu_bin` are resolved paths (None: not found). `nested` means KVM guests are
    not trusted to boot (a VM host not vouched for with STOKER_KVM_BOOTS=1).
    """
    if config_vmm == "firecracker":
        if fc_bin is None:
            return "firecracker", "set by config (vmm = firecracker), but firecracker is missing"
        if not kvm_usable:
            return "firecracker", "set by config (vmm = firecracker), but /dev/kvm is not usable"
        return "firecracker", "set by config (vmm = firecracker)"
    if config_vmm == "qemu":
        if qemu_bin is None:
            return "qemu", "set by config (vmm = qemu), but qemu-system-x86_64 is missing"
        return "qemu", "set by config (vmm = qemu)"
    if config_vmm != "auto":
        raise InvalidArgument(f"vmm must be auto, firecracker or qemu, got {config_vmm!r}")
    if fc_bin and kvm_usable and not nested:
        return "firecracker", "auto: firecracker and a usable /dev/kvm are present"
    why = []
    if not fc_bin:
        why.append("firecracker not found")
    if not kvm_usable:
        why.append("/dev/kvm not usable")
    elif nested:
        why.append(
            f"host is itself virtualised, nested KVM boots are unreliable ({KVM_BOOTS_ENV}=1 "
            "vouches they work)"
        )
    if qemu_bin:
        return "qemu", "auto: " + ", ".join(why or ["qemu available"])
    return "none", "auto: " + ", ".join([*why, "qemu-system-x86_64 not found"])


def choose_accel(kvm_usable: bool, nested: bool) -> tuple[str, str]:
    """(accel, reason) for QEMU: `kvm` only where KVM guests can boot, else `tcg`."""
    if kvm_usable and not nested:
        return "kvm", "KVM is usable"
    if kvm_usable:
        return "tcg", "nested host: KVM guests may not boot, using TCG (slow but works)"
    return "tcg", "no usable /dev/kvm: using TCG (slow but works)"


def make_driver(
    name: str,
    runner: Runner,
    *,
    firecracker_bin: str = "firecracker",
    jailer_bin: str | None = None,
    qemu_bin: str = "qemu-system-x86_64",
    accel: str = "tcg",
    logger: logging.Logger | None = None,
) -> VMMDriver:
    """The driver for `name` (`firecracker` or `qemu`). `jailer_bin` runs Firecracker
    under the jailer with default `JailerOptions`."""
    # Backends are imported here so that `choose_vmm` (doctor, CLI) does not pay for aiohttp.
    if name == "firecracker":
        from stoker.daemon.vmm.firecracker import FirecrackerDriver, JailerOptions

        jailer = JailerOptions(jailer_bin=jailer_bin) if jailer_bin else None
        return FirecrackerDriver(runner, firecracker_bin, jailer=jailer, logger=logger)
    if name == "qemu":
        from stoker.daemon.vmm.qemu import QemuDriver

        if accel not in ("kvm", "tcg"):
            raise InvalidArgument(f"accel must be kvm or tcg, got {accel!r}")
        return QemuDriver(runner, qemu_bin, accel="kvm" if accel == "kvm" else "tcg", logger=logger)
    raise Unavailable(
        "no usable VMM: install qemu-system-x86 (or firecracker with KVM) and see `stoker doctor`"
    )


def driver_for_config(
    config: VMMConfig, runner: Runner, logger: logging.Logger | None = None
) -> VMMDriver:
    """Choose the VMM as `doctor` reports it and build its driver."""
    fc = which(config.firecracker_bin)
    qemu = which(config.qemu_bin)
    kvm_ok, _ = kvm_usable()
    nested = nested_virt() and not kvm_boots_vouched()
    name, why = choose_vmm(config.vmm, fc, qemu, kvm_ok, nested)
    accel, accel_why = choose_accel(kvm_ok, nested)
    (logger or logging.getLogger("stoker.vmm")).info(
        "VMM: %s (%s)%s", name, why, f"; accel {accel}: {accel_why}" if name == "qemu" else ""
    )
    jailer = (which(config.jailer_bin) or config.jailer_bin) if config.use_jailer else None
    return make_driver(
        name,
        runner,
        firecracker_bin=fc or config.firecracker_bin,
        jailer_bin=jailer,
        qemu_bin=qemu or config.qemu_bin,
        accel=accel,
        logger=logger,
    )
