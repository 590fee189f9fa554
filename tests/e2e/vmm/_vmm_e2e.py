"""Helpers for the VMM driver end-to-end tests: the real guest kernel, a tiny test
initramfs, the Firecracker download script, network namespaces.

Everything downloaded is cached under $STOKER_TEST_CACHE (default /var/cache/stoker-test).
Anything that cannot be had here (no root, no mirror, no busybox) skips with the reason.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from prereq import require

CACHE = Path(os.environ.get("STOKER_TEST_CACHE", "/var/cache/stoker-test"))
REPO = Path(__file__).resolve().parents[3]
GET_FIRECRACKER = Path(
    os.environ.get("STOKER_GET_FIRECRACKER", REPO.parent / "shared" / "tools" / "get-firecracker")
)
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"

# Loaded by the test init in this order (a second pass catches dependency order).
MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/char/virtio_console.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/acpi/button.ko",
    "drivers/input/evdev.ko",
)

# The test guest's /init: report what the VMM gave it on the serial console, echo lines
# back over the agent port, and power off when the ACPI power button is pressed.
TEST_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for pass in 1 2; do
  for m in /m/*.ko; do insmod "$m" 2>/dev/null; done
done
i=0
while [ ! -e /sys/block/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
echo "STOKER-TEST disks:$(for d in /sys/block/vd*; do echo -n " ${d##*/}=ro$(cat $d/ro)"; done)"
echo "STOKER-TEST mac: $(cat /sys/class/net/eth0/address 2>/dev/null || echo none)"
for p in /sys/class/virtio-ports/*; do
  if [ "$(cat $p/name 2>/dev/null)" = org.stoker.agent ]; then
    # One read-write open (a port admits one opener): echo lines back to the host. Reads
    # return EOF while no host end is connected, so keep polling.
    (exec 3<>/dev/${p##*/}
     while true; do
       if read -r line <&3; then echo "echo: $line" >&3; else sleep 0.1; fi
     done) &
  fi
done
for e in /dev/input/event*; do
  (head -c 1 "$e" >/dev/null; echo "STOKER-TEST power button"; poweroff -f) &
done
echo "STOKER-TEST ready"
while true; do sleep 1; done
"""


@dataclass(frozen=True)
class GuestKernel:
    """The Debian cloud kernel: compressed bzImage (QEMU), ELF vmlinux (Firecracker)."""

    version: str
    vmlinuz: Path
    vmlinux: Path
    modules: Path


