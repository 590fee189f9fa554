"""`stoker vm fork NAME --name NEW` and `vm create NEW --from-snapshot VM/SNAP` (issue 13
item 3): a new VM restored from a snapshot, with disks of its own (sparse copies of the
snapshot's writable disks) and an identity of its own, given through the guest agent
before its NIC carries a frame.

The order (docs/guest-boot.md, "Identity of a fork"):

1. reserve the name and a guest IP, make the VM directory with the `FORKING` mark, then
   the row (a crash from here on: reconcile deletes the whole VM, see `reap_half_forks`);
2. a host key of its own (pinned in known_hosts, as for `vm create`);
3. the source's disks: a fresh snapshot of the running source saved straight into the new
   VM's directory (`fork`), or sparse copies of an existing snapshot's (`--snapshot`,
   `--from-snapshot`); the state file is hard-linked (or copied) beside them;
4. the normal start flow with a restore as its spawn: the recorded VMM kind + version,
   accel, kernel, image and shape must match (`snapshot_files.snapshot_refusal`); QEMU
   loads the state with the NIC's link down (`set_link`), the guest runs, the agent's
   `identity` frame reseeds the kernel RNG from host entropy and sets the clock, machine-id,
   SSH host key, hostname, /etc/hosts, resolv.conf, network.env and the NIC's MAC, address
   and route; then the link comes up;
5. the mark goes and the state file with it.

Any failure undoes it all (one `Reverter`): no row, no directory, no known_hosts entry, no
VMM, no tap. `fork_from_snapshot` is the daemon-side entry a warm pool can fill from.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.daemon.agent import AgentClient, GuestIdentity, SerialTransport
from stoker.daemon.agent.client import FirecrackerVsockTransport
from stoker.daemon.guestssh import add_known_host, generate_host_key, remove_known_host
from stoker.daemon.revert import Reverter
from stoker.daemon.snapshot_files import copy_sparse
from stoker.daemon.snapshot_service import (
    SNAPSHOTS_DIR,
    STATE_FILE,
    _take,
    check_name,
    machine_meta,
    refuse_if_changed,
)
from stoker.errors import AlreadyExists, Ambiguous, Conflict, InvalidArgument, NotFound
from stoker.model.names import validate_name
from stoker.model.records import VMRecord, VMSpec, VMState
from stoker.store.db import now

if TYPE_CHECKING:
    from stoker.daemon.vm_service import Progress, VMService
    from stoker.daemon.vmm.base import MachineConfig, VMMHandle

FORKING_MARK = "FORKING"  # in the new VM's directory until the fork is whole
FORK_STATE = ".fork-state.bin"  # the state the new VM is restored from (removed after)
SOURCE_SNAPSHOT = ".fork-source"  # a fresh snapshot of the source, saved into the new dir
IDENTITY_TIMEOUT = 30.0
AGENT_WAIT = 60.0  # seconds a restored guest's agent gets to answer

# (state file, what the snapshot recorded) once the new VM's disks are in place
Fill = Callable[[Path], Awaitable[tuple[Path, dict[str, Any]]]]


def _can_fork(svc: VMService) -> None:
    drv = svc._driver()
    if not drv.supports_fork:
        raise Conflict(f"the {drv.label} driver cannot fork VMs yet (QEMU can)")


def _free_name(svc: VMService, name: str) -> str:
    validate_name(name)
    if any(v.name == name for v in svc.store.list_all_vms()):  # pool VMs' names count
        raise AlreadyExists(
            f"a VM named {name!r} already exists: pick another --name or `stoker vm delete {name}`"
        )
    return name


async def fork_vm(
    svc: VMService,
    ref: str,
    new_name: str,
    progress: Progress,
    *,
    snapshot: str | None = None,
    ready: str = "ssh",
) -> VMRecord:
    """`vm fork NAME --name NEW [--snapshot SNAP]`: from a fresh snapshot of the running
    VM (taken into NEW's directory, not kept), or from NAME's existing snapshot SNAP."""
    _can_fork(svc)
    _free_name(svc, new_name)
    source = svc.resolve(ref)
    if source.name == new_name:
        raise InvalidArgument(f"--name {new_name!r} is the VM being forked: give a new name")
    if snapshot is not None:
        return await fork_from_snapshot(svc, source.id, snapshot, new_name, progress, ready=ready)
    if source.state != VMState.RUNNING or not await svc.is_alive(source):
        raise Conflict(
            f"VM {source.name} is not running ({source.state.value}): `vm fork` snapshots a "
            f"running VM; start it (`stoker vm start {source.name}`) or fork one of its "
            f"snapshots (`stoker vm fork {source.name} --name {new_name} --snapshot SNAP`)"
        )

    async def fresh(vm_dir: Path) -> tuple[Path, dict[str, Any]]:
        async with svc.with_vm_lock_by_id(source.id) as src:
            if src.state != VMState.RUNNING or not await svc.is_alive(src):
                raise Conflict(f"VM {src.name} stopped meanwhile: nothing to fork")
            driver = svc._driver()
            if not driver.supports_fork:
                raise Conflict(f"the {driver.label} driver cannot fork VMs yet (QEMU can)")
            handle = svc._handle(src)
            if handle is None:
                raise Conflict(f"VM {src.name}'s VMM is not reachable: restart the VM")
            image = await svc.images.get_image(src.image)
            kernel = await svc.images.get_kernel(image.kernel or "")
            cfg = svc._machine_config(src, kernel, image, src.teardown.tap or "")
            meta = machine_meta(
                driver.name,
                await driver.vmm_version(handle),
                handle.extra.get("accel"),
                image.digest or image.created_at,
                cfg,
            )
            taken = vm_dir / SOURCE_SNAPSHOT
            await _take(svc, src, driver, handle, cfg, taken, progress)
        for d in cfg.disks:
            if not d.read_only:
                os.replace(taken / d.path.name, vm_dir / d.path.name)
        os.replace(taken / STATE_FILE, vm_dir / FORK_STATE)
        shutil.rmtree(taken, ignore_errors=True)
        return vm_dir / FORK_STATE, meta

    return await _fork(svc, source, new_name, progress, ready, fresh)


def resolve_snapshot(svc: VMService, ref: str) -> tuple[VMRecord, str]:
    """`VM/SNAP`, or a bare `SNAP` when exactly one VM has a snapshot of that name."""
    vm_ref, sep, name = ref.rpartition("/")
    if sep:
        return svc.resolve(vm_ref), check_name(name)
    check_name(ref)
    mine = {v.id for v in svc.store.list_vms()}  # not a hidden VM's (the pool's template)
    owners = [
        s["vm_id"]
        for s in svc.store.list_snapshots(None)
        if s["name"] == ref and s["vm_id"] in mine
    ]
    if not owners:
        raise NotFound(
            f"no VM has a snapshot named {ref!r} (see `stoker vm snapshot list`; "
            "name one as VM/SNAP)"
        )
    if len(owners) > 1:
        names = sorted(svc.resolve(o).name for o in owners)
        raise Ambiguous(
            f"several VMs have a snapshot named {ref!r} ({', '.join(names)}): name it as "
            f"VM/SNAP, e.g. {names[0]}/{ref}"
        )
    return svc.resolve(owners[0]), ref


async def create_from_snapshot(
    svc: VMService, snapshot_ref: str, new_name: str | None, progress: Progress, ready: str
) -> VMRecord:
    """`vm create NEW --from-snapshot VM/SNAP`."""
    if not new_name:
        raise InvalidArgument("`vm create --from-snapshot` needs the new VM's --name")
    _free_name(svc, new_name)
    source, snap = resolve_snapshot(svc, snapshot_ref)
    return await fork_from_snapshot(svc, source.id, snap, new_name, progress, ready=ready)


async def fork_from_snapshot(
    svc: VMService,
    source_ref: str,
    snapshot: str,
    new_name: str,
    progress: Progress,
    *,
    ready: str = "ssh",
) -> VMRecord:
    """A new running VM `new_name` from snapshot `snapshot` of VM `source_ref` (which may
    be stopped). The daemon-side entry for anything that makes VMs from a template
    snapshot (a warm pool): the snapshot is kept, the new VM is whole or absent."""
    return await fork_snapshot_by_id(
        svc, svc.resolve(source_ref).id, snapshot, new_name, progress, ready=ready
    )


async def fork_snapshot_by_id(
    svc: VMService,
    source_id: str,
    snapshot: str,
    new_name: str,
    progress: Progress,
    *,
    ready: str = "ssh",
    pool: str | None = None,
) -> VMRecord:
    """`fork_from_snapshot` by the source's id (a hidden VM too: the warm pool's
    template). With `pool`, the new VM is a (not yet ready) pool VM of that image, hidden
    from the start."""
    _free_name(svc, new_name)
    snapshot = check_name(snapshot)
    source = svc.store.get_vm(source_id)
    if source is None:
        raise NotFound(f"VM {source_id!r} (the snapshot's source) was deleted meanwhile")

    async def copy(vm_dir: Path) -> tuple[Path, dict[str, Any]]:
        async with svc.with_vm_lock_by_id(source.id) as src:
            snap = svc.store.get_snapshot(src.id, snapshot)
            if snap is None:
                raise NotFound(
                    f"VM {src.name} has no snapshot named {snapshot!r} "
                    f"(see `stoker vm snapshot list {src.name}`)"
                )
            d = Path(src.vm_dir) / SNAPSHOTS_DIR / snapshot
            if not (d / STATE_FILE).is_file():
                raise Conflict(f"snapshot {snapshot} of {src.name} is incomplete ({d}): delete it")
            progress("disks", f"copying the disks of snapshot {src.name}/{snapshot} (sparse)")
            from stoker.daemon.vm_service import OVERLAY, WORKDISK

            for f in (OVERLAY, WORKDISK):
                if not (d / f).is_file():
                    raise Conflict(f"snapshot {src.name}/{snapshot} has no copy of {f}")
                await asyncio.to_thread(copy_sparse, d / f, vm_dir / f)
            await asyncio.to_thread(_link_or_copy, d / STATE_FILE, vm_dir / FORK_STATE)
            meta: dict[str, Any] = snap["meta"]
        return vm_dir / FORK_STATE, meta

    return await _fork(svc, source, new_name, progress, ready, copy, pool=pool)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


async def _fork(
    svc: VMService,
    source: VMRecord,
    new_name: str,
    progress: Progress,
    ready: str,
    fill: Fill,
    pool: str | None = None,
) -> VMRecord:
    async with contextlib.AsyncExitStack() as locks, Reverter(svc.log) as revert:
        async with svc.create_vm_lock:
            _free_name(svc, new_name)
            ip = svc.net.allocate_ip(svc.store.used_ips())
            vm_id = uuid.uuid4().hex
            vm_dir = svc.layout.vm_dir(vm_id)
            # The mark before the row: a crash between them leaves a directory the start-up
            # sweep removes; after them, reconcile sees the mark and deletes the VM.
            vm_dir.mkdir(parents=True, mode=0o700)
            revert.add(lambda: shutil.rmtree(vm_dir, ignore_errors=True), "remove the VM dir")
            (vm_dir / FORKING_MARK).write_text(f"fork of {source.name} started {now()}\n")
            ts = now()
            spec = VMSpec(**vars(source.spec))
            vm = VMRecord(
                id=vm_id,
                name=new_name,
                state=VMState.CREATED,
                image=source.image,
                spec=spec,
                guest_ip=ip,
                dns_name=f"{new_name}.vm",
                vm_dir=str(vm_dir),
                created_at=ts,
                updated_at=ts,
                system_image=source.system_image,
            )
            svc.store.insert_vm(vm, pool=pool)
            revert.add(lambda: svc.store.delete_vm(vm_id), "delete the VM record")
            await locks.enter_async_context(svc.vm_locks.hold(vm_id))
        progress("identity", f"{new_name}: {ip}, a host key of its own")
        host_key = vm_dir / "ssh_host_ed25519_key"
        pub = await generate_host_key(svc.runner, host_key, f"root@{new_name}")
        hosts = [vm.guest_ip, vm.dns_name, vm.name]
        add_known_host(svc.layout.known_hosts, hosts, pub)
        revert.add(lambda: remove_known_host(svc.layout.known_hosts, hosts), "known_hosts")

        t_fill = time.monotonic()
        state, recorded = await fill(vm_dir)
        timing: dict[str, float] = {"disks_s": round(time.monotonic() - t_fill, 3)}
        # The restored guest's shape is the snapshot's, whatever the source has now.
        vm.spec.vcpu = int(recorded.get("vcpu", vm.spec.vcpu))
        vm.spec.memory_mib = int(recorded.get("memory_mib", vm.spec.memory_mib))
        svc.store.update_vm(vm)
        ident = GuestIdentity(
            **{k: v for k, v in vars(svc._guest_net(vm)).items()},
            host_key=host_key.read_text(),
            host_key_pub=pub,
            machine_id=uuid.uuid4().hex,
            entropy=os.urandom(64),
        )
        boot = _restore_with_identity(svc, vm, state, recorded, ident, progress, timing)
        out = await svc._start_locked(vm, progress, ready=ready, spawn=boot)
        svc.last_timings[vm.id] = {**svc.last_timings.get(vm.id, {}), **timing}
        state.unlink(missing_ok=True)
        (vm_dir / FORKING_MARK).unlink()
        revert.success()
        progress("forked", f"{new_name} forked from {source.name}")
        return out


def _restore_with_identity(
    svc: VMService,
    vm: VMRecord,
    state: Path,
    recorded: dict[str, Any],
    ident: GuestIdentity,
    progress: Progress,
    timing: dict[str, float],
) -> Callable[[Any, MachineConfig], Awaitable[VMMHandle]]:
    async def boot(drv: Any, cfg: MachineConfig) -> VMMHandle:
        if not drv.supports_fork:
            raise Conflict(f"the {drv.label} driver cannot fork VMs yet (QEMU can)")
        await refuse_if_changed(svc, drv, vm.image, cfg, recorded)
        progress("restore", "restoring the snapshot's memory with the NIC's link down")
        t0 = time.monotonic()
        handle: VMMHandle = await drv.restore(cfg, state, link_down=True)
        timing["restore_s"] = round(time.monotonic() - t0, 3)
        try:
            agent = _agent_for_handle(svc, vm, drv, handle)
            deadline = time.monotonic() + AGENT_WAIT
            while not await agent.alive(timeout=1.0):
                if time.monotonic() > deadline or not drv.is_running(handle):
                    raise Conflict(
                        f"the restored guest's agent did not answer within {AGENT_WAIT:.0f}s: "
                        f"see `stoker vm logs {vm.name}`"
                    )
                await asyncio.sleep(0.05)
            health = await agent.healthz(timeout=5.0)
            if "identity" not in health.features:
                raise Conflict(
                    f"the agent in image {vm.image} (version {health.agent_version}) cannot "
                    "set a clone's identity: rebuild the image, snapshot again, then fork"
                )
            progress("identity", "RNG reseed, clock, host key, machine-id, hostname, network")
            t_id = time.monotonic()
            done = await agent.set_identity(ident, timeout=IDENTITY_TIMEOUT)
            timing["identity_s"] = round(time.monotonic() - t_id, 3)
            await drv.set_link(handle, up=True)
            progress("identity", f"guest identity set ({', '.join(done)}); link up")
        except BaseException:
            await vm_stats_drop(svc, vm.id)
            with contextlib.suppress(Exception):
                await drv.kill(handle)
            raise
        timing["restore_identity_s"] = round(time.monotonic() - t0, 3)
        return handle

    return boot


def _agent_for_handle(svc: VMService, vm: VMRecord, drv: Any, handle: VMMHandle) -> AgentClient:
    """The VM's one agent client, made from a handle the start flow has not recorded yet
    (QEMU's chardev takes one client: the start flow then reuses this one)."""
    channel = drv.agent_transport(handle)
    if channel is None:
        raise Conflict(f"VM {vm.name} has no agent channel: a fork sets its identity there")
    transport = (
        FirecrackerVsockTransport(channel.socket)
        if channel.hybrid_vsock
        else SerialTransport(channel.socket)
    )
    c = AgentClient(transport, name=vm.name)
    svc.agents[vm.id] = c
    return c


async def vm_stats_drop(svc: VMService, vm_id: str) -> None:
    from stoker.daemon import vm_stats

    await vm_stats.drop_agent(svc, vm_id)


async def reap_half_forks(svc: VMService) -> list[str]:
    """At daemon start, before anything else looks at the VMs: a VM whose directory still
    has the `FORKING` mark was being forked when the daemon died. Its VMM (if one was
    spawned) is ended, its tap and rules go, and the VM is deleted whole."""
    reaped: list[str] = []
    for vm in svc.store.list_all_vms():  # a pool fill's fork too
        if not (Path(vm.vm_dir) / FORKING_MARK).exists():
            continue
        errs = await svc._cleanup(vm)
        remove_known_host(svc.layout.known_hosts, [vm.guest_ip, vm.dns_name, vm.name])
        shutil.rmtree(vm.vm_dir, ignore_errors=True)
        svc.store.delete_vm(vm.id)
        svc.log.warning(
            "reconcile: deleted %s, a fork stokerd did not finish%s",
            vm.name,
            f" (cleanup: {'; '.join(errs)})" if errs else "",
        )
        reaped.append(vm.name)
    return reaped


async def resume_paused_sources(svc: VMService) -> list[str]:
    """At daemon start: a running VM whose guest was paused for a snapshot when the daemon
    died (`PAUSED_MARK`) runs again."""
    from stoker.daemon.snapshot_service import PAUSED_MARK

    resumed: list[str] = []
    for vm in svc.store.list_vms():
        mark = Path(vm.vm_dir) / PAUSED_MARK
        if not mark.exists():
            continue
        handle = svc._handle(vm)
        drv = svc._driver()
        if handle is not None and drv.is_running(handle) and drv.supports_snapshots:
            try:
                await drv.resume(handle)
                resumed.append(vm.name)
                svc.log.warning("reconcile: resumed %s, left paused by a snapshot", vm.name)
            except Exception as e:
                svc.log.warning("reconcile: could not resume %s: %s", vm.name, e)
                continue
        mark.unlink(missing_ok=True)
    return resumed
