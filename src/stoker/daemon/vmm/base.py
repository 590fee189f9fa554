"""The one VMM interface (`ProcessVMM`), its records, and the process plumbing.

A driver turns a `MachineConfig` into a running VMM process and back: `start` spawns it
fully detached (own session, pidfile and handle file in the VM directory) so it outlives
the daemon; `adopt` finds it again after a daemon restart; `is_running` never trusts a bare
pid (the pid must still be this VMM for this VM directory); `shutdown`/`kill` end it and
remove what it leaves behind (sockets, pidfile, jail), keeping the logs.

`ProcessVMM` is the abstract base in the spirit of QEMU's `python/qemu/machine`: the
template methods (`start`, `shutdown`, `kill`, `adopt`, `is_running`) are written once
here, each backend fills in hooks (`_prepare` builds the argv, `_configure` brings the
spawned VMM to a running guest, `_request_poweroff`, `_leftover_paths`, `_matches_pid`,
`_default_handle`) and answers the questions the daemon would otherwise ask by name
(`boot_kernel`, `vsock_cid`, `agent_transport`, `accelerator`). Snapshots are the same
interface for every backend (`supports_snapshots`, `save_state`, `resume`, `restore`,
`vmm_version`, `binary_version`); a backend without them refuses each with a `Conflict`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from stoker.daemon.vmm.exits import explain_exit, forget_exit, record_exit
from stoker.errors import CommandFailed, Conflict, InvalidArgument, Timeout, Unavailable
from stoker.runner import Runner

# Files a driver keeps in the VM directory (names shared by both backends).
PIDFILE = "vmm.pid"
HANDLE_FILE = "vmm.json"
VMM_LOG = "vmm.log"

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

KILL_WAIT = 5.0


@dataclass
class Disk:
    """A virtio-blk disk; the order in `MachineConfig.disks` is the guest's vda, vdb, ..."""

    path: Path
    read_only: bool
    id: str


@dataclass
class MachineConfig:
    """Everything a VMM needs to boot one VM. Paths are host paths.

    `tap` is the host tap device (None: no NIC); `vsock_cid` and `agent_socket` set up the
    host<->guest agent channel (Firecracker: vsock whose host side is the unix socket
    `agent_socket`; QEMU: a virtio-serial port `org.stoker.agent` backed by `agent_socket`).
    `netns` runs the VMM inside that network namespace (`ip netns exec`, or the jailer's
    `--netns`), which is how tests keep taps off the host.
    """

    vm_id: str
    name: str
    vm_dir: Path
    kernel: Path
    initrd: Path | None
    cmdline: str
    vcpu: int
    memory_mib: int
    disks: list[Disk]
    tap: str | None
    mac: str
    serial_log: Path
    vsock_cid: int | None = None
    agent_socket: Path | None = None
    netns: str | None = None


@dataclass
class VMMHandle:
    """What identifies a running VMM; JSON-serialisable (`to_dict`/`from_dict`).

    `api_socket` is Firecracker's API socket or QEMU's QMP socket (host path). `extra` holds
    backend details: `vm_id`, `netns`, `pidfile`, `log`, `serial_log`, and for Firecracker
    `jailed`, `chroot`, `vsock_uds`.
    """

    kind: str
    pid: int
    api_socket: str | None
    vm_dir: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The handle as plain JSON types."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMMHandle:
        """Rebuild a handle; raises ValueError/TypeError/KeyError on a malformed one."""
        if not isinstance(data, dict):
            raise TypeError("a VMM handle must be a JSON object")
        kind, pid, vm_dir = data["kind"], data["pid"], data["vm_dir"]
        api_socket, extra = data.get("api_socket"), data.get("extra", {})
        if not isinstance(kind, str) or not isinstance(vm_dir, str):
            raise TypeError("VMM handle: kind and vm_dir must be strings")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"VMM handle: bad pid {pid!r}")
        if api_socket is not None and not isinstance(api_socket, str):
            raise TypeError("VMM handle: api_socket must be a string or null")
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            raise TypeError("VMM handle: extra must be an object")
        return cls(kind=kind, pid=pid, api_socket=api_socket, vm_dir=vm_dir, extra=dict(extra))


