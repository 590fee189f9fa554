"""`stoker doctor`: one function per check, each returning a `Check` (PASS/WARN/FAIL, what
it looked at, a one-line fix). Runs in the CLI process; it needs no daemon but asks one if
it runs.

Adding a check is one function here: decorate an `async def check_x(ctx: Context) -> Check`
with `@doctor_check`; checks run, and print, in the order they are defined. Facts several
checks need (the Firecracker and QEMU probes, the daemon's status, the state store) are
asked once through `Context`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from stoker.config import Config
from stoker.hostprobe.probes import (
    device_mapper_available,
    free_bytes_under,
    kvm_boots_vouched,
    kvm_usable,
    nested_virt,
    parse_version,
    qemu_has_microvm,
    read_text,
    version_line,
    which,
)
from stoker.hostprobe.vmm import FIRECRACKER, QEMU, backend, choose_accel, choose_vmm
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


@dataclass(frozen=True)
class Check:
    """One doctor line: `message` says what was looked at, `fix` what to do (not PASS)."""

    name: str
    status: Status
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BinaryProbe:
    """A VMM binary: where it is (None: not found), its `--version` line, and whether it
    is usable by stoker (Firecracker: tested version; QEMU: has `microvm`)."""

    path: str | None
    version: str
    usable: bool


@dataclass(frozen=True)
class StoreProbe:
    """The state store, read-only: its schema version (None: no file), or why it failed."""

    exists: bool
    schema: int | None = None
    error: str = ""
    images: dict[str, str | None] = field(default_factory=dict)
    kernels: frozenset[str] = frozenset()


@dataclass
class Context:
    """What the checks read: the layout, config and runner, and facts asked only once."""

    layout: Layout
    config: Config
    runner: Runner
    daemon_status: Callable[[], dict[str, Any] | None] | None = None
    _memo: dict[str, Any] = field(default_factory=dict)

    def kvm(self) -> tuple[bool, str]:
        if "kvm" not in self._memo:
            self._memo["kvm"] = kvm_usable()
        ok_msg: tuple[bool, str] = self._memo["kvm"]
        return ok_msg

    def nested(self) -> bool:
        if "nested" not in self._memo:
            self._memo["nested"] = nested_virt()
        return bool(self._memo["nested"])

    async def firecracker(self) -> BinaryProbe:
        if "fc" not in self._memo:
            path = which(self.config.firecracker_bin)
            line = (await version_line(self.runner, path) or "") if path else ""
            ver = parse_version(line)
            ok = path is not None and ver is not None and FC_MIN <= ver < FC_MAX_EXCL
            self._memo["fc"] = BinaryProbe(path, line, ok)
        probe: BinaryProbe = self._memo["fc"]
        return probe

    async def qemu(self) -> BinaryProbe:
        if "qemu" not in self._memo:
            path = which(self.config.qemu_bin)
            line, ok = "", False
            if path:
                line = await version_line(self.runner, path) or "unknown version"
                ok = await qemu_has_microvm(self.runner, path)
            self._memo["qemu"] = BinaryProbe(path, line, ok)
        probe: BinaryProbe = self._memo["qemu"]
        return probe

    def daemon(self) -> dict[str, Any] | None:
        """The running daemon's status (asked once), None when none runs."""
        if "daemon" not in self._memo:
            self._memo["daemon"] = self.daemon_status() if self.daemon_status else None
        st: dict[str, Any] | None = self._memo["daemon"]
        return st

    def store(self) -> StoreProbe:
        if "store" not in self._memo:
            self._memo["store"] = _read_store(self.layout.db_path)
        probe: StoreProbe = self._memo["store"]
        return probe


CheckFn = Callable[[Context], Awaitable[Check]]
# Every check, in the order doctor runs and prints them (definition order below).
CHECKS: list[CheckFn] = []


def doctor_check(fn: CheckFn) -> CheckFn:
    """Register a check: it runs after those defined before it."""
    CHECKS.append(fn)
    return fn


async def run_doctor(
    layout: Layout,
    config: Config,
    runner: Runner | None = None,
    daemon_status: Callable[[], dict[str, Any] | None] | None = None,
    checks: list[CheckFn] | None = None,
) -> list[Check]:
    """Run every check (or `checks`). `daemon_status` returns the running daemon's status or
    None."""
    ctx = Context(layout, config, runner or Runner(), daemon_status)
    return [await check(ctx) for check in (CHECKS if checks is None else checks)]


