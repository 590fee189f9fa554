"""hostnet.links and hostnet.taps against real netlink, inside a test namespace."""

from __future__ import annotations

import logging

import pytest
from _netns_helpers import ns_links, sh

from stoker.daemon.hostnet import TAP_PREFIX, Links, TapPool
from stoker.errors import Conflict, Unavailable

pytestmark = pytest.mark.integration

LOG = logging.getLogger("test.hostnet")


def _taps(ns: str) -> set[str]:
    return {n for n in ns_links(ns) if n.startswith(TAP_PREFIX)}


async def test_bridge_is_idempotent_and_carries_the_gateway(netns: str) -> None:
    links = Links(netns)
    for _ in range(3):
        await links.ensure_bridge("br-stoker", "172.30.0.1", 24)
    assert await links.kind("br-stoker") == "bridge"
    assert await links.addresses("br-stoker") == ["172.30.0.1/24"]
    out = sh("ip", "-n", netns, "-o", "link", "show", "br-stoker").stdout
    assert ",UP" in out or "<UP" in out
    assert ns_links(netns) == {"lo", "br-stoker"}


async def test_bridge_name_taken_by_another_kind_is_a_conflict(netns: str) -> None:
    sh("ip", "-n", netns, "link", "add", "br-stoker", "type", "veth", "peer", "name", "stk-peer0")
    with pytest.raises(Conflict, match="not a bridge"):
        await Links(netns).ensure_bridge("br-stoker", "172.30.0.1", 24)


async def test_tap_create_attach_delete(netns: str) -> None:
    links = Links(netns)
    await links.ensure_bridge("br-stoker", "172.30.0.1", 24)
    await links.create_tap("tap-stk-test01")
    assert await links.kind("tap-stk-test01") == "tun"
    detail = sh("ip", "-n", netns, "-d", "link", "show", "tap-stk-test01").stdout
    assert "tun type tap pi off vnet_hdr on persist on" in detail
    assert await links.ports("br-stoker") == []
    await links.attach("tap-stk-test01", "br-stoker")
    assert await links.ports("br-stoker") == ["tap-stk-test01"]
    assert "master br-stoker" in sh("ip", "-n", netns, "link", "show", "tap-stk-test01").stdout
    assert await links.delete("tap-stk-test01") is True
    assert await links.delete("tap-stk-test01") is False
    assert not await links.exists("tap-stk-test01")
    assert await links.ports("br-stoker") == []


async def test_attach_needs_both_devices(netns: str) -> None:
    links = Links(netns)
    with pytest.raises(Unavailable, match="does not exist"):
        await links.attach("tap-stk-none", "br-stoker")
    await links.create_tap("tap-stk-test02")
    with pytest.raises(Unavailable, match="bridge br-stoker does not exist"):
        await links.attach("tap-stk-test02", "br-stoker")


async def test_pool_warms_refills_and_close_deletes_only_pooled(netns: str) -> None:
    pool = TapPool(Links(netns), 2, LOG)
    assert _taps(netns) == set()
    pool.start_refill()
    await pool.wait_refilled()
    warm = set(pool.pooled)
    assert len(warm) == 2 and _taps(netns) == warm
    assert all(len(n) <= 15 for n in warm)

    got = await pool.acquire()
    assert got in warm  # served from the warm pool, not made on demand
    await pool.wait_refilled()
    assert len(pool.pooled) == 2 and got not in pool.pooled
    assert _taps(netns) == {got, *pool.pooled}

    second = await pool.acquire()
    await pool.wait_refilled()
    await pool.release(second)
    assert second not in _taps(netns)
    await pool.release(second)  # idempotent

    await pool.close()
    assert pool.pooled == ()
    assert _taps(netns) == {got}  # a tap in use by a VM survives close()
    pool.start_refill()  # closed: no refill
    await pool.wait_refilled()
    assert _taps(netns) == {got}
    await pool.release(got)
    assert _taps(netns) == set()


async def test_empty_pool_makes_taps_on_demand(netns: str) -> None:
    pool = TapPool(Links(netns), 0, LOG)
    a = await pool.acquire()
    b = await pool.acquire()
    assert a != b and a.startswith(TAP_PREFIX)
    assert _taps(netns) == {a, b}
    await pool.close()
    assert _taps(netns) == {a, b}
    for n in (a, b):
        await pool.release(n)
    assert _taps(netns) == set()


async def test_pool_skips_a_pooled_tap_that_vanished(netns: str) -> None:
    links = Links(netns)
    pool = TapPool(links, 1, LOG)
    pool.start_refill()
    await pool.wait_refilled()
    (stale,) = pool.pooled
    await links.delete(stale)  # e.g. removed by hand
    got = await pool.acquire()
    assert got != stale and await links.exists(got)
    await pool.close()
    await pool.release(got)
    assert _taps(netns) == set()
