"""An in-process authoritative DNS server for `NAME.vm`, over UDP and TCP.

It answers A records from an in-memory table, NXDOMAIN for unknown names in the zone and
REFUSED for everything else: it never recurses and never forwards, so it cannot be used
to reach any other resolver. Packets are size-bounded and malformed ones are answered with
FORMERR (or dropped when not even the header is readable).

The guest-facing instance (on the bridge address, port 53) also keeps a per-guest view,
keyed by the guest's source address (which the bridge's anti-spoofing rules vouch for): a
guest with `--net allow=NAME` gets NAME answered with the addresses the daemon resolved
and put into its nftables rules, and NXDOMAIN for any other name outside `.vm`; a `nat`
guest gets REFUSED, so its resolver moves on to the next nameserver in its resolv.conf.
The server itself still never sends a query anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from dnslib import (
    CLASS,
    OPCODE,
    QTYPE,
    RCODE,
    RR,
    A,
    DNSError,
    DNSHeader,
    DNSQuestion,
    DNSRecord,
)

from stoker.daemon.netdns.netns import bind_udp_tcp
from stoker.errors import InvalidArgument

ZONE = "vm"
# (host, port, netns) -> a bound UDP socket and a listening TCP socket on host:port
Binder = Callable[[str, int, str | None], Awaitable[tuple[socket.socket, socket.socket]]]
DEFAULT_TTL = 5
MAX_QUERY = 4096  # bytes; a DNS query for one name is far smaller
MAX_UDP_REPLY = 512  # classic DNS limit without EDNS
HEADER_LEN = 12
CLASS_ANY = 255  # dnslib names it "*"
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass
class ClientView:
    """What one guest may resolve beyond `.vm`: name -> (addresses, monotonic expiry)."""

    names: dict[str, tuple[tuple[str, ...], float]] = field(default_factory=dict)
    fallthrough: bool = False  # REFUSED (try the next nameserver) rather than NXDOMAIN


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        client = addr[0] if isinstance(addr[0], str) else None
        reply = self.server.handle(data, max_reply=MAX_UDP_REPLY, client=client)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        self.server.log.debug("dns udp error: %s", exc)


class DNSServer:
    """Serves `NAME.<zone>` A records from `set`/`remove` on one address (UDP + TCP)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        zone: str = ZONE,
        ttl: int = DEFAULT_TTL,
        tcp_idle_timeout: float = 10.0,
        max_tcp_clients: int = 64,
        records: dict[str, str] | None = None,
        guest_facing: bool = False,
    ) -> None:
        self.log = logger
        self.zone = zone.strip(".").lower()
        self.ttl = ttl
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_clients = max_tcp_clients
        # `records` shares one table between the host- and the guest-facing instance.
        self._records: dict[str, str] = records if records is not None else {}
        self.guest_facing = guest_facing
        self._clients: dict[str, ClientView] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] | None = None

    # --- records ----------------------------------------------------------------------

    def _label(self, name: str) -> str:
        n = name.strip().rstrip(".").lower()
        suffix = "." + self.zone
        if n.endswith(suffix):
            n = n[: -len(suffix)]
        if not _LABEL.match(n):
            raise InvalidArgument(f"{name!r} cannot be published as a .{self.zone} name")
        return n

    def set(self, name: str, ip: str) -> None:
        """Publish `name.<zone>` -> `ip` (replacing any previous address)."""
        try:
            addr = str(ipaddress.IPv4Address(ip))
        except ValueError:
            raise InvalidArgument(f"{ip!r} is not an IPv4 address") from None
        self._records[self._label(name)] = addr

    def remove(self, name: str) -> None:
        """Stop answering for `name.<zone>`. Idempotent."""
        self._records.pop(self._label(name), None)

    @property
    def records_table(self) -> dict[str, str]:
        """The live table itself (for another instance to share)."""
        return self._records

    def records(self) -> dict[str, str]:
        """A copy of the table: label -> address."""
        return dict(self._records)

    def set_client(self, client_ip: str, view: ClientView) -> None:
        """Set what the guest at `client_ip` may resolve outside the zone."""
        self._clients[str(ipaddress.IPv4Address(client_ip))] = view

    def clear_client(self, client_ip: str) -> None:
        """Forget a guest's view. Idempotent."""
        self._clients.pop(client_ip, None)

    def client(self, client_ip: str) -> ClientView | None:
        return self._clients.get(client_ip)

    # --- protocol -----------------------------------------------------------------------

    def _error(self, data: bytes, rcode: int) -> bytes:
        (qid,) = struct.unpack("!H", data[:2])
        opcode = (data[2] >> 3) & 0xF
        out: bytes = DNSRecord(DNSHeader(id=qid, qr=1, opcode=opcode, rcode=rcode, ra=0)).pack()
        return out

    def handle(
        self, data: bytes, max_reply: int = 65535, client: str | None = None
    ) -> bytes | None:
        """Answer one query packet from `client` (its IP); None means send nothing."""
        if len(data) < HEADER_LEN or len(data) > MAX_QUERY:
            return None
        if data[2] & 0x80:
            return None  # a response, not a query: never answer those (no reflection loops)
        try:
            return self._answer(data, max_reply, client)
        except DNSError:
            return self._error(data, RCODE.FORMERR)
        except Exception as e:
            # Untrusted bytes into a third-party parser: whatever it raises, the server
            # must keep serving everyone else.
            self.log.debug("dns: unparseable query (%s: %s)", type(e).__name__, e)
            return self._error(data, RCODE.FORMERR)

    def _answer(self, data: bytes, max_reply: int, client: str | None) -> bytes:
        req = DNSRecord.parse(data)
        if req.header.opcode != OPCODE.QUERY:
            return self._error(data, RCODE.NOTIMP)
        if len(req.questions) != 1:
            return self._error(data, RCODE.FORMERR)
        q = req.questions[0]
        reply = req.reply(ra=0, aa=1)
        reply.ar = []  # no EDNS echo: answers are tiny
        qname = str(q.qname).rstrip(".").lower()
        in_zone = qname == self.zone or qname.endswith("." + self.zone)
        if q.qclass not in (CLASS.IN, CLASS_ANY):
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
        elif not in_zone:
            self._outside(reply, q, qname, client)
        elif qname != self.zone:
            ip = self._records.get(qname[: -len(self.zone) - 1])
            if ip is None:
                reply.header.rcode = RCODE.NXDOMAIN
            elif q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(ip), ttl=self.ttl))
            # other types on a known name: NOERROR with no answer (NODATA)
        out: bytes = reply.pack()
        if len(out) > max_reply:
            reply.rr = []
            reply.header.tc = 1
            out = reply.pack()
        return out

    def _outside(self, reply: DNSRecord, q: DNSQuestion, qname: str, client: str | None) -> None:
        """A name outside the zone: only a guest's allowed names are answered."""
        view = self._clients.get(client) if client is not None and self.guest_facing else None
        hit = view.names.get(qname) if view is not None else None
        if view is None or (hit is None and view.fallthrough):
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
            return
        if hit is None:
            reply.header.rcode = RCODE.NXDOMAIN  # not allowed: no other server is asked
            return
        addrs, expires = hit
        ttl = max(1, int(expires - time.monotonic()))
        if q.qtype in (QTYPE.A, QTYPE.ANY):
            for ip in addrs:
                reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(ip), ttl=ttl))

    # --- transport ----------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_clients) >= self.max_tcp_clients:
            writer.close()
            return
        self._tcp_clients.add(writer)
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else None
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle_timeout)
                (n,) = struct.unpack("!H", head)
                if n < HEADER_LEN or n > MAX_QUERY:
                    return
                data = await asyncio.wait_for(reader.readexactly(n), self.tcp_idle_timeout)
                reply = self.handle(data, client=peer)
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await asyncio.wait_for(writer.drain(), self.tcp_idle_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._tcp_clients.discard(writer)
            writer.close()

    async def start(
        self, host: str, port: int, *, netns: str | None = None, binder: Binder | None = None
    ) -> tuple[str, int]:
        """Listen on host:port (UDP and TCP; port 0 picks a free one). Returns the address.

        `netns` binds inside that named network namespace (tests). `binder` makes the two
        sockets instead (a non-root daemon gets port 53 bound by stoker-helper). Raises
        OSError (e.g. EADDRINUSE, EADDRNOTAVAIL) when the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        attempts = 5 if port == 0 else 1
        for attempt in range(attempts):
            try:
                usock, tsock = await (binder or bind_udp_tcp)(host, port, netns)
            except OSError as e:
                # With an ephemeral UDP port the same TCP port may be taken: try another.
                if e.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            udp, _ = await loop.create_datagram_endpoint(lambda: _UDP(self), sock=usock)
            tcp = await asyncio.start_server(self._tcp_client, sock=tsock, limit=MAX_QUERY + 2)
            bound = int(usock.getsockname()[1])
            self._udp, self._tcp = udp, tcp
            self.address = (host, bound)
            where = f" in netns {netns}" if netns else ""
            self.log.info(
                "DNS for .%s listening on %s:%d%s (udp+tcp)", self.zone, host, bound, where
            )
            return self.address
        raise OSError(errno.EADDRINUSE, f"no free port for DNS on {host}")  # pragma: no cover

    async def close(self) -> None:
        """Stop listening and drop open TCP clients. Records are kept."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for w in list(self._tcp_clients):
                w.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tcp.wait_closed(), 5.0)
            self._tcp = None
        self.address = None
