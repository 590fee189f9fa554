"""netdns.server: NAME.vm answers, NXDOMAIN, REFUSED, malformed input, UDP and TCP."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from stoker.daemon.netdns.server import DNSServer
from stoker.errors import InvalidArgument

pytestmark = pytest.mark.unit

LOG = logging.getLogger("test.dns")


def ask(server: DNSServer, name: str, qtype: str = "A") -> DNSRecord:
    out = server.handle(DNSRecord.question(name, qtype).pack())
    assert out is not None
    return DNSRecord.parse(out)


def test_answers_a_record_for_published_name() -> None:
    s = DNSServer(LOG)
    s.set("web", "172.30.0.2")
    r = ask(s, "web.vm")
    assert r.header.rcode == RCODE.NOERROR
    assert r.header.aa == 1 and r.header.ra == 0
    assert [(str(a.rname), a.rtype, str(a.rdata)) for a in r.rr] == [
        ("web.vm.", QTYPE.A, "172.30.0.2")
    ]
    # case-insensitive, and set() accepts the full name too
    s.set("API.vm.", "172.30.0.9")
    assert str(ask(s, "Api.VM").rr[0].rdata) == "172.30.0.9"


def test_unknown_vm_name_is_nxdomain_and_remove_makes_it_unknown() -> None:
    s = DNSServer(LOG)
    assert ask(s, "ghost.vm").header.rcode == RCODE.NXDOMAIN
    s.set("web", "172.30.0.2")
    s.remove("web")
    s.remove("web")  # idempotent
    r = ask(s, "web.vm")
    assert r.header.rcode == RCODE.NXDOMAIN and not r.rr
    assert ask(s, "a.web.vm").header.rcode == RCODE.NXDOMAIN


def test_other_types_on_known_name_are_nodata() -> None:
    s = DNSServer(LOG)
    s.set("web", "172.30.0.2")
    r = ask(s, "web.vm", "AAAA")
    assert r.header.rcode == RCODE.NOERROR and not r.rr


def test_names_outside_the_zone_are_refused_never_recursed() -> None:
    s = DNSServer(LOG)
    s.set("web", "172.30.0.2")
    for name in ("example.com", "web.vm.example.com", "vmx", "localhost"):
        r = ask(s, name)
        assert r.header.rcode == RCODE.REFUSED, name
        assert not r.rr and r.header.ra == 0


def test_malformed_packets() -> None:
    s = DNSServer(LOG)
    assert s.handle(b"") is None
    assert s.handle(b"\x12\x34garbage") is None  # shorter than a header: nothing to answer
    bad = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\xff" * 40
    out = s.handle(bad)
    assert out is not None
    r = DNSRecord.parse(out)
    assert r.header.id == 0x1234 and r.header.rcode == RCODE.FORMERR
    # responses (QR set) are never answered, so two servers cannot ping-pong
    resp = DNSRecord.question("web.vm").reply().pack()
    assert s.handle(resp) is None
    assert s.handle(b"\x00" * 5000) is None  # oversized


def test_two_questions_are_formerr() -> None:
    s = DNSServer(LOG)
    q = DNSRecord.question("a.vm")
    q.add_question(DNSRecord.question("b.vm").q)
    out = s.handle(q.pack())
    assert out is not None and DNSRecord.parse(out).header.rcode == RCODE.FORMERR


def test_set_validates_inputs() -> None:
    s = DNSServer(LOG)
    with pytest.raises(InvalidArgument):
        s.set("web", "not-an-ip")
    with pytest.raises(InvalidArgument):
        s.set("bad name", "172.30.0.2")
    with pytest.raises(InvalidArgument):
        s.set("web", "::1")
    assert s.records() == {}


@pytest.fixture
async def server() -> AsyncIterator[DNSServer]:
    s = DNSServer(LOG, tcp_idle_timeout=2.0)
    await s.start("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.close()


def _port(s: DNSServer) -> int:
    assert s.address is not None
    return s.address[1]


async def query(s: DNSServer, name: str, tcp: bool = False) -> DNSRecord:
    q = DNSRecord.question(name)
    raw = await asyncio.to_thread(q.send, "127.0.0.1", _port(s), tcp=tcp, timeout=3)
    return DNSRecord.parse(raw)


async def test_udp_and_tcp_queries(server: DNSServer) -> None:
    server.set("web", "172.30.0.2")
    for tcp in (False, True):
        r = await query(server, "web.vm", tcp=tcp)
        assert str(r.rr[0].rdata) == "172.30.0.2"
        assert (await query(server, "example.org", tcp=tcp)).header.rcode == RCODE.REFUSED
    server.remove("web")
    assert (await query(server, "web.vm")).header.rcode == RCODE.NXDOMAIN


async def test_garbage_does_not_stop_the_server(server: DNSServer) -> None:
    server.set("web", "172.30.0.2")
    port = _port(server)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        for junk in (b"", b"\x01", b"\xff" * 12, b"\x00\x01" + b"\xff" * 600, b"\x00" * 9000):
            u.sendto(junk, ("127.0.0.1", port))
    # TCP: a bogus length prefix, then a half-sent message: both just close the connection
    for junk in (struct.pack("!H", 65535) + b"x", struct.pack("!H", 40) + b"abc"):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(junk)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.05)
    assert str((await query(server, "web.vm")).rr[0].rdata) == "172.30.0.2"
    assert str((await query(server, "web.vm", tcp=True)).rr[0].rdata) == "172.30.0.2"


async def test_busy_port_raises_and_close_frees_it() -> None:
    a = DNSServer(LOG)
    host, port = await a.start("127.0.0.1", 0)
    b = DNSServer(LOG)
    with pytest.raises(OSError):
        await b.start(host, port)
    await a.close()
    await b.start(host, port)  # free again after close
    assert b.address == (host, port)
    await b.close()
