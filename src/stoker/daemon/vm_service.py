"""VMService: VM lifecycle, stats, ports, VMM handles, per-VM locks, create-op registry.

`vm_locks[id]` is held for the entire lifecycle op on a VM. `create_vm_lock` is the
narrow reservation lock: name re-check + IP allocation + initial row only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from stoker.config import Config, host_memory_bytes
from stoker.daemon import vm_stats
from stoker.daemon.agent import AgentClient
from stoker.daemon.api import CreateVM, ExecVM, SetVM
from stoker.daemon.capabilities import CapabilityHooks
from stoker.daemon.guestssh import (
    GuestSSHLike,
    SSHTarget,
    add_known_host,
    generate_host_key,
    remove_known_host,
)
from stoker.daemon.imagemgr import ext4, workload
from stoker.daemon.locks import LockSet
from stoker.daemon.opstate import Registry
from stoker.daemon.opstate.registry import OpState
from stoker.daemon.revert import Reverter
from stoker.daemon.vm_disks import (
    GuestNet,
    grow_work_disk,
    mac_for,
    make_overlay_disk,
    make_work_disk,
)
from stoker.daemon.vmm import Disk, MachineConfig, VMMDriver, VMMHandle
from stoker.daemon.vmm.base import pid_alive
from stoker.errors import (
    AlreadyExists,
    Ambiguous,
    Conflict,
    InvalidArgument,
    NotFound,
    StokerError,
)
from stoker.layout import Layout
from stoker.model.names import generate_name, validate_name
from stoker.model.records import Image, Kernel, Teardown, VMRecord, VMSpec, VMState
from stoker.model.sizes import MIN_DISK_BYTES, check_memory_mib, format_size, parse_size
from stoker.model.wire import (
    ExecDone,
    ExecInputTaken,
    ExecSignalled,
    FanResult,
    GuestPort,
    LogChunk,
    LogsInfo,
    PortForwardInfo,
    SSHInfo,
    VMCreated,
    VMDeleted,
    VMHealth,
    VMShown,
    VMStats,
)
from stoker.runner import Runner
from stoker.store import Store
from stoker.store.db import now

Progress = Callable[..., None]
Spawn = Callable[[VMMDriver, MachineConfig], Awaitable[VMMHandle]]

OVERLAY = "overlay.ext4"
WORKDISK = "work.ext4"
SERIAL_LOG = "serial.log"
# No `ip=`: kernel network autoconfig stalled boots in the prior art (docs/guest-boot.md).
# The rest is boot time: one UART, no crypto self-tests, and only notices and worse on the
# console (each character there is several emulated I/O exits under TCG).
POOL_NAME_PREFIX = "pool-"  # pool VMs' names until taken (hidden from user listings)
BOOT_CMDLINE = (
    "console=ttyS0 reboot=k panic=-1 root=/dev/vda ro rootwait init=/usr/lib/stoker/overlay-init"
    " 8250.nr_uarts=1 cryptomgr.notests loglevel=6"
)
STOP_GRACE = 0.5  # seconds the VMM gets to exit after poweroff before it is killed
DEFAULT_BOOT_TIMEOUT = 180.0


@dataclass
class CreateRequest:
    """What `vm create` asks for; unset sizes come from config/heuristic defaults."""

    name: str | None = None
    image: str | None = None
    vcpu: int | None = None
    memory_mib: int | None = None
    disk_size: str | int | None = None
    nat: bool = False  # alias of net="nat"
    net: str | None = None  # `--net` policy; None: the default (host-only)
    no_start: bool = False
    ready: str = "ssh"  # "agent": running once the guest agent can exec (SSH may lag)
    ttl: float | None = None  # seconds: the VM is deleted this long after creation


if TYPE_CHECKING:
    from stoker.daemon.agent import ExecSession
    from stoker.daemon.host_network import HostNetwork
    from stoker.daemon.image_service import ImageService
    from stoker.daemon.pool_service import PoolService
    from stoker.daemon.portfwd import PortForwards
    from stoker.daemon.workspace_service import WorkspaceService
    from stoker.rpc.server import RequestContext


class VMService:
    """Owns VM records and the processes and devices behind running VMs."""

    def __init__(
        self,
        store: Store,
        layout: Layout,
        config: Config,
        runner: Runner,
        logger: logging.Logger,
        net: HostNetwork,
        images: ImageService,
        ws: WorkspaceService,
        hooks: CapabilityHooks,
        ssh: GuestSSHLike,
        forwards: PortForwards,
        driver_factory: Callable[[], VMMDriver] | None = None,
    ) -> None:
        self.store = store
        self.layout = layout
        self.config = config
        self.runner = runner
        self.log = logger
        self.net = net
        self.images = images
        self.ws = ws
        self.hooks = hooks
        self.forwards = forwards
        self.vm_locks = LockSet()
        self.create_vm_lock = asyncio.Lock()
        self.create_ops: Registry[OpState] = Registry()
        # VMM handles of running VMs, in memory only: the store's teardown identity is the
        # one durable record, the driver's pidfile + vmm.json find its process again.
        self.vmm_handles: dict[str, VMMHandle] = {}
        # Test seams (per instance): how to make the VMM driver, how to reach guests.
        self.driver_factory: Callable[[], VMMDriver] = driver_factory or (
            lambda: default_driver(config, runner)
        )
        self.ssh = ssh
        self.boot_timeout = float(config.boot_timeout or DEFAULT_BOOT_TIMEOUT)
        self.last_timings: dict[str, dict[str, float]] = {}
        self._driver_cache: VMMDriver | None = None
        self.agents: dict[str, AgentClient] = {}
        self.last_samples: dict[str, vm_stats.Sample] = {}
        self.agent_required = False  # readiness gates on SSH; the agent is waited for too
        self.exec_capable: dict[str, bool] = {}  # VM id -> its agent answered with exec
        self.execs: dict[str, ExecSession] = {}  # running execs by token (vm_exec)
        self.ssh_seen: set[str] = set()  # VM ids whose SSH answered since their start
        self.pool: PoolService | None = None  # the warm pool (wiring sets it)

    # --- lookup ------------------------------------------------------------------------

    def resolve(self, ref: str) -> VMRecord:
        """A VM by exact name, full id, or unique id prefix."""
        vms = self.store.list_vms()
        for v in vms:
            if v.name == ref or v.id == ref:
                return v
        matches = [v for v in vms if ref and v.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(v.name for v in matches)
            raise Ambiguous(f"VM reference {ref!r} matches several VMs ({names}): use the name")
        raise NotFound(f"VM {ref!r} not found: `stoker vm list` shows the VMs there are")

    async def list_vms(self) -> list[VMRecord]:
        """Every VM, oldest first."""
        return self.store.list_vms()

    async def show_vm(self, ref: str) -> VMRecord:
        """One VM, with its last error and workspace record."""
        return self.resolve(ref)

    # --- locking -----------------------------------------------------------------------

    @asynccontextmanager
    async def with_vm_lock_by_id(self, vm_id: str) -> AsyncIterator[VMRecord]:
        """Hold vm_locks[id]; yields the VM as re-read under the lock."""
        async with self.vm_locks.hold(vm_id):
            vm = self.store.get_vm(vm_id)
            if vm is None:
                raise NotFound(f"VM {vm_id!r} was deleted meanwhile")
            yield vm

    @asynccontextmanager
    async def with_vm_lock_by_ref(self, ref: str) -> AsyncIterator[VMRecord]:
        """Resolve `ref`, then hold its lock (re-resolving under it)."""
        vm = self.resolve(ref)
        async with self.with_vm_lock_by_id(vm.id) as locked:
            yield locked

    def vm_dir(self, vm: VMRecord) -> Path:
        return Path(vm.vm_dir)

    # --- create ------------------------------------------------------------------------

    def _resolve_spec(
        self,
        vcpu: int | None,
        memory_mib: int | None,
        disk_size: str | int | None,
        base: VMSpec | None = None,
    ) -> VMSpec:
        d = self.config.vm_defaults
        v = vcpu if vcpu is not None else (base.vcpu if base else d.vcpu.value)
        m = (
            memory_mib
            if memory_mib is not None
            else (base.memory_mib if base else d.memory_mib.value)
        )
        if v <= 0 or v > 64:
            raise InvalidArgument(f"--vcpu must be between 1 and 64, got {v}")
        check_memory_mib(m, "--memory", host_memory_bytes())
        if disk_size is not None:
            ds = parse_size(disk_size, "--disk-size", min_bytes=MIN_DISK_BYTES)
        else:
            ds = base.disk_size if base else d.disk_size.value
        return VMSpec(
            vcpu=v,
            memory_mib=m,
            disk_size=ds,
            overlay_size=base.overlay_size if base else d.overlay_size.value,
            nat=base.nat if base else False,
            net=base.net if base else "host-only",
        )

    async def create_vm(self, p: CreateRequest, progress: Progress) -> VMRecord:
        """Validate, reserve name + IP, build disks, and (unless no_start) boot to SSH."""
        if p.name:
            validate_name(p.name)
        spec = self._resolve_spec(p.vcpu, p.memory_mib, p.disk_size)
        policy = await self.net.check_policy(p.net, nat=p.nat)
        spec.net, spec.nat = str(policy), policy.mode == "nat"
        expires_at = expiry_after(p.ttl) if p.ttl is not None else None
        image_name = p.image or self.config.default_image
        progress(
            "spec",
            f"{spec.vcpu} vcpu · {spec.memory_mib} MiB · "
            f"{format_size(spec.disk_size)} disk · net {spec.net}",
        )
        # Image resolution (maybe a pull or build) happens outside every VM lock.
        image = await self.images.ensure_image(image_name, progress)
        system = await self._system_image_for(image, progress)
        if self.pool is not None:
            # A warm VM of this image, when the request is one the pool can serve; any
            # refusal or failure is said in the progress stream and the boot is cold.
            taken = await self.pool.take(p, image, spec, policy, expires_at, progress)
            if taken is not None:
                return taken
        op = self.create_ops.add(OpState(kind="create", target=p.name or "?"))
        try:
            async with Reverter(self.log) as revert:
                vm = await self._reserve(p.name, image, spec, expires_at, revert, system=system)
                name = vm.name
                op.target = name
                op.stage = "disks"
                # Nothing ran yet: a failure rolls the half-made VM back entirely.
                await run_to_end(self._prepare_disks(vm, image, progress, revert))
                revert.success()
            if p.no_start:
                op.finish()
                progress("created", f"{name} created (not started)")
                return vm
            op.stage = "start"
            async with self.with_vm_lock_by_id(vm.id) as locked:
                vm = await self._start_locked(locked, progress, ready=p.ready)
            op.finish()
            return vm
        except BaseException as e:
            op.finish(str(e))
            raise

    async def _reserve(
        self,
        name: str | None,
        image: Image,
        spec: VMSpec,
        expires_at: str | None,
        revert: Reverter,
        pool: str | None = None,
        system: Image | None = None,
        template: bool = False,
    ) -> VMRecord:
        """Under `create_vm_lock`: pick or check the name (pool VMs' names count), allocate
        the guest IP, insert the row (with `pool`, as a pool VM of that image); the row's
        removal is registered on `revert`."""
        async with self.create_vm_lock:
            taken = {v.name for v in self.store.list_all_vms()}
            if pool is not None:
                name = POOL_NAME_PREFIX + uuid.uuid4().hex[:8]
            name = name or generate_name(taken)
            if name in taken:
                raise AlreadyExists(
                    f"a VM named {name!r} already exists: pick another --name or "
                    f"`stoker vm delete {name}`"
                )
            ip = self.net.allocate_ip(self.store.used_ips())
            vm_id = uuid.uuid4().hex
            ts = now()
            vm = VMRecord(
                id=vm_id,
                name=name,
                state=VMState.CREATED,
                image=image.name,
                spec=spec,
                guest_ip=ip,
                dns_name=f"{name}.vm",
                vm_dir=str(self.layout.vm_dir(vm_id)),
                created_at=ts,
                updated_at=ts,
                system_image=system.name if system is not None else None,
            )
            self.store.insert_vm(vm, pool=pool, template=template)
            revert.add(lambda: self.store.delete_vm(vm_id), "delete the VM record")
            if expires_at is not None:
                self.store.set_vm_expiry(vm.id, expires_at)
                vm.expires_at = expires_at
        return vm

    async def create_pool_vm(
        self, image: Image, progress: Progress, *, template: bool = False
    ) -> VMRecord:
        """The pre-booted fill of the warm pool: a VM of `image` with the default sizing and
        network, booted until both SSH and the agent's exec answer, then marked ready. Any
        failure (or cancellation) removes it entirely. With `template`, the pool's template
        VM of `image` (`TemplateFill`), left not ready: its snapshot makes it so."""
        spec = self._resolve_spec(None, None, None)
        system = await self._system_image_for(image, progress)
        async with Reverter(self.log) as revert:
            vm = await self._reserve(
                None, image, spec, None, revert, pool=image.name, system=system, template=template
            )
            await run_to_end(self._prepare_disks(vm, image, progress, revert))
            revert.success()
        try:
            async with self.with_vm_lock_by_id(vm.id) as locked:
                vm = await self._start_locked(locked, progress, ready="ssh")
                await run_to_end(self._wait_pool_agent(vm))
            if not template:
                self.store.set_pool_ready(vm.id)
            return vm
        except BaseException:
            await run_to_end(self.delete_vm_by_id(vm.id, only_pool=True))
            raise

    async def _wait_pool_agent(self, vm: VMRecord) -> None:
        from stoker.daemon import vm_exec

        deadline = time.monotonic() + self.boot_timeout
        if await vm_exec.wait_agent_exec(self, vm, deadline) is None:
            raise StokerError(
                f"the guest agent of pool VM {vm.name} (image {vm.image}) does not run "
                "commands: a warm VM needs it to take its identity (rebuild the image)"
            )

    async def _prepare_disks(
        self, vm: VMRecord, image: Image, progress: Progress, revert: Reverter
    ) -> None:
        vm_dir = Path(vm.vm_dir)
        vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        revert.add(lambda: shutil.rmtree(vm_dir, ignore_errors=True), "remove the VM directory")
        progress("disks", "preparing the copy-on-write root and the /root work disk")
        host_key = vm_dir / "ssh_host_ed25519_key"
        pub = await generate_host_key(self.runner, host_key, f"root@{vm.name}")
        hosts = [vm.guest_ip, vm.dns_name, vm.name]
        add_known_host(self.layout.known_hosts, hosts, pub)
        revert.add(lambda: remove_known_host(self.layout.known_hosts, hosts), "known_hosts")
        net = self._guest_net(vm)
        extra: dict[str, bytes] = {}
        if vm.system_image is not None:
            extra = workload.guest_files(workload.WorkloadConfig.from_meta(image.meta))
        await make_overlay_disk(
            self.runner, vm_dir / OVERLAY, vm.spec.overlay_size, net, host_key, extra
        )
        seed = Path(image.work_seed) if image.work_seed else None
        await make_work_disk(self.runner, vm_dir / WORKDISK, vm.spec.disk_size, seed)

    async def boot_kernel(self, vm: VMRecord, image: Image) -> Kernel:
        """The kernel a VM boots: its image's, or for a VM on a workload root its system
        image's (the workload root is a disk of its own, see _machine_config)."""
        boot = await self.images.get_image(vm.system_image) if vm.system_image else image
        return await self.images.get_kernel(boot.kernel or "")

    async def _system_image_for(self, image: Image, progress: Progress) -> Image | None:
        """The system image a workload root runs on (None for a system image): the
        default image, which must be a system image whose guest files know workload
        roots (docs/guest-boot.md "Workload roots")."""
        if image.role != workload.ROLE_WORKLOAD:
            return None
        name = self.config.default_image
        if name == image.name:
            raise Conflict(
                f"image {image.name!r} is a workload root (it has no SSH server) and is also "
                "the default_image: set default_image to a system image such as "
                "debian-bookworm"
            )
        progress("workload", f"{image.name} is a workload root: booting system image {name}")
        system = await self.images.ensure_image(name, progress)
        if system.role != workload.ROLE_SYSTEM:
            raise Conflict(
                f"default_image {name!r} is itself a workload root: set default_image to a "
                "system image such as debian-bookworm"
            )
        if not await ext4.exists(self.runner, Path(system.rootfs), workload.GUEST_SETUP):
            raise Conflict(
                f"system image {name!r} predates workload roots (it has no "
                f"{workload.GUEST_SETUP}): rebuild it with `stoker image build {name} "
                "--force` (or delete and re-pull it), then create the VM again"
            )
        return system

    def _guest_net(self, vm: VMRecord) -> GuestNet:
        return GuestNet(
            hostname=vm.name,
            ip=vm.guest_ip,
            prefix=self.config.bridge_network.prefixlen,
            gateway=self.config.gateway_ip,
            mac=mac_for(vm.guest_ip),
            # stoker's DNS on the bridge first (NAME.vm, allow= names); the configured ones
            # after it serve `nat` guests, to which stoker's answers REFUSED for other names.
            dns=tuple(dict.fromkeys((self.config.gateway_ip, *self.config.guest_dns))),
        )

    # --- start -------------------------------------------------------------------------

    def _driver(self) -> VMMDriver:
        if self._driver_cache is None:
            self._driver_cache = self.driver_factory()
        return self._driver_cache

    async def start_vm(self, ref: str, progress: Progress) -> VMRecord:
        """Boot a stopped VM and wait until SSH answers."""
        async with self.with_vm_lock_by_ref(ref) as vm:
            if vm.state == VMState.RUNNING and await self.is_alive(vm):
                raise Conflict(f"VM {vm.name} is already running")
            return await self._start_locked(vm, progress)

    async def _start_locked(
        self,
        vm: VMRecord,
        progress: Progress,
        ready: str = "ssh",
        spawn: Spawn | None = None,
    ) -> VMRecord:
        """The start flow; caller holds vm_locks[vm.id]. Runs shielded: a disconnecting
        client never leaves a half-started VM or kills a VMM already spawned. `spawn`
        replaces `driver.start(cfg)` (a restore from a snapshot: the disks are then left as
        they are, the restored guest has them mounted from its saved memory)."""
        return await run_to_end(self._start_flow(vm, progress, ready, spawn))

    async def _start_flow(
        self,
        vm: VMRecord,
        progress: Progress,
        ready: str = "ssh",
        spawn: Spawn | None = None,
    ) -> VMRecord:
        t0 = time.monotonic()
        image = await self.images.get_image(vm.image)
        kernel = await self.boot_kernel(vm, image)
        driver = self._driver()
        vm_dir = Path(vm.vm_dir)
        for f in (OVERLAY, WORKDISK):
            if not (vm_dir / f).exists():
                raise Conflict(
                    f"VM {vm.name} is missing its disk {vm_dir / f}: delete and recreate it"
                )
        vm.state = VMState.STARTING
        vm.last_error = None
        self.store.update_vm(vm)
        revert = Reverter(self.log)
        try:
            async with revert:
                # What the start acquires (tap, NAT, VMM) is named by the VM's teardown
                # identity before it is used: the undo is the one teardown stop uses too.
                revert.add(lambda: self._teardown_or_raise(vm))
                if spawn is None:
                    # Not behind a restored guest: it has the work disk mounted from its
                    # saved memory, and a host-side write under it would corrupt it.
                    progress("prepare", "syncing keys, git identity and files onto the work disk")
                    await grow_work_disk(self.runner, vm_dir / WORKDISK, vm.spec.disk_size)
                    for hook in self.hooks.prepare_host:
                        await hook(vm)
                progress("network", f"bridge {self.config.bridge_name}, tap, {vm.guest_ip}")
                await self.net.ensure_bridge()
                tap = await self.net.acquire_tap()
                # Durable teardown identity first, then use it.
                vm.teardown = Teardown(tap=tap, vmm=driver.name, nat=vm.spec.nat)
                self.store.update_vm(vm)
                await self.net.attach_tap(tap)
                for hook in self.hooks.post_network:
                    await hook(vm)
                cfg = self._machine_config(vm, kernel, image, tap)
                pre_boot = time.monotonic() - t0
                progress("boot", f"starting {driver.name}")
                handle = await (spawn(driver, cfg) if spawn is not None else driver.start(cfg))
                # The store keeps pid and socket (shown by `vm show`); the driver's own
                # pidfile + vmm.json are what find the process again.
                vm.teardown.vmm_pid = handle.pid
                vm.teardown.api_socket = handle.api_socket
                self.store.update_vm(vm)
                self.vmm_handles[vm.id] = handle
                t_vmm = time.monotonic()
                deadline = t_vmm + self.boot_timeout

                def alive() -> bool:
                    return driver.is_running(handle)

                # VMM up -> agent /healthz -> SSH. The agent is not required (images without
                # python3 have none): SSH is the gate, the agent wait runs beside it. With
                # ready="agent" (a non-interactive command comes next) an agent that can exec
                # is enough, and SSH is the gate only when it answers first.
                progress("agent", "waiting for the guest agent")
                if ready == "agent":
                    agent_s = await self._wait_agent_or_ssh(vm, deadline, alive, progress)
                else:
                    agent_wait = asyncio.ensure_future(vm_stats.wait_agent(self, vm, deadline))
                    try:
                        await self.ssh.wait_ready(self.ssh_target(vm), self.boot_timeout, alive)
                        self.ssh_seen.add(vm.id)
                        progress("ssh", "SSH answers")
                        agent_s = await asyncio.wait_for(asyncio.shield(agent_wait), 3.0)
                    except TimeoutError:
                        agent_s = None
                    finally:
                        agent_wait.cancel()
                boot = time.monotonic() - t_vmm
                for hook in self.hooks.post_start:
                    await hook(vm)
                vm.state = VMState.RUNNING
                vm.started_at = now()
                self.store.update_vm(vm)
                self.last_timings[vm.id] = {
                    "pre_boot_s": round(pre_boot, 3),
                    "boot_s": round(boot, 3),
                    "agent_s": round(agent_s, 3) if agent_s is not None else -1.0,
                }
                progress("ready", f"{vm.name} is running at {vm.guest_ip} ({vm.dns_name})")
                revert.success()
                return vm
        except BaseException as e:
            msg = e.message if isinstance(e, StokerError) else f"{type(e).__name__}: {e}"
            errs = revert.errors
            vm.state = VMState.ERROR
            vm.last_error = msg + (f" (cleanup: {'; '.join(errs)})" if errs else "")
            self.store.update_vm(vm)
            raise

    async def _wait_agent_or_ssh(
        self, vm: VMRecord, deadline: float, alive: Callable[[], bool], progress: Progress
    ) -> float | None:
        """Readiness for a non-interactive command: the agent can exec, or else SSH
        answers (an image whose agent cannot run). Seconds until the agent, else None."""
        from stoker.daemon import vm_exec

        agent = asyncio.ensure_future(vm_exec.wait_agent_exec(self, vm, deadline))
        ssh = asyncio.ensure_future(
            self.ssh.wait_ready(self.ssh_target(vm), self.boot_timeout, alive)
        )
        try:
            pending: set[asyncio.Future[Any]] = {agent, ssh}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if agent in done and agent.result() is not None:
                    progress("agent", "the guest agent answers (SSH not waited for)")
                    return agent.result()
                if ssh in done:
                    ssh.result()  # raises when the VM never answered
                    self.ssh_seen.add(vm.id)
                    progress("ssh", "SSH answers")
                    return None
            return None
        finally:
            for t in (agent, ssh):
                t.cancel()
            await asyncio.gather(agent, ssh, return_exceptions=True)

    async def wait_ssh(self, ref: str, progress: Progress) -> None:
        """Wait until a running VM's SSH answers (it may lag the agent after a start that
        only waited for the agent)."""
        vm = self.resolve(ref)
        if vm.state != VMState.RUNNING or vm.id in self.ssh_seen:
            return
        handle = self._handle(vm)
        driver = self._driver()

        def alive() -> bool:
            return handle is not None and driver.is_running(handle)

        try:
            r = await self.ssh.run(self.ssh_target(vm), "true", timeout=5, connect_timeout=1)
            if r.exit_status == 0:
                self.ssh_seen.add(vm.id)
                return
        except StokerError:
            pass
        progress("ssh", "waiting for SSH")
        await self.ssh.wait_ready(self.ssh_target(vm), self.boot_timeout, alive)
        self.ssh_seen.add(vm.id)

    # --- exec (vm_exec.py) ---------------------------------------------------------------

    async def exec(self, p: ExecVM, ctx: RequestContext) -> ExecDone:
        """Run a command through the guest agent, streaming its output (see vm_exec)."""
        from stoker.daemon import vm_exec
        from stoker.daemon.agent import ExecSpec

        if (p.argv is None) == (p.shell is None):
            raise InvalidArgument("give exactly one of argv (a list of words) and shell")
        if p.argv is not None and (not p.argv or not p.argv[0]):
            raise InvalidArgument("argv must name a program")
        if p.shell is not None and not p.shell.strip():
            raise InvalidArgument("the command line is empty")
        for k in p.env:
            if not k or "=" in k or "\0" in k or not (k[0].isalpha() or k[0] == "_"):
                raise InvalidArgument(
                    f"environment variable name {k!r} is invalid: use NAME=VALUE with a "
                    "name of letters, digits and _"
                )
        if p.timeout is not None and not 0 < p.timeout <= 7 * 86400:
            raise InvalidArgument(f"--timeout must be between 0 and 7 days, got {p.timeout}")
        if p.cwd is not None and not p.cwd.startswith("/"):
            raise InvalidArgument(f"--workdir must be an absolute guest path, got {p.cwd!r}")
        spec = ExecSpec(
            argv=p.argv,
            shell=p.shell,
            cwd=p.cwd,
            env=dict(p.env),
            user=p.user,
            stdin=p.stdin,
            timeout=float(p.timeout) if p.timeout is not None else None,
        )
        return await vm_exec.exec_stream(self, p.ref, spec, ctx)

    async def exec_signal(self, token: str, sig: str) -> ExecSignalled:
        from stoker.daemon import vm_exec

        return await vm_exec.exec_signal(self, token, sig)

    async def exec_input(self, token: str, data: str, eof: bool) -> ExecInputTaken:
        from stoker.daemon import vm_exec

        return await vm_exec.exec_input(self, token, data, eof)

    def _machine_config(
        self, vm: VMRecord, kernel: Kernel, image: Image, tap: str
    ) -> MachineConfig:
        vm_dir = Path(vm.vm_dir)
        driver = self._driver()
        kpath = driver.boot_kernel(kernel)
        if kpath is None:
            raise Conflict(f"kernel {kernel.name} has no bootable file for {driver.name}")
        cmdline, root, extra = BOOT_CMDLINE, image.rootfs, []
        if vm.system_image is not None:
            # vda: the system image; vdd: the workload root (read-only, shared like any
            # image; the guest puts its copy-on-write layer on the overlay disk).
            system = self.store.get_image(vm.system_image)
            if system is None:
                raise Conflict(f"VM {vm.name}'s system image {vm.system_image!r} is gone")
            root = system.rootfs
            cmdline = f"{BOOT_CMDLINE} {workload.CMDLINE_ARG}"
            extra = [Disk(path=Path(image.rootfs), read_only=True, id="workload")]
        return MachineConfig(
            vm_id=vm.id,
            name=vm.name,
            vm_dir=vm_dir,
            kernel=kpath,
            initrd=Path(kernel.initrd) if kernel.initrd else None,
            cmdline=cmdline,
            vcpu=vm.spec.vcpu,
            memory_mib=vm.spec.memory_mib,
            disks=[
                Disk(path=Path(root), read_only=True, id="rootfs"),
                Disk(path=vm_dir / OVERLAY, read_only=False, id="overlay"),
                Disk(path=vm_dir / WORKDISK, read_only=False, id="work"),
                *extra,
            ],
            tap=tap,
            mac=mac_for(vm.guest_ip),
            serial_log=vm_dir / SERIAL_LOG,
            vsock_cid=driver.vsock_cid(vm.guest_ip),
            agent_socket=vm_dir / vm_stats.AGENT_SOCKET,
        )

    def ssh_target(self, vm: VMRecord) -> SSHTarget:
        return SSHTarget.for_guest(vm.name, vm.guest_ip, self.layout)

    # --- stop / kill / cleanup ---------------------------------------------------------

    async def stop_vm(self, ref: str) -> VMRecord:
        """Sync the guest's disks over SSH, power it off, end the VMM, clean up."""
        async with self.with_vm_lock_by_ref(ref) as vm:
            return await run_to_end(self._stop_locked(vm, force=False))

    async def kill_vm(self, ref: str) -> VMRecord:
        """Force-stop (signal) and clean up."""
        async with self.with_vm_lock_by_ref(ref) as vm:
            return await run_to_end(self._stop_locked(vm, force=True))

    async def restart_vm(self, ref: str, progress: Progress) -> VMRecord:
        """Stop (if running), then start."""
        async with self.with_vm_lock_by_ref(ref) as vm:
            if vm.state != VMState.STOPPED:
                vm = await run_to_end(self._stop_locked(vm, False))
            return await self._start_locked(vm, progress)

    def _handle(self, vm: VMRecord) -> VMMHandle | None:
        """The VM's VMM handle: the one this daemon started, else what the driver finds
        of its own process (pidfile + vmm.json, the pid checked to really be that VMM)."""
        handle = self.vmm_handles.get(vm.id)
        if handle is None:
            handle = self._driver().adopt(Path(vm.vm_dir))
            if handle is not None:
                self.vmm_handles[vm.id] = handle
        return handle

    async def _stop_locked(self, vm: VMRecord, force: bool) -> VMRecord:
        handle = self._handle(vm)
        driver = self._driver()
        running = handle is not None and driver.is_running(handle)
        if running and not force:
            synced = False
            try:
                # `sync` is what saves data: Ctrl-Alt-Del makes Debian reboot, not halt.
                await self.ssh.run(
                    self.ssh_target(vm),
                    "sync; (systemctl poweroff --no-block || poweroff) >/dev/null 2>&1 &",
                    timeout=30,
                    connect_timeout=1.0,
                )
                synced = True
            except StokerError as e:
                self.log.info("stop %s: guest unreachable over SSH (%s): killing", vm.name, e)
            assert handle is not None
            if synced:
                # The data is on disk; give the guest a moment to power off, then end it.
                deadline = time.monotonic() + STOP_GRACE
                while time.monotonic() < deadline and driver.is_running(handle):
                    await asyncio.sleep(0.05)
        errs = await self._cleanup(vm)
        vm.state = VMState.STOPPED
        vm.last_error = ("; ".join(errs)) if errs else None
        self.store.update_vm(vm)
        if errs:
            raise StokerError(f"VM {vm.name} stopped, but cleanup had errors: {'; '.join(errs)}")
        return vm

    async def _cleanup(self, vm: VMRecord) -> list[str]:
        """Every teardown step runs; errors are collected, never returned early."""
        errs: list[str] = []
        handle = self._handle(vm)
        driver = self._driver()
        if handle is not None:
            # kill() is safe on an exited VMM: it then only removes its sockets/pidfile/jail.
            try:
                await driver.kill(handle)
            except Exception as e:
                errs.append(f"kill VMM: {e}")
        elif vm.teardown.vmm_pid and pid_alive(vm.teardown.vmm_pid):
            errs.append(f"VMM pid {vm.teardown.vmm_pid} alive but not verifiable; left alone")
        for hook in self.hooks.cleanup:
            try:
                await hook(vm)
            except Exception as e:
                errs.append(f"{getattr(hook, '__name__', 'hook')}: {e}")
        if vm.teardown.tap:
            try:
                await self.net.release_tap(vm.teardown.tap)
            except Exception as e:
                errs.append(f"release tap {vm.teardown.tap}: {e}")
        await vm_stats.drop_agent(self, vm.id)
        self.ssh_seen.discard(vm.id)
        await self.ssh.forget(self.ssh_target(vm))
        self.last_samples.pop(vm.id, None)
        self.vmm_handles.pop(vm.id, None)
        vm.teardown = Teardown()
        self.store.update_vm(vm)
        return errs

    async def _teardown_or_raise(self, vm: VMRecord) -> None:
        """`_cleanup` as an undo: its collected errors raised as one."""
        errs = await self._cleanup(vm)
        if errs:
            raise StokerError("; ".join(errs))

    # --- delete / set ------------------------------------------------------------------

    async def delete_vm(self, ref: str) -> VMDeleted:
        """Stop if needed, then remove disks, DNS, NAT, known_hosts entries and the row."""
        return await self.delete_vm_by_id(self.resolve(ref).id)

    async def delete_vm_by_id(self, vm_id: str, only_pool: bool = False) -> VMDeleted:
        """`delete_vm` by id, pool VMs too (which `resolve` does not see). With
        `only_pool`, a VM that is no longer a pool VM once the lock is held (it was taken
        meanwhile) is left alone."""
        async with self.with_vm_lock_by_id(vm_id) as vm:
            if only_pool and not self.store.is_pool_vm(vm_id):
                return VMDeleted(vm.name, vm.id)

            async def flow() -> VMDeleted:
                errs = await self._cleanup(vm)
                remove_known_host(self.layout.known_hosts, [vm.guest_ip, vm.dns_name, vm.name])
                shutil.rmtree(vm.vm_dir, ignore_errors=True)
                self.store.delete_vm(vm.id)
                if errs:
                    self.log.warning("delete %s: cleanup errors: %s", vm.name, "; ".join(errs))
                return VMDeleted(vm.name, vm.id)

            return await run_to_end(flow())

    async def set_vm(
        self,
        ref: str,
        vcpu: int | None,
        memory_mib: int | None,
        disk_size: str | int | None,
        net: str | None = None,
    ) -> VMRecord:
        """Change sizing (applies at the next start; disks only grow) and/or the network
        policy (applied at once to a running VM)."""
        async with self.with_vm_lock_by_ref(ref) as vm:
            spec = self._resolve_spec(vcpu, memory_mib, disk_size, base=vm.spec)
            if spec.disk_size < vm.spec.disk_size:
                raise InvalidArgument(
                    f"--disk-size {format_size(spec.disk_size)} is smaller than VM {vm.name}'s "
                    f"{format_size(vm.spec.disk_size)}: disks only grow"
                )
            if net is not None:
                policy = await self.net.check_policy(net)
                spec.net, spec.nat = str(policy), policy.mode == "nat"
                if vm.state == VMState.RUNNING and vm.teardown.tap:
                    # Rules first: if they cannot be installed the stored policy is unchanged.
                    await run_to_end(
                        self.net.apply_policy(
                            vm.id, vm.guest_ip, vm.teardown.tap, mac_for(vm.guest_ip), policy
                        )
                    )
            vm.spec = spec
            self.store.update_vm(vm)
            return vm

    async def set_ttl(self, ref: str, ttl: float | None) -> VMRecord:
        """`vm set --ttl`: the VM is deleted `ttl` seconds from now (None: never)."""
        expires_at = expiry_after(ttl) if ttl is not None else None
        async with self.with_vm_lock_by_ref(ref) as vm:
            self.store.set_vm_expiry(vm.id, expires_at)
            vm.expires_at = expires_at
            return vm

    async def expire_vms(self) -> list[str]:
        """Background: delete every VM whose TTL has passed (the time is in the store, so
        this also catches VMs that expired while the daemon was down). Names deleted."""
        done: list[str] = []
        t = time.time()
        for vm in self.store.list_vms():
            if vm.expires_at is None or parse_time(vm.expires_at) > t:
                continue
            if self.vm_locks.locked(vm.id):
                continue  # a lifecycle op is running; the next tick gets it
            try:
                await self.delete_vm(vm.id)
            except StokerError as e:
                self.log.warning("TTL of %s expired, but deleting it failed: %s", vm.name, e)
                continue
            self.log.info("deleted %s: its TTL expired at %s", vm.name, vm.expires_at)
            done.append(vm.name)
        return done

    # --- info for the CLI ---------------------------------------------------------------

    def logs_info(self, ref: str) -> LogsInfo:
        """Where the VM's serial console log is (the CLI reads and follows it)."""
        vm = self.resolve(ref)
        return LogsInfo(vm.name, str(Path(vm.vm_dir) / SERIAL_LOG), str(vm.state))

    async def read_log(self, ref: str, offset: int, limit: int) -> LogChunk:
        """Up to `limit` bytes of the VM's console log from `offset` (no symlink followed;
        a log that is not a regular file reads as empty)."""
        import base64
        import stat

        vm = self.resolve(ref)
        path = Path(vm.vm_dir) / SERIAL_LOG

        def read() -> tuple[bytes, int]:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                return b"", -1
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return b"", 0
                return os.pread(fd, limit, offset), st.st_size
            finally:
                os.close(fd)

        data, size = await asyncio.to_thread(read)
        return LogChunk(
            name=vm.name,
            state=str(vm.state),
            offset=offset,
            data=base64.b64encode(data).decode(),
            size=size,
            last_error=vm.last_error,
        )

    async def ssh_info(
        self, ref: str, wait: bool = False, progress: Progress | None = None
    ) -> SSHInfo:
        """What the CLI needs to run the system ssh against a VM; with `wait`, once SSH
        answers (a VM made ready by its agent may be early)."""
        if wait:
            await self.wait_ssh(ref, progress or (lambda *a, **kw: None))
        vm = self.resolve(ref)
        return SSHInfo(
            name=vm.name,
            state=str(vm.state),
            host=vm.guest_ip,
            user="root",
            key=str(self.layout.ssh_key),
            known_hosts=str(self.layout.known_hosts),
            workspace=vm.workspace.guest_path if vm.workspace else None,
            workspace_record=vm.workspace,
        )

    async def prune_vms(self, names: list[str]) -> list[FanResult[VMDeleted]]:
        """Delete the named VMs that are still not running (the CLI confirmed the list);
        a VM started since the confirmation is kept and reported."""

        async def one(vm_id: str) -> VMDeleted:
            vm = self.resolve(vm_id)
            if vm.state in (VMState.RUNNING, VMState.STARTING):
                raise Conflict(f"VM {vm.name} is {vm.state} now: not pruned")
            return await self.delete_vm(vm_id)

        return await self.fan_out(names, one)

    # --- the RPC's multi-VM forms and views ----------------------------------------------

    async def show(self, ref: str) -> VMShown:
        """`vm show`: the record and the VM's port forwards."""
        rec = self.resolve(ref)
        return VMShown(rec, self.forwards.for_vm(rec.id))

    async def create(self, p: CreateVM, progress: Progress) -> VMCreated:
        """`vm create`: the record and how long each boot stage took. With
        `from_snapshot`, a fork of that snapshot (its image, shape and network)."""
        args = p.model_dump()
        snap = args.pop("from_snapshot")
        if snap is not None:
            from stoker.daemon import vm_fork

            given = [
                f"--{k.replace('_mib', '').replace('_', '-')}"
                for k in ("image", "vcpu", "memory_mib", "disk_size", "net", "ttl")
                if args[k] is not None
            ] + [f"--{k.replace('_', '-')}" for k in ("nat", "no_start") if args[k]]
            if given:
                raise InvalidArgument(
                    "--from-snapshot takes the snapshot's image, shape and network: "
                    f"drop {', '.join(given)}"
                )
            rec = await vm_fork.create_from_snapshot(self, snap, p.name, progress, ready=p.ready)
        else:
            rec = await self.create_vm(CreateRequest(**args), progress)
        return VMCreated(rec, self.last_timings.get(rec.id))

    async def fork(
        self, ref: str, name: str, snapshot: str | None, ready: str, progress: Progress
    ) -> VMCreated:
        """`vm fork`: a new VM from a snapshot of `ref` (a fresh one unless `snapshot`)."""
        from stoker.daemon import vm_fork

        rec = await vm_fork.fork_vm(self, ref, name, progress, snapshot=snapshot, ready=ready)
        return VMCreated(rec, self.last_timings.get(rec.id))

    async def set(self, p: SetVM) -> VMRecord:
        """`vm set`: TTL and/or sizing and network policy."""
        if p.ttl is not None or p.clear_ttl:
            await self.set_ttl(p.ref, None if p.clear_ttl else p.ttl)
        if p.vcpu is None and p.memory_mib is None and p.disk_size is None and p.net is None:
            return self.resolve(p.ref)
        return await self.set_vm(p.ref, p.vcpu, p.memory_mib, p.disk_size, p.net)

    async def start_vms(self, refs: list[str], progress: Progress) -> list[FanResult[VMRecord]]:
        return await self.fan_out(refs, self._tagged(self.start_vm, progress))

    async def restart_vms(self, refs: list[str], progress: Progress) -> list[FanResult[VMRecord]]:
        return await self.fan_out(refs, self._tagged(self.restart_vm, progress))

    async def stop_vms(self, refs: list[str]) -> list[FanResult[VMRecord]]:
        return await self.fan_out(refs, self.stop_vm)

    async def kill_vms(self, refs: list[str]) -> list[FanResult[VMRecord]]:
        return await self.fan_out(refs, self.kill_vm)

    async def delete_vms(self, refs: list[str]) -> list[FanResult[VMDeleted]]:
        return await self.fan_out(refs, self.delete_vm)

    def _tagged(
        self, op: Callable[[str, Progress], Awaitable[T]], progress: Progress
    ) -> Callable[[str], Awaitable[T]]:
        """A per-VM op whose progress lines say which VM they are about."""

        async def one(vm_id: str) -> T:
            name = self.resolve(vm_id).name

            def prog(stage: str, message: str = "", **kw: Any) -> None:
                progress(stage, message, vm=name, **kw)

            return await op(vm_id, prog)

        return one

    # --- port forwards (portfwd.py holds them) -------------------------------------------

    async def port_forward(
        self, ref: str, specs: list[str], ctx: RequestContext
    ) -> list[PortForwardInfo]:
        """Forward host ports to a running VM (listeners in the asking client's netns)."""
        async with self.with_vm_lock_by_ref(ref) as rec:
            if rec.state != VMState.RUNNING:
                raise Conflict(
                    f"VM {rec.name} is {rec.state}: ports forward only to a running VM; "
                    f"start it first (`stoker vm start {rec.name}`)"
                )
            return await self.forwards.add(rec.id, rec.name, rec.guest_ip, specs, ctx.peer_pid)

    async def port_forward_remove(self, ref: str, host_port: int | None) -> list[PortForwardInfo]:
        return await self.forwards.remove(self.resolve(ref).id, host_port)

    async def port_forward_list(self, refs: list[str]) -> list[PortForwardInfo]:
        recs = [self.resolve(r) for r in refs] if refs else self.store.list_vms()
        return [f for r in recs for f in self.forwards.for_vm(r.id)]

    # --- observation (vm_stats.py) -------------------------------------------------------

    async def health(self, ref: str) -> VMHealth:
        """Agent health (SSH fallback) for one VM."""
        return await vm_stats.health(self, ref)

    async def stats(self, refs: list[str]) -> list[FanResult[VMStats]]:
        """CPU %, RSS, guest memory, disk use, uptime, last activity per VM."""
        return await vm_stats.stats(self, refs)

    async def ports(self, refs: list[str]) -> list[FanResult[list[GuestPort]]]:
        """Listening sockets per VM as NAME.vm:PORT endpoints."""
        return await vm_stats.ports(self, refs)

    async def poll_stats(self) -> None:
        """Background: sample running VMs, persist, auto-stop idle ones."""
        await vm_stats.poll_stats(self)

    # --- fan-out -----------------------------------------------------------------------

    async def fan_out(
        self, refs: list[str], op: Callable[[str], Awaitable[T]]
    ) -> list[FanResult[T]]:
        """Resolve refs once, dedupe, run concurrently, report in the order given."""
        resolved: list[tuple[str, str | None, str | None]] = []
        for ref in refs:
            try:
                resolved.append((ref, self.resolve(ref).id, None))
            except StokerError as e:
                resolved.append((ref, None, e.message))
        unique = list(dict.fromkeys(vid for _, vid, _ in resolved if vid))

        async def one(vid: str) -> tuple[T | None, str | None]:
            try:
                return await op(vid), None
            except StokerError as e:
                return None, e.message

        results = dict(zip(unique, await asyncio.gather(*(one(v) for v in unique)), strict=True))
        out: list[FanResult[T]] = []
        seen: set[str] = set()
        for ref, vid, err in resolved:
            if vid is None:
                out.append(FanResult(ref, False, err, resolved=False))
            elif vid in seen:
                continue
            else:
                seen.add(vid)
                res, failure = results[vid]
                out.append(FanResult(ref, failure is None, failure, res))
        return out

    # --- watching running VMMs ----------------------------------------------------------

    async def check_vmms(self) -> list[str]:
        """Mark running VMs whose VMM died as stopped (with the reason) and clean up after
        them. VMs with a lifecycle op in flight are skipped. Returns the names reaped."""
        reaped: list[str] = []
        for vm in self.store.list_all_vms():
            if vm.state != VMState.RUNNING or self.vm_locks.locked(vm.id):
                continue
            handle = self._handle(vm)
            if handle is not None and self._driver().is_running(handle):
                continue
            async with self.vm_locks.hold(vm.id):
                cur = self.store.get_vm(vm.id)
                if cur is None or cur.state != VMState.RUNNING:
                    continue
                pid = handle.pid if handle is not None else cur.teardown.vmm_pid
                reason = (
                    self._driver().exit_reason(pid)
                    if pid
                    else "the VMM process exited unexpectedly (killed or crashed)"
                )
                self._note_in_log(cur, reason)
                errs = await self._cleanup(cur)
                cur.state = VMState.STOPPED
                cur.last_error = reason + (f"; cleanup: {'; '.join(errs)}" if errs else "")
                self.store.update_vm(cur)
                self.log.warning("%s: %s", cur.name, cur.last_error)
                reaped.append(cur.name)
        return reaped

    def _note_in_log(self, vm: VMRecord, text: str) -> None:
        """Append a line of the daemon's to the VM's console log, so `vm logs` ends with
        why the VM went away (the log is the daemon's file; the VMM has exited)."""
        path = Path(vm.vm_dir) / SERIAL_LOG
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
        except OSError:
            return
        try:
            os.write(fd, f"\n[stoker] {now()}: {text}\n".encode())
        except OSError:
            pass
        finally:
            os.close(fd)

    # --- reconcile ---------------------------------------------------------------------

    async def sweep_orphan_dirs(self) -> list[str]:
        """At daemon start: delete VM directories under `vms/` that no store row names
        (a crash between dropping a row and removing its files)."""
        import os

        from stoker.daemon.imagemgr.safetree import rmtree

        keep = {os.path.normpath(v.vm_dir) for v in self.store.list_all_vms()}
        vms_dir = self.layout.vms_dir

        def sweep() -> list[str]:
            try:
                names = sorted(os.listdir(vms_dir))
            except FileNotFoundError:
                return []
            gone = [vms_dir / n for n in names if os.path.normpath(vms_dir / n) not in keep]
            for p in gone:
                rmtree(p, ignore_errors=True)
            return [str(p) for p in gone]

        removed = await asyncio.to_thread(sweep)
        for p in removed:
            self.log.info("start-up sweep: removed VM directory %s with no record", p)
        return removed

    async def reconcile(self) -> None:
        """At daemon start: keep VMs whose VMM is alive (handles adopted), mark dead ones
        stopped and tear down what they left (tap, NAT rules), reap orphan taps and NAT
        rules, and republish DNS for the running ones."""
        from stoker.daemon import vm_fork

        # A fork the daemon did not finish goes whole; a source it left paused runs again.
        await vm_fork.reap_half_forks(self)
        await vm_fork.resume_paused_sources(self)
        in_use_taps: set[str] = set()
        live_ids: set[str] = set()
        for vm in self.store.list_all_vms():
            if vm.state not in (VMState.RUNNING, VMState.STARTING, VMState.STOPPING):
                if vm.teardown.tap or vm.teardown.vmm_pid:
                    # A crash between steps left teardown identity behind: clean it.
                    errs = await self._cleanup(vm)
                    if errs:
                        self.log.warning("reconcile %s: %s", vm.name, "; ".join(errs))
                continue
            handle = self._handle(vm)
            alive = handle is not None and self._driver().is_running(handle)
            if alive and vm.state == VMState.RUNNING:
                self.log.info(
                    "reconcile: %s is still running (pid %s)",
                    vm.name,
                    handle.pid if handle else None,
                )
                if vm.teardown.tap:
                    in_use_taps.add(vm.teardown.tap)
                    try:  # rebuilt from the store: rules, DNS view, name refreshes
                        await self.net.apply_policy(
                            vm.id, vm.guest_ip, vm.teardown.tap, mac_for(vm.guest_ip), vm.spec.net
                        )
                    except StokerError as e:
                        self.log.warning("reconcile %s: network policy: %s", vm.name, e)
                live_ids.add(vm.id)
                self.net.publish_dns(vm.name, vm.guest_ip)
                continue
            # Dead VMM, or a start the daemon never finished (e.g. killed mid-create).
            reason = (
                "the VMM process exited while stokerd was not running"
                if vm.state == VMState.RUNNING
                else "stokerd stopped while this VM was starting; start it again"
            )
            self.log.warning("reconcile: %s: %s", vm.name, reason)
            errs = await self._cleanup(vm)
            vm.state = VMState.STOPPED
            vm.last_error = reason + (f" (cleanup: {'; '.join(errs)})" if errs else "")
            self.store.update_vm(vm)
        try:
            if not await self.net.links.exists(self.net.bridge):
                return  # nothing of ours on this host's network yet
            reaped = await self.net.reap_orphan_taps(in_use_taps)
            if reaped:
                self.log.info("reconcile: removed orphan taps %s", ", ".join(reaped))
            for vm_id in await self.net.policy_vm_ids() - live_ids:
                await self.net.remove_policy(vm_id)
        except StokerError as e:
            self.log.warning("reconcile: host network cleanup failed: %s", e)

    # --- liveness ----------------------------------------------------------------------

    async def is_alive(self, vm: VMRecord) -> bool:
        """True when the VM's VMM process is running (by cached handle, else teardown pid)."""
        h = self.vmm_handles.get(vm.id)
        pid = h.pid if h is not None else vm.teardown.vmm_pid
        if not pid:
            return False
        return pid_alive(pid)


def default_driver(config: Config, runner: Runner) -> VMMDriver:
    """The VMM the config and host call for (see vmm.select)."""
    from stoker.daemon.vmm.select import driver_for_config

    return driver_for_config(config, runner)


MAX_TTL = 365 * 86400.0


def expiry_after(ttl: float) -> str:
    """The store timestamp `ttl` seconds from now; refuses a TTL that is not in the future."""
    import math
    from datetime import UTC, datetime, timedelta

    if not math.isfinite(ttl) or ttl <= 0:
        raise InvalidArgument(
            f"--ttl must be a positive duration (got {ttl:g} s, which is not in the future)"
        )
    if ttl > MAX_TTL:
        raise InvalidArgument(f"--ttl is at most 365 days, got {ttl:g} s")
    return (datetime.now(UTC) + timedelta(seconds=ttl)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(ts: str) -> float:
    """A store timestamp (`now()`'s format) as a Unix time."""
    from datetime import UTC, datetime

    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


T = TypeVar("T")


async def run_to_end(coro: Coroutine[Any, Any, T]) -> T:
    """Run a lifecycle step to its end even if the caller is cancelled (a client that
    disconnects): the step finishes while the caller still holds its VM lock, then the
    cancellation propagates. Half-made state and killed VMMs are what this prevents."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            with contextlib.suppress(BaseException):
                await task
        raise