def run_doctor_sync(
    layout: Layout, config: Config, daemon_status: Callable[[], dict[str, Any] | None] | None
) -> list[Check]:
    return asyncio.run(run_doctor(layout, config, daemon_status=daemon_status))


def _install_hint(tools: list[str]) -> str:
    pkgs = " ".join(dict.fromkeys(TOOL_PACKAGES.get(t, t) for t in tools))
    return f"install them (Debian/Ubuntu: apt-get install {pkgs})"


def _read_store(db_path: Path) -> StoreProbe:
    if not db_path.exists():
        return StoreProbe(exists=False)
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=2)
        try:
            v = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]
            images = dict(conn.execute("SELECT name, kernel FROM images").fetchall())
            kernels = frozenset(r[0] for r in conn.execute("SELECT name FROM kernels"))
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return StoreProbe(exists=True, error=str(e))
    return StoreProbe(True, None if v is None else int(v), "", images, kernels)


# --- the checks, in output order ---------------------------------------------------------


@doctor_check
async def check_kvm(ctx: Context) -> Check:
    kvm_ok, kvm_msg = ctx.kvm()
    if kvm_ok and ctx.nested():
        return Check(
            "kvm",
            "WARN",
            f"{kvm_msg}; but this host is itself a VM (cpuinfo "
            "'hypervisor' flag): nested KVM guests may fail or crawl, doctor cannot "
            "tell without booting one",
            'if KVM boots fail, set vmm = "qemu" (TCG, slower but works)',
        )
    if kvm_ok:
        return Check("kvm", "PASS", kvm_msg)
    return Check(
        "kvm",
        "WARN",
        kvm_msg,
        "enable virtualisation / load kvm_intel or kvm_amd and add yourself to "
        "group kvm; without it stoker uses QEMU TCG (slow)",
    )


@doctor_check
async def check_vsock(ctx: Context) -> Check:
    if os.path.exists("/dev/vhost-vsock"):
        return Check("vsock", "PASS", "/dev/vhost-vsock present")
    return Check(
        "vsock",
        "WARN",
        "/dev/vhost-vsock missing: QEMU guests use the "
        "virtio-serial agent channel instead (Firecracker has its own vsock)",
        "modprobe vhost_vsock (optional)",
    )


@doctor_check
async def check_tun(ctx: Context) -> Check:
    if os.path.exists("/dev/net/tun"):
        return Check("tun", "PASS", "/dev/net/tun present")
    return Check("tun", "FAIL", "/dev/net/tun missing: VMs cannot get a network", "modprobe tun")


@doctor_check
async def check_firecracker(ctx: Context) -> Check:
    fc = await ctx.firecracker()
    if fc.usable:
        return Check(
            "firecracker",
            "PASS",
            f"{fc.path}: {fc.version} (tested range "
            f"{'.'.join(map(str, FC_MIN))} to <{'.'.join(map(str, FC_MAX_EXCL))})",
        )
    if fc.path:
        return Check(
            "firecracker",
            "WARN",
            f"{fc.path}: version {fc.version or 'unknown'} is outside the tested range 1.8 to "
            "<1.17",
            "install Firecracker v1.12.x (set firecracker_bin in the config)",
        )
    return Check(
        "firecracker",
        "FAIL" if backend(ctx.config.vmm) is FIRECRACKER else "WARN",
        f"{ctx.config.firecracker_bin!r} not found",
        "install Firecracker (static release binaries of firecracker and jailer) and "
        'set firecracker_bin, or use vmm = "qemu"',
    )


@doctor_check
async def check_jailer(ctx: Context) -> Check:
    """Where the jailer is (next to firecracker, else on PATH) and whether it is used."""
    from stoker.hostprobe.confine import find_jailer

    fc = await ctx.firecracker()
    jl = find_jailer(fc.path, ctx.config.jailer_bin)
    use = ctx.config.use_jailer
    if jl:
        how = "not used: use_jailer = false" if use is False else "used for Firecracker"
        return Check("jailer", "PASS", f"{jl} found ({how})")
    return Check(
        "jailer",
        "FAIL" if use is True else "WARN",
        f"{ctx.config.jailer_bin!r} not found next to firecracker or on PATH"
        + (" but use_jailer = true" if use is True else ": Firecracker would run unjailed"),
        "install the jailer next to firecracker (the release tarball has both), "
        "or set use_jailer = false",
    )


