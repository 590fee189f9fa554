"""In-process DNS for `NAME.vm` and its systemd-resolved wiring (a leaf: no services)."""

from stoker.daemon.netdns.resolved import ResolvedWiring, dns_server_arg
from stoker.daemon.netdns.server import DNSServer

__all__ = ["DNSServer", "ResolvedWiring", "dns_server_arg"]
