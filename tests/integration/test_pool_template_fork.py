"""The warm pool's `TemplateFill` in the fork rig (test_vm_fork_flow: the real daemon
services, store, bridge and taps in the rig's namespace, a stand-in VMM that saves and
restores, the real guest agent setting each fork's identity): one hidden template per
image, made once (boot, one snapshot, then stopped); each fill a fork of it with its own
IP, MAC, host key, RNG input and machine-id; a failing template falls back to pre-booted
VMs with the reason in `pool status`; reconcile keeps a finished template; a drain removes
the template, its snapshot and every pool VM, leaving no directory or process.

The take (identity by the agent's exec) is tested in test_pool_fake_vmm, where the agent
runs in a namespace of its own: here the agent is in-process, so nothing is taken."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_vm_fork_flow import ForkVMM, events, rig, vm_dirs
from test_vm_lifecycle_guest_peer import Live, live, netns

from stoker.daemon import snapshot_service
from stoker.daemon.pool_service import TEMPLATE_SNAPSHOT, PoolService
from stoker.daemon.vm_disks import mac_for
from stoker.daemon.vmm.base import VMMHandle, pid_alive
from stoker.errors import StokerError
from stoker.model.records import VMState

pytestmark = pytest.mark.integration
__all__ = ["live", "netns", "rig"]  # fixtures used by name


@pytest.fixture
async def pooled(rig: tuple[Live, ForkVMM]) -> AsyncIterator[tuple[Live, ForkVMM, PoolService]]:
    lv, vmm = rig
    pool = lv.d.pool
    sizes = {"base": 2}
    pool.sizes = lambda: dict(sizes)  # type: ignore[method-assign]
    pool.backoff_base = 0.05
    pool.backoff_cap = 0.05
    try:
        yield lv, vmm, pool
    finally:
        sizes.clear()
        await pool.drain("base")


def templates(lv: Live) -> list[str]:
    return [m.vm_id for m in lv.d.store.pool_members("base", template=True)]


def saves(vmm: ForkVMM, vm_dir: str) -> int:
    return sum(1 for n, k, _ in vmm.events if n == vm_dir and k == "save")


async def test_the_template_is_made_once_and_each_fill_is_a_fork_with_its_own_identity(
    pooled: tuple[Live, ForkVMM, PoolService],
) -> None:
    lv, vmm, pool = pooled
    store = lv.d.store
    await pool.step()
    await pool.step()
    [tid] = templates(lv)
    tpl = store.get_vm(tid)
    assert tpl is not None and tpl.state == VMState.STOPPED  # its snapshot is the template
    assert not tpl.teardown.vmm_pid and not tpl.teardown.tap  # its VMM and tap are gone
    assert store.get_snapshot(tid, TEMPLATE_SNAPSHOT) is not None
    assert saves(vmm, tpl.vm_dir) == 1
    members = store.pool_members("base")
    assert len(members) == 2 and all(m.ready for m in members)
    vms = [store.get_vm(m.vm_id) for m in members]
    assert all(v is not None and v.state == VMState.RUNNING for v in vms)
    a, b = (v for v in vms if v is not None)
    for v in (a, b):  # restored with the link down, identity first, then the link
        ev = events(vmm, v.name)
        kinds = [k for k, _ in ev]
        assert ev[0] == ("restore", True)
        assert kinds.index("rng") < kinds.index("ip") < kinds.index("link")
        assert not (Path(v.vm_dir) / "snapshots").exists()
    assert len({tpl.guest_ip, a.guest_ip, b.guest_ip}) == 3
    assert mac_for(a.guest_ip) != mac_for(b.guest_ip)
    keys = {(Path(v.vm_dir) / "ssh_host_ed25519_key.pub").read_text() for v in (a, b)}
    assert len(keys) == 2
    rng = [val for n, k, val in vmm.events if k == "rng" and n in (a.name, b.name)]
    assert len(rng) == 2 and rng[0] != rng[1]
    ids = {(Path(v.vm_dir) / "guest-root/etc/machine-id").read_text() for v in (a, b)}
    assert len(ids) == 2
    [st] = pool.status()
    assert (st.strategy, st.fallback, st.ready, st.failures) == ("template", None, 2, 0)
    # Hidden: neither the template nor the pool VMs, nor the template's snapshot, are the
    # user's; a bare snapshot name does not find the template's.
    assert await lv.vm.list_vms() == []
    assert snapshot_service.list_snapshots(lv.vm, None) == []
    # A third fill forks the same template: no second snapshot.
    pool.sizes = lambda: {"base": 3}  # type: ignore[method-assign]
    await pool.step()
    assert templates(lv) == [tid] and saves(vmm, tpl.vm_dir) == 1
    assert len([m for m in store.pool_members("base") if m.ready]) == 3
    # Reconcile (a daemon restart) keeps the finished template and the answering VMs.
    await pool.reconcile()
    assert templates(lv) == [tid] and len(store.pool_members("base")) == 3
    # The drain leaves nothing: no pool VM, no template, no snapshot, no dir, no VMM.
    pids = list(vmm.pids)
    assert await pool.drain("base") == 3
    assert store.pool_members() == [] and templates(lv) == []
    assert store.list_snapshots(None) == [] and store.list_all_vms() == []
    assert vm_dirs(lv) == set()
    assert not any(pid_alive(p) for p in pids)


async def test_an_image_change_rebuilds_the_template(
    pooled: tuple[Live, ForkVMM, PoolService],
) -> None:
    lv, vmm, pool = pooled
    pool.sizes = lambda: {"base": 1}  # type: ignore[method-assign]
    await pool.step()
    [old] = templates(lv)
    old_dir = lv.d.store.get_vm(old).vm_dir  # type: ignore[union-attr]
    with lv.d.store.tx() as c:  # the image replaced (a rebuild): newer than the template
        c.execute("UPDATE images SET created_at=? WHERE name='base'", ("9999-01-01T00:00:00Z",))
    [stale] = lv.d.store.pool_members("base")
    # One step reaps the stale template and the pool VM forked from it, then refills: a
    # new template (a second snapshot, of a new VM) and a fork of it.
    await pool.step()
    [new] = templates(lv)
    assert new != old and not Path(old_dir).exists()
    [m] = lv.d.store.pool_members("base")
    assert m.vm_id != stale.vm_id and m.ready
    assert sum(1 for _, k, _ in vmm.events if k == "save") == 2


async def test_a_failing_template_falls_back_to_pre_booted_with_the_reason(
    pooled: tuple[Live, ForkVMM, PoolService],
) -> None:
    lv, vmm, pool = pooled
    store = lv.d.store
    real_save = vmm.save_state

    async def full(handle: VMMHandle, dest: Path) -> int:
        raise StokerError("No space left on device (writing the template's memory)")

    vmm.save_state = full  # type: ignore[method-assign]
    await pool.step()
    [st] = pool.status()
    assert st.strategy == "pre-booted" and st.failures == 0 and st.last_error is None
    assert st.fallback is not None and st.fallback.startswith("template failed: ")
    assert "No space left on device" in st.fallback
    assert templates(lv) == []  # the failed template is gone, its dir with it
    [m] = store.pool_members("base")
    v = store.get_vm(m.vm_id)
    assert m.ready and v is not None and v.state == VMState.RUNNING
    assert not any(k == "restore" for n, k, _ in vmm.events if n == v.name)  # a cold boot
    assert vm_dirs(lv) == {os.path.basename(v.vm_dir)}
    # While the template backs off, fills are pre-booted at once, `fallback` says why.
    pool.backoff_base = pool.backoff_cap = 60.0
    strategy = pool.strategies[0]
    strategy.next_try["base"] = 1e18  # type: ignore[attr-defined]
    await pool.step()
    [st] = pool.status()
    assert st.strategy == "pre-booted" and st.ready == 2
    assert st.fallback is not None and st.fallback.startswith("template: the template failed (")
    # Once the backoff is over and the snapshot works, the template strategy is back.
    strategy.next_try.clear()  # type: ignore[attr-defined]
    vmm.save_state = real_save  # type: ignore[method-assign]
    pool.sizes = lambda: {"base": 3}  # type: ignore[method-assign]
    await pool.step()
    [st] = pool.status()
    assert (st.strategy, st.fallback, st.ready) == ("template", None, 3)
    assert len(templates(lv)) == 1


async def test_a_driver_that_cannot_fork_fills_pre_booted(
    pooled: tuple[Live, ForkVMM, PoolService],
) -> None:
    lv, vmm, pool = pooled
    vmm.supports_fork = False  # type: ignore[misc]
    await pool.step()
    [st] = pool.status()
    assert st.strategy == "pre-booted" and st.fallback is not None
    assert "cannot fork VMs" in st.fallback and templates(lv) == []
    assert not any(k in ("save", "restore") for _, k, _ in vmm.events)