@doctor_check
async def check_qemu(ctx: Context) -> Check:
    q = await ctx.qemu()
    if q.usable:
        return Check("qemu", "PASS", f"{q.path}: {q.version}; machine 'microvm' available")
    if q.path:
        return Check(
            "qemu",
            "FAIL",
            f"{q.path}: {q.version}; no 'microvm' machine",
            "install a QEMU with microvm (Debian: qemu-system-x86)",
        )
    return Check(
        "qemu",
        "FAIL" if backend(ctx.config.vmm) is QEMU else "WARN",
        f"{ctx.config.qemu_bin!r} not found",
        "apt-get install qemu-system-x86",
    )


@doctor_check
async def check_vmm(ctx: Context) -> Check:
    """The VMM the daemon would pick (the same `choose_vmm` it uses), and why."""
    fc, q = await ctx.firecracker(), await ctx.qemu()
    kvm_ok, _ = ctx.kvm()
    untrusted = ctx.nested() and not kvm_boots_vouched()
    vmm, why = choose_vmm(
        ctx.config.vmm,
        fc.path if fc.usable else None,
        q.path if q.usable else None,
        kvm_ok,
        untrusted,
    )
    chosen = backend(vmm)
    if chosen is not None and chosen.has_accel:
        accel, accel_why = choose_accel(kvm_ok, untrusted)
        why += f"; accel {accel} ({accel_why})"
    return Check(
        "vmm",
        "FAIL" if vmm == "none" else "PASS",
        f"{vmm}: {why}",
        "" if vmm != "none" else "install qemu-system-x86 or firecracker",
    )


@doctor_check
async def check_confinement(ctx: Context) -> Check:
    """What confinement a QEMU started by this host's stokerd gets, and why a part is off."""
    from dataclasses import replace

    from stoker.hostprobe.confine import plan

    q = await ctx.qemu()
    if not q.usable or not q.path:
        return Check("confinement", "WARN", "not checked: no usable QEMU", "")
    user = ctx.config.vmm_user
    c = await asyncio.to_thread(plan, q.path, user=user)
    off = dict(c.off)
    note = ""
    if os.geteuid() == 0 and c.pending_user is not None:
        # A root stokerd creates the user at its first QEMU start: not a problem.
        off.pop("user", None)
        note = f"; user {user} is created at the first VM start"
    fixes = {
        "sandbox": "install a QEMU built with seccomp (Debian's is)",
        "user": "run stokerd as root (the system install does)",
        "cgroup": "run stokerd as root with cgroup memory and cpu controllers mounted",
        "mountns": "install util-linux's unshare (as a non-root stokerd: allow user namespaces)",
    }
    return Check(
        "confinement",
        "WARN" if off else "PASS",
        f"QEMU: {replace(c, off=off).describe()}{note}",
        "; ".join(fixes[k] for k in off if k in fixes),
    )


@doctor_check
async def check_fc_confinement(ctx: Context) -> Check:
    """What confinement a Firecracker started by this host's stokerd gets (the jailer,
    its user, cgroup limits), and why a part is off: the plan the daemon makes."""
    from stoker.hostprobe.confine import plan_firecracker

    fc = await ctx.firecracker()
    if not fc.path:
        return Check("fc-confinement", "WARN", "not checked: no Firecracker", "")
    c = await asyncio.to_thread(
        plan_firecracker,
        fc.path,
        ctx.config.jailer_bin,
        ctx.config.use_jailer,
        user=ctx.config.vmm_user,
    )
    off = dict(c.off)
    note = ""
    if os.geteuid() == 0 and c.pending_user is not None:
        off.pop("user", None)
        note = f"; user {ctx.config.vmm_user} is created at the first VM start"
    if ctx.config.use_jailer is False:
        # Asked for: not a problem to fix, but said.
        return Check("fc-confinement", "WARN", f"Firecracker: {c.describe()}", "")
    fixes = {
        "jailer": "install the jailer next to firecracker and run stokerd as root",
        "user": "run stokerd as root (it creates the VMM user)",
        "cgroup": "run stokerd as root with cgroup memory and cpu controllers mounted",
    }
    from dataclasses import replace

    return Check(
        "fc-confinement",
        "WARN" if off else "PASS",
        f"Firecracker: {replace(c, off=off).describe()}{note}",
        "; ".join(fixes[k] for k in off if k in fixes),
    )


