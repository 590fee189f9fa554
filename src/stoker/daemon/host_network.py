"""HostNetwork: bridge, tap pool, NAT, DNS, VMM process primitives.

It has no access to VM records: callers (VMService) resolve a VM's guest IP and tap
first and pass plain values in.
"""

from __future__ import annotations

import ipaddress
import logging

from stoker.config import Config
from stoker.errors import Unavailable
from stoker.runner import Runner


class HostNetwork:
    """Owns the host-side network state stoker creates."""

    def __init__(self, config: Config, runner: Runner, logger: logging.Logger) -> None:
        self.config = config
        self.runner = runner
        self.log = logger
        self.dns_listen: str | None = None

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.config.bridge_network

    def allocate_ip(self, used: set[str]) -> str:
        """Lowest free address in the bridge CIDR (gateway and broadcast excluded)."""
        gw = self.config.gateway_ip
        for host in self.network.hosts():
            ip = str(host)
            if ip != gw and ip not in used:
                return ip
        raise Unavailable(
            f"no free guest address left in {self.network}: delete unused VMs or widen "
            "bridge_cidr in the config"
        )

    async def start(self) -> None:
        """Bring up long-lived host state (DNS listener). Bridge and taps come on demand."""

    async def close(self) -> None:
        """Stop the DNS listener and background refills. Never touches running VMs."""

    def status(self) -> dict[str, object]:
        return {
            "bridge": self.config.bridge_name,
            "cidr": str(self.network),
            "gateway": self.config.gateway_ip,
            "dns_listen": self.dns_listen,
        }
