"""PoolService: the warm pool. VMs kept booted per image, taken by `vm run` / `vm create`.

`[pool]` in config names a target size per image (`PoolSettings.sizes`). One background
task (`run`) keeps each pool at its size, filling one VM at a time (a TCG host must not
boot several guests at once) through a `FillStrategy`. `PoolService.strategies` is tried in
order: those that `can_fill` the image are tried one after the other until one fills it
(a failure falls back to the next; the reason is `fallback` in `pool status` and a log
line). `TemplateFill` (when the driver `supports_fork`) forks each pool VM from a template
snapshot of the image: one hidden template VM per image, booted with the default sizing,
snapshotted once (`pool-template`) and then stopped; each fill is a fork of it (its own
disks, IP, MAC, host key, RNG and machine-id, through `vm_fork`). `PreBootedFill` boots a
VM with the default sizing and network until SSH and the agent's exec answer.

A pool VM is a VM row plus a `pool_vms` row: hidden from `vm list`/`show`/completion,
prune, TTL and auto-stop (`Store.list_vms` leaves it out, `resolve` cannot find it), seen
by the VMM watch, reconcile and the orphan sweep (`Store.list_all_vms`). A template VM is
a pool row with `template` set (`Store.pool_members(template=True)`): hidden the same way,
never taken, rebuilt when its image changes, removed with a drain. `take` gives a
ready one the request's identity (name, hostname and /etc/hosts in the guest through the
agent's exec, known_hosts entries, NAME.vm, the request's network policy, TTL) and turns
it into the user's VM in one store transaction. Whatever it cannot serve, and any failure,
is a cold boot, the reason in the progress stream. Fills that fail back off exponentially
(`backoff_delay`), the last error shown by `pool status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from stoker.daemon.guestssh import add_known_host, remove_known_host
from stoker.daemon.vm_disks import hosts_file, mac_for
from stoker.errors import AlreadyExists, StokerError
from stoker.model.names import generate_name
from stoker.model.records import Image, PoolMember, VMRecord, VMSpec, VMState
from stoker.model.sizes import parse_size
from stoker.model.wire import PoolImageStatus

if TYPE_CHECKING:
    from stoker.config import Config
    from stoker.daemon.hostnet.policy import NetPolicy
    from stoker.daemon.vm_service import CreateRequest, VMService
    from stoker.store import Store

Progress = Callable[..., None]

BACKOFF_BASE = 5.0  # seconds after the first failed fill
BACKOFF_CAP = 300.0  # never longer than this between tries
TICK = 2.0  # seconds between pool checks when nothing wakes the filler
IDENTITY_TIMEOUT = 20.0  # the identity command in the guest
TEMPLATE_SNAPSHOT = "pool-template"  # the template VM's one snapshot
RECONCILE_AGENT_TIMEOUT = 3.0

# Run by the guest agent (root) in a pool VM being taken: its new name into the kernel,
# /etc/hostname, /etc/hosts (stoker's own file, rewritten whole) and network.env. Files are
# written in place (no temporary beside them): nothing is created outside these paths.
IDENTITY_SCRIPT = r"""set -e
hostname "$STOKER_NAME" 2>/dev/null || printf '%s' "$STOKER_NAME" > /proc/sys/kernel/hostname
printf '%s\n' "$STOKER_NAME" > /etc/hostname
printf '%s' "$STOKER_HOSTS" > /etc/hosts
f=/etc/stoker/network.env
if [ -f "$f" ]; then
  rest=$(grep -v '^STOKER_HOSTNAME=' "$f" || true)
  printf '%s\nSTOKER_HOSTNAME=%s\n' "$rest" "$STOKER_NAME" > "$f"
