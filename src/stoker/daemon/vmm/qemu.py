"""QEMU backend: the `microvm` machine, the same device model as Firecracker.

virtio-mmio disks in `MachineConfig.disks` order (vda, vdb, ...), a virtio-net NIC on the
tap, the serial console appended to the serial log, QMP on `<vm_dir>/qmp.sock` for control
and state, `-pidfile` in the VM directory. ACPI stays on (the microvm default): the Debian
cloud kernel finds virtio-mmio devices through it. `-no-reboot` makes a guest reboot end
QEMU, as it ends Firecracker, so "the VMM exited" always means "the guest is down".

`accel` is chosen by the caller: `kvm` (with `-cpu host`) where guests really boot under
KVM, else `tcg` (`-cpu max`). Under TCG the guest kernel calibrates its TSC against the
emulated PIT, which fails on a loaded host (measured: 4 of 4 parallel boots stuck right
after "tsc: Marking TSC unstable"); microvm has no HPET or PM timer to fall back on. QEMU's
TCG TSC runs at the host's TSC rate, so the driver appends `tsc_early_khz=<host rate>` to
the command line (unless it already has one) and the guest skips calibration. Prefer 1
vCPU under TCG: `-smp 2` was seen to hang once at TSC calibration too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from stoker.daemon.vmm.base import (
    HANDLE_FILE,
    PIDFILE,
    VMM_LOG,
    KernelFiles,
    Launch,
    MachineConfig,
    ProcessVMM,
    VMMHandle,
    check_socket_path,
    has_option,
    netns_prefix,
    pid_alive,
    tail,
    unlink_quiet,
    write_file_atomic,
)
from stoker.daemon.vmm.confine import (
    SANDBOX,
    Confinement,
    Handover,
    drop_argv,
    join_argv,
    memory_limit,
    mount_argv,
    open_tap,
)
from stoker.errors import CommandFailed, Conflict, InvalidArgument, Timeout, Unavailable
from stoker.runner import Runner

QMP_SOCKET = "qmp.sock"
AGENT_PORT_NAME = "org.stoker.agent"

Accel = Literal["kvm", "tcg"]
# TCG's `max` CPU has SVM/VMX, so the guest's udev loads (and signature-checks) kvm during
# boot for nothing. `-cpu max,-svm,-vmx` would avoid that, but guests booted with it hit
# broken mount namespaces (systemd units failing with 226/NAMESPACE) here: the kernel
# refuses the modules instead.
TCG_MODULE_BLACKLIST = "kvm,kvm_amd,kvm_intel"


class QMPClient:
    """A minimal async QMP client: greeting, `qmp_capabilities`, `execute` with a timeout.
    Asynchronous events interleaved with replies are kept in `events`."""

    def __init__(self, socket_path: str, *, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Connect, read the greeting and leave capabilities-negotiation mode."""
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path, limit=1 << 20), self.timeout
            )
            self.greeting = await self._read()
        except TimeoutError:
            await self.close()
            raise Timeout(
                f"QMP socket {self.socket_path} did not greet within {self.timeout:.0f}s"
            ) from None
        except OSError as e:
            await self.close()
            raise Unavailable(
                f"QMP socket {self.socket_path} is not answering ({e.strerror or e}): "
                "QEMU may have exited"
            ) from None
        if "QMP" not in self.greeting:
            await self.close()
            raise Unavailable(f"{self.socket_path} is not a QMP socket: {self.greeting!r}")
        await self.execute("qmp_capabilities")

    async def _read(self) -> dict[str, Any]:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line:
            raise ConnectionResetError("QMP connection closed")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError(f"unexpected QMP message {msg!r}")
        return msg

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run one command and return its `return` value; raises `CommandFailed` with
        QEMU's error description, `Timeout` when it does not answer."""
        if self._writer is None:
            raise Unavailable("QMP client is not connected")
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        limit = timeout if timeout is not None else self.timeout

        async def roundtrip() -> dict[str, Any]:
            assert self._writer is not None
            self._writer.write(json.dumps(req).encode() + b"\n")
            await self._writer.drain()
            while True:
                msg = await self._read()
                if "event" in msg:
                    self.events.append(msg)
                    continue
                return msg

        try:
            reply = await asyncio.wait_for(roundtrip(), limit)
        except TimeoutError:
            raise Timeout(f"QMP {command} did not answer within {limit:.0f}s") from None
        except (OSError, ValueError) as e:
            raise Unavailable(
                f"QMP connection to {self.socket_path} broke during {command} ({e}): "
                "QEMU may have exited"
            ) from None
        if "error" in reply:
            err = reply["error"]
            desc = err.get("desc", err) if isinstance(err, dict) else err
            raise CommandFailed(f"QEMU refused {command}: {desc}")
        return reply.get("return")

    async def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a descriptor under `name` (QMP `getfd`, the fd rides along as
        SCM_RIGHTS on the command's bytes), for `migrate fd:NAME` and the like. Works for a
        confined QEMU, which may neither open our paths nor spawn a process."""
        if self._writer is None:
            raise Unavailable("QMP client is not connected")
        req = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode() + b"\n"
        await self._writer.drain()
        tsock = self._writer.get_extra_info("socket")
        # The transport's socket cannot sendmsg; a dup of it can (same connection).
        with socket.socket(fileno=os.dup(tsock.fileno())) as s:
            s.setblocking(True)
            s.settimeout(self.timeout)
            try:
                socket.send_fds(s, [req], [fd])
            except OSError as e:
                raise Unavailable(
                    f"QMP connection to {self.socket_path} broke during getfd ({e}): "
                    "QEMU may have exited"
                ) from None

        async def reply() -> dict[str, Any]:
            while True:
                msg = await self._read()
                if "event" in msg:
                    self.events.append(msg)
                    continue
                return msg

        try:
            msg = await asyncio.wait_for(reply(), self.timeout)
        except TimeoutError:
            raise Timeout(f"QMP getfd did not answer within {self.timeout:.0f}s") from None
        except (OSError, ValueError) as e:
            raise Unavailable(
                f"QMP connection to {self.socket_path} broke during getfd ({e})"
            ) from None
        if "error" in msg:
            err = msg["error"]
            desc = err.get("desc", err) if isinstance(err, dict) else err
            raise CommandFailed(f"QEMU refused getfd: {desc}")

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def __aenter__(self) -> QMPClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _esc(value: str | os.PathLike[str]) -> str:
    """QEMU option values separate with commas; a literal comma is doubled."""
    return str(value).replace(",", ",,")


def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz (the TCG guest's TSC rate), or None when unknown."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000) or None
    except (OSError, ValueError):
        pass
    return None


XEN_ELFNOTE_PHYS32_ENTRY = 18


def pvh_bootable(kernel: Path) -> bool:
    """True when `kernel` is an ELF vmlinux with a PVH entry point (the Xen
    PHYS32_ENTRY note), which QEMU boots directly: no bzImage setup code, no
    decompression (under TCG that saved ~1 CPU second per boot here)."""
    try:
        with kernel.open("rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return False
            phoff = int.from_bytes(head[0x20:0x28], "little")
            phentsize = int.from_bytes(head[0x36:0x38], "little")
            phnum = int.from_bytes(head[0x38:0x3A], "little")
            if phentsize < 56 or phnum > 64:
                return False
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                ph = table[i * phentsize : (i + 1) * phentsize]
                if int.from_bytes(ph[0:4], "little") != 4:  # PT_NOTE
                    continue
                off = int.from_bytes(ph[8:16], "little")
                size = min(int.from_bytes(ph[32:40], "little"), 1 << 16)
                f.seek(off)
                notes = f.read(size)
                pos = 0
                while pos + 12 <= len(notes):
                    namesz = int.from_bytes(notes[pos : pos + 4], "little")
                    descsz = int.from_bytes(notes[pos + 4 : pos + 8], "little")
                    ntype = int.from_bytes(notes[pos + 8 : pos + 12], "little")
                    name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
                    if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                        return True
                    pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    except OSError:
        return False
    return False


def guest_cmdline(cmdline: str, accel: Accel, tsc_khz: int | None) -> str:
    """The kernel command line QEMU passes: under TCG with the TSC rate preset and the TSC
    trusted (`tsc=reliable`). Without the latter, a starved vCPU made the clocksource
    watchdog (refined-jiffies, microvm has no HPET) mark the TSC unstable: the guest then
    kept time in jiffies, which lose ticks whenever the host does not run the vCPU. And
    without kvm (`TCG_MODULE_BLACKLIST`)."""
    extra: list[str] = []
    if accel == "tcg":
        words = cmdline.split()
        if tsc_khz and not any(w.startswith("tsc_early_khz=") for w in words):
            extra.append(f"tsc_early_khz={tsc_khz}")
        if not any(w.startswith("tsc=") for w in words):
            extra.append("tsc=reliable")
        if not any(w.startswith("module_blacklist=") for w in words):
            extra.append(f"module_blacklist={TCG_MODULE_BLACKLIST}")
    return " ".join([cmdline, *extra])


def qemu_argv(
    cfg: MachineConfig,
    qemu_bin: str,
    accel: Accel,
    qmp: Path,
    pidfile: Path,
    tsc_khz: int | None = None,
    *,
    handover: Handover | None = None,
    sandbox: bool = False,
    paused: bool = False,
    incoming: bool = False,
) -> list[str]:
    """The QEMU command line for `cfg` (without the netns prefix). With `handover` every
    file and socket is one of the descriptors it holds (a QEMU that is not root).
    `incoming`: paused, waiting for a saved state (`-incoming defer`, then QMP
    `migrate-incoming`)."""
    ho = handover.paths if handover is not None else {}
    argv = [
        qemu_bin,
        "-name",
        _esc(f"stoker-{cfg.name}"),
        "-M",
        "microvm",
        "-accel",
        accel,
        "-cpu",
        "host" if accel == "kvm" else "max",
        "-m",
        str(cfg.memory_mib),
        "-smp",
        str(cfg.vcpu),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
    ]
    if sandbox:
        argv += ["-sandbox", SANDBOX]
    if paused:
        argv.append("-S")
    for spec in handover.add_fd if handover is not None else []:
        argv += ["-add-fd", spec]
    argv += [
        "-chardev",
        f"file,id=serial0,path={_esc(ho.get('serial', cfg.serial_log))},append=on",
        "-serial",
        "chardev:serial0",
        "-kernel",
        ho.get("kernel", str(cfg.kernel)),
    ]
    if cfg.initrd is not None:
        argv += ["-initrd", ho.get("initrd", str(cfg.initrd))]
    argv += ["-append", guest_cmdline(cfg.cmdline, accel, tsc_khz)]
    for d in cfg.disks:
        argv += [
            "-drive",
            f"if=none,id={_esc(d.id)},file={_esc(ho.get('disk:' + d.id, d.path))},format=raw,"
            f"readonly={'on' if d.read_only else 'off'}"
            # A writable disk from an fd set: its read-only member keeps the image locks
            # QEMU took while a migration had it inactive (OFD locks live as long as the
            # fd set's descriptor), so `cont` after a snapshot would fail to get the write
            # lock. The daemon's per-VM lock already keeps two QEMUs off one disk.
            + (",file.locking=off" if ("disk:" + d.id) in ho and not d.read_only else ""),
            "-device",
            f"virtio-blk-device,drive={_esc(d.id)}",
        ]
    if cfg.tap:
        tap_fd = handover.tap_fd if handover is not None else None
        argv += [
            "-netdev",
            f"tap,id=net0,fd={tap_fd}"
            if tap_fd is not None
            else f"tap,id=net0,ifname={_esc(cfg.tap)},script=no,downscript=no",
            "-device",
            f"virtio-net-device,netdev=net0,mac={cfg.mac}",
        ]
    if cfg.agent_socket is not None:
        argv += [
            "-device",
            "virtio-serial-device",
            "-chardev",
            f"socket,id=agent,fd={handover.agent_fd},server=on,wait=off"
            if handover is not None and handover.agent_fd is not None
            else f"socket,id=agent,path={_esc(cfg.agent_socket)},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]
    # Entropy from the host from the first moment (and a source to reseed restored clones).
    argv += [
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-device,rng=rng0",
    ]
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    if handover is not None and handover.qmp_fd is not None:
        # No -pidfile: QEMU could not create it; the daemon writes it (see `handover_for`).
        argv += ["-chardev", f"socket,id=qmp,fd={handover.qmp_fd},server=on,wait=off"]
        argv += ["-mon", "chardev=qmp,mode=control"]
        return argv
    argv += ["-qmp", f"unix:{_esc(qmp)},server=on,wait=off", "-pidfile", str(pidfile)]
    return argv


def handover_for(cfg: MachineConfig, qmp: Path, pidfile: Path) -> Handover:
    """Open everything a QEMU that is not root needs (see vmm.confine). The pidfile's path
    rides along as an fd set's `opaque` label: it is what `is_running` recognises."""
    h = Handover()
    try:
        h.fdset(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), opaque=str(pidfile))
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        h.paths["serial"] = h.fdset(os.open(cfg.serial_log, flags, 0o600), opaque="serial")
        h.paths["kernel"] = h.reopenable(cfg.kernel, "kernel")
        if cfg.initrd is not None:
            h.paths["initrd"] = h.reopenable(cfg.initrd, "initrd")
        for d in cfg.disks:
            ro = os.open(d.path, os.O_RDONLY | os.O_CLOEXEC)
            fds = [ro] if d.read_only else [os.open(d.path, os.O_RDWR | os.O_CLOEXEC), ro]
            h.paths["disk:" + d.id] = h.fdset(*fds, opaque=d.id)
        if cfg.tap:
            h.tap_fd = h._child(open_tap(cfg.tap, cfg.netns))
        if cfg.agent_socket is not None:
            h.agent_fd = h.listening(cfg.agent_socket)
        h.qmp_fd = h.listening(qmp)
    except BaseException:
        h.close()
        raise
    return h