@doctor_check
async def check_host_tools(ctx: Context) -> Check:
    missing = [t for t in REQUIRED_TOOLS if not which(t)]
    return Check(
        "host-tools",
        "FAIL" if missing else "PASS",
        f"missing: {', '.join(missing)}" if missing else f"found {', '.join(REQUIRED_TOOLS)}",
        _install_hint(missing) if missing else "",
    )


@doctor_check
async def check_optional_tools(ctx: Context) -> Check:
    missing = [t for t in OPTIONAL_TOOLS if not which(t)]
    return Check(
        "optional-tools",
        "WARN" if missing else "PASS",
        f"missing: {', '.join(missing)}" if missing else f"found {', '.join(OPTIONAL_TOOLS)}",
        _install_hint(missing) + " (image build, kernel import)" if missing else "",
    )


@doctor_check
async def check_nftables(ctx: Context) -> Check:
    nft = which("nft")
    if not nft:
        return Check("nftables", "FAIL", "nft not found", "apt-get install nftables")
    r = await ctx.runner.run([nft, "list", "tables"], check=False, timeout=10)
    if r.returncode == 0:
        return Check("nftables", "PASS", "`nft list tables` works")
    return Check(
        "nftables",
        "FAIL",
        f"`nft list tables` failed: {r.err.strip()}",
        "run stokerd as root (or with CAP_NET_ADMIN)",
    )


@doctor_check
async def check_device_mapper(ctx: Context) -> Check:
    if device_mapper_available():
        return Check("device-mapper", "PASS", "device-mapper available", "")
    return Check(
        "device-mapper",
        "WARN",
        "no device-mapper driver: root disks use the in-guest overlay (works with both VMMs)",
        "none needed",
    )


@doctor_check
async def check_loop(ctx: Context) -> Check:
    if Path("/dev/loop-control").exists():
        return Check("loop", "PASS", "/dev/loop-control present")
    return Check("loop", "WARN", "/dev/loop-control missing")


@doctor_check
async def check_bridge(ctx: Context) -> Check:
    name, cidr = ctx.config.bridge_name, ctx.config.bridge_cidr
    if (Path("/sys/class/net") / name).exists():
        return Check("bridge", "PASS", f"{name} exists ({cidr})")
    return Check("bridge", "PASS", f"{name} not created yet: made at the first VM start ({cidr})")


@doctor_check
async def check_network_policy(ctx: Context) -> Check:
    fwd = read_text("/proc/sys/net/ipv4/ip_forward").strip()
    st = ctx.daemon()
    policies = ((st or {}).get("network") or {}).get("policies")
    live = ""
    if isinstance(policies, dict):
        modes: dict[str, int] = {}
        for p in policies.values():
            mode = str(p).split(",", 1)[0].split("=", 1)[0]
            modes[mode] = modes.get(mode, 0) + 1
        live = "; running VMs: " + (
            ", ".join(f"{n} {m}" for m, n in sorted(modes.items())) if modes else "none"
        )
    return Check(
        "network-policy",
        "PASS",
        "per VM --net, default host-only (the guest reaches stoker's DNS on the bridge "
        "address and nothing else on the host or outside; guests cannot reach each other); "
        "none | nat | allow=HOST[:PORT],... ; ,peers[=GROUP] for guest-to-guest; rules in "
        f"nft tables inet/bridge 'stoker'{live}; ip_forward={fwd or '?'} (turned on for "
        "the first nat/allow= VM)",
    )


def _socket_desc(path: Path) -> str:
    """'mode 0666, root:root' of a socket (or why not)."""
    import grp
    import pwd
    import stat

    try:
        st = os.lstat(path)
    except OSError as e:
        return f"missing ({e.strerror})"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    kind = "" if stat.S_ISSOCK(st.st_mode) else ", not a socket"
    return f"mode {stat.S_IMODE(st.st_mode):04o}, {owner}:{group}{kind}"