fi
cat /proc/sys/kernel/hostname
"""


def backoff_delay(failures: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait after `failures` fills failed in a row: base, 2*base, 4*base, ...
    capped at `cap`; 0 after none."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(failures - 1, 30))


def pool_refusal(
    req: CreateRequest, image: str, sizes: dict[str, int], default: VMSpec
) -> str | None:
    """Why this create cannot come from the pool (None: it can). The pool serves a VM
    that is started, of a pooled image, with the default machine: an explicit --vcpu,
    --memory or --disk-size equal to the default is still the default. The network policy
    (`--net`, `--nat`), the name and the TTL are applied when it is taken."""
    if req.no_start:
        return "--no-start asks for a VM that is not running"
    if sizes.get(image, 0) <= 0:
        return f"image {image} has no warm pool ([pool] in the config)"
    if req.vcpu is not None and req.vcpu != default.vcpu:
        return f"--vcpu {req.vcpu} is not the pool's {default.vcpu}"
    if req.memory_mib is not None and req.memory_mib != default.memory_mib:
        return f"--memory {req.memory_mib} is not the pool's {default.memory_mib} MiB"
    if req.disk_size is not None:
        try:
            size = parse_size(req.disk_size, "--disk-size")
        except StokerError:
            return "--disk-size is not the pool's"
        if size != default.disk_size:
            return f"--disk-size {req.disk_size} is not the pool's"
    return None


class FillStrategy(Protocol):
    """How a pool VM is made. `fill` returns a running VM whose pool row is ready, or
    raises (leaving nothing behind)."""

    name: str

    def can_fill(self, image: Image) -> str | None:
        """None when this strategy can fill `image`, else why not."""
        ...

    async def fill(self, image: Image, progress: Progress) -> VMRecord: ...


@dataclass
class PreBootedFill:
    """A cold boot with the default sizing, kept running (VMService.create_pool_vm)."""

    vm: VMService
    name: str = "pre-booted"

    def can_fill(self, image: Image) -> str | None:
        return None

    async def fill(self, image: Image, progress: Progress) -> VMRecord:
        return await self.vm.create_pool_vm(image, progress)


@dataclass
class TemplateFill:
    """A fork of the image's template snapshot (module docstring). The template is made on
    the first fill (a boot like `PreBootedFill`'s, a snapshot, then the VM is killed: its
    snapshot is all a fork needs), kept while its image is unchanged, rebuilt otherwise.
    A failure (the template's boot or snapshot, or a fork) removes the template, so the
    next try rebuilds it, and keeps this strategy out for a backoff (`can_fill` says why):
    those fills are pre-booted."""

    pool: PoolService
    name: str = "template"
    failures: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)
    next_try: dict[str, float] = field(default_factory=dict)

    def can_fill(self, image: Image) -> str | None:
        try:
            drv = self.pool.vm._driver()
        except StokerError as e:  # `pool status` must not fail on it: the fill will say
            return f"no VMM driver ({e.message})"
        if not drv.supports_fork:
            return f"the {drv.label} driver cannot fork VMs"
        left = self.next_try.get(image.name, 0.0) - time.monotonic()
        if left > 0:
            return (
                f"the template failed ({self.last_error.get(image.name, '?')}); "
                f"next try in {left:.0f}s"
            )
        return None

    async def fill(self, image: Image, progress: Progress) -> VMRecord:
        try:
            vm = await self._fill(image, progress)
        except Exception as e:
            n = self.failures[image.name] = self.failures.get(image.name, 0) + 1
            self.last_error[image.name] = _message(e)
            delay = backoff_delay(n, self.pool.backoff_base, self.pool.backoff_cap)
            self.next_try[image.name] = time.monotonic() + delay
            for m in self.pool.store.pool_members(image.name, template=True):
                await self.pool._reap(m.vm_id, f"the template failed: {_message(e)}")
            raise
        self.failures.pop(image.name, None)
        self.last_error.pop(image.name, None)
        self.next_try.pop(image.name, None)
        return vm

    async def _fill(self, image: Image, progress: Progress) -> VMRecord:
        from stoker.daemon import vm_fork
        from stoker.daemon.vm_service import POOL_NAME_PREFIX

        svc = self.pool.vm
        tpl = await self.template(image, progress)
        name = POOL_NAME_PREFIX + uuid.uuid4().hex[:8]
        vm = await vm_fork.fork_snapshot_by_id(
            svc, tpl.id, TEMPLATE_SNAPSHOT, name, progress, ready="ssh", pool=image.name
        )
        try:
            await _run_to_end(svc._wait_pool_agent(vm))
            svc.store.set_pool_ready(vm.id)
        except BaseException:
            await _run_to_end(svc.delete_vm_by_id(vm.id, only_pool=True))
            raise
        return vm

    async def template(self, image: Image, progress: Progress) -> VMRecord:
        """The image's template VM (stopped, its snapshot taken), made now if there is
        none or it is stale."""
        from stoker.daemon.snapshot_service import snapshot_vm_by_id

        svc, store = self.pool.vm, self.pool.store
        for m in store.pool_members(image.name, template=True):
            vm = store.get_vm(m.vm_id)
            why = self.pool._template_stale(m, image)
            if why is None and vm is not None:
                return vm
            await self.pool._reap(m.vm_id, f"template: {why}")
        progress("template", f"booting the pool's template VM of {image.name}")
        t0 = time.monotonic()
        vm = await svc.create_pool_vm(image, progress, template=True)
        try:
            await snapshot_vm_by_id(svc, vm.id, TEMPLATE_SNAPSHOT, progress)
            async with svc.with_vm_lock_by_id(vm.id) as locked:
                vm = await svc._stop_locked(locked, force=True)  # the snapshot is the template
            store.set_pool_ready(vm.id)
        except BaseException:
            await _run_to_end(svc.delete_vm_by_id(vm.id, only_pool=True))
            raise
        self.pool.log.info(
            "warm pool of %s: template %s made in %.1fs", image.name, vm.name, time.monotonic() - t0
        )
        return vm


@dataclass
class _ImageState:
    """The filler's memory of one image's pool (not persisted: a restart starts afresh)."""

    failures: int = 0
    last_error: str | None = None
    next_try: float = 0.0  # monotonic time before which no fill is tried
    strategy: str = ""
    fallback: str | None = None  # why the last fill did not use the first strategy
    takes: int = 0
    misses: int = 0


class PoolService:
    """Keeps the warm pools filled and hands their VMs out (see module docstring)."""

    def __init__(self, vm: VMService, store: Store, config: Config, logger: logging.Logger) -> None:
        self.vm = vm
        self.store = store
        self.config = config
        self.log = logger
        self.strategies: list[FillStrategy] = [TemplateFill(self), PreBootedFill(vm)]
        self.backoff_base = BACKOFF_BASE
        self.backoff_cap = BACKOFF_CAP
        self.tick = TICK
        self.state: dict[str, _ImageState] = {}
        self._wake = asyncio.Event()
        self._filling: tuple[str, asyncio.Task[VMRecord]] | None = None
        self._taking: set[str] = set()  # pool VM ids being taken right now
        self._draining: set[str] = set()  # images whose pool is being drained

    # --- configuration ------------------------------------------------------------------

    def sizes(self) -> dict[str, int]:
        return self.config.pool.sizes(self.config.default_image)

    def _st(self, image: str) -> _ImageState:
        return self.state.setdefault(image, _ImageState())

    def wake(self) -> None:
        self._wake.set()

    # --- take ---------------------------------------------------------------------------

    async def take(
        self,
        req: CreateRequest,
        image: Image,
        spec: VMSpec,
        policy: NetPolicy,
        expires_at: str | None,
        progress: Progress,
    ) -> VMRecord | None:
        """A ready pool VM of `image` made the VM `req` asks for, or None (cold boot; the
        reason went to `progress`). A name already in use is refused as a cold create
        would refuse it."""
        sizes = self.sizes()
        if not sizes:
            return None  # no pool configured: nothing to say
        why = pool_refusal(req, image.name, sizes, self.vm._resolve_spec(None, None, None))
        if why is not None:
            progress("pool", f"cold boot: {why}")
            return None
        st = self._st(image.name)
        if req.name and req.name in {v.name for v in self.store.list_all_vms()}:
            raise AlreadyExists(
                f"a VM named {req.name!r} already exists: pick another --name or "
                f"`stoker vm delete {req.name}`"
            )
        member = next(
            (
                m
                for m in self.store.pool_members(image.name)
                if m.ready and m.vm_id not in self._taking
            ),
            None,
        )
        if member is None:
            st.misses += 1
            self.wake()
            progress("pool", f"cold boot: the warm pool of {image.name} is empty (refilling)")
            return None
        self._taking.add(member.vm_id)
        t0 = time.monotonic()
        try:
            async with self.vm.with_vm_lock_by_id(member.vm_id) as pv:
                vm: VMRecord = await _run_to_end(
                    self._give_identity(pv, image, member.created_at, req, spec, policy, expires_at)
                )
        except AlreadyExists:
            raise
        except Exception as e:
            msg = e.message if isinstance(e, StokerError) else f"{type(e).__name__}: {e}"
            self.log.warning("taking pool VM %s failed: %s", member.vm_id, msg)
            progress("pool", f"cold boot: the warm VM could not be taken ({msg})")
            st.misses += 1
            await self._reap(member.vm_id, f"take failed: {msg}")
            return None
        finally:
            self._taking.discard(member.vm_id)
            self.wake()  # refill
        st.takes += 1
        took = time.monotonic() - t0
        self.vm.last_timings[vm.id] = {"pool_take_s": round(took, 3)}
        progress("pool", f"took a warm VM from the pool of {image.name} ({took:.2f}s)")
        progress("ready", f"{vm.name} is running at {vm.guest_ip} ({vm.dns_name})")
        return vm

    async def _give_identity(
        self,
        pv: VMRecord,
        image: Image,
        member_since: str,
        req: CreateRequest,
        spec: VMSpec,
        policy: NetPolicy,
        expires_at: str | None,
    ) -> VMRecord:
        """Caller holds vm_locks[pv.id]. Raises (the caller reaps the VM) on any failure
        before the store commit; after it nothing can fail but DNS and log lines."""
        svc = self.vm
        if pv.state != VMState.RUNNING or not await svc.is_alive(pv):
            raise StokerError(f"pool VM {pv.name} is {pv.state}, its VMM not running")
        if image.created_at > member_since:
            raise StokerError(f"image {image.name} changed since pool VM {pv.name} booted")
        if (pv.spec.vcpu, pv.spec.memory_mib, pv.spec.disk_size) != (
            spec.vcpu,
            spec.memory_mib,
            spec.disk_size,
        ):
            raise StokerError(f"pool VM {pv.name} was made with other sizing (config changed)")
        old_name, old_dns = pv.name, pv.dns_name
        async with svc.create_vm_lock:
            taken = {v.name for v in self.store.list_all_vms()}
            name = req.name or generate_name(taken)
            if name in taken:
                raise AlreadyExists(
                    f"a VM named {name!r} already exists: pick another --name or "
                    f"`stoker vm delete {name}`"
                )
            # Reserved: still a pool VM (hidden), but the name is its now.
            pv.name, pv.dns_name = name, f"{name}.vm"
            svc.store.update_vm(pv)
        try:
            return await self._rename_guest(pv, old_name, old_dns, policy, expires_at)
        except BaseException:
            svc.net.unpublish_dns(old_name)  # the reap that follows removes the new name's
            raise

    async def _rename_guest(
        self,
        pv: VMRecord,
        old_name: str,
        old_dns: str,
        policy: NetPolicy,
        expires_at: str | None,
    ) -> VMRecord:
        from stoker.daemon import vm_exec, vm_stats
        from stoker.daemon.agent import ExecSpec

        svc = self.vm
        name = pv.name
        forget = getattr(svc.ssh, "forget", None)
        if forget is not None:
            from stoker.daemon.guestssh import SSHTarget

            await forget(SSHTarget.for_guest(old_name, pv.guest_ip, svc.layout))
        agent = svc.agents.get(pv.id)
        if agent is not None:
            agent.name = name
        code, out, err = await vm_exec.run_collect(
            svc,
            pv,
            ExecSpec(
                argv=["/bin/sh", "-c", IDENTITY_SCRIPT],
                cwd="/",
                env={"STOKER_NAME": name, "STOKER_HOSTS": hosts_file(name, pv.guest_ip)},
            ),
            IDENTITY_TIMEOUT,
        )
        if code != 0 or out.decode(errors="replace").strip() != name:
            detail = (err or out).decode(errors="replace").strip()[-300:]
            raise StokerError(f"setting the hostname in the guest failed (exit {code}): {detail}")
        pub = (Path(pv.vm_dir) / "ssh_host_ed25519_key.pub").read_text()
        remove_known_host(svc.layout.known_hosts, [old_name, old_dns])
        add_known_host(svc.layout.known_hosts, [pv.guest_ip, pv.dns_name, name], pub)
        if str(policy) != pv.spec.net and pv.teardown.tap:
            await svc.net.apply_policy(
                pv.id, pv.guest_ip, pv.teardown.tap, mac_for(pv.guest_ip), policy
            )
        pv.spec.net, pv.spec.nat = str(policy), policy.mode == "nat"
        pv.teardown.nat = pv.spec.nat
        pv.expires_at = expires_at
        svc.store.take_pool_vm(pv, expires_at)
        svc.net.unpublish_dns(old_name)
        svc.net.publish_dns(name, pv.guest_ip)
        svc.ssh_seen.add(pv.id)
        svc.exec_capable[pv.id] = True
        vm_stats.agent_for(svc, pv).name = name
        self.log.info("pool VM %s taken as %s", old_name, name)
        return pv

    # --- fill ---------------------------------------------------------------------------

    async def run(self) -> None:
        """The filler: forever, one step, then wait for a wake-up (a take, a drain) or the
        tick. Cancelled by the daemon's close (a fill in flight is then reaped)."""
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("warm pool: step failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick)

    async def step(self) -> None:
        """Reap what does not belong (dead, stale, surplus, half-filled), then fill at most
        one VM for the first image below its size that is not backing off."""
        sizes = self.sizes()
        await self._reap_unwanted(sizes)
        now = time.monotonic()
        for image_name, size in sizes.items():
            if image_name in self._draining or self.vm.images.name_locks.locked(
                f"image:{image_name}"
            ):
                continue  # being deleted, replaced, pulled or built: not now
            ready = [m for m in self.store.pool_members(image_name) if m.ready]
            if len(ready) >= size:
                continue
            st = self._st(image_name)
            if now < st.next_try:
                continue
            image = self.store.get_image(image_name)
            if image is None:
                continue  # `waiting` in status says so; not a failure
            usable, skipped = self._usable(image)
            if not usable:
                continue
            st.strategy, st.fallback = usable[0].name, skipped
            await self._fill_one(image, usable, st)
            return  # one at a time; the next step looks again

    def _usable(self, image: Image) -> tuple[list[FillStrategy], str | None]:
        """The strategies that can fill `image`, in order, and why the first one of
        `strategies` cannot (None: it can)."""
        usable: list[FillStrategy] = []
        skipped = None
        for s in self.strategies:
            why = s.can_fill(image)
            if why is None:
                usable.append(s)
            elif not usable and skipped is None:
                skipped = f"{s.name}: {why}"
        return usable, skipped

    async def _fill_chain(
        self, image: Image, usable: list[FillStrategy], st: _ImageState, progress: Progress
    ) -> VMRecord:
        """Each strategy in turn until one fills; the last one's failure is the fill's."""
        for s, then in zip(usable, [*usable[1:], None], strict=True):
            st.strategy = s.name
            try:
                return await s.fill(image, progress)
            except Exception as e:
                if then is None:
                    raise
                st.fallback = f"{s.name} failed: {_message(e)}"
                self.log.warning(
                    "warm pool of %s: the %s fill failed, %s instead: %s",
                    image.name,
                    s.name,
                    then.name,
                    _message(e),
                )
        raise StokerError(f"no strategy can fill the pool of {image.name}")

    async def _fill_one(self, image: Image, usable: list[FillStrategy], st: _ImageState) -> None:
        def progress(stage: str, message: str = "", **kw: Any) -> None:
            self.log.debug("pool fill %s: %s %s", image.name, stage, message)

        task = asyncio.ensure_future(self._fill_chain(image, usable, st, progress))
        self._filling = (image.name, task)
        try:
            vm = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():  # we are cancelled (daemon close): the fill ends and is reaped
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise
            # the fill itself was cancelled by a drain
            st.last_error = None
            return
        except Exception as e:
            msg = _message(e)
            st.failures += 1
            st.last_error = msg
            delay = backoff_delay(st.failures, self.backoff_base, self.backoff_cap)
            st.next_try = time.monotonic() + delay
            self.log.warning(
                "warm pool of %s: fill %d failed (next try in %.0fs): %s",
                image.name,
                st.failures,
                delay,
                msg,
            )
            return
        finally:
            self._filling = None
        st.failures, st.last_error, st.next_try = 0, None, 0.0
        self.log.info("warm pool of %s: %s is ready", image.name, vm.name)

    async def _reap_unwanted(self, sizes: dict[str, int]) -> None:
        filling = self._filling[1] if self._filling else None
        for image_name in {m.image for m in self.store.pool_members()}:
            members = self.store.pool_members(image_name)
            image = self.store.get_image(image_name)
            keep = 0
            for m in members:
                if m.vm_id in self._taking:
                    continue
                if not m.ready:
                    if filling is None:  # a fill that is not running: left by a crash
                        await self._reap(m.vm_id, "half-filled and no fill running")
                    continue
                vm = self.store.get_vm(m.vm_id)
                if vm is None:
                    continue
                if vm.state != VMState.RUNNING:
                    await self._reap(m.vm_id, f"its VM is {vm.state}")
                elif image is None or image.created_at > m.created_at:
                    await self._reap(m.vm_id, "its image changed or is gone")
                elif keep >= sizes.get(image_name, 0):
                    await self._reap(m.vm_id, "more than the pool's size")
                else:
                    keep += 1
        for m in self.store.pool_members(template=True):
            image = self.store.get_image(m.image)
            if not m.ready:
                if filling is None:
                    await self._reap(m.vm_id, "a template half-made and no fill running")
            elif sizes.get(m.image, 0) <= 0:
                await self._reap(m.vm_id, f"template: image {m.image} has no pool any more")
            elif image is not None and (why := self._template_stale(m, image)):
                await self._reap(m.vm_id, f"template: {why}")
            elif image is None:
                await self._reap(m.vm_id, f"template: image {m.image} is gone")

    def _template_stale(self, m: PoolMember, image: Image) -> str | None:
        """Why template `m` of `image` cannot be forked from (None: it can)."""
        if not m.ready:
            return "it was not finished"
        if image.created_at > m.created_at:
            return f"image {image.name} changed since it was made"
        if self.store.get_snapshot(m.vm_id, TEMPLATE_SNAPSHOT) is None:
            return f"its snapshot {TEMPLATE_SNAPSHOT} is gone"
        return None

    async def _reap(self, vm_id: str, why: str) -> None:
        self.log.info("warm pool: removing pool VM %s: %s", vm_id, why)
        try:
            await _run_to_end(self.vm.delete_vm_by_id(vm_id, only_pool=True))
        except StokerError as e:
            self.log.warning("warm pool: removing pool VM %s failed: %s", vm_id, e)

    # --- drain, reconcile, status ---------------------------------------------------------

    async def drain(self, image: str) -> int:
        """Empty the pool of `image` (it is being deleted or replaced): a fill in flight
        for it is cancelled, every pool VM of it deleted. Number of VMs removed."""
        self._draining.add(image)
        try:
            if self._filling is not None and self._filling[0] == image:
                task = self._filling[1]
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            n = 0
            for m in self.store.pool_members(image):
                await self._reap(m.vm_id, f"image {image} is being deleted")
                n += 1
            for m in self.store.pool_members(image, template=True):  # its snapshot with it
                await self._reap(m.vm_id, f"template: image {image} is being deleted")
            return n
        finally:
            self._draining.discard(image)

    async def reconcile(self) -> None:
        """At daemon start, after VMService.reconcile: keep pool VMs that are ready,
        running and whose agent answers; reap the rest."""
        from stoker.daemon import vm_stats

        for m in self.store.pool_members():
            vm = self.store.get_vm(m.vm_id)
            if vm is None:
                continue
            why = None
            if not m.ready:
                why = "it was still filling when stokerd stopped"
            elif vm.state != VMState.RUNNING or not await self.vm.is_alive(vm):
                why = f"its VM is {vm.state}, not running"
            elif not await vm_stats.agent_for(self.vm, vm).alive(RECONCILE_AGENT_TIMEOUT):
                why = "its guest agent does not answer"
            if why is None:
                self.log.info("reconcile: pool VM %s of %s kept", vm.name, m.image)
            else:
                await self._reap(m.vm_id, f"reconcile: {why}")
        for m in self.store.pool_members(template=True):
            vm, image = self.store.get_vm(m.vm_id), self.store.get_image(m.image)
            why = (
                f"image {m.image} is gone"
                if image is None
                else "its VM is running (stokerd stopped while it was being made)"
                if vm is not None and vm.state == VMState.RUNNING
                else self._template_stale(m, image)
            )
            if why is None:
                self.log.info("reconcile: pool template of %s kept", m.image)
            else:
                await self._reap(m.vm_id, f"reconcile: template: {why}")

    def status(self) -> list[PoolImageStatus]:
        """Per image with a pool (configured, or VMs or a template left in it): `pool
        status`."""
        sizes = self.sizes()
        members = self.store.pool_members()
        left = [m.image for m in self.store.pool_members(template=True)]
        names = list(dict.fromkeys([*sizes, *(m.image for m in members), *left]))
        now = time.monotonic()
        out = []
        for name in names:
            st = self._st(name)
            mine = [m for m in members if m.image == name]
            filling = sum(1 for m in mine if not m.ready)
            if self._filling is not None and self._filling[0] == name and not filling:
                filling = 1  # the fill has not made its row yet
            waiting = None
            if name not in sizes:
                waiting = "not configured: its pool VMs are being removed"
            elif self.store.get_image(name) is None:
                waiting = f"image {name} is not here: pull or build it to fill its pool"
            elif not filling and st.next_try > now:
                waiting = "backing off after failed fills"
            strategy, fallback = st.strategy, st.fallback
            if not strategy:
                image = self.store.get_image(name)
                usable, skipped = self._usable(image) if image is not None else ([], None)
                strategy = usable[0].name if usable else ""
                fallback = skipped if usable else None
            out.append(
                PoolImageStatus(
                    image=name,
                    size=sizes.get(name, 0),
                    ready=sum(1 for m in mine if m.ready),
                    filling=filling,
                    strategy=strategy,
                    fallback=fallback,
                    failures=st.failures,
                    last_error=st.last_error,
                    backoff_s=round(max(0.0, st.next_try - now), 1),
                    waiting=waiting,
                    takes=st.takes,
                    misses=st.misses,
                )
            )
        return out


def _message(e: BaseException) -> str:
    return e.message if isinstance(e, StokerError) else f"{type(e).__name__}: {e}"


async def _run_to_end(coro: Any) -> Any:
    from stoker.daemon.vm_service import run_to_end

    return await run_to_end(coro)
