"""HostNetwork: bridge, tap pool, NAT, DNS, VMM process primitives.

It has no access to VM records: callers (VMService) resolve a VM's guest IP and tap
first and pass plain values in. The work itself lives in the `hostnet` and `netdns`
leaves; this service owns their long-lived instances and the order they start and stop in.
"""

from __future__ import annotations

import ipaddress
import logging

from stoker.config import Config
from stoker.daemon.hostnet import NAT, TAP_PREFIX, Links, TapPool, allocate_ip
from stoker.daemon.netdns import DNSServer, ResolvedWiring
from stoker.errors import StokerError
from stoker.runner import Runner


class HostNetwork:
    """Owns the host-side network state stoker creates.

    `netns` makes every link and nftables operation happen inside that named network
    namespace; it exists for tests. The daemon passes None and works in the namespace it
    runs in (run it under `ip netns exec` to confine it).
    """

    def __init__(
        self,
        config: Config,
        runner: Runner,
        logger: logging.Logger,
        *,
        netns: str | None = None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.log = logger
        self.netns = netns
        self.links = Links(netns)
        self.pool = TapPool(self.links, config.tap_pool_size, logger.getChild("taps"))
        self.nat = NAT(runner, config.bridge_name, logger.getChild("nat"), netns=netns)
        self.dns = DNSServer(logger.getChild("dns"))
        self.resolved = ResolvedWiring(runner, logger.getChild("resolved"))
        self.dns_listen: str | None = None
        self.dns_error: str | None = None

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The bridge CIDR."""
        return self.config.bridge_network

    @property
    def bridge(self) -> str:
        """The bridge's interface name."""
        return self.config.bridge_name

    # --- addresses ----------------------------------------------------------------------

    def allocate_ip(self, used: set[str]) -> str:
        """Lowest free address in the bridge CIDR (network, gateway and broadcast excluded)."""
        return allocate_ip(self.network, used, gateway=self.config.gateway_ip)

    # --- bridge and taps ----------------------------------------------------------------

    async def ensure_bridge(self) -> None:
        """Create the bridge with the gateway address and bring it up. Safe to repeat.

        The first time it exists while DNS listens, `.vm` is wired into systemd-resolved
        on it, and the tap pool starts filling.
        """
        await self.links.ensure_bridge(self.bridge, self.config.gateway_ip, self.network.prefixlen)
        await self._wire_resolver()
        self.pool.start_refill()

    async def _wire_resolver(self) -> None:
        if self.dns.address is None or self.resolved.applied_link is not None:
            return
        if self.netns is not None:
            # The host's resolver cannot see links inside another namespace.
            self.resolved.state = f"skipped: bridge is in network namespace {self.netns}"
            return
        host, port = self.dns.address
        await self.resolved.apply(self.bridge, host, port)

    async def acquire_tap(self) -> str:
        """A tap for a VM (from the warm pool when possible); the pool refills behind it."""
        return await self.pool.acquire()

    async def release_tap(self, name: str) -> None:
        """Delete a VM's tap. Idempotent."""
        await self.pool.release(name)

    async def attach_tap(self, tap: str) -> None:
        """Put a tap on the bridge and bring it up."""
        await self.links.attach(tap, self.bridge)

    async def reap_orphan_taps(self, in_use: set[str]) -> list[str]:
        """Delete stoker taps (`tap-stk-*`) that no VM uses and the pool does not hold.

        For reconcile after a crash; returns the names deleted.
        """
        keep = set(in_use) | set(self.pool.pooled)
        gone = []
        for name in await self.links.list_links(TAP_PREFIX):
            if name not in keep and await self.links.delete(name):
                gone.append(name)
        if gone:
            self.log.info("removed leftover taps: %s", ", ".join(gone))
        return gone

    async def teardown_bridge_if_unused(self) -> bool:
        """Delete the bridge when no device is attached to it; drop the NAT table when no
        VM has rules left. False when the bridge is still in use (or absent)."""
        if not await self.links.exists(self.bridge):
            return False
        if await self.links.ports(self.bridge):
            return False
        await self.resolved.revert()
        await self.links.delete(self.bridge)
        if not await self.nat.vm_ids():
            await self.nat.teardown_all()
        self.log.info("removed unused bridge %s", self.bridge)
        return True

    # --- NAT ----------------------------------------------------------------------------

    async def ensure_nat(self, vm_id: str, guest_ip: str, tap: str) -> None:
        """Enable forwarding and install the VM's masquerade + forward rules (replacing any)."""
        await self.nat.ensure_vm_nat(vm_id, guest_ip, tap)

    async def remove_nat(self, vm_id: str) -> None:
        """Remove the VM's NAT rules, leaving every other VM's. Idempotent."""
        await self.nat.remove_vm_nat(vm_id)

    async def nat_vm_ids(self) -> set[str]:
        """Ids of VMs with NAT rules installed (reconcile compares them with the store)."""
        return await self.nat.vm_ids()

    # --- DNS ----------------------------------------------------------------------------

    def publish_dns(self, name: str, ip: str) -> None:
        """Answer `NAME.vm` with `ip`."""
        self.dns.set(name, ip)

    def unpublish_dns(self, name: str) -> None:
        """Stop answering `NAME.vm`. Idempotent."""
        self.dns.remove(name)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the DNS listener on `dns_listen`. Bridge and taps come on demand.

        A busy port is logged and shown in `status` rather than failing the daemon: VMs
        still work by IP. If the bridge already exists (VMs in use), the resolver wiring
        and the tap pool are brought up now.
        """
        addr = self.config.dns_listen
        host, _, port = addr.rpartition(":")
        try:
            bound = await self.dns.start(host.strip("[]"), int(port))
        except OSError as e:
            self.dns_listen = None
            self.dns_error = (
                f"cannot listen on {addr}: {e.strerror or e}: free the port or set "
                "dns_listen in the config"
            )
            self.log.warning("DNS for .vm disabled: %s", self.dns_error)
        else:
            self.dns_listen = f"{bound[0]}:{bound[1]}"
            self.dns_error = None
        try:
            if await self.links.exists(self.bridge):
                await self._wire_resolver()
                self.pool.start_refill()
        except StokerError as e:
            self.log.warning("could not inspect bridge %s: %s", self.bridge, e)

    async def close(self) -> None:
        """Stop DNS and the pool refill, delete pooled (unused) taps.

        Never touches taps handed out to VMs, the bridge or NAT rules: running VMs keep
        working while the daemon is down.
        """
        await self.resolved.revert()
        await self.dns.close()
        self.dns_listen = None
        await self.pool.close()

    def status(self) -> dict[str, object]:
        """Bridge, DNS listener, resolver wiring and pool figures for `daemon status`."""
        return {
            "bridge": self.bridge,
            "cidr": str(self.network),
            "gateway": self.config.gateway_ip,
            "dns_listen": self.dns_listen,
            "dns_error": self.dns_error,
            "resolver": self.resolved.state,
            "tap_pool": {"size": self.pool.size, "ready": len(self.pool.pooled)},
        }