@doctor_check
async def check_helper(ctx: Context) -> Check:
    """stoker-helper, the root helper of a stokerd that is not root: installed, reachable,
    its socket's owner (root) and mode (it checks callers itself: SO_PEERCRED)."""
    import stat

    from stoker.helper.config import DEFAULT_CONFIG

    sock = Path(ctx.config.helper_socket)
    cfg = ctx.layout.config_dir / "helper.toml" if ctx.layout.system else DEFAULT_CONFIG
    installed = cfg.is_file()
    st = ctx.daemon()
    net = (st or {}).get("network") or {}
    used = net.get("helper") if st else None
    try:
        sst = os.lstat(sock)
        sock_ok = stat.S_ISSOCK(sst.st_mode) and sst.st_uid == 0
    except OSError:
        sst, sock_ok = None, False
    where = f"socket {sock} ({_socket_desc(sock)}), config {cfg}" + (
        "" if installed else " (missing)"
    )
    if sst is not None and not sock_ok:
        return Check(
            "helper",
            "FAIL",
            f"{sock} is not a socket owned by root: {where}",
            "remove it and restart stoker-helper (only root's helper may own that path)",
        )
    if st and used is None:
        extra = f"; installed: {where}" if installed or sst is not None else ""
        return Check(
            "helper",
            "PASS",
            "not used: stokerd runs as root and makes bridge, taps and rules itself" + extra,
        )
    if st and isinstance(used, dict):
        if used.get("error"):
            return Check(
                "helper",
                "FAIL",
                f"stokerd cannot use stoker-helper: {used['error']} ({where})",
                "start it (systemctl start stoker-helper) and check that its config names "
                "stokerd's user (stoker system install writes both)",
            )
        return Check("helper", "PASS", f"stokerd uses stoker-helper: {where}")
    if not installed and sst is None:
        return Check(
            "helper",
            "PASS",
            "not installed: a stokerd running as root needs none "
            "(`stoker system install` sets it up for use without root)",
        )
    if sst is None:
        return Check(
            "helper",
            "WARN",
            f"installed but not running: {where}",
            "systemctl start stoker-helper",
        )
    return Check("helper", "PASS", f"running (stokerd not checked: not running): {where}")


@doctor_check
async def check_daemon(ctx: Context) -> Check:
    st = ctx.daemon()
    if st:
        return Check(
            "daemon",
            "PASS",
            f"stokerd {st.get('version')} pid {st.get('pid')} on {st.get('socket')}",
        )
    return Check(
        "daemon",
        "WARN",
        "stokerd is not running",
        "any stoker command starts it (or systemctl start stokerd)",
    )


@doctor_check
async def check_pool(ctx: Context) -> Check:
    """The warm pool: what `[pool]` asks for, and (from the daemon) what is ready."""
    sizes = ctx.config.pool.sizes(ctx.config.default_image)
    if not sizes:
        return Check("pool", "PASS", "no warm pool ([pool] size = 0): every VM boots cold", "")
    st = ctx.daemon()
    if not st:
        want = ", ".join(f"{k} x{v}" for k, v in sizes.items())
        return Check("pool", "WARN", f"not checked: the daemon is not running ({want})", "")
    parts, bad, hint = [], False, ""
    for p in st.get("pool", []):
        part = f"{p['image']} {p['ready']}/{p['size']} ready"
        if p.get("strategy"):
            part += f" ({p['strategy']})"
        if p.get("filling"):
            part += ", filling"
        if p.get("fallback") and "failed" in p["fallback"]:
            part += f"; not from a template: {p['fallback']}"
        if p.get("waiting"):
            part += f" ({p['waiting']})"
        if p.get("last_error"):
            bad = True
            part += f"; {p['failures']} failed fill(s), last: {p['last_error']}"
            hint = "see `stoker pool status` and stokerd's log"
        parts.append(part)
    return Check("pool", "WARN" if bad else "PASS", "; ".join(parts) or "empty", hint)


@doctor_check
async def check_dns(ctx: Context) -> Check:
    st = ctx.daemon()
    listen = ctx.config.dns_listen
    if not st:
        return Check(
            "dns",
            "WARN",
            f"not checked: the daemon serves NAME.vm on {listen} while it runs",
            "start the daemon",
        )
    dns = (st.get("network") or {}).get("dns_listen")
    if dns:
        return Check("dns", "PASS", f"NAME.vm served on {dns}")
    return Check(
        "dns", "WARN", "daemon has no DNS listener", f"check dns_listen ({listen}) is free"
    )


