"""Lock primitives and the async-operation registry named by the seed."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from stoker.daemon.locks import LockSet
from stoker.daemon.opstate import Registry
from stoker.daemon.opstate.registry import OpState

pytestmark = pytest.mark.unit


# --- LockSet ---------------------------------------------------------------------------


async def test_lockset_serialises_one_key() -> None:
    locks = LockSet()
    inside = 0
    peak = 0

    async def worker() -> None:
        nonlocal inside, peak
        async with locks.hold("vm1"):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(5))), 5)
    assert peak == 1


async def test_lockset_keys_are_independent() -> None:
    locks = LockSet()
    a_held = asyncio.Event()
    release_a = asyncio.Event()

    async def hold_a() -> None:
        async with locks.hold("a"):
            a_held.set()
            await release_a.wait()

    t = asyncio.create_task(hold_a())
    await asyncio.wait_for(a_held.wait(), 5)
    assert locks.locked("a")
    # b is not blocked behind a
    async with asyncio.timeout(1):
        async with locks.hold("b"):
            assert locks.locked("b")
    release_a.set()
    await asyncio.wait_for(t, 5)


async def test_lockset_drops_idle_entries() -> None:
    locks = LockSet()
    for i in range(20):
        async with locks.hold(f"vm{i}"):
            pass
    assert locks._locks == {} and locks._users == {}
    assert not locks.locked("vm0")


async def test_lockset_released_on_error_and_cancel() -> None:
    locks = LockSet()
    with pytest.raises(RuntimeError):
        async with locks.hold("x"):
            raise RuntimeError("boom")
    assert not locks.locked("x")

    entered = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("x"):
            entered.set()
            await asyncio.sleep(60)

    async def waiter() -> None:
        async with locks.hold("x"):
            pass

    h = asyncio.create_task(holder())
    await asyncio.wait_for(entered.wait(), 5)
    w = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    assert locks._users["x"] == 2
    w.cancel()
    h.cancel()
    await asyncio.gather(h, w, return_exceptions=True)
    assert locks._locks == {} and locks._users == {}
    # usable again
    async with asyncio.timeout(1), locks.hold("x"):
        pass


# --- opstate Registry ------------------------------------------------------------------


def test_registry_add_get_list_remove() -> None:
    reg: Registry[OpState] = Registry()
    a = reg.add(OpState(kind="create", target="web"))
    b = reg.add(OpState(kind="pull", target="img"))
    assert a.id != b.id
    assert reg.get(a.id) is a
    assert {o.id for o in reg.list()} == {a.id, b.id}
    reg.remove(a.id)
    reg.remove("no-such-id")  # harmless
    assert reg.get(a.id) is None
    assert reg.list() == [b]


def test_registry_prune_only_old_finished_ops() -> None:
    reg: Registry[OpState] = Registry()
    running = reg.add(OpState(kind="create", target="a"))
    fresh = reg.add(OpState(kind="create", target="b"))
    old = reg.add(OpState(kind="create", target="c"))
    fresh.finish()
    old.finish(error="failed")
    assert old.done and old.error == "failed" and not running.done
    assert old.finished_at is not None
    old.finished_at -= 1000
    assert reg.prune(older_than=60) == 1
    assert {o.id for o in reg.list()} == {running.id, fresh.id}
    # with a clock far in the future, the fresh finished op goes too; running stays
    assert reg.prune(older_than=60, now=time.time() + 3600) == 1
    assert reg.list() == [running]


def test_registry_is_thread_safe() -> None:
    reg: Registry[OpState] = Registry()

    def work() -> None:
        for _ in range(200):
            op = reg.add(OpState(kind="k", target="t"))
            reg.list()
            reg.remove(op.id)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert reg.list() == []


# --- service-level locks ------------------------------------------------------------------


@pytest.fixture
def vmsvc(daemon_factory):  # type: ignore[no-untyped-def]
    return daemon_factory()


def _insert_vm(d, name: str, ip: str):  # type: ignore[no-untyped-def]
    from stoker.model.records import Image, VMRecord, VMSpec, VMState
    from stoker.store.db import now

    assert d.store is not None
    if d.store.get_image("img") is None:
        d.store.upsert_image(
            Image("img", True, "/r", None, None, "test", 1, now())  # no kernel needed
        )
    rec = VMRecord(
        id=f"{name}-0123456789",
        name=name,
        state=VMState.STOPPED,
        image="img",
        spec=VMSpec(1, 512, 1 << 30, 1 << 30),
        guest_ip=ip,
        dns_name=f"{name}.vm",
        vm_dir=f"/nonexistent/{name}",
        created_at=now(),
        updated_at=now(),
    )
    d.store.insert_vm(rec)
    return rec


async def test_vm_lock_by_ref_serialises_and_rereads(vmsvc) -> None:  # type: ignore[no-untyped-def]
    from stoker.errors import NotFound

    rec = _insert_vm(vmsvc, "web", "172.30.0.2")
    svc = vmsvc.vm
    order: list[str] = []

    async def op(tag: str) -> None:
        async with svc.with_vm_lock_by_ref("web") as v:
            assert v.id == rec.id
            order.append(f"{tag}-in")
            await asyncio.sleep(0.01)
            order.append(f"{tag}-out")

    await asyncio.wait_for(asyncio.gather(op("a"), op("b")), 5)
    assert order in (["a-in", "a-out", "b-in", "b-out"], ["b-in", "b-out", "a-in", "a-out"])

    # by id prefix; the lock is held inside
    async with svc.with_vm_lock_by_ref(rec.id[:6]) as v:
        assert svc.vm_locks.locked(rec.id)
        assert v.name == "web"
    assert not svc.vm_locks.locked(rec.id)

    with pytest.raises(NotFound):
        async with svc.with_vm_lock_by_ref("nope"):
            pass


async def test_vm_lock_by_id_sees_deletion_made_while_waiting(vmsvc) -> None:  # type: ignore[no-untyped-def]
    from stoker.errors import NotFound

    rec = _insert_vm(vmsvc, "web", "172.30.0.2")
    svc = vmsvc.vm
    got: list[BaseException] = []

    async def deleter() -> None:
        async with svc.with_vm_lock_by_id(rec.id):
            await asyncio.sleep(0.02)
            vmsvc.store.delete_vm(rec.id)

    async def late() -> None:
        await asyncio.sleep(0.005)
        try:
            async with svc.with_vm_lock_by_id(rec.id):
                pass
        except NotFound as e:
            got.append(e)

    await asyncio.wait_for(asyncio.gather(deleter(), late()), 5)
    assert len(got) == 1


async def test_resolve_ambiguous_prefix(vmsvc) -> None:  # type: ignore[no-untyped-def]
    from stoker.errors import Ambiguous

    a = _insert_vm(vmsvc, "aa", "172.30.0.2")
    b = _insert_vm(vmsvc, "ab", "172.30.0.3")
    # ids are "<name>-0123..." so "a" is a prefix of both
    with pytest.raises(Ambiguous):
        vmsvc.vm.resolve("a")
    assert vmsvc.vm.resolve("aa").id == a.id
    assert vmsvc.vm.resolve(b.id).name == "ab"


def test_service_lock_fields_exist(vmsvc) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(vmsvc.vm.vm_locks, LockSet)
    assert isinstance(vmsvc.vm.create_vm_lock, asyncio.Lock)
    assert isinstance(vmsvc.vm.create_ops, Registry)
    assert isinstance(vmsvc.images.image_ops_lock, asyncio.Lock)
    assert isinstance(vmsvc.ws.workspace_locks, LockSet)
    # the per-VM lock set and the workspace lock set are distinct objects
    assert vmsvc.vm.vm_locks is not vmsvc.ws.workspace_locks
