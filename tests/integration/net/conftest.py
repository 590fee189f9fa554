"""Network-namespace fixtures for host-network integration tests.

Everything these tests create (bridges, taps, veths, nft tables) lives in namespaces named
`stoker-test-*` that the fixtures add and delete; `host_unchanged` checks that the host's
own links and nftables tables are the same after each test as before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _netns_helpers import Namespaces, host_links, host_nft_tables, need_root_tools


@pytest.fixture(autouse=True)
def host_unchanged() -> Iterator[None]:
    """Fail the test if it left links or nftables tables behind on the host."""
    need_root_tools()
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    links, tables, fwd = host_links(), host_nft_tables(), forward.read_text()
    yield
    assert host_links() == links, "the host's links changed: a test leaked a device"
    assert host_nft_tables() == tables, "the host's nftables tables changed"
    assert forward.read_text() == fwd, "the host's ip_forward changed"


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    """Make namespaces with `.new()`; all are deleted afterwards, and checked gone."""
    ns = Namespaces()
    try:
        yield ns
    finally:
        ns.cleanup()
    assert not ns.leftovers(), "a test namespace was left behind"


@pytest.fixture
def netns(namespaces: Namespaces) -> str:
    """One fresh network namespace with loopback up."""
    return namespaces.new()
