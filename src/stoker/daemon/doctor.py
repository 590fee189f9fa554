"""Host diagnostics (`stoker doctor`): each check says PASS/WARN/FAIL, what it looked at,
and a one-line fix. Runs in the CLI process; it needs no daemon but asks one if it runs."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from stoker.config import Config
from stoker.daemon.vmm.select import kvm_usable, nested_virt
from stoker.layout import Layout
from stoker.runner import Runner

Status = Literal["PASS", "WARN", "FAIL"]

# Firecracker versions this code is tested against (inclusive lower, exclusive upper).
FC_MIN = (1, 8, 0)
FC_MAX_EXCL = (1, 17, 0)

REQUIRED_TOOLS = (
    "ip",
    "nft",
    "mkfs.ext4",
    "debugfs",
    "resize2fs",
    "e2fsck",
    "ssh",
    "ssh-keygen",
    "git",
    "tar",
)
OPTIONAL_TOOLS = ("mmdebstrap", "dmsetup", "lz4", "zstd", "losetup")
# The Debian/Ubuntu package each tool comes in, for the fix hints.
TOOL_PACKAGES = {
    "ip": "iproute2",
    "nft": "nftables",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "git": "git",
    "tar": "tar",
    "mmdebstrap": "mmdebstrap",
    "dmsetup": "dmsetup",
    "lz4": "lz4",
    "zstd": "zstd",
    "losetup": "mount",
}


def _install_hint(tools: list[str]) -> str:
    pkgs = " ".join(dict.fromkeys(TOOL_PACKAGES.get(t, t) for t in tools))
    return f"install them (Debian/Ubuntu: apt-get install {pkgs})"


@dataclass
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _which(name: str) -> str | None:
    if os.path.isabs(name):
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


async def _version_of(runner: Runner, binary: str) -> str | None:
    try:
        r = await runner.run([binary, "--version"], check=False, timeout=10)
    except Exception:
        return None
    return (r.out or r.err).strip().splitlines()[0] if (r.out or r.err).strip() else None


async def run_doctor(
    layout: Layout,
    config: Config,
    runner: Runner | None = None,
    daemon_status: Callable[[], dict[str, Any] | None] | None = None,
) -> list[Check]:
    """Run every host check. `daemon_status` returns the running daemon's status or None."""
    runner = runner or Runner()
    checks: list[Check] = []
    add = checks.append

    # KVM
    kvm_ok, kvm_msg = kvm_usable()
    nested = nested_virt()
    if kvm_ok and nested:
        add(
            Check(
                "kvm",
                "WARN",
                f"{kvm_msg}; but this host is itself a VM (cpuinfo "
                "'hypervisor' flag): nested KVM guests may fail or crawl, doctor cannot "
                "tell without booting one",
                'if KVM boots fail, set vmm = "qemu" (TCG, slower but works)',
            )
        )
    elif kvm_ok:
        add(Check("kvm", "PASS", kvm_msg))
    else:
        add(
            Check(
                "kvm",
                "WARN",
                kvm_msg,
                "enable virtualisation / load kvm_intel or kvm_amd and add yourself to "
                "group kvm; without it stoker uses QEMU TCG (slow)",
            )
        )

    # vsock
    if os.path.exists("/dev/vhost-vsock"):
        add(Check("vsock", "PASS", "/dev/vhost-vsock present"))
    else:
        add(
            Check(
                "vsock",
                "WARN",
                "/dev/vhost-vsock missing: QEMU guests use the "
                "virtio-serial agent channel instead (Firecracker has its own vsock)",
                "modprobe vhost_vsock (optional)",
            )
        )

    # tun
    if os.path.exists("/dev/net/tun"):
        add(Check("tun", "PASS", "/dev/net/tun present"))
    else:
        add(Check("tun", "FAIL", "/dev/net/tun missing: VMs cannot get a network", "modprobe tun"))

    # firecracker + jailer
    fc_path = _which(config.firecracker_bin)
    fc_ok = False
    if fc_path:
        line = await _version_of(runner, fc_path) or ""
        ver = _parse_version(line)
        if ver and FC_MIN <= ver < FC_MAX_EXCL:
            fc_ok = True
            add(
                Check(
                    "firecracker",
                    "PASS",
                    f"{fc_path}: {line} (tested range "
                    f"{'.'.join(map(str, FC_MIN))} to <{'.'.join(map(str, FC_MAX_EXCL))})",
                )
            )
        else:
            add(
                Check(
                    "firecracker",
                    "WARN",
                    f"{fc_path}: version {line or 'unknown'} is "
                    "outside the tested range 1.8 to <1.17",
                    "install Firecracker v1.12.x (set firecracker_bin in the config)",
                )
            )
    else:
        st: Status = "FAIL" if config.vmm == "firecracker" else "WARN"
        add(
            Check(
                "firecracker",
                st,
                f"{config.firecracker_bin!r} not found",
                "install Firecracker (static release binaries of firecracker and jailer) and "
                'set firecracker_bin, or use vmm = "qemu"',
            )
        )
    jl = _which(config.jailer_bin)
    if jl:
        add(Check("jailer", "PASS", f"{jl} found"))
    else:
        st = "FAIL" if config.use_jailer else "WARN"
        add(
            Check(
                "jailer",
                st,
                f"{config.jailer_bin!r} not found"
                + (" but use_jailer = true" if config.use_jailer else " (optional)"),
                "install the jailer next to firecracker, or set use_jailer = false",
            )
        )

    # qemu
    qp = _which(config.qemu_bin)
    qemu_ok = False
    if qp:
        line = await _version_of(runner, qp) or "unknown version"
        try:
            r = await runner.run([qp, "-machine", "help"], check=False, timeout=10)
            has_microvm = "microvm" in r.out
        except Exception:
            has_microvm = False
        if has_microvm:
            qemu_ok = True
            add(Check("qemu", "PASS", f"{qp}: {line}; machine 'microvm' available"))
        else:
            add(
                Check(
                    "qemu",
                    "FAIL",
                    f"{qp}: {line}; no 'microvm' machine",
                    "install a QEMU with microvm (Debian: qemu-system-x86)",
                )
            )
    else:
        st = "FAIL" if config.vmm == "qemu" else "WARN"
        add(Check("qemu", st, f"{config.qemu_bin!r} not found", "apt-get install qemu-system-x86"))

    from stoker.daemon.vmm.select import choose_accel, choose_vmm, kvm_boots_vouched

    untrusted = nested and not kvm_boots_vouched()
    vmm, why = choose_vmm(
        config.vmm, fc_path if fc_ok else None, qp if qemu_ok else None, kvm_ok, untrusted
    )
    if vmm == "qemu":
        accel, accel_why = choose_accel(kvm_ok, untrusted)
        why += f"; accel {accel} ({accel_why})"
    add(
        Check(
            "vmm",
            "FAIL" if vmm == "none" else "PASS",
            f"{vmm}: {why}",
            "" if vmm != "none" else "install qemu-system-x86 or firecracker",
        )
    )

    # host tools
    missing = [t for t in REQUIRED_TOOLS if not _which(t)]
    add(
        Check(
            "host-tools",
            "FAIL" if missing else "PASS",
            f"missing: {', '.join(missing)}" if missing else f"found {', '.join(REQUIRED_TOOLS)}",
            _install_hint(missing) if missing else "",
        )
    )
    opt_missing = [t for t in OPTIONAL_TOOLS if not _which(t)]
    add(
        Check(
            "optional-tools",
            "WARN" if opt_missing else "PASS",
            f"missing: {', '.join(opt_missing)}"
            if opt_missing
            else f"found {', '.join(OPTIONAL_TOOLS)}",
            _install_hint(opt_missing) + " (image build, kernel import)" if opt_missing else "",
        )
    )

    # nftables
    nft = _which("nft")
    if nft:
        r2 = await runner.run([nft, "list", "tables"], check=False, timeout=10)
        if r2.returncode == 0:
            add(Check("nftables", "PASS", "`nft list tables` works"))
        else:
            add(
                Check(
                    "nftables",
                    "FAIL",
                    f"`nft list tables` failed: {r2.err.strip()}",
                    "run stokerd as root (or with CAP_NET_ADMIN)",
                )
            )
    else:
        add(Check("nftables", "FAIL", "nft not found", "apt-get install nftables"))

    # device-mapper / loop
    dm = Path("/dev/mapper/control").exists() and "device-mapper" in _read("/proc/misc")
    add(
        Check(
            "device-mapper",
            "PASS" if dm else "WARN",
            "device-mapper available"
            if dm
            else "no device-mapper driver: root disks use the in-guest overlay (works with both "
            "VMMs)",
            "" if dm else "none needed",
        )
    )
    add(
        Check(
            "loop",
            "PASS" if Path("/dev/loop-control").exists() else "WARN",
            "/dev/loop-control present"
            if Path("/dev/loop-control").exists()
            else "/dev/loop-control missing",
            "",
        )
    )

    # bridge
    br = Path("/sys/class/net") / config.bridge_name
    add(
        Check(
            "bridge",
            "PASS",
            f"{config.bridge_name} exists ({config.bridge_cidr})"
            if br.exists()
            else f"{config.bridge_name} not created yet: made at the first VM start "
            f"({config.bridge_cidr})",
        )
    )
    fwd = _read("/proc/sys/net/ipv4/ip_forward").strip()
    add(
        Check(
            "nat",
            "PASS",
            f"ip_forward={fwd or '?'}; NAT is enabled per VM with --nat "
            "(rules in nft table 'stoker')",
        )
    )

    # daemon + DNS
    st_d = daemon_status() if daemon_status else None
    if st_d:
        add(
            Check(
                "daemon",
                "PASS",
                f"stokerd {st_d.get('version')} pid {st_d.get('pid')} on {st_d.get('socket')}",
            )
        )
        dns = (st_d.get("network") or {}).get("dns_listen")
        add(
            Check(
                "dns",
                "PASS" if dns else "WARN",
                f"NAME.vm served on {dns}" if dns else "daemon has no DNS listener",
                "" if dns else f"check dns_listen ({config.dns_listen}) is free",
            )
        )
    else:
        add(
            Check(
                "daemon",
                "WARN",
                "stokerd is not running",
                "any stoker command starts it (or systemctl start stokerd)",
            )
        )
        add(
            Check(
                "dns",
                "WARN",
                f"not checked: the daemon serves NAME.vm on {config.dns_listen} while it runs",
                "start the daemon",
            )
        )
    resolved = Path("/run/systemd/resolve").is_dir()
    add(
        Check(
            "resolver",
            "PASS" if resolved else "WARN",
            "systemd-resolved present: .vm is routed to stoker's DNS on the bridge link"
            if resolved
            else "no systemd-resolved: the host resolver does not know .vm",
            ""
            if resolved
            else f"query stoker's DNS directly (dig @{config.dns_listen.replace(':', ' -p ')} "
            "NAME.vm) or use IPs",
        )
    )

    # state store, default image/kernel
    images: dict[str, str | None] = {}
    kernels: set[str] = set()
    if layout.db_path.exists():
        try:
            conn = sqlite3.connect(f"file:{layout.db_path}?mode=ro", uri=True, timeout=2)
            try:
                v = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]
                images = dict(conn.execute("SELECT name, kernel FROM images").fetchall())
                kernels = {r[0] for r in conn.execute("SELECT name FROM kernels")}
            finally:
                conn.close()
            from stoker.store import SCHEMA_VERSION

            if v is not None and int(v) > SCHEMA_VERSION:
                add(
                    Check(
                        "state-store",
                        "FAIL",
                        f"{layout.db_path}: schema {v} is newer than "
                        f"this stoker ({SCHEMA_VERSION})",
                        "upgrade stoker",
                    )
                )
            else:
                add(Check("state-store", "PASS", f"{layout.db_path} opens (schema {v})"))
        except sqlite3.DatabaseError as e:
            add(
                Check(
                    "state-store",
                    "FAIL",
                    f"{layout.db_path}: {e}",
                    "move the file aside; stokerd starts with empty state",
                )
            )
    else:
        add(Check("state-store", "PASS", f"{layout.db_path} not created yet (made by stokerd)"))
    img = config.default_image
    if img in images:
        add(Check("default-image", "PASS", f"{img} present"))
        kref = images[img]
        add(
            Check(
                "default-kernel",
                "PASS" if kref in kernels else "FAIL",
                f"{kref} present" if kref in kernels else f"kernel {kref!r} missing",
                "" if kref in kernels else f"stoker kernel pull {kref}",
            )
        )
    else:
        add(
            Check(
                "default-image",
                "WARN",
                f"{img!r} not present (built on first `vm run`)",
                f"stoker image build {img}",
            )
        )
        add(
            Check(
                "default-kernel",
                "WARN",
                "comes with the default image",
                f"stoker image build {img}",
            )
        )

    # disk space
    try:
        target = layout.state_dir if layout.state_dir.exists() else layout.state_dir.parent
        while not target.exists():
            target = target.parent
        sv = os.statvfs(target)
        free = sv.f_bavail * sv.f_frsize
        gib = free / 1024**3
        status: Status = "PASS" if gib >= 10 else ("WARN" if gib >= 2 else "FAIL")
        add(
            Check(
                "disk-space",
                status,
                f"{gib:.1f} GiB free under {target}",
                "" if status == "PASS" else "free space: images need ~2 GiB each",
            )
        )
    except OSError as e:
        add(Check("disk-space", "WARN", f"cannot stat the state dir: {e.strerror}"))

    # VM defaults with provenance
    d = config.vm_defaults
    add(
        Check(
            "vm-defaults",
            "PASS",
            f"vcpu={d.vcpu.value} ({d.vcpu.source}), memory={d.memory_mib.value} MiB "
            f"({d.memory_mib.source}), disk={d.disk_size.value // 1024**3}G "
            f"({d.disk_size.source}), overlay={d.overlay_size.value // 1024**3}G "
            f"({d.overlay_size.source})",
        )
    )
    return checks


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def run_doctor_sync(
    layout: Layout, config: Config, daemon_status: Callable[[], dict[str, Any] | None] | None
) -> list[Check]:
    return asyncio.run(run_doctor(layout, config, daemon_status=daemon_status))