@dataclass(frozen=True)
class AgentChannel:
    """How the host reaches the guest agent of one VM (the driver's answer).

    `socket` is a host unix socket. `hybrid_vsock` False: the socket is a byte stream
    straight to the agent (QEMU's virtio-serial chardev); True: Firecracker's vsock
    multiplexer, which wants `CONNECT <port>` before the stream starts.
    """

    socket: str
    hybrid_vsock: bool = False


class KernelFiles(Protocol):
    """The boot files of an imported kernel (satisfied by `stoker.model.records.Kernel`)."""

    @property
    def vmlinux(self) -> str | None: ...
    @property
    def bzimage(self) -> str | None: ...


@dataclass
class Launch:
    """What a backend's `_prepare` hook hands the start template: the argv to spawn, where
    its output goes, the control socket and the handle's `extra`."""

    argv: list[str]
    stdout: Path
    stderr: Path | None
    api_socket: Path | None
    extra: dict[str, Any]
    sockets: list[tuple[Path, str]] = field(default_factory=list)  # checked for length
    context: object = None  # backend-private, for its `_configure`
    pass_fds: Mapping[int, int] | None = None  # child fd -> our fd, handed over at spawn
    release: Callable[[], None] | None = None  # once spawned (or failed): close our copies


# --- process helpers shared by the backends ------------------------------------------


def reap(pid: int) -> bool:
    """Collect `pid`'s exit status if it is our exited child. False only while it is our
    child and not yet collectable (a multi-threaded VMM shows as a zombie while its
    other threads are still exiting); True when reaped or not our child."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    if done == pid:
        record_exit(pid, status)  # why it ended: `exits.explain_exit`
    return done == pid


def pid_alive(pid: int) -> bool:
    """A process with this pid exists and has not exited. Our own exited child is reaped
    here; one still tearing down its threads counts as alive until it can be reaped."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
        return not reap(pid)
    return True


def proc_argv(pid: int) -> list[str]:
    """The process's argv from /proc ([] when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def proc_exe_name(pid: int) -> str:
    """Basename of the process's executable ('' when unknown). A binary replaced on disk
    while the VMM runs (a package upgrade) shows as '... (deleted)': still the VMM."""
    try:
        target = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""
    return os.path.basename(target.removesuffix(" (deleted)"))


def proc_is(pid: int, exe_hint: str, match: Callable[[list[str]], bool]) -> bool:
    """True when `pid` is alive, its executable (or argv[0]) mentions `exe_hint`, and
    `match(argv)` holds. Guards every signal against pid reuse."""
    if not pid_alive(pid):
        return False
    argv = proc_argv(pid)
    if not argv:
        return False
    names = (proc_exe_name(pid), os.path.basename(argv[0]))
    if not any(exe_hint in n for n in names):
        return False
    return match(argv)


def has_option(argv: list[str], flag: str, value: str) -> bool:
    """`flag value` or `flag=value` occurs in argv."""
    if not value:
        return False
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv) and argv[i + 1] == value:
            return True
        if a == f"{flag}={value}":
            return True
    return False


async def wait_exit(pid: int, timeout: float, interval: float = 0.02) -> bool:
    """Wait until `pid` has exited (reaping it if it is our child); False on timeout."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


async def sigkill_and_wait(pid: int) -> None:
    """SIGKILL `pid` and wait for it to be gone. The caller has checked that `pid` is the
    VMM (or that it is our own unreaped child, which no other process can reuse)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not await wait_exit(pid, KILL_WAIT):
        raise Timeout(
            f"VMM pid {pid} did not exit within {KILL_WAIT:.0f}s of SIGKILL "
            "(stuck in the kernel, e.g. on a hung disk): check `ps -o stat,wchan -p "
            f"{pid}` and retry"
        )


# --- files in the VM directory ---------------------------------------------------------


def write_file_atomic(path: Path, text: str) -> None:
    """Write via a temp file + rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_pidfile(path: Path) -> int | None:
    """The pid in a pidfile, or None when missing or not a positive integer."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) <= 0:
        return None
    return int(text)


def save_handle(handle: VMMHandle) -> None:
    """Persist the handle to `<vm_dir>/vmm.json` so `adopt` can rebuild it."""
    write_file_atomic(Path(handle.vm_dir) / HANDLE_FILE, json.dumps(handle.to_dict()))


def load_handle(vm_dir: Path, kind: str) -> VMMHandle | None:
    """The saved handle of this backend, or None when missing, corrupt or another kind."""
    try:
        h = VMMHandle.from_dict(json.loads((vm_dir / HANDLE_FILE).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return h if h.kind == kind else None


def unlink_quiet(*paths: Path | str | None) -> None:
    """Remove files that may or may not exist."""
    for p in paths:
        if p is not None:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(p)


def check_socket_path(path: Path, what: str) -> None:
    """Unix socket paths are limited to 107 bytes; fail early with the fix."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise InvalidArgument(
            f"{what} path {path} is longer than {MAX_SOCKET_PATH} bytes (a unix socket limit): "
            "use a shorter state directory"
        )


