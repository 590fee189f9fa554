"""The warm pool against real disks, a real bridge/taps/nft in a test namespace, the
stand-in VMM and, as each VM's guest agent, the real agent script (`guest/agent`) behind a
QEMU-like chardev: fill, take (the identity really set by the agent: hostname and
/etc/hosts, in the agent's own UTS + mount namespace so the host's stay untouched),
refill, fallbacks with their reasons, backoff, drain on image delete, hidden from the
user's listings, and reconcile after a daemon restart. Guest boots: tests/e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agentrig import FakeChardev
from agentrig import stop as _stop
from test_vm_lifecycle_fake_vmm import (
    FakeSSH,
    _cancel_stray_tasks,
    _make_ext4,
    netns,  # noqa: F401 (fixture)
)

from stoker.config import parse_config
from stoker.daemon import vm_exec
from stoker.daemon.agent import ExecSpec
from stoker.daemon.daemon import Daemon
from stoker.daemon.host_network import HostNetwork
from stoker.daemon.vm_service import CreateRequest
from stoker.daemon.vmm import MachineConfig, VMMHandle
from stoker.daemon.vmm.base import pid_alive
from stoker.daemon.vmm.standin import StandInDriver
from stoker.errors import AlreadyExists, NotFound, StokerError
from stoker.guest.agent import agent_script
from stoker.layout import Layout
from stoker.model.records import Kernel, VMRecord, VMState
from stoker.runner import Runner
from stoker.store import Store
from stoker.store.db import now

pytestmark = pytest.mark.integration


@dataclass
class Guest:
    chardev: FakeChardev
    agent: subprocess.Popen[bytes]
    work: Path


class AgentVMM(StandInDriver):
    """The stand-in VMM whose 'guest' is the real agent: after the spawn, a chardev at
    the VM's agent socket and the agent on its pty, in a UTS + mount namespace of its own
    with private copies of /etc/hostname and /etc/hosts bound over the host's."""

    def __init__(self) -> None:
        super().__init__()
        self.guests: dict[str, Guest] = {}
        self.fail_start: str | None = None  # a start raises this (a fill that fails)
        self.agent_down = False  # the next guests get no agent
        self.start_delay = 0.0  # seconds a start takes after the spawn (a slow boot)

    async def start(self, cfg: MachineConfig) -> VMMHandle:
        if self.fail_start:
            raise StokerError(self.fail_start)
        h = await super().start(cfg)
        if not self.agent_down:
            self.guests[str(cfg.vm_dir)] = await asyncio.to_thread(self._guest, cfg)
        await asyncio.sleep(self.start_delay)
        return h

    def _guest(self, cfg: MachineConfig) -> Guest:
        work = Path(tempfile.mkdtemp(prefix="stkpool", dir="/tmp"))
        (work / "hostname").write_text(cfg.name + "\n")
        (work / "hosts").write_text(f"127.0.1.1\t{cfg.name}\n")
        chardev = FakeChardev(work)
        assert cfg.agent_socket is not None
        with contextlib.suppress(FileNotFoundError):
            cfg.agent_socket.unlink()
        cfg.agent_socket.symlink_to(chardev.sock_path)
        script = (
            f"mount --bind {work}/hostname /etc/hostname && "
            f"mount --bind {work}/hosts /etc/hosts && hostname {cfg.name} && "
            f'exec "$0" -I -S {agent_script()} --no-vsock --serial {chardev.port_path}'
        )
        log = open(work / "agent.log", "wb")  # noqa: SIM115
        agent = subprocess.Popen(
            [
                *("unshare", "--uts", "--mount", "--propagation", "private"),
                *("sh", "-c", script, sys.executable),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        return Guest(chardev, agent, work)

    def halt(self, vm_dir: str) -> None:
        g = self.guests.pop(vm_dir, None)
        if g is not None:
            _stop(g.agent)
            g.chardev.close()
            shutil.rmtree(g.work, ignore_errors=True)

    async def kill(self, handle: VMMHandle) -> None:
        self.halt(handle.vm_dir)
        await super().kill(handle)

    async def shutdown(self, handle: VMMHandle, timeout: float, *, hard: bool = False) -> None:
        self.halt(handle.vm_dir)
        await super().shutdown(handle, timeout, hard=hard)

    def close(self) -> None:
        for d in list(self.guests):
            self.halt(d)


@dataclass
class Rig:
    d: Daemon
    drv: AgentVMM
    ssh: FakeSSH
    ns: str
    root: Path
    events: list[tuple[str, str]] = field(default_factory=list)

    def progress(self, stage: str, message: str = "", **kw: Any) -> None:
        self.events.append((stage, message))

    def said(self, stage: str) -> list[str]:
        return [m for s, m in self.events if s == stage]

    @property
    def vm(self) -> Any:
        assert self.d.vm is not None
        return self.d.vm

    @property
    def pool(self) -> Any:
        assert self.d.pool is not None
        return self.d.pool


def pool_config(size: int) -> Any:
    return parse_config(
        {
            "bridge_cidr": "172.30.0.0/24",
            "tap_pool_size": 1,
            "default_image": "base",
            "pool": {"size": size},
            "vm_defaults": {
                "vcpu": 1,
                "memory_mib": 256,
                "disk_size": "300M",
                "overlay_size": "300M",
            },
        },
        cpus=2,
        mem_bytes=4 * 1024**3,
    )


def build_daemon(root: Path, ns: str, drv: AgentVMM, ssh: FakeSSH, size: int = 1) -> Daemon:
    layout = Layout(root / "c", root / "s", root / "k", root / "s")
    layout.ensure()
    config = pool_config(size)
    logger = logging.getLogger("stoker.test")
    runner = Runner()
    d = Daemon(
        layout,
        config,
        Store(layout.db_path),
        runner=runner,
        logger=logger,
        net=HostNetwork(config, runner, logger, netns=ns),
        ssh=ssh,  # type: ignore[arg-type]
    )
    d.vm.driver_factory = lambda: drv
    d.pool.tick = 0.1
    return d


@pytest.fixture
async def rig(netns: str) -> AsyncIterator[Rig]:  # noqa: F811
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for the agents' namespaces")
    root = Path(tempfile.mkdtemp(prefix="stk-pool-"))
    drv, ssh = AgentVMM(), FakeSSH()
    d = build_daemon(root, netns, drv, ssh)
    assert d.store is not None and d.images is not None
    kdir = root / "kernel"
    kdir.mkdir()
    (kdir / "vmlinux").write_bytes(b"\x7fELF fake")
    d.store.upsert_kernel(
        Kernel(
            name="k1",
            version="6.1",
            arch="x86_64",
            dir=str(kdir),
            vmlinux=str(kdir / "vmlinux"),
            bzimage=None,
            initrd=None,
            modules_dir=None,
            source="test",
            created_at=now(),
        )
    )
    await _make_ext4(root / "rootfs.ext4")
    await _make_ext4(root / "seed.ext4", 32)
    await d.images.register_image("base", str(root / "rootfs.ext4"), "k1", str(root / "seed.ext4"))
    rig = Rig(d, drv, ssh, netns, root)
    try:
        yield rig
    finally:
        await _cancel_stray_tasks()
        vm = rig.d.vm
        assert vm is not None and rig.d.store is not None
        for v in rig.d.store.list_all_vms():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(vm.delete_vm_by_id(v.id), 20)
        drv.close()
        assert rig.d.net is not None
        await rig.d.net.close()
        await rig.d.net.teardown_bridge_if_unused()
        await rig.d.close()
        shutil.rmtree(root, ignore_errors=True)


def req(**kw: Any) -> CreateRequest:
    return CreateRequest(image="base", ready="agent", **kw)


async def guest_sh(rig: Rig, vm: VMRecord, line: str) -> str:
    code, out, err = await vm_exec.run_collect(
        rig.vm, vm, ExecSpec(argv=["/bin/sh", "-c", line], cwd="/"), 10
    )
    assert code == 0, err
    return out.decode()


def pool_vms(rig: Rig) -> list[VMRecord]:
    assert rig.d.store is not None
    out = []
    for m in rig.d.store.pool_members():
        v = rig.d.store.get_vm(m.vm_id)
        assert v is not None
        out.append(v)
    return out


def ready_count(rig: Rig, image: str = "base") -> int:
    assert rig.d.store is not None
    return sum(1 for m in rig.d.store.pool_members(image) if m.ready)


async def test_fill_take_gives_identity_then_refill(rig: Rig) -> None:
    await rig.pool.step()
    assert ready_count(rig) == 1
    (pv,) = pool_vms(rig)
    assert pv.name.startswith("pool-") and pv.state == VMState.RUNNING
    # Hidden: not listed, not resolvable (so not shown, completed, pruned or exec'd into).
    assert await rig.vm.list_vms() == []
    for ref in (pv.name, pv.id, pv.id[:8]):
        with pytest.raises(NotFound):
            rig.vm.resolve(ref)
    assert (await rig.vm.prune_vms([pv.name]))[0].ok is False
    assert await rig.vm.expire_vms() == []
    assert "pool-" in await guest_sh(rig, pv, "hostname")

    vm = await rig.vm.create_vm(req(name="taken", net="nat", ttl=600), rig.progress)
    assert vm.id == pv.id and vm.name == "taken" and vm.dns_name == "taken.vm"
    assert any("took a warm VM" in m for m in rig.said("pool")), rig.events
    assert not rig.said("boot"), "a take must not boot"
    # The identity, as the guest has it.
    assert (await guest_sh(rig, vm, "hostname")).strip() == "taken"
    assert (await guest_sh(rig, vm, "cat /etc/hostname")).strip() == "taken"
    hosts = await guest_sh(rig, vm, "cat /etc/hosts")
    assert f"{vm.guest_ip}\ttaken.vm taken" in hosts and "pool-" not in hosts
    # The host's records: store, DNS, known_hosts, policy, TTL.
    got = rig.vm.resolve("taken")
    assert got.state == VMState.RUNNING and got.spec.net == "nat" and got.expires_at
    assert [v.name for v in await rig.vm.list_vms()] == ["taken"]
    assert rig.d.net is not None
    recs = rig.d.net.dns.records()
    assert recs.get("taken") == vm.guest_ip and pv.name not in recs
    kh = rig.d.layout.known_hosts.read_text() if rig.d.layout else ""
    line = next(ln for ln in kh.splitlines() if "taken.vm" in ln)
    pub = (Path(vm.vm_dir) / "ssh_host_ed25519_key.pub").read_text().split()[1]
    assert pub in line and vm.guest_ip in line and pv.name not in kh
    assert rig.d.net.applied[vm.id].policy.mode == "nat"
    assert rig.pool.status()[0].takes == 1
    # Refill: a new pool VM, another IP.
    await rig.pool.step()
    assert ready_count(rig) == 1
    (fresh,) = pool_vms(rig)
    assert fresh.id != vm.id and fresh.guest_ip != vm.guest_ip
    # The taken VM is an ordinary VM now: deleting it leaves the pool alone.
    await rig.vm.delete_vm("taken")
    assert ready_count(rig) == 1


async def test_requests_the_pool_cannot_serve_boot_cold_with_the_reason(rig: Rig) -> None:
    vm = await rig.vm.create_vm(req(name="empty"), rig.progress)
    assert any("pool of base is empty" in m for m in rig.said("pool")), rig.events
    assert rig.said("boot") and vm.name == "empty"
    await rig.pool.step()
    assert ready_count(rig) == 1
    for kw, why in (
        ({"vcpu": 2}, "--vcpu 2 is not the pool's 1"),
        ({"memory_mib": 512}, "--memory 512 is not the pool's 256 MiB"),
        ({"disk_size": "400M"}, "--disk-size 400M is not the pool's"),
        ({"no_start": True}, "--no-start"),
    ):
        rig.events.clear()
        v = await rig.vm.create_vm(req(**kw), rig.progress)
        assert any(why in m for m in rig.said("pool")), (kw, rig.events)
        assert v.id not in {p.id for p in pool_vms(rig)}
    assert ready_count(rig) == 1  # untouched
    # Explicit values equal to the defaults are the default machine: taken.
    rig.events.clear()
    v = await rig.vm.create_vm(req(vcpu=1, memory_mib=256, disk_size="300M"), rig.progress)
    assert any("took a warm VM" in m for m in rig.said("pool")), rig.events
    # A name in use is refused as a cold create refuses it; the pool keeps its VM.
    await rig.pool.step()
    with pytest.raises(AlreadyExists):
        await rig.vm.create_vm(req(name=v.name), rig.progress)
    assert ready_count(rig) == 1


async def test_a_take_that_fails_is_reaped_and_the_boot_is_cold(rig: Rig) -> None:
    await rig.pool.step()
    (pv,) = pool_vms(rig)
    rig.drv.halt(pv.vm_dir)  # its agent is gone: the identity cannot be set
    from stoker.daemon import vm_stats

    await vm_stats.drop_agent(rig.vm, pv.id)
    vm = await rig.vm.create_vm(req(name="after"), rig.progress)
    msgs = rig.said("pool")
    assert any("the warm VM could not be taken" in m for m in msgs), rig.events
    assert vm.id != pv.id and rig.said("boot")
    assert rig.d.store is not None and rig.d.store.get_vm(pv.id) is None
    assert not pid_alive(pv.teardown.vmm_pid or 0)
    assert rig.vm.resolve("after").state == VMState.RUNNING


async def test_failing_refills_back_off_and_report_in_status(rig: Rig) -> None:
    rig.pool.backoff_base, rig.pool.backoff_cap = 0.4, 1.0
    rig.drv.fail_start = "the stand-in VMM refuses (test)"
    await rig.pool.step()
    (st,) = rig.pool.status()
    assert (st.image, st.size, st.ready, st.failures) == ("base", 1, 0, 1)
    assert "refuses (test)" in (st.last_error or "") and 0 < st.backoff_s <= 0.4
    assert rig.d.store is not None and rig.d.store.list_all_vms() == []  # nothing left
    await rig.pool.step()  # within the backoff: no try
    assert rig.pool.status()[0].failures == 1
    await asyncio.sleep(0.45)
    await rig.pool.step()
    st = rig.pool.status()[0]
    assert st.failures == 2 and 0.4 < st.backoff_s <= 0.8
    await asyncio.sleep(0.85)
    await rig.pool.step()
    assert rig.pool.status()[0].backoff_s <= 1.0  # capped
    # The daemon's status (doctor reads it) carries the same.
    pool = rig.d.status().pool[0]
    assert pool.failures == 3 and pool.last_error is not None and "refuses" in pool.last_error
    # Fixed: the next try fills and clears the error.
    rig.drv.fail_start = None
    await asyncio.sleep(1.05)
    await rig.pool.step()
    st = rig.pool.status()[0]
    assert (st.ready, st.failures, st.last_error, st.backoff_s) == (1, 0, None, 0)


async def test_the_background_filler_keeps_the_pool_full(rig: Rig) -> None:
    task = asyncio.ensure_future(rig.pool.run())
    try:
        for _ in range(200):
            if ready_count(rig) == 1:
                break
            await asyncio.sleep(0.05)
        assert ready_count(rig) == 1
        await rig.vm.create_vm(req(name="one"), rig.progress)
        for _ in range(200):  # woken by the take, refilled
            if ready_count(rig) == 1:
                break
            await asyncio.sleep(0.05)
        assert ready_count(rig) == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_deleting_the_image_drains_its_pool(rig: Rig) -> None:
    await rig.pool.step()
    (pv,) = pool_vms(rig)
    pid = pv.teardown.vmm_pid or 0
    assert pid_alive(pid)
    assert rig.d.images is not None and rig.d.store is not None
    await rig.d.images.delete_image("base")
    assert rig.d.store.pool_members() == [] and rig.d.store.get_image("base") is None
    assert not pid_alive(pid) and not Path(pv.vm_dir).exists()
    await rig.pool.step()  # nothing to fill from: no failure, a note
    (st,) = rig.pool.status()
    assert st.ready == 0 and st.failures == 0 and "not here" in (st.waiting or "")


async def test_restart_keeps_healthy_pool_vms_and_reaps_the_rest(rig: Rig) -> None:
    d = rig.d
    assert d.store is not None
    rig.pool.config = pool_config(3)
    # Fill three by hand (the filler makes one per step).
    for _ in range(3):
        await rig.pool.step()
    assert ready_count(rig) == 3
    good, dead, mute = pool_vms(rig)
    os.kill(dead.teardown.vmm_pid or 0, signal.SIGKILL)
    rig.drv.halt(mute.vm_dir)  # running VMM, agent gone
    # One more, left half-filled (ready=0) as a daemon killed mid-fill leaves it.
    half = await rig.vm.create_pool_vm(d.store.get_image("base"), rig.progress)
    with d.store.tx() as c:
        c.execute("UPDATE pool_vms SET ready=0 WHERE vm_id=?", (half.id,))
    # The old daemon goes away: its agent connections close (a chardev takes one client).
    from stoker.daemon import vm_stats

    for vm_id in list(rig.vm.agents):
        await vm_stats.drop_agent(rig.vm, vm_id)
    d2 = build_daemon(rig.root, rig.ns, rig.drv, rig.ssh, size=3)
    try:
        assert d2.vm is not None and d2.pool is not None and d2.store is not None
        await d2.vm.reconcile()
        await d2.pool.reconcile()
        kept = [m.vm_id for m in d2.store.pool_members()]
        assert kept == [good.id]
        for gone in (dead, mute, half):
            assert d2.store.get_vm(gone.id) is None
            assert not pid_alive(gone.teardown.vmm_pid or 0)
        assert await d2.vm.list_vms() == []
        # The kept one is still takeable by the new daemon.
        v = await d2.vm.create_vm(req(name="after-restart"), rig.progress)
        assert v.id == good.id
        _, out, _ = await vm_exec.run_collect(d2.vm, v, ExecSpec(argv=["hostname"], cwd="/"), 10)
        assert out.decode().strip() == "after-restart"
        await d2.vm.delete_vm("after-restart")
    finally:
        assert d2.net is not None
        await d2.net.close()
        if d2.store is not None:
            d2.store.close()


async def test_a_replaced_image_replaces_its_pool_vms(rig: Rig) -> None:
    await rig.pool.step()
    (old,) = pool_vms(rig)
    assert rig.d.images is not None and rig.d.store is not None
    await asyncio.sleep(0.01)
    # The same name published again (what a rebuild's publication writes): the pool VM
    # runs the old root file system, so it is replaced rather than handed out.
    im = rig.d.store.get_image("base")
    assert im is not None
    im.created_at = now()
    rig.d.store.upsert_image(im)
    await rig.pool.step()
    (new,) = pool_vms(rig)
    assert new.id != old.id and rig.d.store.get_vm(old.id) is None
    assert not pid_alive(old.teardown.vmm_pid or 0)


async def test_a_pool_vm_whose_vmm_dies_is_replaced(rig: Rig) -> None:
    await rig.pool.step()
    (pv,) = pool_vms(rig)
    os.kill(pv.teardown.vmm_pid or 0, signal.SIGKILL)
    await asyncio.sleep(0.2)
    assert pv.name in await rig.vm.check_vmms()  # the VMM watch sees pool VMs too
    await rig.pool.step()
    (new,) = pool_vms(rig)
    assert new.id != pv.id and ready_count(rig) == 1


async def test_deleting_the_image_mid_fill_cancels_the_fill_and_leaves_nothing(rig: Rig) -> None:
    rig.drv.start_delay = 1.5
    assert rig.d.images is not None and rig.d.store is not None
    fill = asyncio.ensure_future(rig.pool.step())
    for _ in range(100):  # the fill's VMM is up, its start not finished
        if rig.drv.started:
            break
        await asyncio.sleep(0.05)
    assert rig.drv.started and rig.pool.status()[0].filling == 1
    vm_dir = str(rig.drv.started[-1].vm_dir)
    await rig.d.images.delete_image("base")
    await fill
    assert rig.d.store.list_all_vms() == [] and rig.d.store.pool_members() == []
    assert not Path(vm_dir).exists()
    st = rig.pool.status()[0]
    assert st.failures == 0 and st.last_error is None  # a drain is no failure
