"""Firecracker backend: one process per VM, configured over its per-VM API socket.

Start = spawn `firecracker --api-sock <vm_dir>/fc.sock --id <id>` detached (optionally
under the jailer, optionally inside a network namespace), then one idempotent PUT per
concern (logger, metrics, boot source, drives, NIC, machine config, vsock) and
`InstanceStart`. Every refusal is raised with Firecracker's own `fault_message` and what
to do about it. The guest's serial console is Firecracker's stdout (the serial log); the
VMM's own log goes to `firecracker.log`, stderr to `vmm.log`.

Firecracker before 1.17 boots only an uncompressed ELF `vmlinux`; the caller passes it.

Snapshots (issue 13): `save_state` = PATCH /vm Paused, PUT /snapshot/create (Full; the
state file and, beside it, the guest memory), the guest left paused for the caller's disk
copies, `resume` = PATCH /vm Resumed. `restore` = a fresh Firecracker process (in a fresh
jail when jailed: the snapshot files are hard-linked in), PUT /logger and /metrics, then PUT
/snapshot/load with the memory file backend, `network_overrides` (the VM's tap now) and,
where the running version's API has them (asked with GET /), `vsock_override` and
`clock_realtime`; `resume_vm` runs the guest. A load Firecracker refuses ends that process;
the error names the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from stoker.daemon.vmm.base import (
    HANDLE_FILE,
    PIDFILE,
    VMM_LOG,
    AgentChannel,
    Disk,
    KernelFiles,
    Launch,
    MachineConfig,
    ProcessVMM,
    VMMHandle,
    has_option,
    netns_prefix,
    pid_alive,
    tail,
    unlink_quiet,
    vsock_cid_for,
    write_file_atomic,
)
from stoker.errors import CommandFailed, Conflict, InvalidArgument, Timeout, Unavailable
from stoker.runner import Runner

API_SOCKET = "fc.sock"
FC_LOG = "firecracker.log"
FC_METRICS = "firecracker.metrics"
JAIL_DIR = "jail"
IFACE_ID = "eth0"
VSOCK_NAME = "vsock.sock"
# Inside a jail: where the snapshot files are written (create) or linked (restore).
JAIL_SNAP_STATE = "snapshot.state"
JAIL_SNAP_MEM = "snapshot.mem"

# PUT /snapshot/load fields beyond v1.12.1's, sent only to a Firecracker at least this
# version (a version without a field refuses the whole request: "unknown field"). The
# minimum is the first minor release whose published API spec we checked has the field
# (v1.16.1 has both, v1.12.1 neither); versions in between do not get them.
LOAD_FIELDS_SINCE: dict[str, tuple[int, int, int]] = {
    "vsock_override": (1, 16, 0),
    "clock_realtime": (1, 16, 0),
}

_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")

_VM_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True)
class JailerOptions:
    """Run Firecracker under the jailer (chroot, new mount namespace, dropped uid/gid).

    Kernel, initrd and disks are hard-linked into the chroot, so `chroot_base_dir`
    (default `<vm_dir>/jail`) must be on the same filesystem as the images. A non-root
    `uid` needs taps created for that user (`ip tuntap add ... user UID`) and rw disks it
    may write (they are chowned). `cgroups` (`file=value`, e.g. `cpu.shares=512`) are
    applied only when that cgroup hierarchy is mounted; `size_limits` adds memory and CPU
    limits from each VM's size (guest RAM + overhead, vCPUs + half a core, as for QEMU).
    `pending_user` is created (root) at the first start and then used as uid/gid.
    """

    jailer_bin: str = "jailer"
    uid: int = 0
    gid: int = 0
    chroot_base_dir: Path | None = None
    cgroup_version: int = 1
    cgroups: tuple[str, ...] = ()
    parent_cgroup: str | None = None
    size_limits: bool = False
    pending_user: str | None = None


def size_cgroups(version: int, memory_mib: int, vcpu: int) -> tuple[str, ...]:
    """The jailer's `--cgroup` values that limit a VM of this size (cgroup v1 or v2)."""
    from stoker.hostprobe.confine import CPU_PERIOD_US, cpu_quota_us, memory_limit

    mem, quota = memory_limit(memory_mib, "kvm"), cpu_quota_us(vcpu)
    if version == 2:
        return (f"memory.max={mem}", f"cpu.max={quota} {CPU_PERIOD_US}")
    return (
        f"memory.limit_in_bytes={mem}",
        f"cpu.cfs_period_us={CPU_PERIOD_US}",
        f"cpu.cfs_quota_us={quota}",
    )


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from `Firecracker v1.12.1` or `1.12.1`; None if absent."""
    m = _VERSION.search(text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def memory_path(state: Path) -> Path:
    """Where a snapshot's guest memory lives: beside its state file."""
    return state.with_name(state.stem + ".mem")


