"""The fork flow (daemon/vm_fork.py) in the guest-peer rig: the real daemon services,
store, bridge and taps (in the rig's namespace), known_hosts and SSH readiness with the
pinned key, a stand-in VMM that can "save" and "restore", and the real guest agent
(stoker_agent, in-process on each VM's agent socket) whose identity calls are recorded
against a root of the test's own. The peer's sshd serves whatever host key the agent
wrote, and only once the link is up, as a real restored guest would.

Checked: two forks of one snapshot get their own IP, MAC, hostname, host key, machine-id
and RNG input, through the agent, before the link comes up; a fresh fork keeps no
snapshot and resumes its source; refusals (stopped source, a taken name, another VMM
version, an agent that fails) leave nothing; reconcile deletes a fork the daemon did not
finish and resumes a source left paused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_vm_lifecycle_guest_peer import Live, PeerVMM, _noop, live, netns, req

from stoker.daemon import snapshot_service, vm_fork
from stoker.daemon.imagemgr import ext4
from stoker.daemon.vmm.base import MachineConfig, VMMHandle, pid_alive
from stoker.daemon.vmm.standin import StandInDriver
from stoker.errors import AlreadyExists, Conflict, StokerError
from stoker.guest.agent import stoker_agent as sa
from stoker.model.records import VMState

pytestmark = pytest.mark.integration
__all__ = ["live", "netns"]  # fixtures used by name


class GuestSystem(sa.IdentitySystem):
    """A guest's identity side: files under `root`, system calls recorded."""

    def __init__(self, root: str, log: list[tuple[str, str, Any]], name: str) -> None:
        super().__init__(root)
        self.events, self.name = log, name
        self.fail: str | None = None

    def add_entropy(self, data: bytes) -> None:
        self.events.append((self.name, "rng", data))

    def set_clock(self, t: float) -> None:
        self.events.append((self.name, "clock", t))

    def set_hostname(self, name: str) -> None:
        self.events.append((self.name, "hostname", name))

    def run_ip(self, batch: list[str]) -> None:
        if self.fail:
            raise OSError(self.fail)
        self.events.append((self.name, "ip", batch))


class ForkVMM(PeerVMM):
    """PeerVMM that saves and restores: a restored 'guest' runs its agent at once, but its
    sshd (the peer) only answers once the link is up, with the key the agent wrote."""

    supports_snapshots = True
    supports_fork = True

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.accel = None
        self.version = "standin 1.0"
        self.events: list[tuple[str, str, Any]] = []
        self.systems: dict[str, GuestSystem] = {}
        self.servers: dict[str, tuple[socket.socket, threading.Event]] = {}
        self.block_link: asyncio.Event | None = None
        self.fail_next_identity: str | None = None

    def _agent(self, cfg: MachineConfig) -> None:
        assert cfg.agent_socket is not None
        root = cfg.vm_dir / "guest-root"
        (root / "etc" / "stoker").mkdir(parents=True, exist_ok=True)
        system = GuestSystem(str(root), self.events, cfg.name)
        system.fail, self.fail_next_identity = self.fail_next_identity, None
        self.systems[cfg.name] = system
        agent = sa.Agent()
        agent.identity_system = system
        sock = sa.unix_listener(str(cfg.agent_socket))
        stop = threading.Event()
        self.servers[str(cfg.vm_dir)] = (sock, stop)
        server = sa.StreamServer(agent, cfg.name, lambda: sock, stop)
        threading.Thread(target=server.run, daemon=True).start()

    async def start(self, cfg: MachineConfig) -> VMMHandle:
        h = await super().start(cfg)
        self._agent(cfg)  # after the start, which clears leftover sockets
        return h

    async def save_state(self, handle: VMMHandle, dest: Path) -> int:
        self.events.append((handle.vm_dir, "save", str(dest)))
        dest.write_bytes(b"memory of " + handle.vm_dir.encode())
        return dest.stat().st_size

    async def resume(self, handle: VMMHandle) -> None:
        self.events.append((handle.vm_dir, "resume", None))

    async def vmm_version(self, handle: VMMHandle) -> str:
        return self.version

    async def binary_version(self) -> str:
        return self.version

    async def restore(self, cfg: MachineConfig, state: Path, *, link_down: bool) -> VMMHandle:
        assert state.read_bytes().startswith(b"memory of ")
        self.events.append((cfg.name, "restore", link_down))
        h = await StandInDriver.start(self, cfg)  # the peer's sshd is not up yet
        self._agent(cfg)
        self.pids.append(h.pid)
        self.names[str(cfg.vm_dir)] = cfg.name
        return h

    async def set_link(self, handle: VMMHandle, *, up: bool) -> None:
        name = self.names[handle.vm_dir]
        self.events.append((name, "link", up))
        if self.block_link is not None:
            await self.block_link.wait()
            raise StokerError("the daemon 'died' here")
        if up:
            key = Path(self.systems[name].path("/etc/ssh/ssh_host_ed25519_key")).read_bytes()
            overlay = Path(handle.vm_dir) / "overlay.ext4"
            await ext4.write_file(
                self.runner, overlay, "/upper/etc/ssh/ssh_host_ed25519_key", key, 0o600
            )
            vm = self.store.get_vm(Path(handle.vm_dir).name)
            assert vm is not None
            await self.peer.boot(name, vm.guest_ip, handle.pid, Path(handle.vm_dir))

    def _post_shutdown(self, handle: VMMHandle) -> None:
        served = self.servers.pop(handle.vm_dir, None)
        if served is not None:
            sock, stop = served
            stop.set()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        super()._post_shutdown(handle)


