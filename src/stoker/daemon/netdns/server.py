"""An in-process authoritative DNS server for `NAME.vm`, over UDP and TCP.

It answers A records from an in-memory table, NXDOMAIN for unknown names in the zone and
REFUSED for everything else: it never recurses and never forwards, so it cannot be used
to reach any other resolver. Packets are size-bounded and malformed ones are answered with
FORMERR (or dropped when not even the header is readable).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import struct
from typing import cast

from dnslib import CLASS, OPCODE, QTYPE, RCODE, RR, A, DNSError, DNSHeader, DNSRecord

from stoker.errors import InvalidArgument

ZONE = "vm"
DEFAULT_TTL = 5
MAX_QUERY = 4096  # bytes; a DNS query for one name is far smaller
MAX_UDP_REPLY = 512  # classic DNS limit without EDNS
HEADER_LEN = 12
CLASS_ANY = 255  # dnslib names it "*"
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        reply = self.server.handle(data, max_reply=MAX_UDP_REPLY)
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
    ) -> None:
        self.log = logger
        self.zone = zone.strip(".").lower()
        self.ttl = ttl
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_clients = max_tcp_clients
        self._records: dict[str, str] = {}
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

    def records(self) -> dict[str, str]:
        """A copy of the table: label -> address."""
        return dict(self._records)

    # --- protocol -----------------------------------------------------------------------

    def _error(self, data: bytes, rcode: int) -> bytes:
        (qid,) = struct.unpack("!H", data[:2])
        opcode = (data[2] >> 3) & 0xF
        out: bytes = DNSRecord(DNSHeader(id=qid, qr=1, opcode=opcode, rcode=rcode, ra=0)).pack()
        return out

    def handle(self, data: bytes, max_reply: int = 65535) -> bytes | None:
        """Answer one query packet; None means send nothing."""
        if len(data) < HEADER_LEN or len(data) > MAX_QUERY:
            return None
        if data[2] & 0x80:
            return None  # a response, not a query: never answer those (no reflection loops)
        try:
            return self._answer(data, max_reply)
        except DNSError:
            return self._error(data, RCODE.FORMERR)
        except Exception as e:
            # Untrusted bytes into a third-party parser: whatever it raises, the server
            # must keep serving everyone else.
            self.log.debug("dns: unparseable query (%s: %s)", type(e).__name__, e)
            return self._error(data, RCODE.FORMERR)

    def _answer(self, data: bytes, max_reply: int) -> bytes:
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
        if not in_zone or q.qclass not in (CLASS.IN, CLASS_ANY):
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
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

    # --- transport ----------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_clients) >= self.max_tcp_clients:
            writer.close()
            return
        self._tcp_clients.add(writer)
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle_timeout)
                (n,) = struct.unpack("!H", head)
                if n < HEADER_LEN or n > MAX_QUERY:
                    return
                data = await asyncio.wait_for(reader.readexactly(n), self.tcp_idle_timeout)
                reply = self.handle(data)
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await asyncio.wait_for(writer.drain(), self.tcp_idle_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._tcp_clients.discard(writer)
            writer.close()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (UDP and TCP; port 0 picks a free one). Returns the address.

        Raises OSError (e.g. EADDRINUSE) when the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        attempts = 5 if port == 0 else 1
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UDP(self), local_addr=(host, port)
            )
            bound = int(udp.get_extra_info("sockname")[1])
            try:
                tcp = await asyncio.start_server(
                    self._tcp_client, host, bound, reuse_address=True, limit=MAX_QUERY + 2
                )
            except OSError as e:
                udp.close()
                # With an ephemeral UDP port the same TCP port may be taken: try another.
                if e.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            self._udp, self._tcp = udp, tcp
            self.address = (host, bound)
            self.log.info("DNS for .%s listening on %s:%d (udp+tcp)", self.zone, host, bound)
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
