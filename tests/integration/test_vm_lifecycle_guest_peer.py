"""The lifecycle rig with a real SSH peer: VMService's real GuestSSH (asyncssh) talks to an
in-process sshd on each VM's guest address inside the rig's network namespace, serving the
host key stoker injected into the overlay disk and authorizing the key stoker wrote onto
the work disk (tests/integration/guestpeer.py). The VMM is a sleeping stand-in process, so
the graceful stop (sync, poweroff, then end the VMM), the readiness wait, host-key pinning,
the pooled connection, the verbs and tickers, what lands on the work disk and the CLI paths
that talk to a guest all run here in seconds, without a guest boot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from guestpeer import GuestPeer, StandInAgent, in_netns
from test_vm_lifecycle_fake_vmm import _host_links, _make_ext4

from stoker.config import parse_config
from stoker.daemon.daemon import Daemon
from stoker.daemon.guestssh.client import HostKeyMismatch
from stoker.daemon.host_network import HostNetwork
from stoker.daemon.imagemgr import ext4
from stoker.daemon.vm_service import CreateRequest
from stoker.daemon.vmm.base import MachineConfig, VMMHandle, pid_alive
from stoker.daemon.vmm.standin import StandInDriver
from stoker.errors import StokerError, Timeout, Unavailable
from stoker.layout import Layout
from stoker.model.records import Kernel, VMState, Workspace
from stoker.runner import Runner
from stoker.store import Store
from stoker.store.db import now

pytestmark = pytest.mark.integration

IDLE_LIMIT = 60  # auto_stop_stale_after of the rig's config


def _noop(*a: Any, **k: Any) -> None:
    pass


class PeerVMM(StandInDriver):
    """The sleeping stand-in VMM whose 'guest' (the SSH peer) comes up as it starts and
    goes away when it is killed."""

    def __init__(self, peer: GuestPeer, store: Store) -> None:
        super().__init__()
        self.peer = peer
        self.store = store
        self.names: dict[str, str] = {}
        self.pids: list[int] = []  # every stand-in spawned: none may outlive the test

    async def start(self, cfg: MachineConfig) -> VMMHandle:
        h = await super().start(cfg)
        self.pids.append(h.pid)
        vm = self.store.get_vm(cfg.vm_id)
        assert vm is not None
        self.names[str(cfg.vm_dir)] = cfg.name
        await self.peer.boot(cfg.name, vm.guest_ip, h.pid, cfg.vm_dir)
        return h

    async def shutdown(self, h: VMMHandle, timeout: float, *, hard: bool = False) -> None:
        name = self.names.get(h.vm_dir)
        if name is not None:
            await self.peer.halt(name)
        await super().shutdown(h, timeout, hard=hard)


@dataclass
class Live:
    d: Daemon
    peer: GuestPeer
    vmm: PeerVMM
    ns: str
    root: Path
    env: dict[str, str]
    files: dict[str, tuple[Path, int]]  # guest path -> (host file, mode)

    @property
    def vm(self) -> Any:
        assert self.d.vm is not None
        return self.d.vm

    async def cli(
        self, *args: str, stdin: bytes = b"", timeout: float = 60
    ) -> tuple[int, bytes, str]:
        """Run the real CLI as a process (it inherits the rig's network namespace)."""
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "stoker.cli.main",
            *args,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(p.communicate(stdin), timeout)
        assert p.returncode is not None
        return p.returncode, out, err.decode()


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of the test's own; nothing may leak onto the host."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    ns = f"stoker-p-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    before = _host_links()
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        assert _host_links() == before, "the test leaked links onto the host"


@pytest.fixture
async def live(netns: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Live]:
    root = Path(tempfile.mkdtemp(prefix="stkp", dir="/tmp"))
    env = dict(os.environ)
    env.update(
        HOME=str(root / "h"),
        XDG_CONFIG_HOME=str(root / "c"),
        XDG_STATE_HOME=str(root / "s"),
        XDG_CACHE_HOME=str(root / "k"),
    )
    for k in ("XDG_RUNTIME_DIR", "STOKER_CONFIG", "STOKER_SYSTEM", "STOKER_LOG_LEVEL"):
        env.pop(k, None)
    layout = Layout.for_user(env)
    layout.ensure()
    # A known host git identity for the work-disk sync (the daemon asks `git config --global`).
    gitcfg = root / "gitconfig"
    gitcfg.write_text("[user]\n\tname = Ada Peer\n\temail = ada@peer.test\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(gitcfg))
    files = {
        "/root/.config/tool/settings.toml": (root / "settings.toml", 0o640),
        "/root/.netrc": (root / "netrc", 0o600),
        "/root/bin/helper": (root / "helper", 0o755),
    }
    for guest, (host, _) in files.items():
        host.write_bytes(f"content of {guest}\n".encode() + secrets.token_bytes(64))
    config = parse_config(
        {
            "bridge_cidr": "172.30.0.0/24",
            "tap_pool_size": 1,
            "auto_stop_stale_after": IDLE_LIMIT,
            "vm_defaults": {
                "vcpu": 1,
                "memory_mib": 256,
                "disk_size": "300M",
                "overlay_size": "300M",
            },
            "file_sync": [
                {"host": str(h), "guest": g, "mode": f"{m:o}"} for g, (h, m) in files.items()
            ],
        },
        cpus=2,
        mem_bytes=4 * 1024**3,
    )
    with in_netns(netns):
        logger = logging.getLogger("stoker.test")
        store = Store(layout.db_path)
        runner = Runner()
        d = Daemon(
            layout,
            config,
            store,
            runner=runner,
            logger=logger,
            net=HostNetwork(config, runner, logger, netns=netns),
        )
        peer = GuestPeer(netns)
        vmm = PeerVMM(peer, store)
        d.vm.driver_factory = lambda: vmm
        kdir = root / "kernel"
        kdir.mkdir()
        (kdir / "vmlinux").write_bytes(b"\x7fELF fake")
        store.upsert_kernel(
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
        await d.images.register_image(
            "base", str(root / "rootfs.ext4"), "k1", str(root / "seed.ext4")
        )
        lv = Live(d, peer, vmm, netns, root, env, files)
        try:
            yield lv
        finally:
            for v in list(await d.vm.list_vms()):
                try:
                    await asyncio.wait_for(d.vm.delete_vm(v.id), 20)
                except Exception as e:  # keep tearing down; the netns check reports leaks
                    logger.warning("teardown: delete %s: %s", v.name, e)
            await peer.close()
            for pid in vmm.pids:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            assert d.net is not None
            await d.net.teardown_bridge_if_unused()
            await d.close()
            shutil.rmtree(root, ignore_errors=True)


def req(**kw: Any) -> CreateRequest:
    return CreateRequest(image="base", **kw)


def guest_events(lv: Live, name: str, *what: str) -> list[str]:
    return [e.what for e in lv.peer.events if e.vm == name and e.what in what]


# --- item 1: the graceful stop and the readiness wait over real SSH ----------------------


async def test_stop_syncs_then_powers_off_before_the_vmm_ends(live: Live) -> None:
    rec = await live.vm.create_vm(req(name="g1"), _noop)
    assert rec.state == VMState.RUNNING
    # Readiness went over real SSH: the pinned host key and the managed key worked.
    assert live.peer.commands("g1") == ["true"]
    pid = live.vm.resolve("g1").teardown.vmm_pid
    assert pid and pid_alive(pid)
    stopped = await live.vm.stop_vm("g1")
    assert stopped.state == VMState.STOPPED
    steps = [e for e in live.peer.events if e.vm == "g1" and e.what in ("sync", "poweroff")]
    assert [e.what for e in steps] == ["sync", "poweroff"], live.peer.commands("g1")
    assert all(e.vmm_alive for e in steps), "the VMM was ended before the guest synced"
    assert not pid_alive(pid)


@pytest.mark.parametrize("how", ["down", "blackhole"])
async def test_an_unreachable_guest_is_killed_at_once(live: Live, how: str) -> None:
    rec = await live.vm.create_vm(req(name="u1"), _noop)
    pid = live.vm.resolve("u1").teardown.vmm_pid
    # The guest hangs: its sshd goes away (refused) or stops speaking (TCP accepted only).
    live.peer.mode["u1"] = how
    await live.peer.boot("u1", rec.guest_ip, pid, Path(rec.vm_dir))
    t0 = time.monotonic()
    stopped = await live.vm.stop_vm("u1")
    took = time.monotonic() - t0
    assert stopped.state == VMState.STOPPED and not pid_alive(pid)
    assert guest_events(live, "u1", "sync", "poweroff") == []
    # One short connect attempt (1 s), then the kill: not the 5 s default, not a retry loop.
    assert took < 4.0, f"stopping an unreachable guest took {took:.1f}s"


async def test_host_key_mismatch_is_refused_as_mitm(live: Live) -> None:
    live.peer.mode["mitm"] = "wrong-key"
    live.vm.boot_timeout = 20
    t0 = time.monotonic()
    with pytest.raises(HostKeyMismatch, match="man-in-the-middle"):
        await live.vm.create_vm(req(name="mitm"), _noop)
    # Refused at the first answer, not retried until the boot timeout.
    assert time.monotonic() - t0 < 10
    got = live.vm.resolve("mitm")
    assert got.state == VMState.ERROR and "man-in-the-middle" in (got.last_error or "")
    assert got.teardown.tap is None
    assert live.peer.commands("mitm") == []  # no command ever reached the impostor


async def test_readiness_timeout_names_vm_logs(live: Live) -> None:
    live.peer.mode["slow"] = "down"
    live.vm.boot_timeout = 2
    t0 = time.monotonic()
    with pytest.raises(Timeout, match=r"`stoker vm logs slow`"):
        await live.vm.create_vm(req(name="slow"), _noop)
    assert time.monotonic() - t0 < 10
    got = live.vm.resolve("slow")
    assert got.state == VMState.ERROR and "stoker vm logs slow" in (got.last_error or "")
    assert got.teardown.tap is None and got.teardown.vmm_pid is None


async def test_a_vmm_dying_during_the_wait_fails_fast(live: Live) -> None:
    live.peer.mode["dies"] = "down"
    live.vm.boot_timeout = 20  # far above "fast"; bounds the run when the wait ignores it
    task = asyncio.ensure_future(live.vm.create_vm(req(name="dies"), _noop))
    for _ in range(400):
        if live.peer.state("dies") is not None:
            break
        await asyncio.sleep(0.02)
    g = live.peer.state("dies")
    assert g is not None
    await asyncio.sleep(0.3)  # the wait is under way
    t0 = time.monotonic()
    os.kill(g.vmm_pid, signal.SIGKILL)
    with pytest.raises(Unavailable, match="exited during boot"):
        await asyncio.wait_for(task, 10)
    assert time.monotonic() - t0 < 5
    assert live.vm.resolve("dies").state == VMState.ERROR


async def test_the_pooled_connection_is_reused_and_dropped_on_stop(live: Live) -> None:
    rec = await live.vm.create_vm(req(name="pool"), _noop)
    g = live.peer.state("pool")
    assert g is not None and g.accepted == 1
    target = live.vm.ssh_target(rec)
    live.peer.exec_hook = lambda vm, cmd: f"{vm}:{cmd}\n".encode()
    for i in range(3):
        r = await live.vm.ssh.run(target, f"echo {i}")
        assert r.exit_status == 0 and r.stdout == f"pool:echo {i}\n".encode()
    assert g.accepted == 1, "each command dialled a new SSH connection"
    conn = live.vm.ssh._pool.get(live.vm.ssh._key(target))
    assert conn is not None and not conn.is_closed()
    await live.vm.stop_vm("pool")
    assert g.accepted == 1  # the stop's sync went over the kept connection too
    assert guest_events(live, "pool", "sync") == ["sync"]
    assert live.vm.ssh._pool == {}, "the stopped VM's connection stayed in the pool"
    assert conn.is_closed()
    # The next start dials afresh (a new guest, a new connection).
    await live.vm.start_vm("pool", _noop)
    g2 = live.peer.state("pool")
    assert g2 is not None and g2 is not g and g2.accepted == 1


# --- item 2: verbs and tickers ---------------------------------------------------------


async def test_kill_never_talks_to_the_guest_and_cleans_up(live: Live) -> None:
    rec = await live.vm.create_vm(req(name="kk"), _noop)
    got = live.vm.resolve("kk")
    pid, tap = got.teardown.vmm_pid, got.teardown.tap
    assert live.d.net is not None and await live.d.net.links.exists(tap)
    sent = list(live.peer.commands("kk"))
    killed = await live.vm.kill_vm("kk")
    assert live.peer.commands("kk") == sent, "kill ran a command in the guest"
    assert killed.state == VMState.STOPPED and killed.teardown.tap is None
    assert not pid_alive(pid)
    assert not await live.d.net.links.exists(tap)
    assert "kk" not in live.d.net.dns.records()
    assert not (Path(rec.vm_dir) / "vmm.pid").exists()
    assert live.vm.ssh._pool == {}


async def test_restart_stops_gracefully_and_boots_a_new_vmm(live: Live) -> None:
    await live.vm.create_vm(req(name="rs"), _noop)
    pid1 = live.vm.resolve("rs").teardown.vmm_pid
    back = await live.vm.restart_vm("rs", _noop)
    pid2 = back.teardown.vmm_pid
    assert back.state == VMState.RUNNING and pid2 and pid2 != pid1
    assert not pid_alive(pid1) and pid_alive(pid2)
    assert guest_events(live, "rs", "sync", "poweroff") == ["sync", "poweroff"]
    assert live.peer.commands("rs").count("true") == 2  # waited for SSH again
    assert len(live.vmm.started) == 2
    # Restarting a stopped VM just starts it.
    await live.vm.stop_vm("rs")
    again = await live.vm.restart_vm("rs", _noop)
    assert again.state == VMState.RUNNING and len(live.vmm.started) == 3
    assert guest_events(live, "rs", "sync") == ["sync", "sync"]


async def test_auto_stop_after_the_idle_limit(live: Live) -> None:
    idle = await live.vm.create_vm(req(name="idle"), _noop)
    busy = await live.vm.create_vm(req(name="busy"), _noop)
    agents = [
        StandInAgent(Path(idle.vm_dir) / "agent.sock", idle_s=IDLE_LIMIT * 2.0),
        StandInAgent(Path(busy.vm_dir) / "agent.sock", idle_s=IDLE_LIMIT / 2.0),
    ]
    for a in agents:
        await a.start()
    try:
        await live.vm.poll_stats()
    finally:
        for a in agents:
            await a.close()
    assert "/stats" in agents[0].requests and "/stats" in agents[1].requests
    got = live.vm.resolve("idle")
    assert got.state == VMState.STOPPED
    assert "auto_stop_stale_after" in (got.last_error or "")
    assert guest_events(live, "idle", "sync") == ["sync"]  # a graceful stop, not a kill
    assert live.vm.resolve("busy").state == VMState.RUNNING
    assert guest_events(live, "busy", "sync") == []


async def test_known_hosts_entries_are_gone_after_delete(live: Live) -> None:
    a = await live.vm.create_vm(req(name="kh1"), _noop)
    b = await live.vm.create_vm(req(name="kh2", no_start=True), _noop)
    kh = live.d.layout.known_hosts  # type: ignore[union-attr]

    def hosts() -> set[str]:
        return {h for ln in kh.read_text().splitlines() for h in ln.split()[0].split(",")}

    assert {a.guest_ip, "kh1", "kh1.vm", b.guest_ip, "kh2", "kh2.vm"} <= hosts()
    await live.vm.delete_vm("kh1")
    left = hosts()
    assert not {a.guest_ip, "kh1", "kh1.vm"} & left, kh.read_text()
    assert {b.guest_ip, "kh2", "kh2.vm"} <= left
    await live.vm.delete_vm("kh2")
    assert hosts() == set()


async def test_cleanup_carries_on_when_a_teardown_step_fails(live: Live) -> None:
    await live.vm.create_vm(req(name="cf"), _noop)
    got = live.vm.resolve("cf")
    tap, pid = got.teardown.tap, got.teardown.vmm_pid
    assert live.d.net is not None and tap

    async def broken_hook(vm: Any) -> None:
        raise RuntimeError("injected teardown failure")

    live.vm.hooks.cleanup.insert(0, broken_hook)
    try:
        with pytest.raises(StokerError, match=r"cleanup had errors.*injected teardown failure"):
            await live.vm.stop_vm("cf")
    finally:
        live.vm.hooks.cleanup.remove(broken_hook)
    after = live.vm.resolve("cf")
    assert after.state == VMState.STOPPED
    assert "injected teardown failure" in (after.last_error or "")
    # The steps after the failing one still ran.
    assert not await live.d.net.links.exists(tap), "the tap leaked after a failed hook"
    assert "cf" not in live.d.net.dns.records()
    assert after.teardown.tap is None and not pid_alive(pid or 0)


# --- item 3: what lands on the work disk -----------------------------------------------


async def test_work_disk_gets_git_identity_and_every_file_sync_entry(live: Live) -> None:
    rec = await live.vm.create_vm(req(name="wd"), _noop)
    disk = Path(rec.vm_dir) / "work.ext4"
    runner = live.d.runner

    async def check() -> None:
        gc = (await ext4.read_file(runner, disk, "/.gitconfig")).decode()
        assert "name = Ada Peer" in gc and "email = ada@peer.test" in gc
        for guest, (host, mode) in live.files.items():
            rel = "/" + os.path.relpath(guest, "/root")
            assert await ext4.read_file(runner, disk, rel) == host.read_bytes(), guest
            st = await ext4.stat_path(runner, disk, rel)
            assert st is not None and st.mode & 0o7777 == mode, (guest, oct(st.mode if st else 0))
        st = await ext4.stat_path(runner, disk, "/")
        assert st is not None and st.mode & 0o777 == 0o755

    await check()
    # The sync runs before every start: a changed host file lands at the next start.
    await live.vm.stop_vm("wd")
    host, _ = live.files["/root/.netrc"]
    host.write_bytes(b"machine changed\n")
    await live.vm.start_vm("wd", _noop)
    await check()


# --- item 4: concurrent creates while the default image is still being built --------------


async def test_ten_creates_while_the_default_image_builds(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stoker.daemon.imagemgr import golden

    images = live.d.images
    assert images is not None and live.d.config.default_image == "debian-bookworm"
    builds: list[str] = []
    release = asyncio.Event()

    async def slow_build(runner: Any, out_dir: Path, **kw: Any) -> golden.GoldenResult:
        builds.append(str(out_dir))
        await release.wait()  # really awaits: every create piles up behind it
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(live.root / "rootfs.ext4", out_dir / "rootfs.ext4")
        shutil.copyfile(live.root / "seed.ext4", out_dir / "work-seed.ext4")
        return golden.GoldenResult(
            dir=out_dir,
            rootfs=out_dir / "rootfs.ext4",
            work_seed=out_dir / "work-seed.ext4",
            kernel_dir=live.root / "kernel",
            vmlinuz=live.root / "kernel" / "vmlinux",
            initrd=live.root / "kernel" / "vmlinux",
            kernel_version="6.1-test",
            spec_hash="0" * 64,
            manifest=out_dir / "manifest.json",
            packages=1,
        )

    async def import_kernel(name: str, source: Path, origin: str) -> Kernel:
        k = images.store.get_kernel("k1")
        assert k is not None
        return k

    monkeypatch.setattr(golden, "build_golden", slow_build)
    monkeypatch.setattr(images, "_import_kernel_files", import_kernel)
    tasks = [
        asyncio.ensure_future(live.vm.create_vm(CreateRequest(name=f"c{i}"), _noop))
        for i in range(10)
    ]
    for _ in range(100):
        if builds:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # every create is waiting on the build now
    assert not any(t.done() for t in tasks)
    release.set()
    recs = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert len(builds) == 1, builds
    assert len({r.guest_ip for r in recs}) == 10
    assert len({r.name for r in recs}) == 10
    assert all(r.state == VMState.RUNNING and r.image == "debian-bookworm" for r in recs)
    assert len({live.vm.resolve(r.name).teardown.tap for r in recs}) == 10


# --- item 5: CLI paths that reach a guest -------------------------------------------------


@pytest.fixture
async def served(live: Live) -> AsyncIterator[Live]:
    """The rig's daemon served on its socket, for the real CLI."""
    from stoker.rpc.server import RPCServer

    assert live.d.layout is not None
    server = RPCServer(live.d.layout.socket_path, live.d.dispatch)
    await server.start()
    try:
        yield live
    finally:
        await server.close()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=a", "-c", "user.email=a@x", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


async def test_exec_warns_when_head_moved_and_auto_prepare_resyncs(served: Live) -> None:
    lv = served
    repo = lv.root / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "commit", "-q", "--allow-empty", "-m", "one")
    head1 = _git(repo, "rev-parse", "HEAD")
    rec = await lv.vm.create_vm(req(name="ex"), _noop)
    assert lv.d.store is not None
    lv.d.store.set_vm_workspace(
        rec.id, Workspace(guest_path="/root/repo", host_path=str(repo), head=head1)
    )
    lv.peer.exec_hook = lambda vm, cmd: f"ran on {vm}\n".encode()
    prepared: list[tuple[str, str, str, float]] = []

    async def fake_prepare(ref: str, path: str, guest_path: str, *a: Any) -> Workspace:
        prepared.append((ref, path, guest_path, time.monotonic()))
        w = Workspace(guest_path=guest_path, host_path=path, head=_git(repo, "rev-parse", "HEAD"))
        assert lv.d.store is not None
        lv.d.store.set_vm_workspace(lv.vm.resolve(ref).id, w)
        return w

    lv.d.ws.prepare = fake_prepare  # type: ignore[method-assign,union-attr]

    # HEAD where it was prepared: no warning, the command runs in the workspace.
    rc, out, err = await lv.cli("vm", "exec", "ex", "--", "echo", "hi")
    assert rc == 0, err
    assert out == b"ran on ex\n" and "HEAD moved" not in err
    assert "echo hi" in lv.peer.commands("ex")[-1] and "/root/repo" in lv.peer.commands("ex")[-1]

    _git(repo, "commit", "-q", "--allow-empty", "-m", "two")
    head2 = _git(repo, "rev-parse", "HEAD")
    rc, out, err = await lv.cli("vm", "exec", "ex", "--", "echo", "hi")
    assert rc == 0 and out == b"ran on ex\n"
    assert "HEAD moved" in err and head1[:12] in err and head2[:12] in err
    assert "--auto-prepare" in err
    assert prepared == []

    n = len(lv.peer.events)
    rc, out, err = await lv.cli("vm", "exec", "--auto-prepare", "ex", "--", "echo", "hi")
    assert rc == 0, err
    assert "HEAD moved" not in err
    assert [(r, p, g) for r, p, g, _ in prepared] == [("ex", str(repo), "/root/repo")]
    ran = [e for e in lv.peer.events[n:] if e.what == "exec"]
    assert len(ran) == 1 and prepared[0][3] < ran[0].at, "the command ran before the re-sync"


async def test_proxycommand_relay_carries_bytes_both_ways(served: Live) -> None:
    lv = served
    rec = await lv.vm.create_vm(req(name="px"), _noop)
    got: list[bytes] = []

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # until the relay half-closes after stdin's EOF
        got.append(data)
        w.write(data[::-1])
        await w.drain()
        w.close()

    srv = await asyncio.start_server(echo, rec.guest_ip, 2222)
    try:
        payload = secrets.token_bytes(300_000)
        rc, out, err = await lv.cli("__connect", "px.vm", "2222", stdin=payload)
    finally:
        srv.close()
        await srv.wait_closed()
    assert rc == 0, err
    assert got == [payload]
    assert out == payload[::-1]


async def test_register_promote_then_a_vm_starts_from_the_promoted_copy(served: Live) -> None:
    lv = served
    orig_root, orig_seed = lv.root / "reg-rootfs.ext4", lv.root / "reg-seed.ext4"
    shutil.copyfile(lv.root / "rootfs.ext4", orig_root)
    await _make_ext4(orig_seed, 32)
    await ext4.write_file(lv.d.runner, orig_seed, "/marker", b"from the seed\n", 0o644)
    rc, _, err = await lv.cli(
        "image", "register", "reg", "--rootfs", str(orig_root), "--kernel", "k1",
        "--work-seed", str(orig_seed),
    )  # fmt: skip
    assert rc == 0, err
    rc, _, err = await lv.cli("image", "promote", "reg")
    assert rc == 0, err
    im = lv.d.store.get_image("reg")  # type: ignore[union-attr]
    managed = lv.d.layout.images_dir / "reg"  # type: ignore[union-attr]
    assert im is not None and im.managed
    assert Path(im.rootfs).parent == managed and Path(im.work_seed or "").parent == managed
    # The originals go away; the VM still starts, from the promoted copies.
    orig_root.unlink()
    orig_seed.unlink()
    rc, _, err = await lv.cli("vm", "create", "--name", "pr", "--image", "reg", timeout=120)
    assert rc == 0, err
    rec = lv.vm.resolve("pr")
    assert rec.state == VMState.RUNNING
    cfg = lv.vmm.started[-1]
    assert cfg.disks[0].id == "rootfs" and cfg.disks[0].path == managed / "rootfs.ext4"
    marker = await ext4.read_file(lv.d.runner, Path(rec.vm_dir) / "work.ext4", "/marker")
    assert marker == b"from the seed\n"
