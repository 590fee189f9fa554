"""Confinement of the QEMU process: unprivileged user, seccomp sandbox, cgroup limits.

This module (a host probe: standard library only, no daemon import, so `stoker doctor`
can ask it) plans the confinement and makes the cgroups; `daemon.vmm.confine` adds the
descriptor hand-over the QEMU driver uses.

What a confined QEMU looks like (`QemuDriver(confine=plan(...))`):

- It is started as the system user `stoker-vmm` (created by stoker the first time a root
  daemon needs it: `useradd --system`, no home, no shell), through `setpriv` with no
  supplementary groups (but `kvm` when it uses /dev/kvm), no capabilities and
  no_new_privs. It never runs as root, so QEMU's `-runas` (which needs set*id calls) is not
  used, and `-sandbox ... elevateprivileges=deny` can be on.
- Everything it needs is opened by the daemon and handed over as file descriptors: disks
  and the serial log through `-add-fd` fd sets (`/dev/fdset/N`), the tap already attached
  (`-netdev tap,fd=N`), QMP and the agent channel as listening sockets (`fd=N`), kernel and
  initrd through `/proc/self/fd/N` (a copy in a memfd when the file is not world-readable).
  QEMU opens no host path by name, so the VM directory stays root-only; the daemon writes
  the pidfile itself.
- `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny`:
  seccomp mode 2; a forbidden call kills QEMU (SIGSYS) and the VM fails, not the host.
- Its own cgroup `stoker-vms/<vm id>` (v1: in the memory and cpu hierarchies under the
  daemon's own cgroups; v2: under the root, with the memory and cpu controllers), joined
  before QEMU is exec'd: memory limit = guest RAM + overhead, CPU quota = vCPUs + half a
  core for QEMU's own threads.

- Its own mount namespace (`unshare --mount`; a stokerd that is not root makes it inside a
  user namespace, `--user --map-current-user --keep-caps`, then drops those capabilities)
  with empty private tmpfs on /tmp, /var/tmp and /dev/shm and stoker's state directory
  (every VM's disks, images, keys, the database) covered by an empty read-only tmpfs.
  QEMU opens no path there by name, so it loses nothing; what it could reach by a bug is
  the rest of the host's files its user may read. Only with the hand-over (`fds`): a
  root QEMU that opens its files by path keeps the host's view.

Each part is on when this host allows it; `plan()` records why a part is off, and
`stoker doctor` prints it. Firecracker's confinement is the jailer (`plan_firecracker`,
`JailPlan`, at the end): by default whenever the jailer is found and stokerd is root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

VMM_USER = "stoker-vmm"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "stoker-vms"
MiB = 1024 * 1024
# QEMU's own memory beyond guest RAM: TCG's translation cache is the big part.
OVERHEAD_MIB = {"tcg": 512, "kvm": 256}
CPU_PERIOD_US = 100_000
_VM_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def memory_limit(memory_mib: int, accel: str) -> int:
    """Bytes QEMU's cgroup may use for a guest with `memory_mib` of RAM."""
    return (memory_mib + OVERHEAD_MIB.get(accel, OVERHEAD_MIB["tcg"])) * MiB


def cpu_quota_us(vcpu: int) -> int:
    """CFS quota per CPU_PERIOD_US: the vCPUs plus half a core for QEMU's main loop."""
    return vcpu * CPU_PERIOD_US + CPU_PERIOD_US // 2