@dataclass(frozen=True)
class ApiRequest:
    """One call of the configuration sequence, and what to tell the user if refused."""

    method: str
    path: str
    body: dict[str, Any]
    hint: str


@dataclass(frozen=True)
class VMMView:
    """Paths as the Firecracker process sees them (inside the chroot when jailed)."""

    kernel: str
    initrd: str | None
    disks: list[tuple[Disk, str]]
    log: str
    metrics: str
    vsock_uds: str | None


def api_requests(cfg: MachineConfig, view: VMMView) -> list[ApiRequest]:
    """The full configuration sequence for `cfg`, in the order it is sent, ending with
    `InstanceStart`. Pure: the contract test checks every body against the API spec."""
    reqs = logging_requests(view)
    boot: dict[str, Any] = {"kernel_image_path": view.kernel, "boot_args": cfg.cmdline}
    if view.initrd is not None:
        boot["initrd_path"] = view.initrd
    reqs.append(
        ApiRequest(
            "PUT",
            "/boot-source",
            boot,
            f"{cfg.kernel} must be an uncompressed ELF vmlinux readable by the VMM "
            "(Firecracker cannot boot a bzImage): re-import the kernel",
        )
    )
    for disk, path in view.disks:
        reqs.append(
            ApiRequest(
                "PUT",
                f"/drives/{disk.id}",
                {
                    "drive_id": disk.id,
                    "path_on_host": path,
                    # root= is on our command line; Firecracker must not add its own.
                    "is_root_device": False,
                    "is_read_only": disk.read_only,
                },
                f"disk file {disk.path} must exist and be "
                + ("readable" if disk.read_only else "readable and writable")
                + " by the VMM",
            )
        )
    if cfg.tap:
        reqs.append(
            ApiRequest(
                "PUT",
                f"/network-interfaces/{IFACE_ID}",
                {"iface_id": IFACE_ID, "host_dev_name": cfg.tap, "guest_mac": cfg.mac},
                f"tap {cfg.tap} must exist (in the VMM's network namespace) and not be "
                "attached to another VM; the MAC must be xx:xx:xx:xx:xx:xx",
            )
        )
    reqs.append(
        ApiRequest(
            "PUT",
            "/machine-config",
            {"vcpu_count": cfg.vcpu, "mem_size_mib": cfg.memory_mib, "smt": False},
            "vcpu must be 1 or an even number up to 32; memory must fit on the host "
            "(stoker vm set --vcpu/--memory)",
        )
    )
    if cfg.vsock_cid is not None and view.vsock_uds is not None:
        reqs.append(
            ApiRequest(
                "PUT",
                "/vsock",
                {"guest_cid": cfg.vsock_cid, "uds_path": view.vsock_uds},
                "the vsock CID must be >= 3 and unique, and its socket path free",
            )
        )
    reqs.append(
        ApiRequest(
            "PUT",
            "/actions",
            {"action_type": "InstanceStart"},
            "the guest could not be started: check that the kernel is a valid x86_64 ELF "
            "vmlinux and /dev/kvm is usable (details in the VMM log)",
        )
    )
    return reqs


def logging_requests(view: VMMView) -> list[ApiRequest]:
    """PUT /logger and /metrics: the start of a boot and of a restore alike."""
    return [
        ApiRequest(
            "PUT",
            "/logger",
            {"log_path": view.log, "level": "Info", "show_level": True, "show_log_origin": False},
            "the log file must exist and be writable by the VMM",
        ),
        ApiRequest(
            "PUT",
            "/metrics",
            {"metrics_path": view.metrics},
            "the metrics file must exist and be writable by the VMM",
        ),
    ]


def pause_request() -> ApiRequest:
    return ApiRequest("PATCH", "/vm", {"state": "Paused"}, "a guest is paused only while it runs")


def resume_request() -> ApiRequest:
    return ApiRequest("PATCH", "/vm", {"state": "Resumed"}, "only a paused guest can be resumed")


def snapshot_create_request(state: str, memory: str, where: Path) -> ApiRequest:
    """PUT /snapshot/create of a full snapshot at the VMM-side paths `state`/`memory`."""
    return ApiRequest(
        "PUT",
        "/snapshot/create",
        {"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": memory},
        f"could not write the snapshot to {where}: free space there (the memory file is "
        "as large as the guest's RAM) and retry",
    )


