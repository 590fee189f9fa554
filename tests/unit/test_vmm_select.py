"""`vmm = auto | firecracker | qemu`: which VMM and accelerator, and why."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from stoker.daemon.vmm import choose_accel, choose_vmm, driver_for_config, make_driver
from stoker.daemon.vmm.firecracker import FirecrackerDriver
from stoker.daemon.vmm.qemu import QemuDriver
from stoker.errors import InvalidArgument, Unavailable
from stoker.runner import Runner

pytestmark = pytest.mark.unit

FC, QEMU = "/usr/bin/firecracker", "/usr/bin/qemu-system-x86_64"


@pytest.mark.parametrize(
    ("fc", "qemu", "kvm", "nested", "want", "why"),
    [
        (FC, QEMU, True, False, "firecracker", "firecracker and a usable /dev/kvm"),
        (FC, None, True, False, "firecracker", "firecracker and a usable /dev/kvm"),
        (FC, QEMU, True, True, "qemu", "host is itself virtualised"),
        (FC, QEMU, False, False, "qemu", "/dev/kvm not usable"),
        (None, QEMU, True, False, "qemu", "firecracker not found"),
        (FC, None, False, False, "none", "qemu-system-x86_64 not found"),
        (None, None, True, False, "none", "firecracker not found"),
    ],
)
def test_auto(
    fc: str | None, qemu: str | None, kvm: bool, nested: bool, want: str, why: str
) -> None:
    name, reason = choose_vmm("auto", fc, qemu, kvm, nested)
    assert name == want
    assert reason.startswith("auto: ") and why in reason


def test_explicit_choice_wins_and_says_what_is_missing() -> None:
    assert choose_vmm("qemu", FC, QEMU, True, False) == ("qemu", "set by config (vmm = qemu)")
    name, why = choose_vmm("firecracker", FC, QEMU, False, False)
    assert name == "firecracker" and "/dev/kvm is not usable" in why
    name, why = choose_vmm("firecracker", None, QEMU, True, False)
    assert name == "firecracker" and "missing" in why
    name, why = choose_vmm("qemu", FC, None, True, False)
    assert name == "qemu" and "missing" in why
    with pytest.raises(InvalidArgument):
        choose_vmm("xen", FC, QEMU, True, False)


def test_accel() -> None:
    assert choose_accel(True, False)[0] == "kvm"
    assert choose_accel(True, True)[0] == "tcg"
    assert choose_accel(False, False)[0] == "tcg"


def test_make_driver() -> None:
    r = Runner()
    fc = make_driver("firecracker", r, firecracker_bin=FC, jailer_bin="/usr/bin/jailer")
    assert isinstance(fc, FirecrackerDriver) and fc.name == "firecracker"
    assert fc.jailer is not None and fc.jailer.jailer_bin == "/usr/bin/jailer"
    q = make_driver("qemu", r, qemu_bin=QEMU, accel="kvm")
    assert isinstance(q, QemuDriver) and q.accel == "kvm" and q.name == "qemu"
    with pytest.raises(Unavailable, match="no usable VMM"):
        make_driver("none", r)
    with pytest.raises(InvalidArgument):
        make_driver("qemu", r, accel="hvf")


@dataclass(frozen=True)
class Cfg:
    vmm: str = "qemu"
    firecracker_bin: str = "firecracker-not-installed-here"
    jailer_bin: str = "jailer"
    qemu_bin: str = "qemu-system-x86_64"
    use_jailer: bool = False
    vmm_user: str = "stoker-vmm"


def test_driver_for_config() -> None:
    d = driver_for_config(Cfg(), Runner())
    assert isinstance(d, QemuDriver) and d.accel in ("kvm", "tcg")
    d = driver_for_config(Cfg(vmm="firecracker", use_jailer=True), Runner())
    assert isinstance(d, FirecrackerDriver) and d.jailer is not None
