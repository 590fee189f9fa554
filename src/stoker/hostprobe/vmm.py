"""Which VMM and which QEMU accelerator this host and config call for.

Policy shared by the daemon (`daemon.vmm.select.driver_for_config` builds that driver) and
`doctor` (reports the same choice with its reason). The backends are described once, as
data (`BACKENDS`, keyed by the `vmm` config value, in `auto`'s order of preference): the
choice is a lookup of the config value in that table, never a comparison of driver names
(the drivers themselves live in `daemon/vmm/`, which this package must not import).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stoker.errors import InvalidArgument
from stoker.hostprobe.probes import KVM_BOOTS_ENV

VMMName = Literal["firecracker", "qemu"]


@dataclass(frozen=True)
class VMMBackend:
    """What the choice needs to know of one backend."""

    key: VMMName  # the `vmm` config value, and the driver's name
    binary: str  # what is missing when its binary is not found
    needs_kvm: bool  # boots only with a usable /dev/kvm (and not on an untrusted nested host)
    has_accel: bool  # takes a `choose_accel` answer (kvm or tcg)


FIRECRACKER = VMMBackend("firecracker", "firecracker", needs_kvm=True, has_accel=False)
QEMU = VMMBackend("qemu", "qemu-system-x86_64", needs_kvm=False, has_accel=True)
BACKENDS: dict[str, VMMBackend] = {b.key: b for b in (FIRECRACKER, QEMU)}


def backend(name: str) -> VMMBackend | None:
    """The backend a `vmm` config value (or a `choose_vmm` answer) names; None for
    `auto`/`none`/anything else."""
    return BACKENDS.get(name)


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
    found = {FIRECRACKER.key: fc_bin, QEMU.key: qemu_bin}
    chosen = backend(config_vmm)
    if chosen is not None:
        said = f"set by config (vmm = {chosen.key})"
        if found[chosen.key] is None:
            return chosen.key, f"{said}, but {chosen.binary} is missing"
        if chosen.needs_kvm and not kvm_usable:
            return chosen.key, f"{said}, but /dev/kvm is not usable"
        return chosen.key, said
    if config_vmm != "auto":
        raise InvalidArgument(f"vmm must be auto, {' or '.join(BACKENDS)}, got {config_vmm!r}")
    why: list[str] = []
    for b in BACKENDS.values():
        reasons = [] if found[b.key] else [f"{b.binary} not found"]
        if b.needs_kvm and not kvm_usable:
            reasons.append("/dev/kvm not usable")
        elif b.needs_kvm and nested:
            reasons.append(
                f"host is itself virtualised, nested KVM boots are unreliable "
                f"({KVM_BOOTS_ENV}=1 vouches they work)"
            )
        if reasons:
            why += reasons
            continue
        if b.needs_kvm:
            return b.key, f"auto: {b.key} and a usable /dev/kvm are present"
        return b.key, "auto: " + ", ".join(why or [f"{b.key} available"])
    return "none", "auto: " + ", ".join(why)


def choose_accel(kvm_usable: bool, nested: bool) -> tuple[str, str]:
    """(accel, reason) for QEMU: `kvm` only where KVM guests can boot, else `tcg`."""
    if kvm_usable and not nested:
        return "kvm", "KVM is usable"
    if kvm_usable:
        return "tcg", "nested host: KVM guests may not boot, using TCG (slow but works)"
    return "tcg", "no usable /dev/kvm: using TCG (slow but works)"