def tail(path: Path | str | None, lines: int = 8) -> str:
    """The last lines of a log file, for error messages ('' when absent)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.strip().splitlines()[-lines:])


def validate_config(cfg: MachineConfig) -> None:
    """Checks both backends share: files exist, sizes are sane, ids are unique."""
    if cfg.vcpu < 1:
        raise InvalidArgument(f"vcpu must be at least 1, got {cfg.vcpu}")
    if cfg.memory_mib < 64:
        raise InvalidArgument(f"memory must be at least 64 MiB, got {cfg.memory_mib}")
    if not cfg.kernel.is_file():
        raise InvalidArgument(
            f"kernel {cfg.kernel} does not exist: re-import the kernel (stoker kernel pull)"
        )
    if cfg.initrd is not None and not cfg.initrd.is_file():
        raise InvalidArgument(
            f"initrd {cfg.initrd} does not exist: re-import the kernel (stoker kernel pull)"
        )
    seen: set[str] = set()
    for d in cfg.disks:
        if not d.id or d.id in seen:
            raise InvalidArgument(f"disk ids must be unique and non-empty, got {d.id!r}")
        seen.add(d.id)
        if not d.path.is_file():
            raise InvalidArgument(
                f"disk {d.id} ({d.path}) does not exist: delete and recreate the VM"
            )
    if not cfg.vm_dir.is_dir():
        raise InvalidArgument(f"VM directory {cfg.vm_dir} does not exist")


def netns_prefix(netns: str | None) -> list[str]:
    """argv prefix that runs a command inside a named network namespace."""
    return ["ip", "netns", "exec", netns] if netns else []


def vsock_cid_for(ip: str) -> int:
    """A guest CID unique per VM on this host: 3 + the guest IPv4 as an integer's low bits."""
    return 3 + (int(ipaddress.IPv4Address(ip)) & 0xFFFFFF)


# --- the abstract process VMM -----------------------------------------------------------


