"""Host network leaves: bridge/tap links, tap pool, per-VM network policy (nftables),
guest IP allocation, resolution of allowed names.

Leaves import no service and no other daemon leaf outside this package.
"""

from stoker.daemon.hostnet.ipalloc import allocate_ip, gateway_for
from stoker.daemon.hostnet.links import Links, check_ifname
from stoker.daemon.hostnet.nat import Firewall, NatRule, VMRules
from stoker.daemon.hostnet.policy import AllowEntry, NetPolicy, parse_policy
from stoker.daemon.hostnet.resolve import DNSResolver, NameResolver, Resolved, ResolveFailed
from stoker.daemon.hostnet.taps import TAP_PREFIX, TapPool, new_tap_name

__all__ = [
    "TAP_PREFIX",
    "AllowEntry",
    "DNSResolver",
    "Firewall",
    "Links",
    "NameResolver",
    "NatRule",
    "NetPolicy",
    "ResolveFailed",
    "Resolved",
    "TapPool",
    "VMRules",
    "allocate_ip",
    "check_ifname",
    "gateway_for",
    "new_tap_name",
    "parse_policy",
]
