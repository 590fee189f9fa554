"""`Daemon`: the composition root. Infrastructure plus the services; dispatch forwards.

No VM, image, workspace or network behaviour lives here. `methods()` maps each RPC name
to its parameter schema and the bound service method that serves it, one line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from stoker import __version__
from stoker.config import Config, config_path, load_config
from stoker.daemon import api, snapshot_service
from stoker.daemon.capabilities import Capability, CapabilityHooks
from stoker.daemon.env_service import EnvService
from stoker.daemon.guestssh import GuestSSHLike
from stoker.daemon.host_network import HostNetwork
from stoker.daemon.image_service import ImageService
from stoker.daemon.pool_service import PoolService
from stoker.daemon.portfwd import PortForwards
from stoker.daemon.vm_service import VMService
from stoker.daemon.wiring import build_services
from stoker.daemon.workspace_service import WorkspaceService
from stoker.errors import ConfigError, MethodNotFound
from stoker.layout import Layout
from stoker.model.wire import DaemonStatus, OperationInfo, Stopping
from stoker.rpc.jsonable import to_jsonable
from stoker.rpc.protocol import PROTOCOL_VERSION
from stoker.rpc.server import RequestContext, RPCServer
from stoker.runner import Runner
from stoker.store import Store

Handler = Callable[[Any, RequestContext], Awaitable[Any]]


@dataclass
class Method:
    params: type[api.Params]
    handler: Handler
    fn: Callable[..., Any] | None = None  # the service method `route` serves (its result type)


# Parameters a served function may take besides the RPC's own fields.
_FROM_CONTEXT: dict[str, Callable[[Any, RequestContext], Any]] = {
    "p": lambda p, ctx: p,  # the validated parameters model itself
    "ctx": lambda p, ctx: ctx,
    "progress": lambda p, ctx: ctx.progress,
}


def route(
    params: type[api.Params], fn: Callable[..., Any], **derive: Callable[[Any], Any]
) -> Method:
    """A method-table entry serving `fn` (a bound service method, sync or async).

    Each of `fn`'s parameters is filled by name: from `derive` (NAME=lambda p: ...), else
    `p` / `ctx` / `progress`, else the RPC parameter of that name. Checked when the table
    is built, so a schema and a service method that drift apart fail at once.
    """
    fields = set(params.model_fields)
    plan: list[tuple[str, Callable[[Any, RequestContext], Any]]] = []
    for name, prm in inspect.signature(fn).parameters.items():
        if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            continue
        if name in derive:
            plan.append((name, _derived(derive[name])))
        elif name in _FROM_CONTEXT:
            plan.append((name, _FROM_CONTEXT[name]))
        elif name in fields:
            plan.append((name, _field(name)))
        elif prm.default is prm.empty:
            raise TypeError(f"{params.__name__} has no field for {fn!r}'s parameter {name!r}")

    async def handler(p: Any, ctx: RequestContext) -> Any:
        out = fn(**{name: get(p, ctx) for name, get in plan})
        return await out if inspect.isawaitable(out) else out

    return Method(params, handler, fn)


def _derived(f: Callable[[Any], Any]) -> Callable[[Any, RequestContext], Any]:
    return lambda p, ctx: f(p)


def _field(name: str) -> Callable[[Any, RequestContext], Any]:
    return lambda p, ctx: getattr(p, name)


def _credential(p: api.PullRef | api.PushImage) -> Any:
    from stoker.daemon.oci.auth import Credential

    return Credential.from_wire(p.auth) if p.auth else None


class Daemon:
    """Shared infrastructure (required) and the services built over it.

    Tests build one by hand, passing any stub service as a keyword; everything else is
    built around it (`wiring.build_services`).
    """

    def __init__(
        self,
        layout: Layout,
        config: Config,
        store: Store,
        *,
        runner: Runner | None = None,
        logger: logging.Logger | None = None,
        net: HostNetwork | None = None,
        images: ImageService | None = None,
        ws: WorkspaceService | None = None,
        vm: VMService | None = None,
        ssh: GuestSSHLike | None = None,
        capabilities: list[Capability] | None = None,
        pool: PoolService | None = None,
    ) -> None:
        self.layout = layout
        self.config = config
        self.store = store
        self.runner = runner or Runner()
        self.logger = logger or logging.getLogger("stoker")
        s = build_services(
            layout,
            config,
            store,
            self.runner,
            self.logger,
            net=net,
            images=images,
            ws=ws,
            vm=vm,
            ssh=ssh,
            capabilities=capabilities,
            pool=pool,
        )
        self.net: HostNetwork = s.net
        self.images: ImageService = s.images
        self.ws: WorkspaceService = s.ws
        self.vm: VMService = s.vm
        self.ssh: GuestSSHLike = s.ssh
        self.hooks: CapabilityHooks = s.hooks
        self.forwards: PortForwards = s.forwards
        self.capabilities: list[Capability] = s.capabilities
        self.pool: PoolService = s.pool
        self.envs = EnvService(self.images, self.vm, self.ws)
        self.listener: RPCServer | None = None  # while serving
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._bg: list[asyncio.Task[None]] = []
        self._methods: dict[str, Method] | None = None
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls, layout: Layout, config_file: str | None = None, runner: Runner | None = None
    ) -> Daemon:
        """Load config, open the store, wire services, reconcile. Does not serve yet."""
        path, explicit = config_path(config_file, layout.config_file)
        config = load_config(path, required=explicit)
        layout.ensure()
        d = cls(layout, config, Store(layout.db_path), runner=runner)
        await d.reconcile()
        return d

    async def reconcile(self) -> None:
        """Bring recorded state in line with what is really running on the host: rehydrate
        handles, reap VMs whose VMM died, republish DNS, sweep a crash's leftovers."""
        await self.vm.reconcile()
        await self.pool.reconcile()  # pool VMs: kept if ready, running and answering
        await self.images.sweep_leftovers()  # staging, orphan image/kernel dirs
        await self.vm.sweep_orphan_dirs()

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Listen on the socket and run background loops until `stop()`."""
        await self.net.start()
        group = self.config.socket_group
        if group and self.layout.runtime_dir == self.layout.state_dir:
            raise ConfigError(
                f"socket_group = {group!r} needs a runtime dir apart from the state dir "
                f"({self.layout.state_dir} must stay private): set XDG_RUNTIME_DIR, or use "
                "a system install (/run/stoker)"
            )
        self.listener = RPCServer(self.layout.socket_path, self.dispatch, group=group)
        await self.listener.start()
        self.start_background()
        if ready is not None:
            ready()
        try:
            await self._stop.wait()
        finally:
            await self.close()

    def stop(self) -> None:
        self._stop.set()

    async def stop_soon(self) -> Stopping:
        """`daemon.stop`: answer first, then stop serving."""
        asyncio.get_running_loop().call_later(0.05, self.stop)
        return Stopping(True, os.getpid())

    async def close(self) -> None:
        """Stop serving. Running VMs are left alone: they outlive the daemon."""
        for t in self._bg:
            t.cancel()
        if self._bg:
            await asyncio.wait(self._bg, timeout=2.0)
        self._bg.clear()
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
        if self._closed:
            return
        self._closed = True
        await self.forwards.close()
        await self.net.close()
        await self.ssh.close()
        self.store.close()

    # --- dispatch ----------------------------------------------------------------------

    def methods(self) -> dict[str, Method]:
        """The RPC method table: each entry forwards to one bound service method."""
        vm, images, ws, envs = self.vm, self.images, self.ws, self.envs
        snap = functools.partial
        return {
            "daemon.status": route(api.NoParams, self.status),
            "daemon.stop": route(api.NoParams, self.stop_soon),
            "daemon.operations.list": route(api.NoParams, self.operations),
            "vm.list": route(api.ListParams, vm.list_vms),
            "vm.show": route(api.VMRef, vm.show),
            "vm.create": route(api.CreateVM, vm.create),
            "vm.fork": route(api.ForkVM, vm.fork),
            "vm.start": route(api.VMRefs, vm.start_vms),
            "vm.restart": route(api.VMRefs, vm.restart_vms),
            "vm.stop": route(api.VMRefs, vm.stop_vms),
            "vm.kill": route(api.VMRefs, vm.kill_vms),
            "vm.delete": route(api.VMRefs, vm.delete_vms),
            "vm.set": route(api.SetVM, vm.set),
            "vm.prune": route(api.PruneVMs, vm.prune_vms),
            "vm.workspace.inspect": route(
                api.WorkspaceInspect, ws.inspect, with_files=lambda p: p.list_files
            ),
            "vm.workspace.prepare": route(api.WorkspacePrepare, ws.prepare),
            "vm.workspace.export": route(api.WorkspaceExport, ws.export),
            "vm.snapshot": route(api.SnapshotCreate, snap(snapshot_service.snapshot_vm, vm)),
            "vm.snapshot.list": route(api.SnapshotList, snap(snapshot_service.list_snapshots, vm)),
            "vm.start_from_snapshot": route(
                api.SnapshotRef, snap(snapshot_service.start_from_snapshot, vm)
            ),
            "vm.snapshot.delete": route(
                api.SnapshotRef, snap(snapshot_service.delete_snapshot, vm)
            ),
            "vm.health": route(api.VMRef, vm.health),
            "vm.ping": route(api.VMRef, vm.health),
            "vm.stats": route(api.OptionalRefs, vm.stats),
            "vm.ports": route(api.OptionalRefs, vm.ports),
            "vm.port_forward": route(api.PortForward, vm.port_forward),
            "vm.port_forward.remove": route(api.PortForwardRemove, vm.port_forward_remove),
            "vm.port_forward.list": route(api.OptionalRefs, vm.port_forward_list),
            "vm.logs": route(api.VMRef, vm.logs_info),
            "vm.logs.read": route(api.LogRead, vm.read_log),
            "vm.ssh_info": route(api.SSHInfo, vm.ssh_info),
            "vm.exec": route(api.ExecVM, vm.exec),
            "vm.exec.signal": route(
                api.ExecSignal, vm.exec_signal, token=lambda p: p.exec, sig=lambda p: p.signal
            ),
            "vm.exec.input": route(api.ExecInput, vm.exec_input, token=lambda p: p.exec),
            "vm.commit": route(api.CommitVM, envs.commit),
            "image.list": route(api.ListParams, images.list_images),
            "image.show": route(api.NameParam, images.get_image),
            "image.register": route(api.RegisterImage, images.register_image),
            "image.promote": route(api.NameParam, images.promote_image),
            "image.delete": route(api.NameParam, images.delete_image),
            "image.pull": route(api.PullRef, images.pull, credential=_credential),
            "image.push": route(api.PushImage, images.push, credential=_credential),
            "image.build": route(api.BuildImage, envs.image_build),
            "image.cache.prune": route(api.PruneCache, images.prune_cache),
            "kernel.import": route(api.ImportKernel, images.import_kernel),
            "kernel.list": route(api.KernelList, images.kernel_list),
            "kernel.pull": route(api.NameParam, images.pull_kernel),
            "kernel.show": route(api.NameParam, images.get_kernel),
            "kernel.rm": route(api.NameParam, images.delete_kernel),
            "pool.status": route(api.NoParams, self.pool.status),
        }

    async def dispatch(self, method: str, params: dict[str, Any], ctx: RequestContext) -> Any:
        if self._methods is None:
            self._methods = self.methods()
        table = self._methods
        m = table.get(method)
        if m is None:
            raise MethodNotFound(
                f"unknown method {method!r}: this stokerd ({__version__}) serves "
                f"{', '.join(sorted(table))}"
            )
        p = api.validate(m.params, method, params)
        from stoker.daemon.workspace.gitcmd import REQUESTER

        REQUESTER.set(ctx.peer_uid)  # a repository the caller owns is read for it
        return to_jsonable(await m.handler(p, ctx))

    def status(self) -> DaemonStatus:
        """Daemon facts for `stoker daemon status`."""
        return DaemonStatus(
            pid=os.getpid(),
            version=__version__,
            protocol=PROTOCOL_VERSION,
            socket=str(self.layout.socket_path),
            state_dir=str(self.layout.state_dir),
            config=str(self.config.path) if self.config.path else None,
            uptime_s=round(time.time() - self.started_at, 1),
            network=self.net.status(),
            pool=self.pool.status(),
        )

    def operations(self) -> list[OperationInfo]:
        """`daemon.operations.list`: create, pull, build and prepare operations, oldest first."""
        ops = [*self.vm.create_ops.list(), *self.images.ops.list(), *self.ws.ops.list()]
        now = time.time()
        return [OperationInfo(**o.to_dict(now)) for o in sorted(ops, key=lambda o: o.started_at)]

    def start_background(self) -> None:
        """The ticker fan-out: each job on its own task and interval, so a slow one never
        delays the others. Stopped by `close()`."""
        vm, cfg, images, ws = self.vm, self.config, self.images, self.ws

        async def prune_ops() -> None:
            for reg in (vm.create_ops, images.ops, ws.ops):
                reg.prune(older_than=cfg.op_prune_interval * 5)

        self._ticker("watch-vmms", 2.0, vm.check_vmms)
        self._ticker("expire-vms", 2.0, vm.expire_vms)
        self._ticker("poll-stats", float(cfg.stats_poll_interval), vm.poll_stats)
        self._ticker("prune-ops", float(cfg.op_prune_interval), prune_ops)
        self._bg.append(asyncio.ensure_future(self.pool.run()))  # the warm pool's filler

    def _ticker(self, name: str, interval: float, job: Callable[[], Awaitable[Any]]) -> None:
        log = self.logger

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await asyncio.wait_for(job(), timeout=max(interval * 5, 30))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("background job %s failed", name)

        async def runner() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                await loop()

        self._bg.append(asyncio.ensure_future(runner()))
