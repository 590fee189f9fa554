"""Which VMM and which QEMU accelerator this host and config call for.

Policy shared by the daemon (`daemon.vmm.select.driver_for_config` builds that driver) and
`doctor` (reports the same choice with its reason). The names compared here are the values
of the `vmm` config key, not driver objects.
"""

from __future__ import annotations

from stoker.errors import InvalidArgument
from stoker.hostprobe.probes import KVM_BOOTS_ENV


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
