"""HostNetwork without root: DNS startup (including a busy port), status, IP allocation."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from dnslib import DNSRecord

from stoker.config import Config
from stoker.daemon.host_network import HostNetwork
from stoker.runner import Runner

pytestmark = pytest.mark.unit

LOG = logging.getLogger("test.host_network")
# A bridge name nobody has: start() only looks it up, and must create nothing.
ABSENT_BRIDGE = "stk-absent-br0"


def _config(dns_listen: str) -> Config:
    return Config(bridge_name=ABSENT_BRIDGE, dns_listen=dns_listen, tap_pool_size=2)


async def test_start_serves_dns_and_close_stops_it() -> None:
    net = HostNetwork(_config("127.0.0.1:0"), Runner(), LOG)
    await net.start()
    try:
        st = net.status()
        assert st.dns_listen and st.dns_error is None
        net.publish_dns("web", "172.30.0.7")
        assert net.dns.address is not None
        host, port = net.dns.address
        q = DNSRecord.question("web.vm")
        raw = await asyncio.to_thread(q.send, host, port, timeout=3)
        assert str(DNSRecord.parse(raw).rr[0].rdata) == "172.30.0.7"
        net.unpublish_dns("web")
        assert "web" not in net.dns.records()
        assert net.pool.pooled == ()  # no bridge here: no taps were made
    finally:
        await net.close()
    assert net.status().dns_listen is None


async def test_busy_dns_port_is_a_warning_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        net = HostNetwork(_config(f"127.0.0.1:{port}"), Runner(), LOG)
        with caplog.at_level(logging.WARNING, logger="test.host_network"):
            await net.start()
        st = net.status()
        await net.close()
    assert st.dns_listen is None
    assert f"127.0.0.1:{port}" in str(st.dns_error)
    assert "DNS for .vm disabled" in caplog.text


def test_allocate_ip_uses_config_cidr() -> None:
    net = HostNetwork(Config(bridge_cidr="10.77.0.0/29"), Runner(), LOG)
    assert net.allocate_ip(set()) == "10.77.0.2"
    assert net.allocate_ip({"10.77.0.2", "10.77.0.3"}) == "10.77.0.4"
