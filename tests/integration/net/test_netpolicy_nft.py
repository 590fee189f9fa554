"""Per-VM network policy for real: nftables + stoker's guest DNS, inside test namespaces.

Topology (every namespace made by the test; no outside address is ever used):

    guest1 172.30.0.2 --veth--+
                               br-stoker 172.30.0.1 [stoker ns] stk-up0 192.0.2.1 --veth--
    guest2 172.30.0.3 --veth--+   (DNS :53, svc :8000)           outside ns 192.0.2.2 :8080 :8081

"Guests" are namespaces whose veth peer sits on the bridge where a VM's tap would (nft
rules do not care what is behind the port); each guest's MAC is the one stoker gives a VM
with that address. The stoker namespace stands in for the host: a service bound on the
bridge address there is "a host service". Names of `allow=` resolve through a DNS server
the test runs on loopback, never through the real resolver.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from _netns_helpers import Namespaces, ns_nft, sh

from stoker.config import Config
from stoker.daemon.host_network import HostNetwork
from stoker.daemon.hostnet import DNSResolver, ResolveFailed
from stoker.daemon.netdns import DNSServer
from stoker.daemon.vm_disks import mac_for
from stoker.errors import InvalidArgument
from stoker.runner import Runner

pytestmark = pytest.mark.integration

LOG = logging.getLogger("test.netpolicy")
GW, G1, G2, OUT = "172.30.0.1", "172.30.0.2", "172.30.0.3", "192.0.2.2"

SERVER = """
import socket, selectors, sys
sel = selectors.DefaultSelector()
for port in sys.argv[2:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(port)))
    s.listen(16)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        c, addr = key.fileobj.accept()
        c.sendall(addr[0].encode())
        c.close()
"""

CLIENT = """
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print(s.recv(64).decode())
except OSError as e:
    print("FAIL", e)
    sys.exit(1)
"""

LOOKUP = """
import sys
from dnslib import DNSRecord, RCODE
try:
    raw = DNSRecord.question(sys.argv[1]).send(sys.argv[2], 53, timeout=1.0)
except Exception as e:
    print("NOANSWER", type(e).__name__)
    sys.exit(0)