class ProcessVMM(abc.ABC):
    """One VMM backend: a detached process per VM, found again by pidfile + handle file.

    Template methods here; hooks (underscored, abstract) in each backend. `shutdown` is
    soft (the backend's poweroff request, then wait), else hard (SIGKILL, only if the pid
    is still this VMM), and always post-shutdown (`_post_shutdown` removes what the VMM
    leaves behind) in a `finally`.
    """

    name: ClassVar[str]
    label: ClassVar[str]  # how messages name the VMM ("QEMU", "Firecracker")
    supports_snapshots: ClassVar[bool] = False  # save_state/resume/restore are real
    supports_fork: ClassVar[bool] = False  # restore(link_down=True) and set_link are real

    def __init__(self, runner: Runner, exe_hint: str, logger: logging.Logger) -> None:
        self.runner = runner
        self.exe_hint = exe_hint
        self.log = logger

    # --- backend answers -----------------------------------------------------------------

    @abc.abstractmethod
    def boot_kernel(self, kernel: KernelFiles) -> Path | None:
        """The kernel file this VMM boots (None: the kernel has none it can boot)."""

    def vsock_cid(self, guest_ip: str) -> int | None:
        """The guest's vsock CID, or None when this VMM gives the guest no vsock."""
        return None

    def agent_transport(self, handle: VMMHandle) -> AgentChannel | None:
        """How the host reaches this VM's guest agent (None: no agent channel)."""
        sock = handle.extra.get("agent_socket")
        return AgentChannel(str(sock)) if sock else None

    def accelerator(self, handle: VMMHandle | None = None) -> str | None:
        """The accelerator the VMM runs (`handle`'s), or a start would use (None: n/a)."""
        return None

    # --- snapshots (issue 13) ------------------------------------------------------------

    def _no_snapshots(self) -> Conflict:
        return Conflict(
            f"the {self.label} driver cannot take or restore snapshots: start the VM "
            "without --from-snapshot"
        )

    async def save_state(self, handle: VMMHandle, dest: Path) -> int:
        """Pause the guest and write its device state and RAM: `dest` is the snapshot's
        state file; a backend that keeps guest memory apart writes it beside `dest` in the
        same directory. The guest stays paused (the caller copies the disks, then
        `resume`); on failure nothing is left and the guest runs again. Returns bytes."""
        raise self._no_snapshots()

    async def resume(self, handle: VMMHandle) -> None:
        """Run a guest paused by `save_state`."""
        raise self._no_snapshots()

    async def restore(
        self, cfg: MachineConfig, state: Path, *, link_down: bool = False
    ) -> VMMHandle:
        """A fresh VMM for `cfg` running the guest saved at `state` (its writable disks
        must be the copies taken with it). With `link_down` (forks; `supports_fork`) the
        NIC's link is down before the guest runs, until `set_link`. Nothing is left behind
        on failure."""
        raise self._no_snapshots()

    async def set_link(self, handle: VMMHandle, *, up: bool) -> None:
        """The guest NIC's link up or down (a fork gets its identity with it down)."""
        raise Conflict(f"the {self.label} driver cannot fork VMs yet (QEMU can)")

    async def vmm_version(self, handle: VMMHandle) -> str:
        """The running VMM's version, as a snapshot records it."""
        raise self._no_snapshots()

    async def binary_version(self) -> str:
        """The version a start would run, in `vmm_version`'s form (checked before a
        restore)."""
        raise self._no_snapshots()

    # --- hooks -------------------------------------------------------------------------

    def _validate(self, cfg: MachineConfig) -> None:  # noqa: B027 - optional hook
        """Backend-specific checks of `cfg` before anything is touched."""

    @abc.abstractmethod
    def _prepare(self, cfg: MachineConfig) -> Launch:
        """Build the argv (with the netns prefix) and any files the VMM needs first."""

    @abc.abstractmethod
    async def _configure(self, handle: VMMHandle, cfg: MachineConfig, launch: Launch) -> None:
        """Bring the spawned VMM to a running guest (wait for its API, configure it)."""

    @abc.abstractmethod
    async def _request_poweroff(self, handle: VMMHandle, timeout: float) -> None:
        """Ask the guest to stop at VMM level; raises CommandFailed/Unavailable/Timeout."""

    @abc.abstractmethod
    def _leftover_paths(self, handle: VMMHandle) -> list[Path | str | None]:
        """Files the VMM leaves behind once it has exited (never the logs)."""

    @abc.abstractmethod
    def _matches_pid(self, handle: VMMHandle, argv: list[str]) -> bool:
        """The live process with this argv is this handle's VMM (guards against pid reuse)."""

    @abc.abstractmethod
    def _default_handle(self, vm_dir: Path, pid: int) -> VMMHandle:
        """The handle of a VMM in `vm_dir` known only by its pidfile (no handle file)."""

    def _post_shutdown(self, handle: VMMHandle) -> None:
        """Remove what the VMM leaves behind; safe when it never ran or is long gone."""
        unlink_quiet(*self._leftover_paths(handle))

    def exit_reason(self, pid: int) -> str:
        """Why this VMM's process `pid` ended by itself, in plain words (its wait status
        when the daemon reaped it; a seccomp kill is named with the audit record)."""
        return explain_exit(self.label, pid, sandboxed=self._sandboxed())

    def _sandboxed(self) -> bool:
        """The VMM runs under QEMU's `-sandbox` classes (a backend may say so)."""
        return False

    # --- identity ----------------------------------------------------------------------

    def is_running(self, handle: VMMHandle) -> bool:
        """The pid is alive and really is this VMM for this VM directory."""
        if handle.kind != self.name:
            return False
        return proc_is(handle.pid, self.exe_hint, lambda argv: self._matches_pid(handle, argv))

    def adopt(self, vm_dir: Path) -> VMMHandle | None:
        """Rebuild the handle of a VMM left running by an earlier daemon (pidfile + saved
        handle), or None."""
        handle = load_handle(vm_dir, self.name)
        pid = read_pidfile(vm_dir / PIDFILE)
        if handle is None:
            if pid is None:
                return None
            handle = self._default_handle(vm_dir, pid)
        elif pid is not None:
            handle.pid = pid
        return handle if self.is_running(handle) else None

    # --- start -------------------------------------------------------------------------

    async def start(self, cfg: MachineConfig) -> VMMHandle:
        """Spawn the VMM detached, configure it and start the guest. On any failure the
        process is killed and its leftovers removed before the error is raised."""
        return await self._start(cfg, self._prepare)

    async def _start(
        self, cfg: MachineConfig, prepare: Callable[[MachineConfig], Launch]
    ) -> VMMHandle:
        """The start template (`prepare` is `_prepare`, or a backend's variant of it)."""
        validate_config(cfg)
        self._validate(cfg)
        running = self.adopt(cfg.vm_dir)
        if running is not None:
            raise Conflict(
                f"a {self.label} for VM {cfg.name} is already running (pid {running.pid}): "
                "stop it first (stoker vm stop/kill)"
            )
        # What an earlier run that died without cleanup left (stale sockets make bind fail).
        stale = load_handle(cfg.vm_dir, self.name) or self._default_handle(cfg.vm_dir, 1)
        self._post_shutdown(stale)
        unlink_quiet(cfg.agent_socket)
        cfg.serial_log.parent.mkdir(parents=True, exist_ok=True)
        launch = prepare(cfg)
        handle = VMMHandle(
            kind=self.name,
            pid=1,  # not spawned yet
            api_socket=str(launch.api_socket) if launch.api_socket else None,
            vm_dir=str(cfg.vm_dir),
            extra=launch.extra,
        )
        try:
            for path, what in launch.sockets:
                check_socket_path(path, what)
            handle.pid = await self.runner.spawn(
                launch.argv, stdout=launch.stdout, stderr=launch.stderr, pass_fds=launch.pass_fds
            )
        except BaseException:
            self._post_shutdown(handle)  # what `_prepare` made is named in the handle
            raise
        finally:
            if launch.release is not None:
                launch.release()
        pid = handle.pid
        forget_exit(pid)  # a status kept for an earlier process with this pid
        try:
            save_handle(handle)
            await self._configure(handle, cfg, launch)
        except BaseException:
            await self._abort(handle)
            raise
        self.log.info("%s for %s started (pid %d)", self.name, cfg.name, pid)
        return handle

    async def _abort(self, handle: VMMHandle) -> None:
        """A start failed half-way: never leave the VMM or its files behind. The pid is
        our unreaped child, so it is killed without the identity check (which would miss
        an `ip netns exec` that has not exec'd the VMM yet)."""
        try:
            await asyncio.shield(sigkill_and_wait(handle.pid))
        except Exception as e:  # the original error matters more
            self.log.warning("cleanup after failed start of pid %d: %s", handle.pid, e)
        self._post_shutdown(handle)

    # --- stop --------------------------------------------------------------------------

    async def shutdown(self, handle: VMMHandle, timeout: float, *, hard: bool = False) -> None:
        """Soft (ask the guest to stop at VMM level, wait up to `timeout`), then hard
        (SIGKILL if still this VMM), then post-shutdown cleanup, which always runs."""
        try:
            if not self.is_running(handle):
                return
            if not hard and await self._soft_shutdown(handle, timeout):
                return
            if self.is_running(handle):
                await sigkill_and_wait(handle.pid)
        finally:
            self._post_shutdown(handle)

    async def _soft_shutdown(self, handle: VMMHandle, timeout: float) -> bool:
        """True when the VMM exited within `timeout` of the poweroff request."""
        try:
            await self._request_poweroff(handle, timeout)
        except (CommandFailed, Unavailable, Timeout) as e:
            self.log.info("poweroff request to pid %d failed (%s): killing", handle.pid, e)
            return False
        return await wait_exit(handle.pid, timeout)

    async def kill(self, handle: VMMHandle) -> None:
        """SIGKILL the VMM (only if it is still this VMM), wait for it to exit, remove its
        leftovers. Safe to call when it has already exited."""
        await self.shutdown(handle, 0.0, hard=True)

    # --- introspection -----------------------------------------------------------------

    @abc.abstractmethod
    async def describe(self, handle: VMMHandle) -> dict[str, Any]:
        """State read back from the VMM's own API (always has a boolean `running`)."""


# The name the daemon uses for "a VMM driver".
VMMDriver = ProcessVMM
