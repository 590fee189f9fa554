"""HostNetwork: bridge, tap pool, per-VM network policy, DNS, VMM process primitives.

It has no access to VM records: callers (VMService) resolve a VM's guest IP, tap and
policy first and pass plain values in. The work itself lives in the `hostnet` and `netdns`
leaves; this service owns their long-lived instances and the order they start and stop in.
It also keeps each running VM's applied policy in memory, so the addresses of `allow=`
names are re-resolved when their TTL runs out (rebuilt from the store at reconcile).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from dataclasses import dataclass, field

from stoker.config import Config
from stoker.daemon.hostnet import (
    TAP_PREFIX,
    DNSResolver,
    Firewall,
    Links,
    NameResolver,
    NetPolicy,
    Resolved,
    TapPool,
    VMRules,
    allocate_ip,
    parse_policy,
)
from stoker.daemon.hostnet.policy import check_destination
from stoker.daemon.hostnet.privileged import (
    HelperFirewall,
    HelperLinks,
    check_grant,
    hello,
    helper_binder,
)
from stoker.daemon.netdns import DNSServer, ResolvedWiring
from stoker.daemon.netdns.server import ClientView
from stoker.errors import InvalidArgument, StokerError
from stoker.helper.client import HelperClient
from stoker.model.wire import HelperStatus, NetworkStatus, TapPoolStatus
from stoker.runner import Runner

GUEST_DNS_PORT = 53
MIN_REFRESH = 5.0  # seconds: a TTL below this is refreshed this often, not faster
MAX_REFRESH = 3600.0
RETRY_REFRESH = 30.0  # after a failed refresh the last good addresses stay, retried this soon


@dataclass
class AppliedPolicy:
    """One running VM's policy as installed: what its rules and DNS view were built from."""

    vm_id: str
    guest_ip: str
    tap: str
    mac: str
    policy: NetPolicy
    # allowed name -> (addresses, monotonic time the answer expires)
    names: dict[str, tuple[tuple[str, ...], float]] = field(default_factory=dict)


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
        resolver: NameResolver | None = None,
        helper: HelperClient | None = None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.log = logger
        self.netns = netns
        # A stokerd that is not root makes every host change through stoker-helper.
        self.helper = helper
        self.helper_error: str | None = None
        self.links: Links
        self.fw: Firewall
        if helper is not None:
            self.links = HelperLinks(helper, config.bridge_name, netns)
            self.fw = HelperFirewall(
                helper, runner, config.bridge_name, config.gateway_ip, logger.getChild("nft")
            )
        else:
            self.links = Links(netns)
            self.fw = Firewall(
                runner, config.bridge_name, config.gateway_ip, logger.getChild("nft"), netns=netns
            )
        self.pool = TapPool(self.links, config.tap_pool_size, logger.getChild("taps"))
        self.dns = DNSServer(logger.getChild("dns"))
        # The guests' nameserver, on the bridge address: same records plus per-guest views.
        self.guest_dns = DNSServer(
            logger.getChild("guest-dns"), records=self.dns.records_table, guest_facing=True
        )
        self.guest_dns_port = GUEST_DNS_PORT
        self.guest_dns_error: str | None = None
        self.resolved = ResolvedWiring(runner, logger.getChild("resolved"))
        self.dns_listen: str | None = None
        self.dns_error: str | None = None
        self.resolver: NameResolver = resolver or DNSResolver()
        self.min_refresh = MIN_REFRESH
        self.applied: dict[str, AppliedPolicy] = {}
        # Held across one VM's rule change, so a refresh never re-adds rules of a VM whose
        # policy is being replaced or removed. A leaf lock (nothing else is taken under it
        # but the Firewall's own).
        self._policy_mu = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

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
        # Base drops first: a tap that joins the bridge is confined before its VM's rules.
        await self.fw.ensure_base()
        await self._start_guest_dns()
        await self._wire_resolver()
        self.pool.start_refill()

    async def _start_guest_dns(self) -> None:
        if self.guest_dns.address is not None:
            return
        try:
            await self.guest_dns.start(
                self.config.gateway_ip,
                self.guest_dns_port,
                netns=self.netns,
                binder=helper_binder(self.helper) if self.helper is not None else None,
            )
            self.guest_dns_error = None
        except (OSError, StokerError) as e:
            why = e.message if isinstance(e, StokerError) else (e.strerror or str(e))
            self.guest_dns_error = (
                f"cannot listen on {self.config.gateway_ip}:{self.guest_dns_port}: "
                f"{why}: guests cannot resolve NAME.vm or allow= names"
            )
            self.log.warning("guest DNS disabled: %s", self.guest_dns_error)

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
        await self.guest_dns.close()
        await self.links.delete(self.bridge)
        if not await self.fw.vm_ids():
            await self.fw.teardown_all()
        self.log.info("removed unused bridge %s", self.bridge)
        return True

    # --- network policy -----------------------------------------------------------------

    async def host_addresses(self) -> set[ipaddress.IPv4Address]:
        """This host's own IPv4 addresses (in the namespace the bridge lives in)."""
        return {ipaddress.IPv4Address(a) for a in await self.links.all_addresses()}

    async def _resolve(self, name: str) -> Resolved:
        return await self.resolver.resolve(name)

    def _expiry(self, ttl: int) -> float:
        return time.monotonic() + min(MAX_REFRESH, max(self.min_refresh, float(ttl)))

    async def check_policy(self, text: str | None, *, nat: bool = False) -> NetPolicy:
        """Parse and fully check a `--net` value before anything is created or changed:
        every name must resolve and no destination may cover the host or its guests."""
        policy = parse_policy(text, nat=nat)
        names = {}
        for name in policy.names:
            r = await self._resolve(name)
            names[name] = (r.addrs, self._expiry(r.ttl))
        self._plan(policy, names, await self.host_addresses(), strict=True)
        return policy

    def _plan(
        self,
        policy: NetPolicy,
        names: dict[str, tuple[tuple[str, ...], float]],
        host_addrs: set[ipaddress.IPv4Address],
        *,
        strict: bool,
    ) -> tuple[list[tuple[str, int | None]], list[int], dict[str, tuple[tuple[str, ...], float]]]:
        """Destinations to the outside, ports on the bridge address, and the DNS view.

        `strict` raises on a forbidden destination (create/set); otherwise (a start, a
        refresh) it is left out and logged, so a name that moved cannot open the host."""
        out: list[tuple[str, int | None]] = []
        host_ports: list[int] = []
        view: dict[str, tuple[tuple[str, ...], float]] = {}
        for entry in policy.allow:
            if entry.network is not None:
                targets = [(entry.network, f"allow={entry}")]
            else:
                addrs = names.get(entry.host, ((), 0.0))[0]
                targets = [
                    (ipaddress.IPv4Network(a), f"allow={entry} ({entry.host} is {a})")
                    for a in addrs
                ]
            for net, what in targets:
                try:
                    is_host = check_destination(
                        net,
                        entry.port,
                        what=what,
                        host_addrs=host_addrs,
                        bridge=self.network,
                        gateway=ipaddress.IPv4Address(self.config.gateway_ip),
                    )
                except InvalidArgument as e:
                    if strict:
                        raise InvalidArgument(f"--net {policy}: {e.message}") from None
                    self.log.warning("left out of the policy: %s", e.message)
                    continue
                if is_host and entry.port is not None:
                    host_ports.append(entry.port)
                else:
                    out.append((str(net), entry.port))
                if entry.network is None:
                    prev = view.get(entry.host, ((), names[entry.host][1]))
                    addr = str(net.network_address)
                    if addr not in prev[0]:
                        view[entry.host] = ((*prev[0], addr), prev[1])
        return (
            list(dict.fromkeys(out)),
            sorted(set(host_ports)),
            view,
        )

    async def apply_policy(
        self, vm_id: str, guest_ip: str, tap: str, mac: str, policy: NetPolicy | str
    ) -> None:
        """Install (or replace) the VM's rules and DNS view. Names that do not resolve now
        get no addresses (logged) and are retried soon; nothing here fails a start for a
        name that was valid when the policy was set."""
        pol = policy if isinstance(policy, NetPolicy) else parse_policy(policy)
        names: dict[str, tuple[tuple[str, ...], float]] = {}
        for name in pol.names:
            try:
                r = await self._resolve(name)
                names[name] = (r.addrs, self._expiry(r.ttl))
            except StokerError as e:
                self.log.warning("VM %s: %s (retrying)", vm_id, e.message)
                names[name] = ((), time.monotonic() + min(RETRY_REFRESH, self.min_refresh))
        applied = AppliedPolicy(vm_id, guest_ip, tap, mac, pol, names)
        async with self._policy_mu:
            await self._install(applied, await self.host_addresses())
        if pol.names:
            self._wake.set()
            self._start_refresher()

    async def _install(self, a: AppliedPolicy, host_addrs: set[ipaddress.IPv4Address]) -> None:
        """Write rules + DNS view for `a`; caller holds _policy_mu."""
        out, host_ports, view = self._plan(a.policy, a.names, host_addrs, strict=False)
        await self.fw.apply_vm(
            VMRules(
                vm_id=a.vm_id,
                guest_ip=a.guest_ip,
                tap=a.tap,
                mac=a.mac,
                mode=a.policy.mode,
                allow_out=tuple(out),
                host_ports=tuple(host_ports),
                peers=a.policy.peers,
            )
        )
        old = self.applied.get(a.vm_id)
        if old is not None and old.guest_ip != a.guest_ip:
            self.guest_dns.clear_client(old.guest_ip)
        self.applied[a.vm_id] = a
        if a.policy.mode == "none":
            self.guest_dns.clear_client(a.guest_ip)
        else:
            self.guest_dns.set_client(
                a.guest_ip, ClientView(names=view, fallthrough=a.policy.mode == "nat")
            )

    async def remove_policy(self, vm_id: str) -> None:
        """Remove the VM's rules and DNS view, leaving every other VM's. Idempotent."""
        async with self._policy_mu:
            a = self.applied.pop(vm_id, None)
            if a is not None:
                self.guest_dns.clear_client(a.guest_ip)
            await self.fw.remove_vm(vm_id)

    async def policy_vm_ids(self) -> set[str]:
        """Ids of VMs with rules installed (reconcile compares them with the store)."""
        return await self.fw.vm_ids()

    def _start_refresher(self) -> None:
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.create_task(self._refresh_loop(), name="net-refresh")

    def next_refresh(self) -> float | None:
        """Monotonic time the earliest allowed name expires (None: nothing to refresh)."""
        return min(
            (exp for a in self.applied.values() for _, exp in a.names.values()), default=None
        )

    async def _refresh_loop(self) -> None:
        while True:
            due = self.next_refresh()
            self._wake.clear()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            try:
                await self.refresh_due()
            except Exception as e:  # the loop must outlive any one bad refresh
                self.log.warning("refreshing allowed names failed: %s", e)
                await asyncio.sleep(self.min_refresh)

    async def refresh_due(self) -> list[str]:
        """Re-resolve every expired allowed name; rebuild the rules of VMs whose addresses
        changed. Returns the ids of the VMs rebuilt."""
        now = time.monotonic()
        rebuilt = []
        for vm_id, a in list(self.applied.items()):
            expired = [n for n, (_, exp) in a.names.items() if exp <= now]
            if not expired:
                continue
            names = dict(a.names)
            for name in expired:
                try:
                    r = await self._resolve(name)
                    names[name] = (r.addrs, self._expiry(r.ttl))
                except StokerError as e:
                    self.log.warning("VM %s: %s: keeping %s", vm_id, e.message, names[name][0])
                    names[name] = (names[name][0], time.monotonic() + RETRY_REFRESH)
            async with self._policy_mu:
                cur = self.applied.get(vm_id)
                if cur is not a:
                    continue  # replaced or removed meanwhile
                changed = any(names[n][0] != a.names[n][0] for n in expired)
                fresh = AppliedPolicy(a.vm_id, a.guest_ip, a.tap, a.mac, a.policy, names)
                if changed:
                    await self._install(fresh, await self.host_addresses())
                    rebuilt.append(vm_id)
                    self.log.info("VM %s: allowed addresses changed: rules rebuilt", vm_id)
                else:
                    # Same addresses: only the expiries move (and the TTL the guest sees).
                    self.applied[vm_id] = fresh
                    view = self.guest_dns.client(a.guest_ip)
                    if view is not None:
                        for n in expired:
                            if n in view.names:
                                view.names[n] = (view.names[n][0], names[n][1])
        return rebuilt

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
        if self.helper is not None:
            await self.check_helper()
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
                await self._start_guest_dns()
                await self._wire_resolver()
                self.pool.start_refill()
        except StokerError as e:
            self.log.warning("could not inspect bridge %s: %s", self.bridge, e)

    async def check_helper(self) -> None:
        """Ask stoker-helper what it grants this daemon and check the config agrees. A
        missing helper is logged and shown in `status`: VMs cannot start until it is up,
        everything else works."""
        assert self.helper is not None
        try:
            check_grant(await hello(self.helper), self.bridge, self.config.bridge_cidr)
            self.helper_error = None
        except StokerError as e:
            self.helper_error = e.message
            self.log.warning("stoker-helper: %s", e.message)

    async def close(self) -> None:
        """Stop DNS and the pool refill, delete pooled (unused) taps.

        Never touches taps handed out to VMs, the bridge or policy rules: running VMs keep
        working while the daemon is down (allowed names are not refreshed until it is back).
        """
        await self.resolved.revert()
        await self.dns.close()
        await self.guest_dns.close()
        self.dns_listen = None
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.pool.close()

    def status(self) -> NetworkStatus:
        """Bridge, DNS listener, resolver wiring and pool figures for `daemon status`."""
        return NetworkStatus(
            bridge=self.bridge,
            cidr=str(self.network),
            gateway=self.config.gateway_ip,
            dns_listen=self.dns_listen,
            dns_error=self.dns_error,
            guest_dns=(
                f"{self.guest_dns.address[0]}:{self.guest_dns.address[1]}"
                if self.guest_dns.address
                else None
            ),
            guest_dns_error=self.guest_dns_error,
            policies={a.vm_id: str(a.policy) for a in self.applied.values()},
            resolver=self.resolved.state,
            helper=(
                None
                if self.helper is None
                else HelperStatus(str(self.helper.socket_path), self.helper_error)
            ),
            tap_pool=TapPoolStatus(self.pool.size, len(self.pool.pooled)),
        )