def _marked(argv: list[str], pidfile: str) -> bool:
    """A confined QEMU carries its pidfile's path as an `-add-fd ...,opaque=` label."""
    want = f",opaque={_esc(pidfile)}"
    return any(
        a == "-add-fd" and i + 1 < len(argv) and argv[i + 1].endswith(want)
        for i, a in enumerate(argv)
    )


class QemuDriver(ProcessVMM):
    """The QEMU `microvm` VMM driver (see module docstring)."""

    name = "qemu"
    label = "QEMU"
    supports_snapshots = True
    supports_fork = True

    def __init__(
        self,
        runner: Runner,
        qemu_bin: str = "qemu-system-x86_64",
        *,
        accel: Accel = "tcg",
        qmp_timeout: float = 5.0,
        ready_timeout: float = 15.0,
        tsc_khz: int | None = None,
        logger: logging.Logger | None = None,
        confine: Confinement | None = None,
        start_paused: bool = False,
    ) -> None:
        """`tsc_khz` presets the TCG guest's TSC rate (default: the host's, see module
        docstring; 0 turns the preset off). `confine` (vmm.confine.plan) runs QEMU as an
        unprivileged user, under seccomp and in its own cgroup; `start_paused` adds -S."""
        if accel not in ("kvm", "tcg"):
            raise InvalidArgument(f"accel must be kvm or tcg, got {accel!r}")
        super().__init__(
            runner,
            os.path.basename(qemu_bin) or "qemu",
            logger or logging.getLogger("stoker.vmm.qemu"),
        )
        self.qemu_bin = qemu_bin
        self.accel: Accel = accel
        self.qmp_timeout = qmp_timeout
        self.ready_timeout = ready_timeout
        self.tsc_khz = host_tsc_khz() if tsc_khz is None and accel == "tcg" else tsc_khz
        self.confine = confine or Confinement()
        self.start_paused = start_paused

    # --- backend answers ---------------------------------------------------------------

    def boot_kernel(self, kernel: KernelFiles) -> Path | None:
        """The ELF vmlinux when it has a PVH entry (no decompression, docs/guest-boot.md),
        else the bzImage (an ELF vmlinux too, when that is all there is)."""
        if kernel.vmlinux and pvh_bootable(Path(kernel.vmlinux)):
            return Path(kernel.vmlinux)
        f = kernel.bzimage or kernel.vmlinux
        return Path(f) if f else None

    def accelerator(self, handle: VMMHandle | None = None) -> str | None:
        """`kvm` or `tcg`: the running QEMU's (from its handle), else this driver's."""
        if handle is not None:
            accel = handle.extra.get("accel")
            return str(accel) if accel is not None else None
        return self.accel

    # --- identity ----------------------------------------------------------------------

    def _matches_pid(self, handle: VMMHandle, argv: list[str]) -> bool:
        """QEMU started with this VM directory's pidfile (a confined one carries it as a
        label, see `_marked`)."""
        pidfile = str(handle.extra.get("pidfile") or Path(handle.vm_dir) / PIDFILE)
        return has_option(argv, "-pidfile", pidfile) or _marked(argv, pidfile)

    def _default_handle(self, vm_dir: Path, pid: int) -> VMMHandle:
        return VMMHandle(
            kind=self.name,
            pid=pid,
            api_socket=str(vm_dir / QMP_SOCKET),
            vm_dir=str(vm_dir),
            extra={"pidfile": str(vm_dir / PIDFILE)},
        )

    # --- start -------------------------------------------------------------------------

    async def start(self, cfg: MachineConfig, *, incoming: bool = False) -> VMMHandle:
        """Spawn QEMU detached and wait until QMP answers with the guest running; with
        `incoming`, paused and waiting for `load_state` instead (see `restore`)."""
        return await self._start(cfg, lambda c: self._prepare(c, incoming=incoming))

    def _prepare(self, cfg: MachineConfig, *, incoming: bool = False) -> Launch:
        vm_dir = cfg.vm_dir
        qmp = vm_dir / QMP_SOCKET
        pidfile = vm_dir / PIDFILE
        # Checked before the handover binds them.
        check_socket_path(qmp, "QMP socket")
        if cfg.agent_socket is not None:
            check_socket_path(cfg.agent_socket, "agent socket")
        vmm_log = vm_dir / VMM_LOG
        if self.confine.pending_user is not None:
            self.confine = self.confine.with_pending_user()
            self.log.info("QEMU confinement: %s", self.confine.describe())
        c = self.confine
        handover = handover_for(cfg, qmp, pidfile) if c.fds else None
        cgroups: list[str] = []
        try:
            procs = []
            if c.cgroups is not None:
                limit = memory_limit(cfg.memory_mib, self.accel)
                procs = c.cgroups.create(cfg.vm_id, limit, cfg.vcpu)
                cgroups = [str(p.parent) for p in procs]
            argv = [
                *join_argv(procs),
                *netns_prefix(cfg.netns),
                *mount_argv(c, _hidden_dirs(cfg.vm_dir)),
                *drop_argv(c),
                *qemu_argv(
                    cfg,
                    self.qemu_bin,
                    self.accel,
                    qmp,
                    pidfile,
                    self.tsc_khz,
                    handover=handover,
                    sandbox=c.sandbox,
                    paused=self.start_paused,
                    incoming=incoming,
                ),
            ]
        except BaseException:
            _remove_cgroups(cgroups)
            if handover is not None:
                handover.close()
            raise
        return Launch(
            argv=argv,
            stdout=vmm_log,
            stderr=None,
            api_socket=qmp,
            extra={
                "vm_id": cfg.vm_id,
                "netns": cfg.netns,
                "accel": self.accel,
                "pidfile": str(pidfile),
                "log": str(vmm_log),
                "serial_log": str(cfg.serial_log),
                "agent_socket": str(cfg.agent_socket) if cfg.agent_socket else None,
                "confinement": c.describe(),
                "cgroups": cgroups,
            },
            pass_fds=handover.fds if handover else None,
            release=handover.close if handover else None,
            # A QEMU that is not root cannot write its pidfile: the daemon does.
            context=handover is not None,
        )

    async def _configure(self, handle: VMMHandle, cfg: MachineConfig, launch: Launch) -> None:
        """QEMU is up when QMP answers; it runs the guest from the start (no -S)."""
        if launch.context:
            write_file_atomic(Path(handle.extra["pidfile"]), f"{handle.pid}\n")
        deadline = time.monotonic() + self.ready_timeout
        qmp = Path(handle.api_socket or "")
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not pid_alive(handle.pid):
                raise CommandFailed(
                    f"qemu exited during startup: {self.exit_reason(handle.pid)}: "
                    + (tail(handle.extra.get("log")) or "no output"),
                    detail=f"log: {handle.extra.get('log')}",
                )
            if qmp.exists():
                try:
                    async with QMPClient(str(qmp), timeout=2.0) as c:
                        await c.execute("query-status")
                    return
                except (Unavailable, Timeout) as e:
                    last = e
            await asyncio.sleep(0.02)
        raise Timeout(
            f"qemu did not open its QMP socket {qmp} within {self.ready_timeout:.0f}s"
            + (f" ({last})" if last else "")
            + f": see {handle.extra.get('log')}"
        )

    def _sandboxed(self) -> bool:
        return self.confine.sandbox

    # --- stop --------------------------------------------------------------------------

    async def _request_poweroff(self, handle: VMMHandle, timeout: float) -> None:
        """The ACPI power button (`system_powerdown`)."""
        if not handle.api_socket:
            raise Unavailable("this QEMU handle has no QMP socket")
        async with QMPClient(handle.api_socket, timeout=min(self.qmp_timeout, timeout)) as c:
            await c.execute("system_powerdown")

    def _leftover_paths(self, handle: VMMHandle) -> list[Path | str | None]:
        return [
            handle.api_socket,
            handle.extra.get("agent_socket"),
            handle.extra.get("pidfile") or Path(handle.vm_dir) / PIDFILE,
            Path(handle.vm_dir) / HANDLE_FILE,
        ]

    def _post_shutdown(self, handle: VMMHandle) -> None:
        """Sockets, pidfile and handle file, then the VM's cgroups."""
        super()._post_shutdown(handle)
        _remove_cgroups(handle.extra.get("cgroups") or [])

    # --- snapshots (issue 13) ----------------------------------------------------------

    async def save_state(self, handle: VMMHandle, dest: Path, timeout: float = 120.0) -> int:
        """Pause the guest and write its device state and RAM to `dest`. The daemon opens
        the file and hands QEMU the descriptor (QMP `getfd`, `migrate fd:`): a confined
        QEMU (another user, seccomp spawn=deny) can neither open our path nor run `exec:`.
        The guest stays paused, so the caller can copy the disks at that instant, then
        `resume`. Returns the file's size. On any failure (a full disk included) nothing
        is left at `dest` and the guest runs again."""
        if not handle.api_socket:
            raise Unavailable("this QEMU handle has no QMP socket")
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        unlink_quiet(tmp)
        fdname = f"stoker-save-{os.getpid()}"
        async with QMPClient(handle.api_socket, timeout=self.qmp_timeout) as c:
            await c.execute("stop")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    await c.send_fd(fdname, fd)
                finally:
                    os.close(fd)
                await c.execute("migrate", {"uri": f"fd:{fdname}"})
                status = await self._migration_done(c, "query-migrate", timeout)
                if status != "completed":
                    raise CommandFailed(f"QEMU could not save the VM state: {status}")
                os.replace(tmp, dest)
            except OSError as e:
                unlink_quiet(tmp)
                with contextlib.suppress(Exception):
                    await c.execute("cont")
                raise CommandFailed(
                    f"QEMU could not save the VM state to {dest}: {e.strerror or e}"
                ) from None
            except BaseException:
                unlink_quiet(tmp)
                with contextlib.suppress(Exception):
                    await c.execute("cont")
                raise
        return dest.stat().st_size

    async def load_state(self, handle: VMMHandle, src: Path, timeout: float = 120.0) -> None:
        """Feed a QEMU started with `incoming=True` the state `save_state` wrote, through a
        descriptor the daemon opened (`migrate-incoming fd:`; works confined). The guest
        stays paused (`resume` runs it)."""
        if not handle.api_socket:
            raise Unavailable("this QEMU handle has no QMP socket")
        if not src.is_file():
            raise Conflict(f"snapshot state {src} is missing: the snapshot is incomplete")
        state: str | None = None
        fdname = f"stoker-load-{os.getpid()}"
        try:
            async with QMPClient(handle.api_socket, timeout=self.qmp_timeout) as c:
                fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    await c.send_fd(fdname, fd)
                finally:
                    os.close(fd)
                await c.execute("migrate-incoming", {"uri": f"fd:{fdname}"})
                deadline = time.monotonic() + timeout
                while True:
                    # The incoming side's own status: the run state after a load is the
                    # one saved (a guest saved before it ever ran comes back `prelaunch`).
                    mig = await c.execute("query-migrate")
                    done = mig.get("status") if isinstance(mig, dict) else None
                    if done in ("completed", "failed", "cancelled"):
                        st = await c.execute("query-status")
                        state = st.get("status") if isinstance(st, dict) else None
                        if done != "completed":
                            state = f"{done}, {state}"
                        break
                    if time.monotonic() > deadline:
                        raise Timeout(f"QEMU did not load {src} within {timeout:.0f}s")
                    await asyncio.sleep(0.02)
        except Unavailable:
            # A state QEMU cannot load (another machine shape, a damaged file) ends it.
            state = "exited"
        if state not in ("paused", "prelaunch"):
            raise CommandFailed(
                f"QEMU could not load the VM state from {src} ({state}): "
                + (tail(handle.extra.get("log")) or "no output"),
                detail=f"log: {handle.extra.get('log')}",
            )

    async def resume(self, handle: VMMHandle) -> None:
        """Run a paused guest (after `save_state` or `load_state`)."""
        if not handle.api_socket:
            raise Unavailable("this QEMU handle has no QMP socket")
        async with QMPClient(handle.api_socket, timeout=self.qmp_timeout) as c:
            await c.execute("cont")

    async def restore(
        self, cfg: MachineConfig, state: Path, *, link_down: bool = False
    ) -> VMMHandle:
        """A QEMU for `cfg` running the guest saved in `state` (its disks must be the ones
        copied when it was saved). With `link_down` the NIC's link is down before the
        guest runs (a clone must not send a frame with its source's identity; `set_link`
        brings it up). Kills the new QEMU on any failure."""
        handle = await self.start(cfg, incoming=True)
        try:
            await self.load_state(handle, state)
            if link_down and cfg.tap:
                # After the load: virtio-net infers the link from the migrated status.
                await self.set_link(handle, up=False)
            await self.resume(handle)
        except BaseException:
            await self._abort(handle)
            raise
        return handle

    async def set_link(self, handle: VMMHandle, *, up: bool) -> None:
        """The NIC's link (QMP `set_link`): down, QEMU passes no frame either way and the
        guest sees no carrier."""
        if not handle.api_socket:
            raise Unavailable("this QEMU handle has no QMP socket")
        async with QMPClient(handle.api_socket, timeout=self.qmp_timeout) as c:
            await c.execute("set_link", {"name": "net0", "up": up})

    async def vmm_version(self, handle: VMMHandle) -> str:
        """The running QEMU's version (QMP query-version), as a snapshot records it."""
        if not handle.api_socket:
            raise Unavailable("this QEMU handle has no QMP socket")
        async with QMPClient(handle.api_socket, timeout=self.qmp_timeout) as c:
            v = await c.execute("query-version")
        q = v.get("qemu", {}) if isinstance(v, dict) else {}
        pkg = str(v.get("package", "")).strip() if isinstance(v, dict) else ""
        return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}" + (f" ({pkg})" if pkg else "")

    async def binary_version(self) -> str:
        """The version of the QEMU binary a start would run, in `vmm_version`'s form
        (`7.2.19 (Debian 1:7.2+dfsg-7+deb12u7)`): checked before a restore."""
        r = await self.runner.run([self.qemu_bin, "--version"], timeout=10)
        first = r.stdout.decode(errors="replace").splitlines()[0] if r.stdout else ""
        return first.removeprefix("QEMU emulator version ").strip()

    async def _migration_done(self, c: QMPClient, query: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            info = await c.execute(query)
            status = str(info.get("status", "")) if isinstance(info, dict) else ""
            if status in ("completed", "failed", "cancelled"):
                if status == "failed" and isinstance(info, dict) and info.get("error-desc"):
                    return f"failed: {info['error-desc']}"
                return status
            if time.monotonic() > deadline:
                with contextlib.suppress(Exception):
                    await c.execute("migrate_cancel")
                raise Timeout(f"saving the VM state did not finish within {timeout:.0f}s")
            await asyncio.sleep(0.02)

    # --- introspection ---------------------------------------------------------------

    async def describe(self, handle: VMMHandle) -> dict[str, Any]:
        """QMP query-status."""
        if not handle.api_socket:
            raise Unavailable("this QEMU handle has no QMP socket")
        async with QMPClient(handle.api_socket, timeout=self.qmp_timeout) as c:
            status = await c.execute("query-status")
        st = status.get("status") if isinstance(status, dict) else None
        return {
            "kind": self.name,
            "running": bool(isinstance(status, dict) and status.get("running")),
            "state": st,
            "status": status,
            "accel": handle.extra.get("accel"),
            "confinement": handle.extra.get("confinement"),
        }


def _hidden_dirs(vm_dir: Path) -> list[Path]:
    """What a confined QEMU's mount namespace covers up: the state directory the VM
    directories live in (`<state>/vms/<id>`: every VM's disks, the images, keys, the
    database), else the VM directory's parent. Never `/` or a top-level directory."""
    d = vm_dir.resolve().parent
    if d.name == "vms":
        d = d.parent
    return [d] if len(d.parts) > 2 else []


def _remove_cgroups(dirs: list[str]) -> None:
    """Empty once QEMU is gone; a cgroup still holding a process stays (EBUSY), as does the
    `stoker-vms` parent while other VMs' cgroups are in it."""
    for d in dirs:
        for x in (d, os.path.dirname(d)):
            with contextlib.suppress(OSError):
                os.rmdir(x)