@doctor_check
async def check_guest_dns(ctx: Context) -> Check:
    st = ctx.daemon()
    if not st:
        return Check("guest-dns", "WARN", "not checked: the daemon is not running", "")
    netst = st.get("network") or {}
    gdns, gerr = netst.get("guest_dns"), netst.get("guest_dns_error")
    pols = netst.get("policies") or {}
    if gerr:
        return Check("guest-dns", "FAIL", gerr, f"free port 53 on {ctx.config.gateway_ip}")
    if gdns:
        return Check(
            "guest-dns", "PASS", f"guests' nameserver on {gdns}; {len(pols)} VM(s) with rules"
        )
    return Check("guest-dns", "PASS", "starts with the bridge (first VM start)")


@doctor_check
async def check_resolver(ctx: Context) -> Check:
    if Path("/run/systemd/resolve").is_dir():
        return Check(
            "resolver",
            "PASS",
            "systemd-resolved present: .vm is routed to stoker's DNS on the bridge link",
        )
    return Check(
        "resolver",
        "WARN",
        "no systemd-resolved: the host resolver does not know .vm",
        f"query stoker's DNS directly (dig @{ctx.config.dns_listen.replace(':', ' -p ')} "
        "NAME.vm) or use IPs",
    )


@doctor_check
async def check_state_store(ctx: Context) -> Check:
    from stoker.store import SCHEMA_VERSION

    db, s = ctx.layout.db_path, ctx.store()
    if not s.exists:
        return Check("state-store", "PASS", f"{db} not created yet (made by stokerd)")
    if s.error:
        return Check(
            "state-store",
            "FAIL",
            f"{db}: {s.error}",
            "move the file aside; stokerd starts with empty state",
        )
    if s.schema is not None and s.schema > SCHEMA_VERSION:
        return Check(
            "state-store",
            "FAIL",
            f"{db}: schema {s.schema} is newer than this stoker ({SCHEMA_VERSION})",
            "upgrade stoker",
        )
    return Check("state-store", "PASS", f"{db} opens (schema {s.schema})")


@doctor_check
async def check_default_image(ctx: Context) -> Check:
    img = ctx.config.default_image
    if img in ctx.store().images:
        return Check("default-image", "PASS", f"{img} present")
    return Check(
        "default-image",
        "WARN",
        f"{img!r} not present (built on first `vm run`)",
        f"stoker image build {img}",
    )


@doctor_check
async def check_default_kernel(ctx: Context) -> Check:
    img, s = ctx.config.default_image, ctx.store()
    if img not in s.images:
        return Check(
            "default-kernel", "WARN", "comes with the default image", f"stoker image build {img}"
        )
    kref = s.images[img]
    if kref in s.kernels:
        return Check("default-kernel", "PASS", f"{kref} present")
    return Check("default-kernel", "FAIL", f"kernel {kref!r} missing", f"stoker kernel pull {kref}")


@doctor_check
async def check_disk_space(ctx: Context) -> Check:
    try:
        target, free = free_bytes_under(ctx.layout.state_dir)
    except OSError as e:
        return Check("disk-space", "WARN", f"cannot stat the state dir: {e.strerror}")
    gib = free / 1024**3
    status: Status = "PASS" if gib >= 10 else ("WARN" if gib >= 2 else "FAIL")
    return Check(
        "disk-space",
        status,
        f"{gib:.1f} GiB free under {target}",
        "" if status == "PASS" else "free space: images need ~2 GiB each",
    )


@doctor_check
async def check_vm_defaults(ctx: Context) -> Check:
    """The defaults a new VM gets, each with where it came from."""
    d = ctx.config.vm_defaults
    return Check(
        "vm-defaults",
        "PASS",
        f"vcpu={d.vcpu.value} ({d.vcpu.source}), memory={d.memory_mib.value} MiB "
        f"({d.memory_mib.source}), disk={d.disk_size.value // 1024**3}G "
        f"({d.disk_size.source}), overlay={d.overlay_size.value // 1024**3}G "
        f"({d.overlay_size.source})",
    )