def snapshot_load_request(
    cfg: MachineConfig,
    view: VMMView,
    state: str,
    memory: str,
    version: tuple[int, int, int] | None,
    snapshot: str,
) -> ApiRequest:
    """PUT /snapshot/load for `cfg` (its tap, its vsock socket) of the VMM-side files
    `state`/`memory`, with only the fields `version`'s API has (LOAD_FIELDS_SINCE)."""
    body: dict[str, Any] = {
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": memory},
        "resume_vm": True,
    }
    if cfg.tap:
        body["network_overrides"] = [{"iface_id": IFACE_ID, "host_dev_name": cfg.tap}]

    def has(field: str) -> bool:
        return version is not None and version >= LOAD_FIELDS_SINCE[field]

    if has("vsock_override") and cfg.vsock_cid is not None and view.vsock_uds:
        body["vsock_override"] = {"uds_path": view.vsock_uds}
    if has("clock_realtime"):
        # The guest clock advances by the time the snapshot was on disk.
        body["clock_realtime"] = True
    return ApiRequest(
        "PUT",
        "/snapshot/load",
        body,
        f"snapshot {snapshot} could not be loaded: it must have been taken by this "
        "Firecracker version from a VM of the same shape, with its files intact; start "
        "the VM without --from-snapshot",
    )


@dataclass(frozen=True)
class RestorePlan:
    """`_configure`'s context for a restore: the view and the snapshot as the VMM sees it."""

    view: VMMView
    state: str
    memory: str
    snapshot: str  # the snapshot's directory, for messages