def _run(*argv: str, cwd: Path | None = None, timeout: float = 300) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """Decompress the LZ4 (legacy frame) payload of a Debian vmlinuz into an ELF vmlinux."""
    data = vmlinuz.read_bytes()
    at = data.find(LZ4_LEGACY_MAGIC)
    if at < 0:
        raise RuntimeError(f"{vmlinuz}: no LZ4 legacy payload (magic 02 21 4C 18)")
    payload = out.with_suffix(".lz4")
    payload.write_bytes(data[at:])
    tmp = out.with_suffix(".tmp")
    # lz4 exits 1 on the bytes after the frame (the bzImage trailer): judge by the output.
    subprocess.run(["lz4", "-d", "-f", str(payload), str(tmp)], capture_output=True, timeout=120)
    payload.unlink()
    with open(tmp, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise RuntimeError(f"decompressing {vmlinuz} did not give an ELF vmlinux")
    tmp.rename(out)


def fetch_debian_kernel(cache: Path) -> GuestKernel:
    """Download linux-image-cloud-amd64's kernel package (once) and unpack it."""
    kdir = cache / "kernel"
    kdir.mkdir(parents=True, exist_ok=True)
    dep = _run("apt-cache", "depends", "linux-image-cloud-amd64")
    pkgs = [ln.split(":", 1)[1].strip() for ln in dep.splitlines() if "Depends:" in ln]
    pkg = next((p for p in pkgs if p.startswith("linux-image-")), None)
    if pkg is None:
        raise RuntimeError("apt-cache knows no linux-image-cloud-amd64 dependency")
    version = pkg.removeprefix("linux-image-")
    root = kdir / version
    vmlinuz = root / "boot" / f"vmlinuz-{version}"
    if not vmlinuz.exists():
        debs = list(kdir.glob(f"{pkg}_*.deb"))
        if not debs:
            _run("apt-get", "download", pkg, cwd=kdir)
            debs = list(kdir.glob(f"{pkg}_*.deb"))
        tmp = kdir / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _run("dpkg-deb", "-x", str(debs[0]), str(tmp))
        tmp.rename(root)
    vmlinux = kdir / f"vmlinux-{version}"
    if not vmlinux.exists():
        extract_vmlinux(vmlinuz, vmlinux)
    return GuestKernel(version, vmlinuz, vmlinux, root / "lib" / "modules" / version / "kernel")


def _cpio_entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    """One `newc` cpio record."""
    nb = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
    out = b"070701" + "".join(f"{v:08X}" for v in fields).encode() + nb
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def build_test_initrd(kernel: GuestKernel, out: Path) -> None:
    """A gzip'd cpio: static busybox, the virtio/button/evdev modules, TEST_INIT."""
    busybox = Path("/bin/busybox")
    require(
        busybox.exists() and b"libc.so" not in busybox.read_bytes()[:65536],
        "needs a static /bin/busybox (apt-get install -y busybox-static)",
    )
    entries = [(d, stat.S_IFDIR | 0o755, b"") for d in ("bin", "m", "dev", "proc", "sys")]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    entries.append(("init", stat.S_IFREG | 0o755, TEST_INIT.encode()))
    for i, rel in enumerate(MODULES):
        ko = kernel.modules / rel
        if not ko.exists():
            raise RuntimeError(f"module {ko} missing from the kernel package")
        entries.append((f"m/{i:02d}-{ko.name}", stat.S_IFREG | 0o644, ko.read_bytes()))
    blob = b"".join(_cpio_entry(n, m, d, 100 + i) for i, (n, m, d) in enumerate(entries))
    blob += _cpio_entry("TRAILER!!!", 0, b"", 0)
    out.write_bytes(gzip.compress(blob, 1))


@dataclass(frozen=True)
class NetNS:
    """A test network namespace with one tap in it."""

    name: str
    tap: str


def ns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def sparse_ext4(path: Path, size_mib: int = 64) -> Path:
    """A sparse file with an empty ext4 filesystem."""
    with open(path, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", str(path))
    return path


def ns_pids(name: str) -> list[int]:
    """Processes inside network namespace `name`."""
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


@contextlib.contextmanager
def netns_with_tap() -> Iterator[NetNS]:
    """`stoker-vmm-XXXX` with a tap `stkvmm0` (up) inside. On exit anything still in it is
    killed (a safety net: tests assert themselves that nothing was left) and it is deleted."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace and a tap")
    require(shutil.which("ip"), "needs iproute2")
    name = f"stoker-vmm-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            ["ip", "-n", name, "tuntap", "add", "dev", "stkvmm0", "mode", "tap"], check=True
        )
        subprocess.run(["ip", "-n", name, "link", "set", "stkvmm0", "up"], check=True)
        yield NetNS(name, "stkvmm0")
    finally:
        for pid in ns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert name not in ns_list(), f"network namespace {name} was left behind"


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A temporary directory with a short path, removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="stk-vmm-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def vmm_pids_for(vm_dir: Path) -> list[int]:
    """Live processes whose command line mentions `vm_dir` (a leaked VMM would)."""
    found = []
    needle = str(vm_dir).encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in (p / "cmdline").read_bytes():
                state = (p / "stat").read_text().rsplit(")", 1)[-1].split()[0]
                if state != "Z":
                    found.append(int(p.name))
        except OSError:
            continue
    return found
