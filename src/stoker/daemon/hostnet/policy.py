"""Per-VM network policy: the `--net` syntax, its canonical form, and destination checks.

    --net none | host-only | nat | allow=HOST[:PORT],HOST[:PORT],...   [,peers | ,peers=GROUP]

- `none`: the guest can open no connection at all (not even DNS); only connections the
  host opens to it (stoker's own SSH for exec and workspaces) get replies.
- `host-only` (the default): the guest reaches stoker's DNS on the bridge address (NAME.vm)
  and nothing else.
- `nat`: everything outbound, masqueraded; still only DNS on the host itself.
- `allow=`: only the listed destinations (DNS names, IPv4 addresses or CIDRs, each with an
  optional port); stoker's DNS answers only those names (plus NAME.vm) for this guest.
- `peers` / `peers=GROUP`: guest-to-guest traffic with other VMs in the same group (bare
  `peers` is group `default`); a VM without it cannot be reached by, or reach, other VMs.

Pure functions only (no I/O): parsing happens in the daemon before anything is created,
and the host-address checks take the host's addresses as an argument.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from stoker.errors import InvalidArgument

MODES = ("none", "host-only", "nat", "allow")
DEFAULT_MODE = "host-only"
DEFAULT_GROUP = "default"
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_NOT_UNICAST = (
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv4Network("224.0.0.0/4"),
    ipaddress.IPv4Network("240.0.0.0/4"),
)
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_GROUP = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
_ADDRISH = re.compile(r"^[0-9./]+$")
SYNTAX = (
    "use none, host-only, nat or allow=HOST[:PORT],... optionally followed by ,peers or "
    ",peers=GROUP (e.g. --net allow=pypi.org:443,10.0.5.0/24 or --net host-only,peers)"
)


@dataclass(frozen=True)
class AllowEntry:
    """One `allow=` destination: a DNS name or an IPv4 network, optionally one port."""

    host: str  # lower-case name, or a normalised IPv4 network ("10.0.0.0/24", "1.2.3.4/32")
    port: int | None = None

    @property
    def network(self) -> ipaddress.IPv4Network | None:
        """The destination network, or None when `host` is a DNS name."""
        if _ADDRISH.match(self.host):
            return ipaddress.IPv4Network(self.host)
        return None

    def __str__(self) -> str:
        net = self.network
        h = str(net.network_address) if net is not None and net.prefixlen == 32 else self.host
        return f"{h}:{self.port}" if self.port is not None else h


@dataclass(frozen=True)
class NetPolicy:
    """A VM's network policy (see the module docstring)."""

    mode: str = DEFAULT_MODE
    allow: tuple[AllowEntry, ...] = ()
    peers: str | None = None

    @property
    def outbound(self) -> bool:
        """True when the guest's traffic may leave the host (masqueraded)."""
        return self.mode in ("nat", "allow")

    @property
    def names(self) -> tuple[str, ...]:
        """The DNS names `allow=` lists (in order, no duplicates)."""
        return tuple(dict.fromkeys(e.host for e in self.allow if e.network is None))

    def __str__(self) -> str:
        head = (
            "allow=" + ",".join(str(e) for e in self.allow) if self.mode == "allow" else self.mode
        )
        if self.peers is None:
            return head
        return head + (",peers" if self.peers == DEFAULT_GROUP else f",peers={self.peers}")


def _bad(text: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"--net {text!r}: {why}")


