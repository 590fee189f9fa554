"""VMService with network policies, over the fake VMM and a real bridge in a namespace:
create checks `--net` before anything exists, start installs the VM's rules, `vm set --net`
replaces them on a running VM, stop removes them, a restarted daemon rebuilds them."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_vm_lifecycle_fake_vmm import (  # noqa: F401 - fixtures used by name
    Rig,
    build_daemon,
    netns,
    req,
    rig,
)

from stoker.daemon.hostnet import Resolved, ResolveFailed
from stoker.errors import InvalidArgument
from stoker.model.records import VMState

pytestmark = pytest.mark.integration


class Names:
    """A resolver the test controls (never the host's real one)."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    async def resolve(self, name: str) -> Resolved:
        if name not in self.table:
            raise ResolveFailed(f"{name} does not exist (NXDOMAIN from the test)")
        return Resolved((self.table[name],), 60)


def _noop(*a: object, **k: object) -> None:
    pass


def _rules(ns: str, vm_id: str) -> list[str]:
    """Rule texts (as nft -j expressions) tagged with the VM's id, across stoker's tables."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        json.dumps(it["rule"]["expr"])
        for it in json.loads(out)["nftables"]
        if it.get("rule", {}).get("comment", "").startswith(f"stoker-vm:{vm_id} ")
    ]


async def test_bad_net_is_refused_before_anything_is_made(rig: Rig) -> None:  # noqa: F811
    vm, net = rig.d.vm, rig.d.net
    assert vm is not None and net is not None
    net.resolver = Names({})
    with pytest.raises(InvalidArgument, match=r"nothere\.example does not exist"):
        await vm.create_vm(req(name="n1", net="allow=nothere.example:443"), _noop)
    with pytest.raises(InvalidArgument, match="out of range"):
        await vm.create_vm(req(name="n1", net="allow=192.0.2.9:99999"), _noop)
    with pytest.raises(InvalidArgument, match="--nat means --net nat"):
        await vm.create_vm(req(name="n1", net="host-only", nat=True), _noop)
    assert await vm.list_vms() == []
    assert rig.fake.started == []


async def test_policy_follows_the_vm_lifecycle(rig: Rig) -> None:  # noqa: F811
    vm, net = rig.d.vm, rig.d.net
    assert vm is not None and net is not None
    net.resolver = Names({"api.example": "192.0.2.7"})
    rec = await vm.create_vm(req(name="p1", net="allow=api.example:443,peers"), _noop)
    assert rec.spec.net == "allow=api.example:443,peers" and not rec.spec.nat
    rules = _rules(rig.ns, rec.id)
    assert any('"192.0.2.7"' in r and "443" in r for r in rules)
    assert not any("masquerade" in r and "192.0.2.7" in r for r in rules)
    assert net.status().policies == {rec.id: "allow=api.example:443,peers"}
    client = net.guest_dns.client(rec.guest_ip)
    assert client is not None and client.names["api.example"][0] == ("192.0.2.7",)

    # vm set --net on the running VM: rules replaced at once, the stored spec too
    with pytest.raises(InvalidArgument, match="covers loopback"):
        await vm.set_vm("p1", None, None, None, "allow=127.0.0.0/8")  # nothing changes
    assert vm.resolve("p1").spec.net == "allow=api.example:443,peers"
    got = await vm.set_vm("p1", None, None, None, "nat")
    assert got.spec.net == "nat" and got.spec.nat
    rules = _rules(rig.ns, rec.id)
    assert any("masquerade" in r for r in rules)
    assert not any('"192.0.2.7"' in r for r in rules)
    assert net.guest_dns.client(rec.guest_ip) is not None

    # a restarted daemon rebuilds the rules of a running VM from the store
    await net.remove_policy(rec.id)
    assert _rules(rig.ns, rec.id) == []
    d2 = build_daemon(rig.root, rig.ns, rig.fake, rig.ssh)
    try:
        assert d2.vm is not None
        await d2.vm.reconcile()
        assert d2.vm.resolve("p1").state == VMState.RUNNING
        assert any("masquerade" in r for r in _rules(rig.ns, rec.id))
    finally:
        assert d2.store is not None and d2.net is not None
        await d2.net.close()
        d2.store.close()

    await vm.stop_vm("p1")
    assert _rules(rig.ns, rec.id) == []
