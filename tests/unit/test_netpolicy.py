"""Network policy without root: `--net` parsing, destination checks, the guest DNS views,
the allowed-name resolver, the store migration, and the CLI's --net flags."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from dnslib import CNAME as CNAMErd
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from stoker.daemon.hostnet.policy import NetPolicy, check_destination, parse_policy
from stoker.daemon.hostnet.resolve import (
    DNSResolver,
    ResolveFailed,
    _from_answer,
    nameservers_from,
)
from stoker.daemon.netdns.server import ClientView, DNSServer
from stoker.errors import InvalidArgument

pytestmark = pytest.mark.unit

LOG = logging.getLogger("test.netpolicy")


# --- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        (None, "host-only"),
        ("", "host-only"),
        ("host-only", "host-only"),
        ("none", "none"),
        ("NAT", "nat"),
        ("peers", "host-only,peers"),
        ("host-only,peers", "host-only,peers"),
        ("nat,peers=build-1", "nat,peers=build-1"),
        ("allow=pypi.org:443", "allow=pypi.org:443"),
        ("allow=PyPI.org.:443,10.0.5.0/24,1.2.3.4:80", "allow=pypi.org:443,10.0.5.0/24,1.2.3.4:80"),
        ("allow=a.example,b.example:22,peers", "allow=a.example,b.example:22,peers"),
        ("allow=a.example,allow=b.example", "allow=a.example,b.example"),
        ("allow=a.example,a.example", "allow=a.example"),
    ],
)
def test_policies_parse_to_a_canonical_form(text: str | None, canonical: str) -> None:
    p = parse_policy(text)
    assert str(p) == canonical
    assert parse_policy(str(p)) == p  # the stored form reads back the same


def test_nat_alias_and_its_conflicts() -> None:
    assert parse_policy(None, nat=True) == NetPolicy("nat")
    assert parse_policy("nat,peers", nat=True) == NetPolicy("nat", peers="default")
    with pytest.raises(InvalidArgument, match="--nat means --net nat"):
        parse_policy("host-only", nat=True)


def test_names_and_networks_of_allow() -> None:
    p = parse_policy("allow=a.example:443,10.0.0.0/8,a.example:80,1.2.3.4")
    assert p.names == ("a.example",)
    nets = [e.network for e in p.allow]
    assert nets[1] == ipaddress.IPv4Network("10.0.0.0/8")
    assert nets[3] == ipaddress.IPv4Network("1.2.3.4/32")
    assert p.outbound and NetPolicy("nat").outbound and not NetPolicy().outbound


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("allow=api.example:0", "port 0 in 'api.example:0' is out of range: use 1-65535"),
        ("allow=api.example:65536", "port 65536 in 'api.example:65536' is out of range"),
        ("allow=api.example:https", "port 'https' in 'api.example:https' is not a number"),
        ("allow=", "an allow= entry is empty"),
        ("allow=a.example,,b.example", "empty part between commas"),
        ("allow=10.0.0.1/24", "is not an IPv4 address or CIDR"),
        ("allow=999.1.1.1", "is not an IPv4 address or CIDR"),
        ("allow=bad_name!", "is not a DNS name, an IPv4 address or a CIDR"),
        ("allow=[::1]:80", "not HOST[:PORT]"),
        ("allow=web.vm", "guest-to-guest traffic is opened with ,peers"),
        ("open", "unknown part 'open'"),
        ("host-only,api.example", "unknown part 'api.example'"),
        ("nat,none", "nat and none cannot be combined"),
        ("nat,allow=a.example", "nat and allow= cannot be combined"),
        ("none,peers", "none means no traffic at all"),
        ("peers=Bad_Group", "peer group 'bad_group' must be 1-24 of [a-z0-9-]"),
        ("peers=a,peers=b", "one peer group only"),
    ],
)
def test_bad_policies_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_policy(text)
    assert e.value.message.startswith(f"--net {text!r}: ")
    assert why in e.value.message


BRIDGE = ipaddress.IPv4Network("172.30.0.0/24")
GW = ipaddress.IPv4Address("172.30.0.1")
HOST = {ipaddress.IPv4Address(a) for a in ("10.1.2.3", "172.30.0.1", "127.0.0.1")}


def _check(net: str, port: int | None = None) -> bool:
    return check_destination(
        ipaddress.IPv4Network(net),
        port,
        what=f"allow={net}",
        host_addrs=HOST,
        bridge=BRIDGE,
        gateway=GW,
    )


def test_destinations_outside_are_fine_and_the_bridge_address_needs_a_port() -> None:
    assert _check("93.184.216.0/24") is False
    assert _check("10.1.2.4/32", 443) is False  # a neighbour of the host, not the host
    assert _check("172.30.0.1/32", 8000) is True  # a host service on the bridge address
    with pytest.raises(InvalidArgument, match="without a port"):
        _check("172.30.0.1/32")


@pytest.mark.parametrize(
    ("net", "why"),
    [
        ("10.0.0.0/8", "covers this host's own address 10.1.2.3"),
        ("0.0.0.0/0", "covers stoker's guest network"),
        ("172.30.0.5/32", "covers stoker's guest network"),
        ("127.0.0.0/8", "loopback"),
        ("224.0.0.0/8", "not a unicast destination"),
    ],
)
def test_destinations_covering_the_host_or_guests_are_refused(net: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why.replace(".", r"\.")):
        _check(net, 80)


# --- guest DNS views --------------------------------------------------------------------


def _ask(s: DNSServer, name: str, client: str | None) -> DNSRecord:
    out = s.handle(DNSRecord.question(name).pack(), client=client)
    assert out is not None
    return DNSRecord.parse(out)


def test_guest_views_answer_only_each_guests_allowed_names() -> None:
    host = DNSServer(LOG)
    guest = DNSServer(LOG, records=host.records_table, guest_facing=True)
    host.set("web", "172.30.0.9")
    exp = time.monotonic() + 30
    guest.set_client("172.30.0.2", ClientView(names={"api.example": (("192.0.2.7",), exp)}))
    guest.set_client("172.30.0.3", ClientView(fallthrough=True))  # a nat guest

    r = _ask(guest, "api.example", "172.30.0.2")
    assert r.header.rcode == RCODE.NOERROR and [str(a.rdata) for a in r.rr] == ["192.0.2.7"]
    assert 28 <= r.rr[0].ttl <= 30  # what is left of the resolved TTL
    assert _ask(guest, "other.example", "172.30.0.2").header.rcode == RCODE.NXDOMAIN
    assert _ask(guest, "api.example", "172.30.0.3").header.rcode == RCODE.REFUSED
    assert _ask(guest, "api.example", "172.30.0.4").header.rcode == RCODE.REFUSED  # unknown
    assert str(_ask(guest, "web.vm", "172.30.0.2").rr[0].rdata) == "172.30.0.9"  # shared
    # the host-facing server never uses views, even for a guest's address
    host.set_client("172.30.0.2", guest.client("172.30.0.2") or ClientView())
    assert _ask(host, "api.example", "172.30.0.2").header.rcode == RCODE.REFUSED
    guest.clear_client("172.30.0.2")
    guest.clear_client("172.30.0.2")
    assert _ask(guest, "api.example", "172.30.0.2").header.rcode == RCODE.REFUSED


# --- resolver ---------------------------------------------------------------------------


def test_answers_follow_cname_chains_and_take_the_smallest_ttl() -> None:
    q = DNSRecord.question("www.example")
    reply = q.reply()
    reply.add_answer(RR("www.example", QTYPE.CNAME, rdata=CNAMErd("edge.cdn.example"), ttl=300))
    reply.add_answer(RR("edge.cdn.example", QTYPE.A, rdata=A("192.0.2.20"), ttl=20))
    reply.add_answer(RR("edge.cdn.example", QTYPE.A, rdata=A("192.0.2.3"), ttl=60))
    reply.add_answer(RR("unrelated.example", QTYPE.A, rdata=A("192.0.2.99"), ttl=1))
    r = _from_answer("WWW.example.", DNSRecord.parse(reply.pack()), "test")
    assert r.addrs == ("192.0.2.3", "192.0.2.20") and r.ttl == 20
    empty = q.reply()
    with pytest.raises(ResolveFailed, match="has no IPv4 address"):
        _from_answer("www.example", empty, "test")


async def test_dns_resolver_against_a_server_the_test_runs() -> None:
    upstream = DNSServer(LOG, zone="test", ttl=42)
    await upstream.start("127.0.0.1", 0)
    try:
        assert upstream.address is not None
        upstream.set("api", "192.0.2.5")
        res = DNSResolver([upstream.address], timeout=1.0)
        r = await res.resolve("api.test")
        assert r.addrs == ("192.0.2.5",) and r.ttl == 42
        with pytest.raises(ResolveFailed, match=r"ghost\.test does not exist \(NXDOMAIN"):
            await res.resolve("ghost.test")
        with pytest.raises(ResolveFailed, match=r"cannot resolve example\.org: .*REFUSED"):
            await res.resolve("example.org")
    finally:
        await upstream.close()


async def test_resolver_without_nameservers_says_what_to_do(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# nothing\nsearch example\nnameserver not-an-ip\n")
    assert nameservers_from(conf) == []
    with pytest.raises(ResolveFailed, match=r"no nameserver in .*use an address or CIDR"):
        await DNSResolver(resolv_conf=conf).resolve("api.example")
    conf.write_text("nameserver 192.0.2.53\nnameserver fe80::1%eth0\n")
    assert nameservers_from(conf) == [("192.0.2.53", 53), ("fe80::1", 53)]


async def test_resolver_timeout_is_an_error_not_a_hang() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        res = DNSResolver([silent.getsockname()], timeout=0.2)
        t0 = time.monotonic()
        with pytest.raises(ResolveFailed, match=r"cannot resolve api\.example: 127\.0\.0\.1"):
            await asyncio.wait_for(res.resolve("api.example"), 5)
        assert time.monotonic() - t0 < 3


# --- store ------------------------------------------------------------------------------


def test_migration_gives_old_vms_a_policy_that_keeps_their_nat(tmp_path: Path) -> None:
    from stoker.store import Store
    from stoker.store.migrations import MIGRATIONS

    mine = next(i for i, m in enumerate(MIGRATIONS) if "'$.net'" in m)
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
    for v, script in enumerate(MIGRATIONS[:mine], start=1):
        conn.executescript(script)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 'before')", (v,))
    conn.execute(
        "INSERT INTO images(name, managed, rootfs, source, size, created_at) "
        "VALUES ('img', 1, '/r', 't', 1, 'now')"
    )
    for name, ip, nat in (("old-nat", "172.30.0.2", True), ("old-plain", "172.30.0.3", False)):
        spec = {"vcpu": 1, "memory_mib": 256, "disk_size": 1, "overlay_size": 1, "nat": nat}
        conn.execute(
            "INSERT INTO vms(id, name, state, image, spec, guest_ip, dns_name, vm_dir, "
            "created_at, updated_at) VALUES (?, ?, 'stopped', 'img', ?, ?, ?, '/x', 'n', 'n')",
            (name, name, json.dumps(spec), ip, f"{name}.vm"),
        )
    conn.close()
    s = Store(db)
    try:
        got = {v.name: (v.spec.net, v.spec.nat) for v in s.list_vms()}
    finally:
        s.close()
    assert got == {"old-nat": ("nat", True), "old-plain": ("host-only", False)}


# --- CLI --------------------------------------------------------------------------------


def _insert(td: Any) -> None:
    from stoker.model.records import Image, VMRecord, VMSpec, VMState
    from stoker.store.db import now

    store = td.daemon.store
    store.upsert_image(Image("img", True, "/r", None, None, "test", 5 << 30, now()))
    store.insert_vm(
        VMRecord(
            id="web0123456789abcdef",
            name="web",
            state=VMState.STOPPED,
            image="img",
            spec=VMSpec(2, 2048, 8 << 30, 8 << 30),
            guest_ip="172.30.0.2",
            dns_name="web.vm",
            vm_dir="/nonexistent/web",
            created_at=now(),
            updated_at=now(),
        )
    )


def test_cli_net_flags(
    threaded_daemon: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stoker.cli.main import build_parser, main

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    args = build_parser("vm", "create").parse_args(["vm", "create", "--net", "nat,peers"])
    from stoker.cli.vm import sizing_params

    assert sizing_params(args)["net"] == "nat,peers" and sizing_params(args)["nat"] is False
    args = build_parser("vm", "run").parse_args(["vm", "run", "--nat"])
    assert sizing_params(args)["nat"] is True and sizing_params(args)["net"] is None

    _insert(threaded_daemon)
    rc, out, _ = run("vm", "show", "web")
    assert rc == 0 and "net:        host-only" in out
    rc, out, err = run("vm", "set", "web", "--net", "allow=api.example:70000")
    assert rc == 1 and out == ""
    assert "port 70000 in 'api.example:70000' is out of range: use 1-65535" in err
    rc, out, err = run("vm", "set", "web", "--net", "none")
    assert rc == 0, err
    assert "web: net none (applies at next start)" in out
    rc, out, _ = run("vm", "show", "web", "--json")
    assert json.loads(out)["spec"]["net"] == "none"
    with pytest.raises(SystemExit) as e:
        run("vm", "set", "web")
    assert e.value.code == 2  # a usage error: nothing to change


def test_doctor_reports_network_policy(
    threaded_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from stoker.cli.main import main

    main(["doctor", "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert "default host-only" in checks["network-policy"]["message"]
    assert "inet/bridge 'stoker'" in checks["network-policy"]["message"]
    gd = checks["guest-dns"]
    assert gd["status"] == "PASS" and "starts with the bridge" in gd["message"]