@pytest.fixture
async def rig(live: Live) -> AsyncIterator[tuple[Live, ForkVMM]]:
    vmm = ForkVMM(live.peer, live.d.store)
    live.vm.driver_factory = lambda: vmm
    live.vm._driver_cache = None
    try:
        yield live, vmm
    finally:
        for v in list(await live.vm.list_vms()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(live.vm.delete_vm(v.id), 20)
        for pid in vmm.pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def known_hosts(lv: Live) -> str:
    p = lv.vm.layout.known_hosts
    return p.read_text() if p.exists() else ""


def vm_dirs(lv: Live) -> set[str]:
    d = lv.vm.layout.vms_dir
    return set(os.listdir(d)) if d.exists() else set()


def events(vmm: ForkVMM, name: str) -> list[tuple[str, Any]]:
    return [(k, v) for n, k, v in vmm.events if n == name]


async def test_two_forks_of_one_snapshot_get_their_own_identity_before_the_link(
    rig: tuple[Live, ForkVMM],
) -> None:
    lv, vmm = rig
    src = await lv.vm.create_vm(req(name="src"), _noop)
    await snapshot_service.snapshot_vm(lv.vm, "src", "tpl", _noop)
    a = await vm_fork.fork_from_snapshot(lv.vm, "src", "tpl", "fa", _noop)
    b = await vm_fork.create_from_snapshot(lv.vm, "src/tpl", "fb", _noop, ready="ssh")
    assert a.state == b.state == VMState.RUNNING
    assert len({src.guest_ip, a.guest_ip, b.guest_ip}) == 3
    for v in (a, b):
        ev = events(vmm, v.name)
        kinds = [k for k, _ in ev]
        # Restored with the link down; RNG first; the link comes up only after the identity.
        assert ev[0] == ("restore", True)
        assert kinds.index("rng") < kinds.index("clock") < kinds.index("ip")
        assert kinds.index("ip") < kinds.index("link")
        assert ("link", True) in ev and [k for k in kinds if k == "link"] == ["link"]
        root = Path(v.vm_dir) / "guest-root" / "etc"
        assert (root / "hostname").read_text() == f"{v.name}\n"
        env = (root / "stoker" / "network.env").read_text()
        assert f"STOKER_IP={v.guest_ip}\n" in env
        ip_batch = next(val for k, val in ev if k == "ip")
        assert f"addr add {v.guest_ip}/24 dev eth0" in ip_batch
        pub = (root / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()[1]
        assert pub in known_hosts(lv)
        assert (Path(v.vm_dir) / "ssh_host_ed25519_key").read_text() == (
            root / "ssh" / "ssh_host_ed25519_key"
        ).read_text()
        assert not (Path(v.vm_dir) / vm_fork.FORKING_MARK).exists()
        assert not (Path(v.vm_dir) / vm_fork.FORK_STATE).exists()
        # Its own disk copies, not the snapshot's files.
        snap_overlay = Path(src.vm_dir) / "snapshots" / "tpl" / "overlay.ext4"
        assert os.stat(Path(v.vm_dir) / "overlay.ext4").st_ino != snap_overlay.stat().st_ino
    ra = next(val for n, k, val in vmm.events if n == "fa" and k == "rng")
    rb = next(val for n, k, val in vmm.events if n == "fb" and k == "rng")
    assert ra != rb and len(ra) >= 32
    ids = {(Path(v.vm_dir) / "guest-root/etc/machine-id").read_text() for v in (a, b)}
    assert len(ids) == 2
    # SSH readiness went over the pinned key the agent installed (a stale one would fail).
    assert lv.vm.ssh_seen >= {a.id, b.id}
    t = lv.vm.last_timings[a.id]
    assert t["restore_identity_s"] >= t["identity_s"] >= 0 and t["disks_s"] >= 0
    assert "boot_s" in lv.vm.last_timings[a.id]
    assert [s["name"] for s in lv.d.store.list_snapshots(src.id)] == ["tpl"]


async def test_a_fresh_fork_keeps_no_snapshot_and_resumes_the_source(
    rig: tuple[Live, ForkVMM],
) -> None:
    lv, vmm = rig
    src = await lv.vm.create_vm(req(name="src"), _noop)
    c = await vm_fork.fork_vm(lv.vm, "src", "fc", _noop)
    assert c.state == VMState.RUNNING
    kinds = [k for n, k, _ in vmm.events if n == src.vm_dir]
    assert kinds == ["save", "resume"]
    assert lv.d.store.list_snapshots(src.id) == []
    left = set(os.listdir(c.vm_dir))
    assert {"overlay.ext4", "work.ext4"} <= left
    assert not left & {vm_fork.SOURCE_SNAPSHOT, vm_fork.FORK_STATE, vm_fork.FORKING_MARK}
    assert not (Path(src.vm_dir) / snapshot_service.PAUSED_MARK).exists()


async def test_refusals_leave_nothing(rig: tuple[Live, ForkVMM]) -> None:
    lv, vmm = rig
    await lv.vm.create_vm(req(name="src"), _noop)
    await snapshot_service.snapshot_vm(lv.vm, "src", "tpl", _noop)
    before = (len(lv.d.store.list_vms()), vm_dirs(lv), known_hosts(lv))

    with pytest.raises(AlreadyExists, match="already exists"):
        await vm_fork.fork_vm(lv.vm, "src", "src", _noop)
    lv.vm._driver_cache = PeerVMM(lv.peer, lv.d.store)  # a VMM that cannot snapshot
    with pytest.raises(Conflict, match="cannot fork VMs yet"):
        await vm_fork.fork_vm(lv.vm, "src", "fv", _noop)
    lv.vm._driver_cache = vmm
    vmm.version = "standin 2.0"
    with pytest.raises(Conflict, match=r"standin 2\.0"):
        await vm_fork.fork_from_snapshot(lv.vm, "src", "tpl", "fx", _noop)
    vmm.version = "standin 1.0"
    vmm.fail_next_identity = "RTNETLINK answers: Operation not permitted"
    with pytest.raises(StokerError, match="RTNETLINK"):
        await vm_fork.fork_from_snapshot(lv.vm, "src", "tpl", "fy", _noop)
    await lv.vm.stop_vm("src")
    with pytest.raises(Conflict, match=r"not running.*--snapshot"):
        await vm_fork.fork_vm(lv.vm, "src", "fz", _noop)
    assert (len(lv.d.store.list_vms()), vm_dirs(lv), known_hosts(lv)) == before
    assert not any(pid_alive(p) for p in vmm.pids)
    # A stopped source's snapshot still forks.
    f = await vm_fork.fork_vm(lv.vm, "src", "fw", _noop, snapshot="tpl")
    assert f.state == VMState.RUNNING


async def test_reconcile_deletes_an_unfinished_fork_and_resumes_a_paused_source(
    rig: tuple[Live, ForkVMM],
) -> None:
    lv, vmm = rig
    src = await lv.vm.create_vm(req(name="src"), _noop)
    await snapshot_service.snapshot_vm(lv.vm, "src", "tpl", _noop)
    kh = known_hosts(lv)
    vmm.block_link = asyncio.Event()
    task = asyncio.ensure_future(vm_fork.fork_from_snapshot(lv.vm, "src", "tpl", "half", _noop))
    for _ in range(400):
        if any(n == "half" and k == "link" for n, k, _ in vmm.events):
            break
        await asyncio.sleep(0.025)
    half = next(v for v in lv.d.store.list_vms() if v.name == "half")
    pid = vmm.pids[-1]
    assert pid_alive(pid) and (Path(half.vm_dir) / vm_fork.FORKING_MARK).exists()
    # What a daemon killed here leaves: the row, the directory with its mark, the VMM, the
    # tap. A source paused by a snapshot leaves its mark too.
    (Path(src.vm_dir) / snapshot_service.PAUSED_MARK).touch()
    vmm.events.clear()
    await lv.vm.reconcile()
    assert [v.name for v in lv.d.store.list_vms()] == ["src"]
    assert not Path(half.vm_dir).exists()
    for _ in range(100):
        if not pid_alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not pid_alive(pid)
    assert known_hosts(lv) == kh
    assert (src.vm_dir, "resume", None) in vmm.events
    assert not (Path(src.vm_dir) / snapshot_service.PAUSED_MARK).exists()
    vmm.block_link.set()
    with pytest.raises(StokerError):
        await task
    assert [v.name for v in lv.d.store.list_vms()] == ["src"]


async def test_vm_create_from_snapshot_refuses_sizing_flags_and_a_bad_reference(
    rig: tuple[Live, ForkVMM],
) -> None:
    from types import SimpleNamespace

    from stoker.daemon import api
    from stoker.errors import Ambiguous, InvalidArgument, NotFound

    lv, _ = rig
    await lv.vm.create_vm(req(name="src"), _noop)
    await snapshot_service.snapshot_vm(lv.vm, "src", "tpl", _noop)
    create = lv.d.methods()["vm.create"]
    ctx = SimpleNamespace(progress=_noop)
    before = len(lv.d.store.list_vms())
    p = api.CreateVM(name="n1", from_snapshot="src/tpl", memory_mib=512, nat=True)
    with pytest.raises(InvalidArgument, match="drop --memory, --nat"):
        await create.handler(p, ctx)
    with pytest.raises(NotFound, match="no snapshot named 'nope'"):
        await create.handler(api.CreateVM(name="n1", from_snapshot="src/nope"), ctx)
    with pytest.raises(NotFound, match="no VM has a snapshot named 'nope'"):
        await create.handler(api.CreateVM(name="n1", from_snapshot="nope"), ctx)
    with pytest.raises(InvalidArgument, match="needs the new VM's --name"):
        await create.handler(api.CreateVM(from_snapshot="src/tpl"), ctx)
    assert len(lv.d.store.list_vms()) == before
    # A bare name works while one VM has it; two make it ambiguous.
    out = await create.handler(api.CreateVM(name="n1", from_snapshot="tpl"), ctx)
    assert out.record.name == "n1" and out.timings is not None
    assert out.timings["restore_identity_s"] >= 0
    await snapshot_service.snapshot_vm(lv.vm, "n1", "tpl", _noop)
    with pytest.raises(Ambiguous, match="n1/tpl"):
        await create.handler(api.CreateVM(name="n2", from_snapshot="tpl"), ctx)
