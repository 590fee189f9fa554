"""Host network leaves: bridge/tap links, tap pool, per-VM NAT, guest IP allocation.

Leaves import no service and no other daemon leaf outside this package.
"""

from stoker.daemon.hostnet.ipalloc import allocate_ip, gateway_for
from stoker.daemon.hostnet.links import Links, check_ifname
from stoker.daemon.hostnet.nat import NAT, NatRule
from stoker.daemon.hostnet.taps import TAP_PREFIX, TapPool, new_tap_name

__all__ = [
    "NAT",
    "TAP_PREFIX",
    "Links",
    "NatRule",
    "TapPool",
    "allocate_ip",
    "check_ifname",
    "gateway_for",
    "new_tap_name",
]