def parse_entry(token: str, text: str) -> AllowEntry:
    """Parse one HOST[:PORT] of `allow=`; `text` is the whole --net value (for messages)."""
    t = token.strip().lower()
    if not t:
        raise _bad(text, "an allow= entry is empty: " + SYNTAX)
    host, port = t, None
    if ":" in t:
        host, _, p = t.rpartition(":")
        if ":" in host or not host:
            raise _bad(text, f"{token!r} is not HOST[:PORT] (IPv6 destinations are not supported)")
        if not p.isdigit():
            raise _bad(text, f"port {p!r} in {token!r} is not a number: use 1-65535")
        port = int(p)
        if not 1 <= port <= 65535:
            raise _bad(text, f"port {port} in {token!r} is out of range: use 1-65535")
    if _ADDRISH.match(host):
        try:
            net = ipaddress.IPv4Network(host, strict=True)
        except ValueError as e:
            raise _bad(text, f"{host!r} is not an IPv4 address or CIDR: {e}") from None
        return AllowEntry(str(net), port)
    name = host.rstrip(".")
    if len(name) > 253 or not all(_LABEL.match(lbl) for lbl in name.split(".")):
        raise _bad(text, f"{host!r} is not a DNS name, an IPv4 address or a CIDR")
    if name == "vm" or name.endswith(".vm"):
        raise _bad(
            text,
            f"{name} is a stoker VM: guest-to-guest traffic is opened with ,peers on both VMs",
        )
    return AllowEntry(name, port)


def parse_policy(text: str | None, *, nat: bool = False) -> NetPolicy:
    """Parse a `--net` value (None: the default, or `nat` when the `--nat` alias is set)."""
    if text is None or not text.strip():
        return NetPolicy("nat" if nat else DEFAULT_MODE)
    mode: str | None = None
    allow: list[AllowEntry] = []
    peers: str | None = None
    for raw in text.split(","):
        tok = raw.strip()
        low = tok.lower()
        if not tok:
            raise _bad(text, "empty part between commas: " + SYNTAX)
        if low == "peers" or low.startswith("peers="):
            group = low.partition("=")[2] if "=" in low else DEFAULT_GROUP
            if not _GROUP.match(group):
                raise _bad(text, f"peer group {group!r} must be 1-24 of [a-z0-9-]")
            if peers is not None and peers != group:
                raise _bad(text, "a VM is in one peer group only")
            peers = group
            continue
        if low.startswith("allow="):
            if mode not in (None, "allow"):
                raise _bad(text, f"{mode} and allow= cannot be combined")
            mode = "allow"
            allow.append(parse_entry(tok[len("allow=") :], text))
            continue
        if low in ("none", "host-only", "nat"):
            if mode is not None and mode != low:
                raise _bad(text, f"{mode} and {low} cannot be combined: pick one")
            mode = low
            continue
        if mode == "allow":
            allow.append(parse_entry(tok, text))
            continue
        raise _bad(text, f"unknown part {tok!r}: {SYNTAX}")
    mode = mode or DEFAULT_MODE
    if nat and mode != "nat":
        raise _bad(text, "--nat means --net nat: drop one of them")
    if mode == "none" and peers is not None:
        raise _bad(text, "none means no traffic at all: it cannot have peers")
    return NetPolicy(mode, tuple(dict.fromkeys(allow)), peers)


def check_destination(
    net: ipaddress.IPv4Network,
    port: int | None,
    *,
    what: str,
    host_addrs: set[ipaddress.IPv4Address],
    bridge: ipaddress.IPv4Network,
    gateway: ipaddress.IPv4Address,
) -> bool:
    """Refuse destinations that would open the host or other guests; True when `net` is
    the bridge address itself (a host service on a named port), False for the outside."""
    if net.num_addresses == 1 and net.network_address == gateway:
        if port is None:
            raise InvalidArgument(
                f"{what} is the bridge address without a port: that would open every host "
                f"service to the guest; name the port ({gateway}:PORT)"
            )
        return True
    if net.overlaps(bridge):
        raise InvalidArgument(
            f"{what} covers stoker's guest network {bridge}: guest-to-guest traffic is "
            "opened with ,peers on both VMs, not with allow="
        )
    if net.overlaps(LOOPBACK):
        raise InvalidArgument(f"{what} covers loopback addresses: that is the host itself")
    for a in sorted(host_addrs):
        if a in net:
            raise InvalidArgument(
                f"{what} covers this host's own address {a}: allow= never opens the host; "
                f"for a host service use the bridge address with a port ({gateway}:PORT)"
            )
    for bad in _NOT_UNICAST:
        if net.overlaps(bad):
            raise InvalidArgument(f"{what} covers {bad}, which is not a unicast destination")
    return False
