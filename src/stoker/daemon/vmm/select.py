"""Which VMM to use, and building its driver.

`vmm = auto` picks Firecracker only when its binary and a usable /dev/kvm are present and
this host is not itself a VM (nested KVM may open fine and still fail every boot); else
QEMU `microvm`, with KVM acceleration under the same condition and TCG otherwise.
`STOKER_KVM_BOOTS=1` in the daemon's environment vouches that KVM guests really boot on a
nested host. `doctor` shows the same choice and reason: both take it from `stoker.hostprobe`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal, Protocol

from stoker.daemon.vmm.base import VMMDriver
from stoker.errors import InvalidArgument, Unavailable

# The host probes and the choice policy live below the daemon, shared with `doctor`;
# re-exported here for the daemon's callers.
from stoker.hostprobe.probes import (
    KVM_BOOTS_ENV,
    KVM_GET_API_VERSION,
    kvm_boots_vouched,
    kvm_usable,
    nested_virt,
    which,
)
from stoker.hostprobe.vmm import choose_accel, choose_vmm
from stoker.runner import Runner

if TYPE_CHECKING:
    from stoker.hostprobe.confine import JailPlan

__all__ = [
    "KVM_BOOTS_ENV",
    "KVM_GET_API_VERSION",
    "VMMConfig",
    "choose_accel",
    "choose_vmm",
    "driver_for_config",
    "kvm_boots_vouched",
    "kvm_usable",
    "make_driver",
    "nested_virt",
    "which",
]


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
    def use_jailer(self) -> bool | Literal["auto"]: ...
    @property
    def vmm_user(self) -> str: ...


def make_driver(
    name: str,
    runner: Runner,
    *,
    firecracker_bin: str = "firecracker",
    jailer_bin: str | None = None,
    qemu_bin: str = "qemu-system-x86_64",
    accel: str = "tcg",
    logger: logging.Logger | None = None,
    confine: bool = False,
    vmm_user: str | None = None,
    jail: JailPlan | None = None,
) -> VMMDriver:
    """The driver for `name` (`firecracker` or `qemu`). Firecracker runs under the jailer
    as `jail` plans it (user, size cgroups), or with `jailer_bin` and default
    `JailerOptions`; `confine` confines QEMU as far as this host allows (vmm.confine)."""
    # Backends are imported here so that `choose_vmm` (doctor, CLI) does not pay for aiohttp.
    if name == "firecracker":
        from stoker.daemon.vmm.firecracker import FirecrackerDriver, JailerOptions

        jailer = JailerOptions(jailer_bin=jailer_bin) if jailer_bin else None
        if jail is not None:
            (logger or logging.getLogger("stoker.vmm")).info(
                "Firecracker confinement: %s", jail.describe()
            )
            jailer = None
            if jail.jailer is not None:
                jailer = JailerOptions(
                    jailer_bin=jail.jailer,
                    uid=jail.uid,
                    gid=jail.gid,
                    cgroup_version=jail.cgroup_version or 1,
                    size_limits=jail.cgroup_version is not None,
                    pending_user=jail.pending_user,
                )
        return FirecrackerDriver(runner, firecracker_bin, jailer=jailer, logger=logger)
    if name == "qemu":
        from stoker.daemon.vmm.qemu import QemuDriver

        if accel not in ("kvm", "tcg"):
            raise InvalidArgument(f"accel must be kvm or tcg, got {accel!r}")
        from stoker.daemon.vmm.confine import VMM_USER, plan

        confinement = plan(qemu_bin, accel=accel, user=vmm_user or VMM_USER) if confine else None
        if confinement is not None:
            (logger or logging.getLogger("stoker.vmm")).info(
                "QEMU confinement: %s", confinement.describe()
            )
        return QemuDriver(
            runner,
            qemu_bin,
            accel="kvm" if accel == "kvm" else "tcg",
            logger=logger,
            confine=confinement,
        )
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
    jail = None
    if name == "firecracker":
        from stoker.hostprobe.confine import VMM_USER, plan_firecracker

        jail = plan_firecracker(
            fc, config.jailer_bin, config.use_jailer, user=config.vmm_user or VMM_USER
        )
    return make_driver(
        name,
        runner,
        firecracker_bin=fc or config.firecracker_bin,
        jail=jail,
        qemu_bin=qemu or config.qemu_bin,
        accel=accel,
        logger=logger,
        confine=True,
        vmm_user=config.vmm_user,
    )
