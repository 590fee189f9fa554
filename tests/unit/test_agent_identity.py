"""The agent's `identity` frame (a fork's identity, issue 13 item 3): validation of every
field, the order it is applied in (RNG first), the files it writes into a root of the
test's own, and the host client against the real agent over a unix socket (the calls that
change the whole system, RNG, clock, hostname and `ip`, are recorded, not made)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stoker.daemon.agent import AgentClient, AgentProtocolError, GuestIdentity, UnixTransport
from stoker.guest.agent import stoker_agent as sa

pytestmark = pytest.mark.unit

KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhvc3RrZXlmb3J0ZXN0aW5nb25seQ root@f1"


def ident(**over: Any) -> GuestIdentity:
    base: dict[str, Any] = dict(
        hostname="f1",
        ip="172.30.0.7",
        prefix=24,
        gateway="172.30.0.1",
        mac="06:53:ac:1e:00:07",
        dns=("172.30.0.1",),
        host_key=KEY,
        host_key_pub=PUB,
        machine_id="0123456789abcdef0123456789abcdef",
        entropy=os.urandom(64),
    )
    base.update(over)
    return GuestIdentity(**base)


class FakeSystem(sa.IdentitySystem):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.calls: list[tuple[str, Any]] = []

    def add_entropy(self, data: bytes) -> None:
        self.calls.append(("rng", data))

    def set_clock(self, t: float) -> None:
        self.calls.append(("clock", t))

    def set_hostname(self, name: str) -> None:
        self.calls.append(("hostname", name))

    def run_ip(self, batch: list[str]) -> None:
        self.calls.append(("ip", batch))


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stkid", dir="/tmp"))
    (d / "etc" / "stoker").mkdir(parents=True)
    (d / "etc" / "stoker" / "network.env").write_text(
        "STOKER_IP=172.30.0.2\nSTOKER_MAC=06:53:ac:1e:00:02\n"
    )
    for name, mac in (("lo", "00:00:00:00:00:00"), ("ens3", "06:53:ac:1e:00:02")):
        (d / "sys" / "class" / "net" / name).mkdir(parents=True)
        (d / "sys" / "class" / "net" / name / "address").write_text(mac + "\n")
    try:
        yield d
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def frame(**over: Any) -> dict[str, Any]:
    f = ident().frame()
    f.update(over)
    return f


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("hostname", "Bad_Name", "hostname"),
        ("hostname", "-x", "hostname"),
        ("hostname", "a" * 64, "hostname"),
        ("ip", "172.30.0.256", "ip must be"),
        ("ip", "172.30.0.7; reboot", "ip must be"),
        ("gateway", 17, "gateway must be"),
        ("prefix", 33, "prefix"),
        ("prefix", True, "prefix"),
        ("mac", "07:53:ac:1e:00:07", "unicast"),
        ("mac", "06:53:AC:1E:00:07", "mac"),
        ("dns", [], "dns"),
        ("dns", ["1.1.1.1"] * 9, "dns"),
        ("time", float("nan"), "time"),
        ("time", 5, "plausible"),
        ("entropy", "not base64!", "base64"),
        ("entropy", base64.b64encode(b"x" * 8).decode(), "32 to 4096"),
        ("host_key", "-----BEGIN RSA PRIVATE KEY-----\n", "OpenSSH private key"),
        ("host_key", KEY.replace("b3Bl", "$(rm -rf /)"), "OpenSSH private key"),
        ("host_key_pub", PUB + "\nssh-ed25519 AAAA extra", "one 'ssh-ed25519"),
        ("machine_id", "0" * 32, "machine_id"),
        ("machine_id", "xyz", "machine_id"),
    ],
)
def test_each_bad_field_is_refused_with_its_name(field: str, value: Any, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        sa.IdentitySpec(frame(**{field: value}))


def test_a_missing_field_is_refused() -> None:
    f = frame()
    del f["machine_id"]
    with pytest.raises(ValueError, match="machine_id"):
        sa.IdentitySpec(f)


def test_apply_reseeds_first_then_clock_then_files_and_network(root: Path) -> None:
    sysm = FakeSystem(str(root))
    i = ident()
    spec = sa.IdentitySpec(i.frame())
    done: list[str] = []
    sysm.apply(spec, done)
    assert done == ["rng", "clock", "machine-id", "host-key", "hostname", "network", "sync"]
    kinds = [c[0] for c in sysm.calls]
    assert kinds == ["rng", "clock", "hostname", "ip"]
    assert sysm.calls[0][1] == i.entropy
    etc = root / "etc"
    assert (etc / "machine-id").read_text() == i.machine_id + "\n"
    assert (etc / "machine-id").stat().st_mode & 0o777 == 0o444
    assert (etc / "ssh" / "ssh_host_ed25519_key").read_text() == KEY
    assert (etc / "ssh" / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert (etc / "ssh" / "ssh_host_ed25519_key.pub").read_text() == PUB + "\n"
    assert (etc / "hostname").read_text() == "f1\n"
    assert "172.30.0.7\tf1.vm f1" in (etc / "hosts").read_text()
    env = (etc / "stoker" / "network.env").read_text()
    assert "STOKER_IP=172.30.0.7\n" in env and "STOKER_MAC=06:53:ac:1e:00:07\n" in env
    assert (etc / "resolv.conf").read_text() == "nameserver 172.30.0.1\n"
    # The NIC is found by the source's MAC (from the old network.env), not assumed eth0.
    batch = sysm.calls[3][1]
    assert batch[0] == "link set dev ens3 address 06:53:ac:1e:00:07"
    assert "addr add 172.30.0.7/24 dev ens3" in batch
    assert "route replace default via 172.30.0.1 dev ens3" in batch
    assert not [p for p in etc.rglob("*.stoker-*")]  # no temporaries left


def test_a_planted_link_is_replaced_not_followed(root: Path) -> None:
    victim = root / "victim"
    victim.write_text("keep")
    (root / "etc" / "hostname").symlink_to(victim)
    FakeSystem(str(root)).apply(sa.IdentitySpec(ident().frame()), [])
    assert victim.read_text() == "keep"
    assert not (root / "etc" / "hostname").is_symlink()


class Recorder:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.got = threading.Event()

    def write(self, data: bytes) -> bool:
        self.frames.append(json.loads(data))
        self.got.set()
        return True


def test_a_bad_frame_is_answered_with_a_result_not_applied(root: Path) -> None:
    agent = sa.Agent()
    agent.identity_system = sysm = FakeSystem(str(root))
    rec = Recorder()
    bad = frame(id="c1", ip="1.2.3")
    agent.handle_frame(sa.Session(rec.write), sa.Frame(json.dumps(bad).encode()))
    assert rec.frames == [
        {"t": "result", "id": "c1", "ok": False, "error": rec.frames[0]["error"], "done": []}
    ]
    assert "ip must be" in rec.frames[0]["error"] and sysm.calls == []


def test_a_failure_part_way_names_the_last_step_done(root: Path) -> None:
    class Broken(FakeSystem):
        def run_ip(self, batch: list[str]) -> None:
            raise OSError("ip -batch failed (1): RTNETLINK answers: Operation not permitted")

    agent = sa.Agent()
    agent.identity_system = Broken(str(root))
    rec = Recorder()
    agent.handle_frame(sa.Session(rec.write), sa.Frame(json.dumps(frame(id="c2")).encode()))
    assert rec.got.wait(5)
    r = rec.frames[0]
    assert r["ok"] is False and r["done"][-1] == "hostname"
    assert "hostname done, then OSError" in r["error"] and "RTNETLINK" in r["error"]


async def _serve(agent: sa.Agent, sock: Path) -> threading.Event:
    stop = threading.Event()
    server = sa.StreamServer(agent, f"unix:{sock}", lambda: sa.unix_listener(str(sock)), stop)
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(100):
        if sock.exists():
            break
        await asyncio.sleep(0.02)
    return stop


async def test_the_host_client_sets_an_identity_through_the_real_agent(root: Path) -> None:
    agent = sa.Agent()
    agent.identity_system = sysm = FakeSystem(str(root))
    sock = root / "agent.sock"
    stop = await _serve(agent, sock)
    c = AgentClient(UnixTransport(sock), name="f1")
    try:
        health = await c.healthz(timeout=5)
        assert "identity" in health.features
        i = ident()
        done = await c.set_identity(i, timeout=10)
        assert done[:2] == ["rng", "clock"] and done[-1] == "sync"
        assert (root / "etc" / "hostname").read_text() == "f1\n"
        clock = next(v for k, v in sysm.calls if k == "clock")
        import time

        assert abs(clock - time.time()) < 2  # the host's time at sending
        # A refusal comes back as the agent's message.
        with pytest.raises(AgentProtocolError, match=r"could not apply the new identity.*hostname"):
            await c.set_identity(ident(hostname="Nope"), timeout=10)
    finally:
        await c.close()
        stop.set()


async def test_an_agent_without_identity_is_a_clear_error(root: Path) -> None:
    """An older agent answers an unknown frame type with an error frame for the id."""

    async def old_agent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while line := await r.readline():
            if line.startswith(b"{"):
                msg = json.loads(line)
                w.write(
                    b"\n"
                    + json.dumps(
                        {"t": "error", "id": msg["id"], "error": "unknown frame type 'identity'"}
                    ).encode()
                    + b"\n"
                )
                await w.drain()

    sock = root / "old.sock"
    server = await asyncio.start_unix_server(old_agent, str(sock))
    c = AgentClient(UnixTransport(sock), name="f1")
    try:
        with pytest.raises(AgentProtocolError, match="unknown frame type 'identity'"):
            await c.set_identity(ident(), timeout=5)
    finally:
        await c.close()
        server.close()
