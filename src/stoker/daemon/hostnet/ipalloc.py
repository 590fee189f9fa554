"""Deterministic guest address allocation inside the bridge CIDR."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from stoker.errors import InvalidArgument, Unavailable


def _network(cidr: str | ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    if isinstance(cidr, ipaddress.IPv4Network):
        return cidr
    try:
        return ipaddress.IPv4Network(cidr, strict=False)
    except ValueError as e:
        raise InvalidArgument(f"{cidr!r} is not an IPv4 CIDR: {e}") from None


def gateway_for(cidr: str | ipaddress.IPv4Network) -> str:
    """The bridge's own address: the first host address of the CIDR."""
    net = _network(cidr)
    return str(next(net.hosts()))


def allocate_ip(
    cidr: str | ipaddress.IPv4Network,
    used: Iterable[str],
    gateway: str | None = None,
) -> str:
    """Lowest free host address in `cidr`.

    The network and broadcast addresses, the gateway (default: the first host address)
    and every address in `used` are skipped. The same inputs always give the same answer,
    so a retry after a crash picks the same address again.
    """
    net = _network(cidr)
    gw = ipaddress.IPv4Address(gateway) if gateway is not None else next(net.hosts())
    taken: set[ipaddress.IPv4Address] = {gw}
    for u in used:
        try:
            taken.add(ipaddress.IPv4Address(u))
        except ValueError:
            # A malformed record must not block allocation; it cannot collide either.
            continue
    for host in net.hosts():
        if host in (net.network_address, net.broadcast_address):
            continue  # /31 and /32 "hosts" include them; guests must never get these
        if host not in taken:
            return str(host)
    raise Unavailable(
        f"no free guest address left in {net}: delete unused VMs or widen bridge_cidr in the config"
    )
