"""hostnet.nat for real: the `nat` policy's masquerade + forward rules per VM, inside test
namespaces only (the other policies: test_netpolicy.py).

Topology (all namespaces made by the test; no outside address is ever used):

    guest1 (172.30.0.2) --veth--+
                                 br-stoker (172.30.0.1) [stoker ns] stk-up0 (192.0.2.1)
    guest2 (172.30.0.3) --veth--+                                      |
                                                                  veth |
                                                   test host  stk-up1 (192.0.2.2)

The test host has no route to 172.30.0.0/24, so a guest reaches it only when stoker's
namespace forwards the guest's packets and masquerades them behind 192.0.2.1.
The veth ends on the bridge stand in for the VMs' taps (a tap carries no traffic
without a VMM behind it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest
from _netns_helpers import Namespaces, ns_nft, sh

from stoker.daemon.hostnet import Firewall, Links, VMRules
from stoker.daemon.vm_disks import mac_for
from stoker.errors import InvalidArgument
from stoker.runner import Runner

pytestmark = pytest.mark.integration

LOG = logging.getLogger("test.nat")
SERVER_PORT = 8080
HOST_IP = "192.0.2.2"
# per nat VM: 5 anti-spoofing (bridge), DNS (input), out + replies (forward), masquerade
NAT_RULES = 9

SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {SERVER_PORT}))
s.listen(16)
print("ready", flush=True)
while True:
    c, addr = s.accept()
    c.sendall(addr[0].encode())
    c.close()
"""

CLIENT = f"""
import socket, sys
s = socket.socket()
s.settimeout(1.0)
try:
    s.connect(("{HOST_IP}", {SERVER_PORT}))
    print(s.recv(64).decode())
except OSError as e:
    print("FAIL", e)
    sys.exit(1)
"""