class FirecrackerAPI:
    """A tiny client for one Firecracker API socket (HTTP over a unix socket)."""

    def __init__(self, socket_path: str, *, timeout: float = 5.0, log_hint: str = "") -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.log_hint = log_hint
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FirecrackerAPI:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.socket_path),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, hint: str = ""
    ) -> Any:
        """Send one request; return the decoded JSON body (None for 204). Raises
        `CommandFailed` with Firecracker's fault_message when it refuses."""
        assert self._session is not None, "use FirecrackerAPI as an async context manager"
        where = f"{method} {path}"
        try:
            async with self._session.request(method, f"http://localhost{path}", json=body) as r:
                text = await r.text()
                status = r.status
        except TimeoutError:
            raise Timeout(
                f"firecracker API {where} did not answer within {self.timeout:.0f}s"
                + (f": see {self.log_hint}" if self.log_hint else "")
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise Unavailable(
                f"firecracker API socket {self.socket_path} is not answering ({e}): the VMM "
                "may have exited" + (f"; see {self.log_hint}" if self.log_hint else "")
            ) from None
        data: Any = None
        if text.strip():
            try:
                data = json.loads(text)
            except ValueError:
                data = {"fault_message": text.strip()}
        if status >= 300:
            fault = data.get("fault_message") if isinstance(data, dict) else None
            raise CommandFailed(
                f"firecracker refused {where} (HTTP {status}): {fault or text.strip() or '?'}"
                + (f": {hint}" if hint else ""),
                detail=self.log_hint or None,
            )
        return data


class FirecrackerDriver(ProcessVMM):
    """The Firecracker VMM driver (see module docstring)."""

    name = "firecracker"
    label = "Firecracker"
    supports_snapshots = True

    def __init__(
        self,
        runner: Runner,
        firecracker_bin: str = "firecracker",
        *,
        jailer: JailerOptions | None = None,
        api_timeout: float = 5.0,
        ready_timeout: float = 10.0,
        snapshot_timeout: float = 120.0,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(
            runner,
            os.path.basename(firecracker_bin) or "firecracker",
            logger or logging.getLogger("stoker.vmm.firecracker"),
        )
        self.firecracker_bin = firecracker_bin
        self.jailer = jailer
        self.api_timeout = api_timeout
        self.ready_timeout = ready_timeout
        self.snapshot_timeout = snapshot_timeout

    # --- backend answers ---------------------------------------------------------------

    def boot_kernel(self, kernel: KernelFiles) -> Path | None:
        """Firecracker boots the ELF vmlinux (before 1.17 it cannot boot a bzImage; a
        bzImage-only kernel is refused in `start` with that reason)."""
        f = kernel.vmlinux or kernel.bzimage
        return Path(f) if f else None

    def vsock_cid(self, guest_ip: str) -> int | None:
        """Every Firecracker guest gets a vsock (the agent channel), CID from its IP."""
        return vsock_cid_for(guest_ip)

    def agent_transport(self, handle: VMMHandle) -> AgentChannel | None:
        """The vsock multiplexer's host socket (`CONNECT <port>` first)."""
        sock = handle.extra.get("agent_socket") or handle.extra.get("vsock_uds")
        return AgentChannel(str(sock), hybrid_vsock=True) if sock else None

    def accelerator(self, handle: VMMHandle | None = None) -> str | None:
        """Firecracker always runs on KVM."""
        return "kvm"

    # --- identity ----------------------------------------------------------------------

    def _matches_pid(self, handle: VMMHandle, argv: list[str]) -> bool:
        if handle.extra.get("jailed"):
            # The jailer execs `/firecracker --id <id> ...` inside the chroot.
            return has_option(argv, "--id", str(handle.extra.get("vm_id", "")))
        return has_option(argv, "--api-sock", handle.api_socket or "")

    def _default_handle(self, vm_dir: Path, pid: int) -> VMMHandle:
        return VMMHandle(
            kind=self.name,
            pid=pid,
            api_socket=str(vm_dir / API_SOCKET),
            vm_dir=str(vm_dir),
            extra={"vm_id": vm_dir.name, "jailed": False},
        )

    # --- start -------------------------------------------------------------------------

    def _validate(self, cfg: MachineConfig) -> None:
        if not _VM_ID.match(cfg.vm_id):
            raise InvalidArgument(
                f"VM id {cfg.vm_id!r} cannot be a Firecracker id (1-64 of A-Z a-z 0-9 -)"
            )
        if cfg.vcpu != 1 and (cfg.vcpu % 2 or cfg.vcpu > 32):
            raise InvalidArgument(
                f"Firecracker needs 1 or an even number of vCPUs up to 32, got {cfg.vcpu}: "
                "stoker vm set NAME --vcpu N"
            )
        if not _is_elf(cfg.kernel):
            raise InvalidArgument(
                f"{cfg.kernel} is not an ELF vmlinux: Firecracker cannot boot a compressed "
                "bzImage; import the kernel with its vmlinux (stoker kernel pull)"
            )

    def _prepare(self, cfg: MachineConfig) -> Launch:
        vm_dir = cfg.vm_dir
        vmm_log = vm_dir / VMM_LOG
        extra: dict[str, Any] = {
            "vm_id": cfg.vm_id,
            "netns": cfg.netns,
            "pidfile": str(vm_dir / PIDFILE),
            "log": str(vm_dir / FC_LOG),
            "stderr": str(vmm_log),
            "serial_log": str(cfg.serial_log),
            "jailed": self.jailer is not None,
        }
        if self.jailer is None:
            api_sock = vm_dir / API_SOCKET
            view = self._prepare_plain(cfg)
            if view.vsock_uds and cfg.vsock_cid is not None:
                extra["vsock_uds"] = view.vsock_uds
            argv = [
                *netns_prefix(cfg.netns),
                self.firecracker_bin,
                "--api-sock",
                str(api_sock),
                "--id",
                cfg.vm_id,
                # Startup chatter would land in the serial console (stdout) until PUT /logger.
                "--level",
                "Warning",
            ]
        else:
            api_sock, view, argv = self._prepare_jail(cfg, extra)
        if extra.get("vsock_uds"):
            # Where the agent client connects (a link into the jail when jailed).
            extra["agent_socket"] = str(cfg.agent_socket)
        sockets = [(api_sock, "Firecracker API socket")]
        if extra.get("vsock_uds"):
            sockets.append((Path(extra["vsock_uds"]), "vsock socket"))
        return Launch(
            argv=argv,
            stdout=cfg.serial_log,
            stderr=vmm_log,
            api_socket=api_sock,
            extra=extra,
            sockets=sockets,
            context=view,
        )

    async def _configure(self, handle: VMMHandle, cfg: MachineConfig, launch: Launch) -> None:
        ctx = launch.context
        write_file_atomic(Path(handle.vm_dir) / PIDFILE, f"{handle.pid}\n")
        await self._wait_api(handle)
        if isinstance(ctx, RestorePlan):
            await self._load(handle, cfg, ctx)
            return
        assert isinstance(ctx, VMMView)
        async with self._api(handle) as api:
            for req in api_requests(cfg, ctx):
                await api.request(req.method, req.path, req.body, req.hint)

    def _prepare_plain(self, cfg: MachineConfig) -> VMMView:
        for name in (FC_LOG, FC_METRICS):
            # Firecracker opens these without O_CREAT and writes from offset 0: start empty.
            (cfg.vm_dir / name).write_bytes(b"")
        return VMMView(
            kernel=str(cfg.kernel),
            initrd=str(cfg.initrd) if cfg.initrd else None,
            disks=[(d, str(d.path)) for d in cfg.disks],
            log=str(cfg.vm_dir / FC_LOG),
            metrics=str(cfg.vm_dir / FC_METRICS),
            vsock_uds=str(cfg.agent_socket) if cfg.agent_socket else None,
        )

    def _jailer_options(self) -> JailerOptions:
        """The jailer options for this start (a pending VMM user is created now, once)."""
        j = self.jailer
        assert j is not None
        if j.pending_user is not None:
            from stoker.hostprobe.confine import ensure_user

            pw, why = ensure_user(j.pending_user)
            if pw is None or pw.pw_uid == 0:
                self.log.warning(
                    "jailed Firecracker stays root: %s", why or f"{j.pending_user} is root"
                )
                j = replace(j, pending_user=None)
            else:
                j = replace(j, uid=pw.pw_uid, gid=pw.pw_gid, pending_user=None)
            self.jailer = j
        return j

    def _prepare_jail(
        self, cfg: MachineConfig, extra: dict[str, Any]
    ) -> tuple[Path, VMMView, list[str]]:
        """Build the chroot the jailer will pivot into, and its argv. A fresh jail every
        start (and restore): whatever an earlier run left there is removed first."""
        j = self._jailer_options()
        jailer = shutil.which(j.jailer_bin)
        if jailer is None:
            raise Unavailable(
                f"the jailer {j.jailer_bin!r} was not found: install it next to firecracker "
                "(set jailer_bin), or set use_jailer = false"
            )
        if os.geteuid() != 0:
            raise Unavailable(
                "the jailer needs root (chroot, mknod, setuid) and stokerd is not root: "
                "set use_jailer = false"
            )
        exec_file = shutil.which(self.firecracker_bin)
        if exec_file is None:
            raise Unavailable(
                f"{self.firecracker_bin} not found: set firecracker_bin to its absolute path"
            )
        exec_file = os.path.abspath(exec_file)
        if "firecracker" not in os.path.basename(exec_file):
            raise InvalidArgument(
                f"the jailer only runs a binary whose name contains 'firecracker', got {exec_file}"
            )
        base = (j.chroot_base_dir or cfg.vm_dir / JAIL_DIR).absolute()
        jail = base / os.path.basename(exec_file) / cfg.vm_id
        root = jail / "root"
        shutil.rmtree(jail, ignore_errors=True)
        root.mkdir(parents=True)
        extra["chroot"] = str(jail)
        unprivileged = (j.uid, j.gid) != (0, 0)
        try:
            kernel = self._link_in(root, cfg.kernel, "vmlinux", False)
            initrd = self._link_in(root, cfg.initrd, "initrd", False) if cfg.initrd else None
            disks = [
                (d, self._link_in(root, d.path, f"{d.id}.img", not d.read_only)) for d in cfg.disks
            ]
            for name in (FC_LOG, FC_METRICS):
                (root / name).write_bytes(b"")
                os.chown(root / name, j.uid, j.gid)
            if cfg.tap and unprivileged:
                # Firecracker attaches the tap by name; as another user it may only when
                # the persistent tap is that user's.
                from stoker.daemon.vmm.confine import set_tap_owner

                set_tap_owner(cfg.tap, cfg.netns, j.uid)
        except BaseException:
            shutil.rmtree(jail, ignore_errors=True)
            raise
        extra["log"] = str(root / FC_LOG)
        extra["jail_uid"] = j.uid
        vsock_uds = None
        if cfg.vsock_cid is not None and cfg.agent_socket is not None:
            vsock_uds = "/" + VSOCK_NAME
            extra["vsock_uds"] = str(root / VSOCK_NAME)
            # The agent looks for its socket where the config says; point it into the jail.
            os.symlink(root / VSOCK_NAME, cfg.agent_socket)
            extra["agent_link"] = str(cfg.agent_socket)
        argv = [
            jailer,
            "--id",
            cfg.vm_id,
            "--exec-file",
            exec_file,
            "--uid",
            str(j.uid),
            "--gid",
            str(j.gid),
            "--chroot-base-dir",
            str(base),
        ]
        if cfg.netns:
            argv += ["--netns", f"/var/run/netns/{cfg.netns}"]
        cgroups = self._cgroups_for(cfg)
        cg_dirs = self._cgroup_dirs(cfg.vm_id, os.path.basename(exec_file), cgroups)
        if cg_dirs:
            argv += ["--cgroup-version", str(j.cgroup_version)]
            if j.parent_cgroup:
                argv += ["--parent-cgroup", j.parent_cgroup]
            for c in cgroups:
                argv += ["--cgroup", c]
            extra["cgroup_dirs"] = [str(d) for d in cg_dirs]
            extra["cgroups"] = list(cgroups)
            # The jailer made the default parent (named after the binary); ours to tidy.
            extra["cgroup_parent_ours"] = j.parent_cgroup is None
        argv += ["--", "--api-sock", "/" + API_SOCKET, "--level", "Warning"]
        view = VMMView(
            kernel=kernel,
            initrd=initrd,
            disks=disks,
            log="/" + FC_LOG,
            metrics="/" + FC_METRICS,
            vsock_uds=vsock_uds,
        )
        return root / API_SOCKET, view, argv

    def _link_in(self, root: Path, src: Path, name: str, writable: bool) -> str:
        """Hard-link `src` into the jail root as `name` (the VMM-side path). A writable
        file becomes the jail user's; a read-only one that user cannot read is copied
        when small (kernel, initrd), refused when it is a disk."""
        j = self.jailer
        assert j is not None
        dst = root / name
        unprivileged = (j.uid, j.gid) != (0, 0)
        st = src.stat()
        if unprivileged and not writable and st.st_mode & 0o004 == 0 and st.st_uid != j.uid:
            if st.st_size > 256 << 20:
                raise InvalidArgument(
                    f"{src} is not readable by the jailed Firecracker's user (uid {j.uid}): "
                    "make it world-readable (chmod o+r) or set use_jailer = false"
                )
            shutil.copyfile(src, dst)
            os.chown(dst, j.uid, j.gid)
            return "/" + name
        try:
            os.link(src, dst)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise InvalidArgument(
                    f"cannot hard-link {src} into the jail {root}: they are on different "
                    "filesystems; put the jailer's chroot base dir on the filesystem of "
                    "the state directory"
                ) from None
            raise
        if writable and unprivileged:
            os.chown(dst, j.uid, j.gid)
        return "/" + name

    def _cgroups_for(self, cfg: MachineConfig) -> tuple[str, ...]:
        j = self.jailer
        assert j is not None
        sized = size_cgroups(j.cgroup_version, cfg.memory_mib, cfg.vcpu) if j.size_limits else ()
        return tuple(dict.fromkeys((*j.cgroups, *sized)))

    def _cgroup_dirs(self, vm_id: str, exec_name: str, cgroups: tuple[str, ...]) -> list[Path]:
        """The cgroup directories the jailer will create, or [] when cgroups are not
        requested or their hierarchy is not mounted here (then none are used)."""
        j = self.jailer
        if j is None or not cgroups:
            return []
        parent = j.parent_cgroup or exec_name
        root = Path("/sys/fs/cgroup")
        if j.cgroup_version == 2:
            if not (root / "cgroup.controllers").exists():
                self.log.warning("cgroup v2 is not mounted: starting without --cgroup")
                return []
            return [root / parent / vm_id]
        dirs = []
        for c in cgroups:
            controller = c.split("=", 1)[0].split(".", 1)[0]
            if not (root / controller).is_dir():
                self.log.warning("cgroup v1 %s is not mounted: starting without --cgroup", c)
                return []
            dirs.append(root / controller / parent / vm_id)
        return sorted(set(dirs))

    async def _wait_api(self, handle: VMMHandle) -> None:
        """Wait until the API socket answers GET /, or the process dies."""
        deadline = time.monotonic() + self.ready_timeout
        sock = Path(handle.api_socket or "")
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not pid_alive(handle.pid):
                raise CommandFailed(
                    "firecracker exited during startup: "
                    + (
                        tail(handle.extra.get("stderr"))
                        or tail(handle.extra.get("serial_log"))
                        or "no output"
                    ),
                    detail=f"logs: {handle.extra.get('stderr')}, {handle.extra.get('serial_log')}",
                )
            if sock.exists():
                try:
                    async with self._api(handle, timeout=1.0) as api:
                        await api.request("GET", "/")
                    return
                except (Unavailable, Timeout) as e:
                    last = e
            await asyncio.sleep(0.02)
        raise Timeout(
            f"firecracker did not open its API socket {sock} within {self.ready_timeout:.0f}s"
            + (f" ({last})" if last else "")
            + f": see {handle.extra.get('stderr')}"
        )

    def _api(self, handle: VMMHandle, timeout: float | None = None) -> FirecrackerAPI:
        if not handle.api_socket:
            raise Unavailable("this Firecracker handle has no API socket")
        return FirecrackerAPI(
            handle.api_socket,
            timeout=timeout or self.api_timeout,
            log_hint=str(handle.extra.get("log", "")),
        )

    # --- stop ------------------------------------------------------------------------

    async def _request_poweroff(self, handle: VMMHandle, timeout: float) -> None:
        """Ctrl-Alt-Del (with `reboot=k` the guest's reboot ends Firecracker)."""
        async with self._api(handle, timeout=min(self.api_timeout, timeout)) as api:
            await api.request(
                "PUT",
                "/actions",
                {"action_type": "SendCtrlAltDel"},
                "the guest has no keyboard controller to receive it",
            )

    def _leftover_paths(self, handle: VMMHandle) -> list[Path | str | None]:
        vm_dir = Path(handle.vm_dir)
        return [
            handle.api_socket,
            handle.extra.get("vsock_uds"),
            handle.extra.get("agent_link"),
            vm_dir / PIDFILE,
            vm_dir / HANDLE_FILE,
        ]

    def _post_shutdown(self, handle: VMMHandle) -> None:
        """Sockets, pidfile and handle file, then the jail and the cgroups it made."""
        super()._post_shutdown(handle)
        vm_dir = Path(handle.vm_dir)
        chroot = handle.extra.get("chroot")
        if chroot:
            # Keep the VMM's log for `vm logs`/post-mortems; the rest of the jail is only
            # links and files Firecracker made (the linked images keep their other names).
            with contextlib.suppress(OSError):
                os.replace(Path(chroot) / "root" / FC_LOG, vm_dir / FC_LOG)
            shutil.rmtree(chroot, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(Path(chroot).parent)
                os.rmdir(vm_dir / JAIL_DIR)
        for d in handle.extra.get("cgroup_dirs") or []:
            with contextlib.suppress(OSError):
                os.rmdir(d)
                if handle.extra.get("cgroup_parent_ours"):
                    os.rmdir(Path(d).parent)  # fails, as it should, while other VMs use it

    # --- snapshots (issue 13) ----------------------------------------------------------

    async def save_state(self, handle: VMMHandle, dest: Path) -> int:
        """Pause the guest and write a full snapshot: the state to `dest`, the guest
        memory to `memory_path(dest)`. A jailed Firecracker writes inside its jail (it
        sees nothing else); the files are moved out. The guest stays paused (`resume`);
        on any failure nothing is left at either path and the guest runs again."""
        mem = memory_path(dest)
        chroot = handle.extra.get("chroot")
        if chroot:
            root = Path(chroot) / "root"
            tmp_state, tmp_mem = root / JAIL_SNAP_STATE, root / JAIL_SNAP_MEM
            seen_state, seen_mem = "/" + JAIL_SNAP_STATE, "/" + JAIL_SNAP_MEM
        else:
            tag = f".tmp-{os.getpid()}"
            tmp_state = dest.with_name(f".{dest.name}{tag}")
            tmp_mem = mem.with_name(f".{mem.name}{tag}")
            seen_state, seen_mem = str(tmp_state), str(tmp_mem)
        unlink_quiet(tmp_state, tmp_mem)
        async with self._api(handle, timeout=self.snapshot_timeout) as api:
            pause = pause_request()
            await api.request(pause.method, pause.path, pause.body, pause.hint)
            try:
                req = snapshot_create_request(seen_state, seen_mem, dest.parent)
                await api.request(req.method, req.path, req.body, req.hint)
                for tmp, final in ((tmp_state, dest), (tmp_mem, mem)):
                    _move_out(tmp, final)
            except BaseException:
                unlink_quiet(tmp_state, tmp_mem, dest, mem)
                with contextlib.suppress(Exception):
                    r = resume_request()
                    await api.request(r.method, r.path, r.body, r.hint)
                raise
        return dest.stat().st_size + mem.stat().st_size

    async def resume(self, handle: VMMHandle) -> None:
        """PATCH /vm Resumed: run the guest `save_state` paused."""
        async with self._api(handle) as api:
            r = resume_request()
            await api.request(r.method, r.path, r.body, r.hint)

    async def restore(
        self, cfg: MachineConfig, state: Path, *, link_down: bool = False
    ) -> VMMHandle:
        """A fresh Firecracker (in a fresh jail when jailed) running the guest saved at
        `state` and `memory_path(state)`, attached to `cfg`'s tap. On any failure the new
        process, its jail and its sockets are gone and the error names the snapshot."""
        mem = memory_path(state)
        for f in (state, mem):
            if not f.is_file():
                raise Conflict(f"snapshot {state.parent} is incomplete ({f} is missing): delete it")
        return await self._start(cfg, lambda c: self._prepare_restore(c, state, mem))

    def _prepare_restore(self, cfg: MachineConfig, state: Path, mem: Path) -> Launch:
        launch = self._prepare(cfg)
        view = launch.context
        assert isinstance(view, VMMView)
        launch.extra["restored_from"] = str(state.parent)
        chroot = launch.extra.get("chroot")
        if chroot is None:
            seen_state, seen_mem = str(state), str(mem)
        else:
            root = Path(chroot) / "root"
            try:
                # Writable for ownership: the jail's user must read them.
                seen_state = self._link_in(root, state, JAIL_SNAP_STATE, True)
                seen_mem = self._link_in(root, mem, JAIL_SNAP_MEM, True)
            except BaseException:
                # Not spawned: remove the jail and links `_prepare` made.
                sock = str(launch.api_socket) if launch.api_socket else None
                self._post_shutdown(
                    VMMHandle(self.name, 1, sock, str(cfg.vm_dir), extra=launch.extra)
                )
                raise
        launch.context = RestorePlan(view, seen_state, seen_mem, str(state.parent))
        return launch

    async def _load(self, handle: VMMHandle, cfg: MachineConfig, plan: RestorePlan) -> None:
        """Logger and metrics, then PUT /snapshot/load with the fields this version has."""
        async with self._api(handle, timeout=self.snapshot_timeout) as api:
            info = await api.request("GET", "/")
            version = parse_version(str(info.get("vmm_version", ""))) if info else None
            reqs = [
                *logging_requests(plan.view),
                snapshot_load_request(
                    cfg, plan.view, plan.state, plan.memory, version, plan.snapshot
                ),
            ]
            for req in reqs:
                try:
                    await api.request(req.method, req.path, req.body, req.hint)
                except Unavailable as e:
                    # A load Firecracker cannot do ends the process, sometimes before the
                    # answer is written.
                    raise CommandFailed(
                        f"firecracker exited while loading snapshot {plan.snapshot}: "
                        + (tail(handle.extra.get("stderr")) or str(e)),
                        detail=f"logs: {handle.extra.get('stderr')}, {handle.extra.get('log')}",
                    ) from None

    async def vmm_version(self, handle: VMMHandle) -> str:
        """The running Firecracker's version (GET /: `1.12.1`)."""
        async with self._api(handle) as api:
            info = await api.request("GET", "/")
        v = info.get("vmm_version") if isinstance(info, dict) else None
        if not isinstance(v, str) or parse_version(v) is None:
            raise CommandFailed(f"firecracker did not report its version (GET / said {info!r})")
        return v

    async def binary_version(self) -> str:
        """The version of the binary a start runs (`firecracker --version`), in
        `vmm_version`'s form."""
        r = await self.runner.run([self.firecracker_bin, "--version"], timeout=10)
        out = r.stdout.decode(errors="replace")
        v = parse_version(out.splitlines()[0] if out else "")
        if v is None:
            raise CommandFailed(
                f"cannot tell the version of {self.firecracker_bin} (--version said {out!r})"
            )
        return ".".join(map(str, v))

    # --- introspection ---------------------------------------------------------------

    async def describe(self, handle: VMMHandle) -> dict[str, Any]:
        """GET / (instance state) and GET /vm/config (the configuration Firecracker holds)."""
        async with self._api(handle) as api:
            info = await api.request("GET", "/")
            config = await api.request("GET", "/vm/config")
        state = info.get("state") if isinstance(info, dict) else None
        return {
            "kind": self.name,
            "running": state == "Running",
            "state": state,
            "instance": info,
            "config": config,
            "machine_config": config.get("machine-config") if isinstance(config, dict) else None,
        }


def _move_out(src: Path, dst: Path) -> None:
    """Move a snapshot file out of the jail (or its temporary name) into place, 0600."""
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.move(src, dst)
    os.chmod(dst, 0o600)


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False
