"""Firecracker backend: one process per VM, configured over its per-VM API socket.

Start = spawn `firecracker --api-sock <vm_dir>/fc.sock --id <id>` detached (optionally
under the jailer, optionally inside a network namespace), then one idempotent PUT per
concern (logger, metrics, boot source, drives, NIC, machine config, vsock) and
`InstanceStart`. Every refusal is raised with Firecracker's own `fault_message` and what
to do about it. The guest's serial console is Firecracker's stdout (the serial log); the
VMM's own log goes to `firecracker.log`, stderr to `vmm.log`.

Firecracker before 1.17 boots only an uncompressed ELF `vmlinux`; the caller passes it.
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
from dataclasses import dataclass
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
    vsock_cid_for,
    write_file_atomic,
)
from stoker.errors import CommandFailed, InvalidArgument, Timeout, Unavailable
from stoker.runner import Runner

API_SOCKET = "fc.sock"
FC_LOG = "firecracker.log"
FC_METRICS = "firecracker.metrics"
JAIL_DIR = "jail"
IFACE_ID = "eth0"
VSOCK_NAME = "vsock.sock"

_VM_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True)
class JailerOptions:
    """Run Firecracker under the jailer (chroot, new mount namespace, dropped uid/gid).

    Kernel, initrd and disks are hard-linked into the chroot, so `chroot_base_dir`
    (default `<vm_dir>/jail`) must be on the same filesystem as the images. A non-root
    `uid` needs taps created for that user (`ip tuntap add ... user UID`) and rw disks it
    may write (they are chowned). `cgroups` (`file=value`, e.g. `cpu.shares=512`) are
    applied only when that cgroup hierarchy is mounted.
    """

    jailer_bin: str = "jailer"
    uid: int = 0
    gid: int = 0
    chroot_base_dir: Path | None = None
    cgroup_version: int = 1
    cgroups: tuple[str, ...] = ()
    parent_cgroup: str | None = None


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
    reqs = [
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

    def __init__(
        self,
        runner: Runner,
        firecracker_bin: str = "firecracker",
        *,
        jailer: JailerOptions | None = None,
        api_timeout: float = 5.0,
        ready_timeout: float = 10.0,
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
        view = launch.context
        assert isinstance(view, VMMView)
        write_file_atomic(Path(handle.vm_dir) / PIDFILE, f"{handle.pid}\n")
        await self._wait_api(handle)
        async with self._api(handle) as api:
            for req in api_requests(cfg, view):
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

    def _prepare_jail(
        self, cfg: MachineConfig, extra: dict[str, Any]
    ) -> tuple[Path, VMMView, list[str]]:
        """Build the chroot the jailer will pivot into, and its argv."""
        j = self.jailer
        assert j is not None
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

        def link(src: Path, name: str, writable: bool) -> str:
            dst = root / name
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
            if writable and (j.uid, j.gid) != (0, 0):
                os.chown(dst, j.uid, j.gid)
            return "/" + name

        kernel = link(cfg.kernel, "vmlinux", False)
        initrd = link(cfg.initrd, "initrd", False) if cfg.initrd else None
        disks = [(d, link(d.path, f"{d.id}.img", not d.read_only)) for d in cfg.disks]
        for name in (FC_LOG, FC_METRICS):
            (root / name).write_bytes(b"")
            os.chown(root / name, j.uid, j.gid)
        extra["log"] = str(root / FC_LOG)
        vsock_uds = None
        if cfg.vsock_cid is not None and cfg.agent_socket is not None:
            vsock_uds = "/" + VSOCK_NAME
            extra["vsock_uds"] = str(root / VSOCK_NAME)
            # The agent looks for its socket where the config says; point it into the jail.
            os.symlink(root / VSOCK_NAME, cfg.agent_socket)
            extra["agent_link"] = str(cfg.agent_socket)
        argv = [
            j.jailer_bin,
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
        cg_dirs = self._cgroup_dirs(cfg.vm_id, os.path.basename(exec_file))
        if cg_dirs:
            argv += ["--cgroup-version", str(j.cgroup_version)]
            if j.parent_cgroup:
                argv += ["--parent-cgroup", j.parent_cgroup]
            for c in j.cgroups:
                argv += ["--cgroup", c]
            extra["cgroup_dirs"] = [str(d) for d in cg_dirs]
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

    def _cgroup_dirs(self, vm_id: str, exec_name: str) -> list[Path]:
        """The cgroup directories the jailer will create, or [] when cgroups are not
        requested or their hierarchy is not mounted here (then none are used)."""
        j = self.jailer
        if j is None or not j.cgroups:
            return []
        parent = j.parent_cgroup or exec_name
        root = Path("/sys/fs/cgroup")
        if j.cgroup_version == 2:
            if not (root / "cgroup.controllers").exists():
                self.log.warning("cgroup v2 is not mounted: starting without --cgroup")
                return []
            return [root / parent / vm_id]
        dirs = []
        for c in j.cgroups:
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


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False
