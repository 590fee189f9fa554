"""`Daemon`: the composition root. Infrastructure plus four services; dispatch forwards.

No VM, image, workspace or network behaviour lives here. `METHODS` maps each RPC name
to its parameter schema and the service method that serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from stoker import __version__
from stoker.config import Config, config_path, load_config
from stoker.daemon import api
from stoker.daemon.capabilities import Capability, CapabilityHooks
from stoker.daemon.host_network import HostNetwork
from stoker.daemon.image_service import ImageService
from stoker.daemon.portfwd import PortForwards
from stoker.daemon.vm_service import CreateRequest, VMService
from stoker.daemon.wiring import wire_services
from stoker.daemon.workspace_service import WorkspaceService
from stoker.errors import ConfigError, InvalidArgument, MethodNotFound
from stoker.layout import Layout
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


@dataclass
class Daemon:
    """Shared infrastructure and pointers to the four services."""

    layout: Layout | None = None
    config: Config | None = None
    store: Store | None = None
    runner: Runner = field(default_factory=Runner)
    logger: logging.Logger | None = None
    listener: RPCServer | None = None
    net: HostNetwork | None = None
    images: ImageService | None = None
    ws: WorkspaceService | None = None
    vm: VMService | None = None
    hooks: CapabilityHooks | None = None
    capabilities: list[Capability] | None = None
    forwards: PortForwards | None = None
    started_at: float = field(default_factory=time.time)
    _stop: asyncio.Event | None = None
    _bg: list[asyncio.Task[None]] = field(default_factory=list)

    # --- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls, layout: Layout, config_file: str | None = None, runner: Runner | None = None
    ) -> Daemon:
        """Load config, open the store, wire services, reconcile. Does not serve yet."""
        path, explicit = config_path(config_file, layout.config_file)
        config = load_config(path, required=explicit)
        layout.ensure()
        logger = logging.getLogger("stoker")
        store = Store(layout.db_path)
        d = cls(layout=layout, config=config, store=store, logger=logger)
        if runner is not None:
            d.runner = runner
        wire_services(d)
        from stoker.daemon.reconcile import reconcile

        await reconcile(d)
        return d

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Listen on the socket and run background loops until `stop()`."""
        assert self.layout is not None and self.net is not None
        self._stop = asyncio.Event()
        await self.net.start()
        group = self.config.socket_group if self.config is not None else ""
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
        if self._stop is not None:
            self._stop.set()

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
        if self.forwards is not None:
            await self.forwards.close()
        if self.net is not None:
            await self.net.close()
        close_ssh = getattr(self.vm.ssh, "close", None) if self.vm is not None else None
        if close_ssh is not None:
            await close_ssh()
        if self.store is not None:
            self.store.close()
            self.store = None

    # --- dispatch ----------------------------------------------------------------------

    def methods(self) -> dict[str, Method]:
        """The RPC method table: each entry forwards to one service method."""
        assert self.vm is not None and self.images is not None
        vm, images = self.vm, self.images

        async def daemon_status(p: api.NoParams, ctx: RequestContext) -> Any:
            return self.status()

        async def operations_list(p: api.NoParams, ctx: RequestContext) -> Any:
            ops = [*vm.create_ops.list(), *images.ops.list()]
            if self.ws is not None:
                ops.extend(self.ws.ops.list())
            now = time.time()
            return [o.to_dict(now) for o in sorted(ops, key=lambda o: o.started_at)]

        async def vm_list(p: api.ListParams, ctx: RequestContext) -> Any:
            return await vm.list_vms()

        assert self.forwards is not None
        forwards = self.forwards

        async def vm_show(p: api.VMRef, ctx: RequestContext) -> Any:
            rec = await vm.show_vm(p.ref)
            out = rec.to_dict()
            out["port_forwards"] = forwards.for_vm(rec.id)
            return out

        async def port_forward(p: api.PortForward, ctx: RequestContext) -> Any:
            from stoker.errors import Conflict
            from stoker.model.records import VMState

            async with vm.with_vm_lock_by_ref(p.ref) as rec:
                if rec.state != VMState.RUNNING:
                    raise Conflict(
                        f"VM {rec.name} is {rec.state}: ports forward only to a running VM; "
                        f"start it first (`stoker vm start {rec.name}`)"
                    )
                return await forwards.add(rec.id, rec.name, rec.guest_ip, p.specs, ctx.peer_pid)

        async def port_forward_remove(p: api.PortForwardRemove, ctx: RequestContext) -> Any:
            rec = vm.resolve(p.ref)
            return await forwards.remove(rec.id, p.host_port)

        async def port_forward_list(p: api.OptionalRefs, ctx: RequestContext) -> Any:
            recs = [vm.resolve(r) for r in p.refs] if p.refs else vm.store.list_vms()
            return [f for r in recs for f in forwards.for_vm(r.id)]

        async def image_list(p: api.ListParams, ctx: RequestContext) -> Any:
            return await images.list_images()

        async def kernel_list(p: api.KernelList, ctx: RequestContext) -> Any:
            if p.available:
                return images.available_kernels()
            return await images.list_kernels()

        async def kernel_pull(p: api.NameParam, ctx: RequestContext) -> Any:
            return await images.pull_kernel(p.name, ctx.progress)

        async def vm_create(p: api.CreateVM, ctx: RequestContext) -> Any:
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
                        f"--from-snapshot takes the snapshot's image, shape and network: "
                        f"drop {', '.join(given)}"
                    )
                rec = await vm_fork.create_from_snapshot(
                    vm, snap, p.name, ctx.progress, ready=p.ready
                )
                out = rec.to_dict()
                out["timings"] = vm.last_timings.get(rec.id)
                return out
            req = CreateRequest(**args)
            rec = await vm.create_vm(req, ctx.progress)
            out = rec.to_dict()
            out["timings"] = vm.last_timings.get(rec.id)
            return out

        def fan(op: Callable[[str], Awaitable[Any]]) -> Handler:
            async def h(p: api.VMRefs, ctx: RequestContext) -> Any:
                return await vm.fan_out(p.refs, op)

            return h

        async def vm_snapshot(p: api.SnapshotCreate, ctx: RequestContext) -> Any:
            from stoker.daemon import snapshot_service

            return await snapshot_service.snapshot_vm(vm, p.ref, p.name, ctx.progress)

        async def vm_start_from_snapshot(p: api.SnapshotRef, ctx: RequestContext) -> Any:
            from stoker.daemon import snapshot_service

            rec = await snapshot_service.start_from_snapshot(vm, p.ref, p.name, ctx.progress)
            return rec.to_dict()

        async def vm_fork(p: api.ForkVM, ctx: RequestContext) -> Any:
            from stoker.daemon import vm_fork as forks

            rec = await forks.fork_vm(
                vm, p.ref, p.name, ctx.progress, snapshot=p.snapshot, ready=p.ready
            )
            out = rec.to_dict()
            out["timings"] = vm.last_timings.get(rec.id)
            return out

        async def vm_snapshot_list(p: api.SnapshotList, ctx: RequestContext) -> Any:
            from stoker.daemon import snapshot_service

            return snapshot_service.list_snapshots(vm, p.ref)

        async def vm_snapshot_delete(p: api.SnapshotRef, ctx: RequestContext) -> Any:
            from stoker.daemon import snapshot_service

            return await snapshot_service.delete_snapshot(vm, p.ref, p.name)

        async def vm_health(p: api.VMRef, ctx: RequestContext) -> Any:
            return await vm.health(p.ref)

        async def vm_stats(p: api.OptionalRefs, ctx: RequestContext) -> Any:
            return await vm.stats(p.refs)

        async def vm_ports(p: api.OptionalRefs, ctx: RequestContext) -> Any:
            results = await vm.ports(p.refs)
            for r in results:  # each guest port says which host ports forward to it
                if r.get("ok") and isinstance(r.get("result"), list):
                    rec = vm.resolve(r["ref"])
                    by_port: dict[int, list[str]] = {}
                    for f in forwards.for_vm(rec.id):
                        by_port.setdefault(f["guest_port"], []).append(f["listen"])
                    for entry in r["result"]:
                        if entry.get("proto") == "tcp":
                            entry["forwarded_from"] = by_port.pop(entry["port"], [])
                    for port, listens in sorted(by_port.items()):
                        r["result"].append(
                            {
                                "proto": "tcp",
                                "port": port,
                                "addr": None,
                                "process": None,
                                "pid": None,
                                "endpoint": f"{rec.dns_name}:{port}",
                                "loopback_only": False,
                                "url": None,
                                "forwarded_from": listens,
                            }
                        )
            return results

        wsvc = self.ws
        assert wsvc is not None

        async def ws_inspect(p: api.WorkspaceInspect, ctx: RequestContext) -> Any:
            return await wsvc.inspect(p.path, p.include_untracked, p.list_files)

        async def ws_prepare(p: api.WorkspacePrepare, ctx: RequestContext) -> Any:
            return await wsvc.prepare(
                p.ref,
                p.path,
                p.guest_path,
                p.branch,
                p.from_ref,
                p.include_untracked,
                ctx.progress,
            )

        async def ws_export(p: api.WorkspaceExport, ctx: RequestContext) -> Any:
            return await wsvc.export(p.ref, p.base_commit)

        async def vm_prune(p: api.PruneVMs, ctx: RequestContext) -> Any:
            return await vm.prune_vms(p.names)

        async def vm_set(p: api.SetVM, ctx: RequestContext) -> Any:
            if p.ttl is not None or p.clear_ttl:
                await vm.set_ttl(p.ref, None if p.clear_ttl else p.ttl)
            if p.vcpu is None and p.memory_mib is None and p.disk_size is None and p.net is None:
                return vm.resolve(p.ref)
            return await vm.set_vm(p.ref, p.vcpu, p.memory_mib, p.disk_size, p.net)

        async def vm_logs(p: api.VMRef, ctx: RequestContext) -> Any:
            return vm.logs_info(p.ref)

        async def vm_ssh_info(p: api.SSHInfo, ctx: RequestContext) -> Any:
            if p.wait:
                await vm.wait_ssh(p.ref, ctx.progress)
            return vm.ssh_info(p.ref)

        async def vm_exec(p: api.ExecVM, ctx: RequestContext) -> Any:
            return await vm.exec(p, ctx)

        async def vm_exec_signal(p: api.ExecSignal, ctx: RequestContext) -> Any:
            return await vm.exec_signal(p.exec, p.signal)

        async def vm_exec_input(p: api.ExecInput, ctx: RequestContext) -> Any:
            return await vm.exec_input(p.exec, p.data, p.eof)

        async def image_show(p: api.NameParam, ctx: RequestContext) -> Any:
            return await images.get_image(p.name)

        async def image_register(p: api.RegisterImage, ctx: RequestContext) -> Any:
            return await images.register_image(p.name, p.rootfs, p.kernel, p.work_seed, p.has_sshd)

        async def image_promote(p: api.NameParam, ctx: RequestContext) -> Any:
            return await images.promote_image(p.name)

        async def image_delete(p: api.NameParam, ctx: RequestContext) -> Any:
            return await images.delete_image(p.name)

        def credential(auth: dict[str, str] | None) -> Any:
            from stoker.daemon.oci.auth import Credential

            return Credential.from_wire(auth) if auth else None

        async def image_pull(p: api.PullRef, ctx: RequestContext) -> Any:
            return await images.pull(p.ref, p.name, ctx.progress, credential(p.auth))

        async def image_push(p: api.PushImage, ctx: RequestContext) -> Any:
            return await images.push(p.name, p.ref, ctx.progress, credential(p.auth))

        async def cache_prune(p: api.PruneCache, ctx: RequestContext) -> Any:
            return await images.prune_cache(p.dry_run)

        from stoker.daemon.env_service import EnvService

        envs = EnvService(images, vm, wsvc)

        async def image_build(p: api.BuildImage, ctx: RequestContext) -> Any:
            if p.from_image is None and not (p.packages or p.setup or p.inputs):
                return await images.build_golden(p.name or "debian-bookworm", p.force, ctx.progress)
            return await envs.build(_build_request(p), ctx.progress)

        async def vm_commit(p: api.CommitVM, ctx: RequestContext) -> Any:
            return await envs.commit(p.ref, p.image, p.with_work_disk, p.force, ctx.progress)

        async def kernel_import(p: api.ImportKernel, ctx: RequestContext) -> Any:
            return await images.import_kernel(p.name, p.source, ctx.progress)

        async def kernel_show(p: api.NameParam, ctx: RequestContext) -> Any:
            return await images.get_kernel(p.name)

        async def kernel_rm(p: api.NameParam, ctx: RequestContext) -> Any:
            return await images.delete_kernel(p.name)

        async def daemon_stop(p: api.NoParams, ctx: RequestContext) -> Any:
            asyncio.get_running_loop().call_later(0.05, self.stop)
            return {"stopping": True, "pid": os.getpid()}

        return {
            "daemon.status": Method(api.NoParams, daemon_status),
            "daemon.stop": Method(api.NoParams, daemon_stop),
            "daemon.operations.list": Method(api.NoParams, operations_list),
            "vm.list": Method(api.ListParams, vm_list),
            "vm.show": Method(api.VMRef, vm_show),
            "vm.create": Method(api.CreateVM, vm_create),
            "vm.start": Method(api.VMRefs, self._fan_progress(vm.start_vm)),
            "vm.restart": Method(api.VMRefs, self._fan_progress(vm.restart_vm)),
            "vm.stop": Method(api.VMRefs, fan(vm.stop_vm)),
            "vm.kill": Method(api.VMRefs, fan(vm.kill_vm)),
            "vm.delete": Method(api.VMRefs, fan(vm.delete_vm)),
            "vm.set": Method(api.SetVM, vm_set),
            "vm.prune": Method(api.PruneVMs, vm_prune),
            "vm.workspace.inspect": Method(api.WorkspaceInspect, ws_inspect),
            "vm.workspace.prepare": Method(api.WorkspacePrepare, ws_prepare),
            "vm.workspace.export": Method(api.WorkspaceExport, ws_export),
            "vm.snapshot": Method(api.SnapshotCreate, vm_snapshot),
            "vm.fork": Method(api.ForkVM, vm_fork),
            "vm.snapshot.list": Method(api.SnapshotList, vm_snapshot_list),
            "vm.start_from_snapshot": Method(api.SnapshotRef, vm_start_from_snapshot),
            "vm.snapshot.delete": Method(api.SnapshotRef, vm_snapshot_delete),
            "vm.health": Method(api.VMRef, vm_health),
            "vm.ping": Method(api.VMRef, vm_health),
            "vm.stats": Method(api.OptionalRefs, vm_stats),
            "vm.ports": Method(api.OptionalRefs, vm_ports),
            "vm.port_forward": Method(api.PortForward, port_forward),
            "vm.port_forward.remove": Method(api.PortForwardRemove, port_forward_remove),
            "vm.port_forward.list": Method(api.OptionalRefs, port_forward_list),
            "vm.logs": Method(api.VMRef, vm_logs),
            "vm.ssh_info": Method(api.SSHInfo, vm_ssh_info),
            "vm.exec": Method(api.ExecVM, vm_exec),
            "vm.exec.signal": Method(api.ExecSignal, vm_exec_signal),
            "vm.exec.input": Method(api.ExecInput, vm_exec_input),
            "vm.commit": Method(api.CommitVM, vm_commit),
            "image.list": Method(api.ListParams, image_list),
            "image.show": Method(api.NameParam, image_show),
            "image.register": Method(api.RegisterImage, image_register),
            "image.promote": Method(api.NameParam, image_promote),
            "image.delete": Method(api.NameParam, image_delete),
            "image.pull": Method(api.PullRef, image_pull),
            "image.push": Method(api.PushImage, image_push),
            "image.build": Method(api.BuildImage, image_build),
            "kernel.import": Method(api.ImportKernel, kernel_import),
            "image.cache.prune": Method(api.PruneCache, cache_prune),
            "kernel.list": Method(api.KernelList, kernel_list),
            "kernel.pull": Method(api.NameParam, kernel_pull),
            "kernel.show": Method(api.NameParam, kernel_show),
            "kernel.rm": Method(api.NameParam, kernel_rm),
        }

    def _fan_progress(self, op: Callable[[str, Callable[..., None]], Awaitable[Any]]) -> Handler:
        """A multi-ref handler whose per-VM op also streams progress (tagged by VM)."""
        assert self.vm is not None
        vm = self.vm

        async def h(p: api.VMRefs, ctx: RequestContext) -> Any:
            async def one(vm_id: str) -> Any:
                name = vm.resolve(vm_id).name

                def prog(stage: str, message: str = "", **kw: Any) -> None:
                    ctx.progress(stage, message, vm=name, **kw)

                return await op(vm_id, prog)

            return await vm.fan_out(p.refs, one)

        return h

    async def dispatch(self, method: str, params: dict[str, Any], ctx: RequestContext) -> Any:
        table = self._table()
        m = table.get(method)
        if m is None:
            raise MethodNotFound(
                f"unknown method {method!r}: this stokerd ({__version__}) serves "
                f"{', '.join(sorted(table))}"
            )
        p = api.validate(m.params, method, params)
        return to_jsonable(await m.handler(p, ctx))

    def _table(self) -> dict[str, Method]:
        t: dict[str, Method] | None = getattr(self, "_method_cache", None)
        if t is None:
            t = self.methods()
            object.__setattr__(self, "_method_cache", t)
        return t

    def status(self) -> dict[str, Any]:
        """Daemon facts for `stoker daemon status`."""
        assert self.layout is not None and self.net is not None
        return {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "socket": str(self.layout.socket_path),
            "state_dir": str(self.layout.state_dir),
            "config": str(self.config.path) if self.config and self.config.path else None,
            "uptime_s": round(time.time() - self.started_at, 1),
            "network": self.net.status(),
        }

    def start_background(self) -> None:
        """The ticker fan-out: each job on its own task and interval, so a slow one never
        delays the others. Stopped by `close()`."""
        assert self.vm is not None and self.config is not None
        vm, cfg = self.vm, self.config

        images, ws = self.images, self.ws
        assert images is not None and ws is not None

        async def prune_ops() -> None:
            for reg in (vm.create_ops, images.ops, ws.ops):
                reg.prune(older_than=cfg.op_prune_interval * 5)

        self._ticker("watch-vmms", 2.0, vm.check_vmms)
        self._ticker("expire-vms", 2.0, vm.expire_vms)
        self._ticker("poll-stats", float(cfg.stats_poll_interval), vm.poll_stats)
        self._ticker("prune-ops", float(cfg.op_prune_interval), prune_ops)

    def _ticker(self, name: str, interval: float, job: Callable[[], Awaitable[Any]]) -> None:
        log = self.logger or logging.getLogger("stoker")

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


def _build_request(p: api.BuildImage) -> Any:
    """RPC parameters -> an EnvService build request (derived images)."""
    from stoker.daemon.env_service import DEFAULT_SETUP_TIMEOUT, BuildRequest
    from stoker.daemon.imagemgr.derived import SetupStep
    from stoker.errors import InvalidArgument

    inputs: list[tuple[str, str]] = []
    for i in p.inputs:
        if len(i) != 2:
            raise InvalidArgument("inputs: each entry is [repo path, sha256]")
        inputs.append((i[0], i[1]))
    return BuildRequest(
        name=p.name,
        from_image=p.from_image or "debian-bookworm",
        packages=tuple(p.packages),
        setup=tuple(SetupStep(s.label, s.script) for s in p.setup),
        inputs=tuple(inputs),
        repo=p.repo,
        recipe=p.recipe,
        force=p.force,
        keep_failed=p.keep_failed,
        setup_timeout=float(p.setup_timeout or DEFAULT_SETUP_TIMEOUT),
    )
