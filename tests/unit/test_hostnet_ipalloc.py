"""ipalloc: deterministic guest addresses inside the bridge CIDR."""

from __future__ import annotations

import ipaddress

import pytest

from stoker.daemon.hostnet.ipalloc import allocate_ip, gateway_for
from stoker.errors import InvalidArgument, Unavailable

pytestmark = pytest.mark.unit


def test_first_free_address_skips_network_and_gateway() -> None:
    assert gateway_for("172.30.0.0/24") == "172.30.0.1"
    assert allocate_ip("172.30.0.0/24", set()) == "172.30.0.2"


def test_deterministic_for_the_same_inputs() -> None:
    used = {"172.30.0.2", "172.30.0.4"}
    first = allocate_ip("172.30.0.0/24", used)
    assert first == "172.30.0.3"
    assert allocate_ip("172.30.0.0/24", set(used)) == first
    assert allocate_ip("172.30.0.0/24", sorted(used, reverse=True)) == first


def test_skips_used_addresses_in_order() -> None:
    used: set[str] = set()
    got = []
    for _ in range(5):
        ip = allocate_ip("10.20.0.0/24", used)
        got.append(ip)
        used.add(ip)
    assert got == [f"10.20.0.{i}" for i in range(2, 7)]


def test_whole_small_network_never_hands_out_reserved_addresses() -> None:
    net = ipaddress.IPv4Network("10.9.0.0/29")
    used: set[str] = set()
    while True:
        try:
            used.add(allocate_ip(net, used))
        except Unavailable:
            break
    assert used == {f"10.9.0.{i}" for i in range(2, 7)}
    assert "10.9.0.0" not in used and "10.9.0.7" not in used and "10.9.0.1" not in used


def test_exhaustion_names_the_cidr() -> None:
    used = {f"10.9.0.{i}" for i in range(2, 7)}
    with pytest.raises(Unavailable) as ei:
        allocate_ip("10.9.0.0/29", used)
    assert "10.9.0.0/29" in str(ei.value)
    assert "bridge_cidr" in str(ei.value)


def test_explicit_gateway_is_skipped_and_first_host_becomes_usable() -> None:
    assert allocate_ip("10.9.0.0/29", set(), gateway="10.9.0.2") == "10.9.0.1"
    assert allocate_ip("10.9.0.0/29", {"10.9.0.1"}, gateway="10.9.0.2") == "10.9.0.3"


def test_malformed_used_entries_are_ignored() -> None:
    assert allocate_ip("172.30.0.0/24", {"not-an-ip", "", "172.30.0.2"}) == "172.30.0.3"


def test_invalid_cidr_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        allocate_ip("172.30.0.0/33", set())