@dataclass
class Topo:
    ns: Namespaces
    stoker: str
    host: str
    guests: dict[str, str]  # guest ip -> namespace
    taps: dict[str, str]  # guest ip -> bridge-side veth (the "tap")

    def reach(self, guest_ip: str) -> str | None:
        """Connect from the guest to the test host; the source address the host saw."""
        r = self.ns.python(self.guests[guest_ip], CLIENT, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    def ip_forward(self) -> str:
        return sh("ip", "netns", "exec", self.stoker, "cat", "/proc/sys/net/ipv4/ip_forward")\
            .stdout.strip()  # fmt: skip


@pytest.fixture
async def topo(namespaces: Namespaces) -> Topo:
    stoker, host = namespaces.new(), namespaces.new()
    await Links(stoker).ensure_bridge("br-stoker", "172.30.0.1", 24)
    sh("ip", "-n", stoker, "link", "add", "stk-up0", "type", "veth",
       "peer", "name", "stk-up1", "netns", host)  # fmt: skip
    sh("ip", "-n", stoker, "addr", "add", "192.0.2.1/24", "dev", "stk-up0")
    sh("ip", "-n", stoker, "link", "set", "stk-up0", "up")
    sh("ip", "-n", host, "addr", "add", f"{HOST_IP}/24", "dev", "stk-up1")
    sh("ip", "-n", host, "link", "set", "stk-up1", "up")
    guests, taps = {}, {}
    for i, gip in enumerate(("172.30.0.2", "172.30.0.3"), start=1):
        g = namespaces.new()
        tap = f"stk-vmtap{i}"
        sh("ip", "-n", stoker, "link", "add", tap, "type", "veth", "peer", "name", "eth0",
           "netns", g)  # fmt: skip
        await Links(stoker).attach(tap, "br-stoker")
        sh("ip", "-n", g, "link", "set", "eth0", "address", mac_for(gip))  # as stoker gives a VM
        sh("ip", "-n", g, "addr", "add", f"{gip}/24", "dev", "eth0")
        sh("ip", "-n", g, "link", "set", "eth0", "up")
        sh("ip", "-n", g, "route", "add", "default", "via", "172.30.0.1")
        guests[gip], taps[gip] = g, tap
    server = namespaces.spawn(host, SERVER)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return Topo(namespaces, stoker, host, guests, taps)


def _fw(ns: str) -> Firewall:
    return Firewall(Runner(), "br-stoker", "172.30.0.1", LOG, netns=ns)


def _nat(vm_id: str, ip: str, tap: str) -> VMRules:
    return VMRules(vm_id, ip, tap, mac_for(ip), mode="nat")


def _vm_rules(stoker_ns: str) -> dict[str, int]:
    doc = json.loads(sh("ip", "netns", "exec", stoker_ns, "nft", "-j", "list", "ruleset").stdout)
    counts: dict[str, int] = {}
    for it in doc["nftables"]:
        c = it.get("rule", {}).get("comment", "")
        if c.startswith("stoker-vm:"):
            vm = c.split()[0].split(":", 1)[1]
            counts[vm] = counts.get(vm, 0) + 1
    return counts


async def test_guest_is_masqueraded_only_while_its_rule_exists(topo: Topo) -> None:
    nat = _fw(topo.stoker)
    g1 = "172.30.0.2"
    assert topo.ip_forward() == "0"
    assert topo.reach(g1) is None  # no forwarding, no NAT: unreachable

    await nat.apply_vm(_nat("vm1", g1, topo.taps[g1]))
    assert topo.ip_forward() == "1"
    assert topo.reach(g1) == "192.0.2.1"  # arrived, masqueraded behind the uplink address

    assert await nat.remove_vm("vm1") is True
    assert topo.ip_forward() == "1"  # forwarding stays on: the base drop rule blocks it
    assert topo.reach(g1) is None
    assert _vm_rules(topo.stoker) == {}


async def test_removing_one_vm_leaves_the_other(topo: Topo) -> None:
    nat = _fw(topo.stoker)
    g1, g2 = "172.30.0.2", "172.30.0.3"
    await nat.apply_vm(_nat("vm1", g1, topo.taps[g1]))
    await nat.apply_vm(_nat("vm2", g2, topo.taps[g2]))
    await nat.apply_vm(_nat("vm2", g2, topo.taps[g2]))  # repeat: replaced, not duplicated
    assert _vm_rules(topo.stoker) == {"vm1": NAT_RULES, "vm2": NAT_RULES}
    assert await nat.vm_ids() == {"vm1", "vm2"}
    assert topo.reach(g1) == "192.0.2.1" and topo.reach(g2) == "192.0.2.1"

    await nat.remove_vm("vm1")
    assert _vm_rules(topo.stoker) == {"vm2": NAT_RULES}
    assert topo.reach(g1) is None
    assert topo.reach(g2) == "192.0.2.1"
    assert await nat.remove_vm("vm1") is False  # idempotent


async def test_teardown_all_and_idempotence(netns: str) -> None:
    nat = _fw(netns)
    assert await nat.remove_vm("nothing") is False  # no table yet
    assert await nat.teardown_all() is False
    await nat.apply_vm(_nat("vm1", "172.30.0.2", "tap-stk-aaaaaa"))
    ruleset = ns_nft(netns)
    assert (
        "table inet stoker" in ruleset and 'comment "stoker-vm:vm1 tap=tap-stk-aaaaaa"' in ruleset
    )
    assert await nat.teardown_all() is True
    assert "stoker" not in ns_nft(netns)
    assert await nat.teardown_all() is False


async def test_bad_values_never_reach_nft(netns: str) -> None:
    nat = _fw(netns)
    with pytest.raises(InvalidArgument):
        await nat.apply_vm(_nat('x" ; flush ruleset ; "', "172.30.0.2", "tap-stk-aaaaaa"))
    with pytest.raises(InvalidArgument):
        await nat.apply_vm(
            VMRules("vm1", "172.30.0.2; drop", "tap-stk-aaaaaa", "06:53:00:00:00:01")
        )
    with pytest.raises(InvalidArgument):
        await nat.apply_vm(_nat("vm1", "172.30.0.2", "tap name"))
    with pytest.raises(InvalidArgument):
        await nat.apply_vm(VMRules("vm1", "172.30.0.2", "tap-stk-aaaaaa", "06:53 drop"))
    with pytest.raises(InvalidArgument):
        await nat.apply_vm(
            VMRules("vm1", "172.30.0.2", "tap-stk-aaaaaa", "06:53:00:00:00:01", peers='a" }')
        )
    assert "stoker" not in ns_nft(netns)