@dataclass(frozen=True)
class Cgroups:
    """Where per-VM cgroups go: v2 (one dir) or v1 (memory and cpu hierarchies)."""

    version: int
    parents: dict[str, Path]  # controller ("memory", "cpu"; v2: "unified") -> parent dir

    def dirs(self, vm_id: str) -> dict[str, Path]:
        if not _VM_ID.match(vm_id):
            raise ValueError(f"{vm_id!r} cannot name a cgroup")
        return {c: p / vm_id for c, p in self.parents.items()}

    def create(self, vm_id: str, memory_bytes: int, vcpu: int) -> list[Path]:
        """Make the VM's cgroup(s) with their limits; the `cgroup.procs` files to join."""
        procs = []
        for ctrl, d in self.dirs(vm_id).items():
            d.parent.mkdir(exist_ok=True)
            if self.version == 2:
                _enable_v2(d.parent)
            d.mkdir(exist_ok=True)
            quota = cpu_quota_us(vcpu)
            if self.version == 2:
                (d / "memory.max").write_text(f"{memory_bytes}\n")
                (d / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}\n")
            elif ctrl == "memory":
                (d / "memory.limit_in_bytes").write_text(f"{memory_bytes}\n")
            elif ctrl == "cpu":
                (d / "cpu.cfs_period_us").write_text(f"{CPU_PERIOD_US}\n")
                (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
            procs.append(d / "cgroup.procs")
        return procs

    def remove(self, vm_id: str) -> None:
        """Remove the VM's cgroup(s) once no process is left in them (else kept), and the
        `stoker-vms` parent when no other VM's cgroup is in it."""
        for d in self.dirs(vm_id).values():
            for x in (d, d.parent):
                with contextlib.suppress(OSError):
                    x.rmdir()


def _enable_v2(parent: Path) -> None:
    ctl = parent / "cgroup.subtree_control"
    with contextlib.suppress(OSError):
        have = ctl.read_text().split()
        want = [f"+{c}" for c in ("memory", "cpu") if c not in have]
        if want:
            ctl.write_text(" ".join(want) + "\n")


def _own_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for ctrl in parts[1].split(",") if parts[1] else ["unified"]:
            out[ctrl] = parts[2]
    return out


def find_cgroups(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> tuple[Cgroups | None, str]:
    """The per-VM cgroup layout this host supports, or None and why not."""
    own = _own_paths(proc_cgroup)
    if (root / "cgroup.controllers").is_file():
        try:
            ctrls = (root / "cgroup.controllers").read_text().split()
        except OSError as e:
            return None, f"cannot read {root}/cgroup.controllers: {e.strerror}"
        missing = [c for c in ("memory", "cpu") if c not in ctrls]
        if missing:
            return None, f"cgroup v2 without the {' and '.join(missing)} controller"
        if not os.access(root, os.W_OK):
            return None, f"{root} is not writable (run stokerd as root)"
        return Cgroups(2, {"unified": root / CGROUP_PARENT}), "cgroup v2 (memory, cpu)"
    parents: dict[str, Path] = {}
    for ctrl in ("memory", "cpu"):
        mount = root / ctrl
        if not mount.is_dir():
            return None, f"no cgroup v1 {ctrl} hierarchy at {mount}"
        base = mount / own.get(ctrl, "/").lstrip("/")
        if not os.access(base, os.W_OK):
            return None, f"{base} is not writable (run stokerd as root)"
        parents[ctrl] = base / CGROUP_PARENT
    return Cgroups(1, parents), "cgroup v1 (memory, cpu)"


@dataclass(frozen=True)
class Confinement:
    """What a QEMU start applies; `off` says why a part is not applied."""

    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    kvm_gid: int | None = None
    sandbox: bool = False
    cgroups: Cgroups | None = None
    setpriv: str = "setpriv"
    off: dict[str, str] = field(default_factory=dict)
    pending_user: str | None = None  # to create (root) at the first QEMU start
    mountns: str | None = None  # "root" (unshare --mount) or "user" (inside a user ns)
    unshare: str = "unshare"

    def with_pending_user(self) -> Confinement:
        """Create the pending user now (the first QEMU start); a copy that uses it, or
        that says why it could not."""
        if self.pending_user is None:
            return self
        pw, why = ensure_user(self.pending_user)
        off = {k: v for k, v in self.off.items() if k != "user"}
        if pw is None or pw.pw_uid == 0:
            off["user"] = why or f"user {self.pending_user} is root"
            return replace(self, pending_user=None, off=off)
        return replace(
            self,
            user=self.pending_user,
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            pending_user=None,
            off=off,
        )

    @property
    def fds(self) -> bool:
        """Files are handed over as descriptors (needed when QEMU is not root: confined,
        or started by a stokerd that is not root itself)."""
        return self.uid is not None or os.geteuid() != 0

    def describe(self) -> str:
        on = []
        if self.user is not None:
            on.append(f"runs as {self.user} (uid {self.uid})")
        if self.sandbox:
            on.append("seccomp -sandbox on")
        if self.cgroups is not None:
            on.append(f"cgroup v{self.cgroups.version} memory+cpu limits")
        if self.mountns is not None and (self.fds or self.pending_user is not None):
            how = " (in a user namespace)" if self.mountns == "user" else ""
            on.append(f"own mount namespace{how}")
        off = [f"{k} off: {v}" for k, v in self.off.items()]
        return "; ".join(on + off) or "not confined"


def qemu_has_sandbox(qemu_bin: str) -> tuple[bool, str]:
    """Whether this QEMU was built with seccomp (-sandbox)."""
    try:
        r = subprocess.run([qemu_bin, "-help"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot run {qemu_bin} -help: {e}"
    if "-sandbox" in r.stdout:
        return True, ""
    return False, f"{qemu_bin} was built without seccomp (no -sandbox)"


def ensure_user(name: str) -> tuple[pwd.struct_passwd | None, str]:
    """The system user QEMU runs as, created (`useradd --system`) when missing."""
    if not _USER.match(name):
        return None, f"{name!r} is not a valid user name"
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name), ""
    if os.geteuid() != 0:
        return None, f"user {name} does not exist and only root can create it"
    useradd = shutil.which("useradd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if useradd is None:
        return None, f"user {name} does not exist and useradd is not installed"
    r = subprocess.run(
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "stoker VMM (QEMU runs as this user)",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0 and "already exists" not in r.stderr:
        return None, f"useradd {name} failed: {r.stderr.strip()}"
    try:
        return pwd.getpwnam(name), ""
    except KeyError:
        return None, f"user {name} still missing after useradd"


def plan(
    qemu_bin: str,
    *,
    user: str = VMM_USER,
    create_user: bool = True,
    accel: str = "tcg",
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> Confinement:
    """Find out which parts of the confinement this host allows; never raises. A missing
    user is left pending when `create_user` (root creates it at the first QEMU start,
    `with_pending_user`), so building a driver changes nothing on the host."""
    off: dict[str, str] = {}
    ok, why = qemu_has_sandbox(qemu_bin)
    if not ok:
        off["sandbox"] = why
    uid = gid = kvm_gid = None
    pending = None
    setpriv = shutil.which("setpriv") or ""
    if os.geteuid() != 0:
        off["user"] = "stokerd is not root: QEMU runs as the daemon's own user"
    elif not setpriv:
        off["user"] = "setpriv is not installed (util-linux)"
    else:
        pw = _lookup(user)
        if pw is None and create_user and _USER.match(user):
            pending = user
            off["user"] = f"user {user} does not exist yet: created at the first VM start"
        elif pw is None:
            off["user"] = f"user {user} does not exist"
        elif pw.pw_uid == 0:
            off["user"] = f"user {user} is root"
        else:
            uid, gid = pw.pw_uid, pw.pw_gid
            if accel == "kvm":
                with contextlib.suppress(OSError):
                    kvm_gid = os.stat("/dev/kvm").st_gid
    cg, why = find_cgroups(cgroup_root, proc_cgroup)
    if cg is None:
        off["cgroup"] = why
    unshare = shutil.which("unshare") or ""
    mountns, why = mountns_mode(unshare)
    if mountns is None:
        off["mountns"] = why
    return Confinement(
        user=user if uid is not None else None,
        uid=uid,
        gid=gid,
        kvm_gid=kvm_gid,
        sandbox=ok,
        cgroups=cg,
        setpriv=setpriv or "setpriv",
        off=off,
        pending_user=pending,
        mountns=mountns,
        unshare=unshare or "unshare",
    )


_MOUNT_SCRIPT = (  # the hidden dirs first: one may be below /tmp
    "set -e; "
    'while [ "$1" != -- ]; do '
    'mount -t tmpfs -o mode=0555,size=4k,nosuid,nodev,noexec stoker-hidden "$1"; shift; done; '
    "shift; "
    'for d in /tmp /var/tmp /dev/shm; do if [ -d "$d" ]; then '
    'mount -t tmpfs -o mode=1777,size=16m,nosuid,nodev stoker-tmp "$d"; fi; done; '
    'exec "$@"'
)


def _userns_argv(unshare: str) -> list[str]:
    return [unshare, "--user", "--map-current-user", "--keep-caps", "--mount"]


def mountns_mode(unshare: str) -> tuple[str | None, str]:
    """How this process can give QEMU its own mount namespace: "root" (it may unshare one
    itself), "user" (inside a user namespace it makes), or None and why not."""
    if not unshare:
        return None, "unshare is not installed (util-linux)"
    if os.geteuid() == 0:
        return "root", ""
    try:
        r = subprocess.run(
            [*_userns_argv(unshare), "--", "/bin/sh", "-c", "mount -t tmpfs stoker-probe /tmp"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cannot run {unshare}: {e}"
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["failed"])[-1]
        return None, f"stokerd is not root and cannot make a user namespace here ({why})"
    return "user", ""


def mount_argv(c: Confinement, hide: list[Path]) -> list[str]:
    """argv prefix that puts the rest in its own mount namespace (private /tmp, /var/tmp,
    /dev/shm; each of `hide` covered by an empty tmpfs), then execs it. Only for a QEMU
    that gets its files as descriptors (`c.fds`). After `ip netns exec` (which makes a
    mount namespace of its own for /sys), before the privilege drop."""
    if c.mountns is None or not c.fds:
        return []
    pre = (
        [c.unshare, "--mount", "--propagation", "private"]
        if c.mountns == "root"
        else [*_userns_argv(c.unshare), "--propagation", "private"]
    )
    out = [*pre, "--", "/bin/sh", "-c", _MOUNT_SCRIPT, "stoker-vmm-mnt"]
    out += [str(p) for p in hide if p.is_dir()]
    out.append("--")
    if c.mountns == "user":
        # The capabilities the user namespace gave the mount step go before QEMU runs.
        out += [
            c.setpriv,
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]
    return out


def _lookup(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def join_argv(procs: list[Path]) -> list[str]:
    """argv prefix that moves itself into the cgroups, then execs the rest. It must come
    before `ip netns exec`, which remounts /sys without the cgroup hierarchies."""
    if not procs:
        return []
    n = len(procs)
    joins = " && ".join(f'echo $$ > "${i}"' for i in range(1, n + 1))
    return [
        "/bin/sh",
        "-c",
        f'{joins} && shift {n} && exec "$@"',
        "stoker-vmm-join",
        *(str(p) for p in procs),
    ]


def drop_argv(c: Confinement) -> list[str]:
    """argv prefix that drops to the VMM user (no groups, capabilities or new privileges)."""
    out: list[str] = []
    if c.uid is not None and c.gid is not None:
        groups = ["--groups", str(c.kvm_gid)] if c.kvm_gid is not None else ["--clear-groups"]
        out += [
            c.setpriv,
            f"--reuid={c.uid}",
            f"--regid={c.gid}",
            *groups,
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]
    return out


# --- Firecracker: the jailer ------------------------------------------------------------


@dataclass(frozen=True)
class JailPlan:
    """How a Firecracker start is confined (`plan_firecracker`; `off` says why a part is
    not applied). `jailer` None: Firecracker runs unjailed, as the daemon's user.

    Under the jailer it runs chrooted in the VM's own jail directory, in new mount and PID
    namespaces (and the VM's network namespace), as `user` (uid/gid; root when no usable
    user), with the jailer's own seccomp filter (built into Firecracker, always on), and in
    a cgroup with memory and CPU limits from the VM's size when `cgroup_version` is set."""

    jailer: str | None = None
    user: str | None = None
    uid: int = 0
    gid: int = 0
    cgroup_version: int | None = None
    off: dict[str, str] = field(default_factory=dict)
    pending_user: str | None = None  # to create (root) at the first Firecracker start

    def with_pending_user(self) -> JailPlan:
        """Create the pending user now (the first jailed start); a copy that uses it, or
        that says why it could not (then the jailed Firecracker stays root)."""
        if self.pending_user is None:
            return self
        pw, why = ensure_user(self.pending_user)
        off = {k: v for k, v in self.off.items() if k != "user"}
        if pw is None or pw.pw_uid == 0:
            off["user"] = why or f"user {self.pending_user} is root"
            return replace(self, pending_user=None, off=off)
        return replace(
            self, user=self.pending_user, uid=pw.pw_uid, gid=pw.pw_gid, pending_user=None, off=off
        )

    def describe(self) -> str:
        if self.jailer is None:
            return "; ".join(f"{k} off: {v}" for k, v in self.off.items()) or "not jailed"
        on = [f"jailer {self.jailer} (chroot, mount+pid namespaces, seccomp)"]
        if self.user is not None:
            on.append(f"runs as {self.user} (uid {self.uid})")
        if self.cgroup_version is not None:
            on.append(f"cgroup v{self.cgroup_version} memory+cpu limits")
        off = [f"{k} off: {v}" for k, v in self.off.items()]
        return "; ".join(on + off)


def find_jailer(firecracker: str | None, jailer_bin: str) -> str | None:
    """The jailer to use: `jailer_bin` as a path when it has a slash; a bare name next to
    the Firecracker binary first (release tarballs ship them together), else on PATH."""
    if "/" in jailer_bin:
        return jailer_bin if os.access(jailer_bin, os.X_OK) else None
    if firecracker:
        beside = Path(firecracker).resolve().parent / jailer_bin
        if os.access(beside, os.X_OK) and beside.is_file():
            return str(beside)
    extra = ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(jailer_bin, path=os.environ.get("PATH", "") + extra)


def plan_firecracker(
    firecracker: str | None,
    jailer_bin: str,
    use_jailer: bool | str,
    *,
    user: str = VMM_USER,
    create_user: bool = True,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> JailPlan:
    """Which parts of the Firecracker confinement this host allows; never raises and
    changes nothing (a missing user is left pending, as for QEMU). `use_jailer` is the
    config value: "auto" jails when the jailer is found and stokerd is root; True always
    (a start then fails with the reason when it cannot); False never."""
    if use_jailer is False:
        return JailPlan(off={"jailer": "use_jailer = false in the config"})
    found = find_jailer(firecracker, jailer_bin)
    if found is None:
        why = f"{jailer_bin!r} not found next to firecracker or on PATH"
        if use_jailer is True:
            # Kept so that a start fails naming the missing jailer, not silently unjailed.
            return JailPlan(jailer=jailer_bin, off={"jailer": why})
        return JailPlan(off={"jailer": why})
    if os.geteuid() != 0 and use_jailer == "auto":
        return JailPlan(
            off={"jailer": "stokerd is not root (the jailer needs root: chroot, mknod, setuid)"}
        )
    off: dict[str, str] = {}
    uid = gid = 0
    name: str | None = None
    pending = None
    pw = _lookup(user)
    if pw is None and create_user and _USER.match(user):
        pending = user
        off["user"] = f"user {user} does not exist yet: created at the first VM start"
    elif pw is None:
        off["user"] = f"user {user} does not exist"
    elif pw.pw_uid == 0:
        off["user"] = f"user {user} is root"
    else:
        name, uid, gid = user, pw.pw_uid, pw.pw_gid
    cg, why = find_cgroups(cgroup_root, proc_cgroup)
    if cg is None:
        off["cgroup"] = why
    return JailPlan(
        jailer=found,
        user=name,
        uid=uid,
        gid=gid,
        cgroup_version=cg.version if cg is not None else None,
        off=off,
        pending_user=pending,
    )
