"""Resolving the DNS names of `--net allow=` (A records with their TTL).

The daemon resolves an allowed name itself, puts the addresses into the VM's nftables
rules and answers the guest's queries for that name from the same result, so the guest
only ever connects to addresses the rules admit. The resolver is a seam: the daemon uses
the host's nameservers from /etc/resolv.conf; tests pass nameservers they run themselves.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dnslib import QTYPE, RCODE, DNSRecord

from stoker.errors import InvalidArgument

RESOLV_CONF = Path("/etc/resolv.conf")
MAX_CNAME = 8


class ResolveFailed(InvalidArgument):
    """A name of `allow=` does not resolve (to IPv4)."""


@dataclass(frozen=True)
class Resolved:
    addrs: tuple[str, ...]
    ttl: int


class NameResolver(Protocol):
    async def resolve(self, name: str) -> Resolved:
        """IPv4 addresses of `name` and the TTL of the answer; ResolveFailed if none."""
        ...


def nameservers_from(path: Path = RESOLV_CONF) -> list[tuple[str, int]]:
    """`nameserver` lines of a resolv.conf as (address, 53)."""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append((str(ipaddress.ip_address(parts[1].split("%")[0])), 53))
            except ValueError:
                continue
    return out


class DNSResolver:
    """Asks the given nameservers (recursive resolvers) for A records, in order."""

    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        *,
        resolv_conf: Path = RESOLV_CONF,
        timeout: float = 2.0,
    ) -> None:
        self._fixed = nameservers
        self.resolv_conf = resolv_conf
        self.timeout = timeout

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        return list(self._fixed) if self._fixed is not None else nameservers_from(self.resolv_conf)

    async def resolve(self, name: str) -> Resolved:
        servers = self.nameservers
        if not servers:
            raise ResolveFailed(
                f"cannot resolve {name}: no nameserver in {self.resolv_conf}; use an address "
                "or CIDR in allow= instead"
            )
        errors = []
        for host, port in servers:
            try:
                raw = await asyncio.to_thread(
                    DNSRecord.question(name, "A").send, host, port, timeout=self.timeout
                )
                reply = DNSRecord.parse(raw)
            except Exception as e:  # timeouts, refused sockets, garbage replies
                errors.append(f"{host}:{port}: {type(e).__name__}: {e}".rstrip(": "))
                continue
            rcode = reply.header.rcode
            if rcode == RCODE.NXDOMAIN:
                raise ResolveFailed(f"{name} does not exist (NXDOMAIN from {host}:{port})")
            if rcode != RCODE.NOERROR:
                errors.append(f"{host}:{port}: {RCODE.get(rcode)}")
                continue
            return _from_answer(name, reply, f"{host}:{port}")
        raise ResolveFailed(f"cannot resolve {name}: " + "; ".join(errors))


def _from_answer(name: str, reply: DNSRecord, server: str) -> Resolved:
    """Follow the CNAME chain of `name` inside the answer section; collect its A records."""
    want = name.rstrip(".").lower()
    addrs: list[str] = []
    ttls: list[int] = []
    for _ in range(MAX_CNAME):
        step = [rr for rr in reply.rr if str(rr.rname).rstrip(".").lower() == want]
        a = [rr for rr in step if rr.rtype == QTYPE.A]
        if a:
            addrs = [str(rr.rdata) for rr in a]
            ttls += [int(rr.ttl) for rr in a]
            break
        cname = [rr for rr in step if rr.rtype == QTYPE.CNAME]
        if not cname:
            break
        ttls.append(int(cname[0].ttl))
        want = str(cname[0].rdata).rstrip(".").lower()
    if not addrs:
        raise ResolveFailed(f"{name} has no IPv4 address (answer from {server})")
    return Resolved(tuple(sorted(set(addrs), key=ipaddress.IPv4Address)), min(ttls))