r = DNSRecord.parse(raw)
print(RCODE.get(r.header.rcode), " ".join(sorted(str(a.rdata) for a in r.rr)))
"""


@dataclass
class Topo:
    ns: Namespaces
    stoker: str
    outside: str
    guests: dict[str, str]  # guest ip -> namespace
    taps: dict[str, str]  # guest ip -> bridge-side veth (the "tap")
    net: HostNetwork
    names: DNSServer  # the test's own "upstream" DNS for allow= names

    async def run(self, ns: str, code: str, *args: str) -> tuple[int, str]:
        """Python in `ns`, off the event loop (stoker's DNS answers on that loop)."""
        argv = ("ip", "netns", "exec", ns, sys.executable, "-c", code, *args)
        p = await asyncio.to_thread(sh, *argv, check=False)
        return p.returncode, p.stdout.strip()

    async def reach(self, guest_ip: str, host: str, port: int, tries: int = 1) -> str | None:
        """Connect from a guest; the source address the server saw, None if it failed.

        Expected successes get a few tries: a guest whose ARP went unanswered while it was
        shut off keeps the neighbour entry FAILED for a moment, as a real guest would."""
        for _ in range(tries):
            rc, out = await self.run(self.guests[guest_ip], CLIENT, host, str(port), "0.7")
            if rc == 0:
                return out
        return None

    async def lookup(self, guest_ip: str, name: str) -> str:
        """A query from the guest to stoker's DNS on the bridge address: 'RCODE addrs'."""
        return (await self.run(self.guests[guest_ip], LOOKUP, name, GW))[1]

    async def apply(self, guest_ip: str, policy: str) -> None:
        await self.net.apply_policy(
            f"vm-{guest_ip.rsplit('.', 1)[1]}",
            guest_ip,
            self.taps[guest_ip],
            mac_for(guest_ip),
            await self.net.check_policy(policy),
        )


def _serve(ns: Namespaces, where: str, host: str, *ports: int) -> None:
    p = subprocess.Popen(
        ["ip", "netns", "exec", where, sys.executable, "-u", "-c", SERVER, host]
        + [str(x) for x in ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ns.procs.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"


@pytest.fixture
async def topo(namespaces: Namespaces) -> AsyncIterator[Topo]:
    stoker, outside = namespaces.new(), namespaces.new()
    names = DNSServer(LOG, zone="test", ttl=60)
    await names.start("127.0.0.1", 0)
    assert names.address is not None
    config = Config(bridge_cidr="172.30.0.0/24", tap_pool_size=0, dns_listen="127.0.0.1:0")
    net = HostNetwork(
        config, Runner(), LOG, netns=stoker, resolver=DNSResolver([names.address], timeout=1.0)
    )
    try:
        await net.ensure_bridge()
        assert net.guest_dns.address == (GW, 53), net.guest_dns_error
        sh("ip", "-n", stoker, "link", "add", "stk-up0", "type", "veth",
           "peer", "name", "stk-up1", "netns", outside)  # fmt: skip
        sh("ip", "-n", stoker, "addr", "add", "192.0.2.1/24", "dev", "stk-up0")
        sh("ip", "-n", stoker, "link", "set", "stk-up0", "up")
        sh("ip", "-n", outside, "addr", "add", f"{OUT}/24", "dev", "stk-up1")
        sh("ip", "-n", outside, "link", "set", "stk-up1", "up")
        guests, taps = {}, {}
        for i, gip in enumerate((G1, G2), start=1):
            g = namespaces.new()
            tap = f"stk-vmtap{i}"
            sh("ip", "-n", stoker, "link", "add", tap, "type", "veth", "peer", "name", "eth0",
               "netns", g)  # fmt: skip
            await net.attach_tap(tap)
            sh("ip", "-n", g, "link", "set", "eth0", "address", mac_for(gip))
            sh("ip", "-n", g, "addr", "add", f"{gip}/24", "dev", "eth0")
            sh("ip", "-n", g, "link", "set", "eth0", "up")
            sh("ip", "-n", g, "route", "add", "default", "via", GW)
            guests[gip], taps[gip] = g, tap
        _serve(namespaces, outside, "0.0.0.0", 8080, 8081)
        _serve(namespaces, stoker, GW, 8000)  # a host service on the bridge address
        _serve(namespaces, guests[G2], G2, 9000)  # a service in guest2
        net.publish_dns("web", G2)
        yield Topo(namespaces, stoker, outside, guests, taps, net, names)
    finally:
        await net.close()
        await names.close()


async def test_host_only_reaches_dns_and_nothing_else(topo: Topo) -> None:
    await topo.apply(G1, "host-only")
    assert await topo.lookup(G1, "web.vm") == f"NOERROR {G2}"
    assert (await topo.lookup(G1, "example.com")).startswith(
        "NXDOMAIN"
    )  # no recursion, no fallthrough
    assert await topo.reach(G1, GW, 8000) is None  # a host service on the bridge address
    assert await topo.reach(G1, OUT, 8080) is None  # the outside
    assert await topo.reach(G1, "192.0.2.1", 22) is None  # another of the host's addresses


async def test_none_gets_not_even_dns(topo: Topo) -> None:
    await topo.apply(G1, "none")
    await topo.apply(G2, "none")
    assert (await topo.lookup(G1, "web.vm")).startswith("NOANSWER")
    assert await topo.reach(G1, GW, 8000) is None
    # the host still reaches the guest (stoker's SSH for exec and workspaces works so)
    rc, out = await topo.run(topo.stoker, CLIENT, G2, "9000", "3")
    assert rc == 0 and out == GW


async def test_nat_reaches_outside_masqueraded_but_not_the_host(topo: Topo) -> None:
    await topo.apply(G1, "nat")
    assert await topo.reach(G1, OUT, 8080, tries=4) == "192.0.2.1"
    assert await topo.reach(G1, GW, 8000) is None
    # a name outside .vm is REFUSED, so the guest's resolver moves on to its next server
    assert (await topo.lookup(G1, "example.com")).startswith("REFUSED")
    await topo.apply(G1, "host-only")  # a policy change replaces the rules
    assert await topo.reach(G1, OUT, 8080) is None


async def test_allow_admits_exactly_the_named_host_and_port(topo: Topo) -> None:
    topo.names.set("api", OUT)
    await topo.apply(G1, "allow=api.test:8080")
    assert await topo.lookup(G1, "api.test") == f"NOERROR {OUT}"
    assert await topo.lookup(G1, "web.vm") == f"NOERROR {G2}"
    assert (await topo.lookup(G1, "other.test")).startswith("NXDOMAIN")  # only the listed names
    assert await topo.reach(G1, OUT, 8080, tries=4) == "192.0.2.1"
    assert await topo.reach(G1, OUT, 8081) is None  # another port on the same host
    assert await topo.reach(G1, GW, 8000) is None
    assert await topo.reach(G2, OUT, 8080) is None  # the other guest (no policy) stays shut


async def test_allow_a_host_service_by_bridge_address_and_port(topo: Topo) -> None:
    await topo.apply(G1, f"allow={GW}:8000")
    assert await topo.reach(G1, GW, 8000, tries=4) == G1
    assert await topo.reach(G1, OUT, 8080) is None


async def test_allowed_name_is_refreshed_when_its_ttl_runs_out(topo: Topo) -> None:
    topo.names.ttl = 1
    topo.net.min_refresh = 0.3
    topo.names.set("api", "192.0.2.99")  # first answer: an address nothing listens on
    await topo.apply(G1, "allow=api.test:8080")
    assert await topo.reach(G1, OUT, 8080) is None
    topo.names.set("api", OUT)

    async def moved() -> bool:
        for _ in range(50):
            if await topo.lookup(G1, "api.test") == f"NOERROR {OUT}":
                return True
            await asyncio.sleep(0.2)
        return False

    assert await moved()
    assert await topo.reach(G1, OUT, 8080, tries=4) == "192.0.2.1"


async def test_guests_reach_each_other_only_when_both_opt_in(topo: Topo) -> None:
    await topo.apply(G1, "host-only")
    await topo.apply(G2, "host-only")
    assert await topo.reach(G1, G2, 9000) is None  # default: denied
    await topo.apply(G1, "host-only,peers")
    assert await topo.reach(G1, G2, 9000) is None  # one side only: denied
    await topo.apply(G2, "host-only,peers=other")
    assert await topo.reach(G1, G2, 9000) is None  # different groups: denied
    await topo.apply(G2, "host-only,peers")
    assert await topo.reach(G1, G2, 9000, tries=4) == G1  # both in group default
    await topo.net.remove_policy("vm-3")
    assert await topo.reach(G1, G2, 9000) is None  # removing one ends it


UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 8082))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(256)
    print(addr[0], data.decode(), flush=True)
"""

UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(sys.argv[2].encode(), (sys.argv[1], 8082))
    time.sleep(0.05)
"""


async def test_a_guest_cannot_spoof_another_guests_address(topo: Topo) -> None:
    await topo.apply(G1, "host-only")
    await topo.apply(G2, "nat")  # the one whose address is worth stealing
    sink = topo.ns.spawn(topo.outside, UDP_SINK)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    g1 = topo.guests[G1]
    sh("ip", "-n", g1, "addr", "del", f"{G1}/24", "dev", "eth0")
    sh("ip", "-n", g1, "addr", "add", f"{G2}/24", "dev", "eth0")
    sh("ip", "-n", g1, "route", "add", "default", "via", GW)
    # a static neighbour entry, so no ARP is needed (ARP claiming G2 is dropped as well)
    br = json.loads(sh("ip", "-n", topo.stoker, "-j", "link", "show", "br-stoker").stdout)
    sh("ip", "-n", g1, "neigh", "replace", GW, "lladdr", br[0]["address"], "dev", "eth0")
    # one-way UDP needs no reply: only the anti-spoofing rules stop it
    await topo.run(g1, UDP_SEND, OUT, "spoofed")
    await topo.run(topo.guests[G2], UDP_SEND, OUT, "genuine")
    await asyncio.sleep(0.3)
    sink.kill()
    got = sink.communicate(timeout=5)[0]
    assert "192.0.2.1 genuine" in got  # the path works for the real owner
    assert "spoofed" not in got


async def test_bad_destinations_are_refused_and_change_nothing(topo: Topo) -> None:
    before = ns_nft(topo.stoker)
    with pytest.raises(ResolveFailed, match=r"nothere\.test does not exist"):
        await topo.net.check_policy("allow=nothere.test:443")
    with pytest.raises(InvalidArgument, match=r"covers this host's own address 192\.0\.2\.1"):
        await topo.net.check_policy("allow=192.0.2.0/24")
    topo.names.set("sneaky", "192.0.2.1")  # a name that points at the host itself
    with pytest.raises(InvalidArgument, match=r"host's own address 192\.0\.2\.1"):
        await topo.net.check_policy("allow=sneaky.test:22")
    with pytest.raises(InvalidArgument, match="guest network"):
        await topo.net.check_policy("allow=172.30.0.0/16")
    with pytest.raises(InvalidArgument, match="without a port"):
        await topo.net.check_policy(f"allow={GW}")
    with pytest.raises(InvalidArgument, match="out of range"):
        await topo.net.check_policy("allow=api.test:65536")
    assert ns_nft(topo.stoker) == before


async def test_remove_and_teardown_leave_nothing(topo: Topo) -> None:
    topo.names.set("api", OUT)
    await topo.apply(G1, "allow=api.test:8080,peers")
    await topo.apply(G2, "nat,peers")
    assert await topo.net.policy_vm_ids() == {"vm-2", "vm-3"}
    await topo.net.remove_policy("vm-2")
    await topo.net.remove_policy("vm-2")  # idempotent
    assert await topo.net.policy_vm_ids() == {"vm-3"}
    assert "peers_default" in ns_nft(topo.stoker)
    await topo.net.remove_policy("vm-3")
    ruleset = ns_nft(topo.stoker)
    assert "stoker-vm:" not in ruleset and "peers_default" not in ruleset
    assert await topo.net.fw.teardown_all()
    assert "stoker" not in ns_nft(topo.stoker)
