"""HostNetwork end to end inside a test namespace: bridge, pool, taps, NAT, DNS, close."""

from __future__ import annotations

import asyncio
import logging

import pytest
from _netns_helpers import ns_links, ns_nft, sh
from dnslib import RCODE, DNSRecord

from stoker.config import Config
from stoker.daemon.host_network import HostNetwork
from stoker.daemon.hostnet import TAP_PREFIX
from stoker.runner import Runner

pytestmark = pytest.mark.integration

LOG = logging.getLogger("test.host_network")


def _taps(ns: str) -> set[str]:
    return {n for n in ns_links(ns) if n.startswith(TAP_PREFIX)}


async def _ask(net: HostNetwork, name: str) -> DNSRecord:
    assert net.dns.address is not None
    host, port = net.dns.address
    raw = await asyncio.to_thread(DNSRecord.question(name).send, host, port, timeout=3)
    return DNSRecord.parse(raw)


async def test_host_network_lifecycle(netns: str) -> None:
    config = Config(bridge_cidr="172.30.0.0/24", tap_pool_size=2, dns_listen="127.0.0.1:0")
    net = HostNetwork(config, Runner(), LOG, netns=netns)
    await net.start()
    try:
        assert net.status().dns_listen is not None
        assert "br-stoker" not in ns_links(netns)  # bridge comes on demand
        assert _taps(netns) == set()

        await net.ensure_bridge()
        await net.ensure_bridge()
        assert await net.links.addresses("br-stoker") == ["172.30.0.1/24"]
        await net.pool.wait_refilled()
        assert len(net.pool.pooled) == 2

        ip = net.allocate_ip(set())
        tap = await net.acquire_tap()
        await net.attach_tap(tap)
        assert await net.links.ports("br-stoker") == [tap]
        assert not await net.teardown_bridge_if_unused()  # a VM's tap is attached

        await net.apply_policy("vm-a", ip, tap, "06:53:ac:1e:00:02", "nat")
        assert await net.policy_vm_ids() == {"vm-a"}
        assert net.status().policies == {"vm-a": "nat"}
        assert net.status().guest_dns == "172.30.0.1:53"
        fwd = sh("ip", "netns", "exec", netns, "cat", "/proc/sys/net/ipv4/ip_forward")
        assert fwd.stdout.strip() == "1"

        net.publish_dns("web", ip)
        assert str((await _ask(net, "web.vm")).rr[0].rdata) == ip
        net.unpublish_dns("web")
        assert (await _ask(net, "web.vm")).header.rcode == RCODE.NXDOMAIN
        await net.pool.wait_refilled()
        pooled = set(net.pool.pooled)
        assert len(pooled) == 2 and tap not in pooled
    finally:
        await net.close()

    # close(): pooled taps gone, the VM's tap, bridge and NAT rules untouched
    assert _taps(netns) == {tap}
    assert await net.links.ports("br-stoker") == [tap]
    assert "stoker-vm:vm-a" in ns_nft(netns)
    assert net.status().dns_listen is None

    await net.remove_policy("vm-a")
    await net.remove_policy("vm-a")
    await net.release_tap(tap)
    await net.release_tap(tap)
    assert await net.teardown_bridge_if_unused()
    assert ns_links(netns) == {"lo"}
    assert "stoker" not in ns_nft(netns)
    assert not await net.teardown_bridge_if_unused()


async def test_restart_with_existing_bridge_warms_pool_and_reaps_orphans(netns: str) -> None:
    config = Config(tap_pool_size=1, dns_listen="127.0.0.1:0")
    first = HostNetwork(config, Runner(), LOG, netns=netns)
    await first.ensure_bridge()
    in_use = await first.acquire_tap()
    await first.attach_tap(in_use)
    orphan = await first.acquire_tap()  # as if the daemon died before recording it
    await first.pool.close()  # (a crash would even leave the pooled tap behind)

    second = HostNetwork(config, Runner(), LOG, netns=netns)
    await second.start()  # bridge exists: the pool warms up right away
    try:
        await second.pool.wait_refilled()
        assert len(second.pool.pooled) == 1
        gone = await second.reap_orphan_taps({in_use})
        assert gone == [orphan]
        assert _taps(netns) == {in_use, *second.pool.pooled}
    finally:
        await second.close()
    assert _taps(netns) == {in_use}
    await second.release_tap(in_use)
    assert await second.teardown_bridge_if_unused()
    assert ns_links(netns) == {"lo"}
