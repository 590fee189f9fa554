"""The warm pool's pure parts: which creates may take from the pool, the fill backoff,
`[pool]` in the config, the store's pool marker, and doctor's pool line."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_store import image, kernel, vm

from stoker.config import MAX_POOL_SIZE, parse_config
from stoker.daemon.pool_service import backoff_delay, pool_refusal
from stoker.daemon.vm_service import CreateRequest
from stoker.errors import AlreadyExists, ConfigError, NotFound
from stoker.hostprobe.doctor import Context, check_pool
from stoker.layout import Layout
from stoker.model.records import VMSpec
from stoker.runner import Runner
from stoker.store import Store

pytestmark = pytest.mark.unit

DEFAULT = VMSpec(vcpu=1, memory_mib=1024, disk_size=8 << 30, overlay_size=8 << 30)
SIZES = {"debian-bookworm": 1}


def refusal(**kw: Any) -> str | None:
    image = kw.pop("image", "debian-bookworm")
    return pool_refusal(CreateRequest(**kw), image, SIZES, DEFAULT)


def test_default_requests_may_take_from_the_pool() -> None:
    assert refusal() is None
    assert refusal(name="web", ttl=60, ready="agent") is None
    # The network policy is applied at take (as `vm set --net` does on a running VM).
    assert refusal(net="nat") is None and refusal(nat=True) is None
    # Explicit values equal to the defaults are the default machine.
    assert refusal(vcpu=1, memory_mib=1024, disk_size="8G") is None
    assert refusal(disk_size=8 << 30) is None


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"vcpu": 2}, "--vcpu 2 is not the pool's 1"),
        ({"memory_mib": 2048}, "--memory 2048 is not the pool's 1024 MiB"),
        ({"disk_size": "16G"}, "--disk-size 16G is not the pool's"),
        ({"disk_size": "lots"}, "--disk-size is not the pool's"),
        ({"no_start": True}, "--no-start asks for a VM that is not running"),
        ({"image": "other"}, "image other has no warm pool"),
    ],
)
def test_other_requests_boot_cold_with_the_reason(kw: dict[str, Any], why: str) -> None:
    got = refusal(**kw)
    assert got is not None and why in got


def test_a_pool_of_size_zero_serves_nothing() -> None:
    got = pool_refusal(CreateRequest(), "debian-bookworm", {}, DEFAULT)
    assert got is not None and "no warm pool" in got


def test_backoff_doubles_and_is_capped() -> None:
    assert backoff_delay(0) == 0
    assert [backoff_delay(n, 5, 300) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert backoff_delay(10_000, 5, 300) == 300  # no overflow
    assert backoff_delay(3, 0.5, 1.0) == 1.0


def test_pool_config_sizes_per_image() -> None:
    c = parse_config({}, cpus=2, mem_bytes=4 << 30)
    assert c.pool.sizes(c.default_image) == {}
    c = parse_config({"pool": {"size": 2}}, cpus=2, mem_bytes=4 << 30)
    assert c.pool.sizes(c.default_image) == {"debian-bookworm": 2}
    c = parse_config(
        {"pool": {"size": 1, "images": {"my-env": 3, "debian-bookworm": 0}}},
        cpus=2,
        mem_bytes=4 << 30,
    )
    assert c.pool.sizes(c.default_image) == {"my-env": 3}  # images overrides size


@pytest.mark.parametrize(
    ("pool", "key"),
    [
        ({"size": -1}, "pool.size"),
        ({"size": MAX_POOL_SIZE + 1}, "pool.size"),
        ({"size": "1"}, "pool.size"),
        ({"size": True}, "pool.size"),
        ({"images": {"x": 99}}, "pool.images.x"),
        ({"images": ["x"]}, "pool.images"),
        ({"sise": 1}, "pool.sise"),
    ],
)
def test_bad_pool_config_names_the_key(pool: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"pool": pool}, cpus=2, mem_bytes=4 << 30)
    assert repr(key) in ei.value.message
    with pytest.raises(ConfigError):
        parse_config({"pool": 1}, cpus=2, mem_bytes=4 << 30)


def test_store_hides_pool_vms_until_taken(tmp_path: Path) -> None:
    s = Store(tmp_path / "state.db")
    try:
        s.upsert_kernel(kernel())
        s.upsert_image(image())
        s.insert_vm(vm("web", "172.30.0.2"))
        pv = vm("pool-1", "172.30.0.3")
        s.insert_vm(pv, pool="img")
        assert [v.name for v in s.list_vms()] == ["web"]
        assert {v.name for v in s.list_all_vms()} == {"web", "pool-1"}
        assert s.used_ips() == {"172.30.0.2", "172.30.0.3"}
        (m,) = s.pool_members()
        assert (m.vm_id, m.image, m.ready) == (pv.id, "img", False)
        s.set_pool_ready(pv.id)
        assert s.pool_members("img")[0].ready and s.pool_members("other") == []
        # Taking it under a name in use changes nothing.
        pv.name = "web"
        with pytest.raises(AlreadyExists):
            s.take_pool_vm(pv, None)
        assert s.is_pool_vm(pv.id) and s.get_vm(pv.id).name == "pool-1"  # type: ignore[union-attr]
        pv.name, pv.dns_name = "api", "api.vm"
        s.take_pool_vm(pv, "2030-01-01T00:00:00.000000Z")
        assert not s.is_pool_vm(pv.id) and s.pool_members() == []
        got = s.get_vm(pv.id)
        assert got is not None and got.name == "api" and got.expires_at
        assert {v.name for v in s.list_vms()} == {"api", "web"}
        with pytest.raises(NotFound):
            s.take_pool_vm(pv, None)  # no longer in the pool
        # Deleting the VM drops its pool row with it.
        pv2 = vm("pool-2", "172.30.0.4")
        s.insert_vm(pv2, pool="img")
        s.delete_vm(pv2.id)
        assert s.pool_members() == []
    finally:
        s.close()


def test_doctor_reports_the_pool(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "s")
    off = parse_config({}, cpus=2, mem_bytes=4 << 30)
    on = parse_config({"pool": {"size": 1}}, cpus=2, mem_bytes=4 << 30)

    def run(config: Any, status: dict[str, Any] | None) -> Any:
        return asyncio.run(check_pool(Context(layout, config, Runner(), lambda: status)))

    c = run(off, None)
    assert c.status == "PASS" and "no warm pool" in c.message
    c = run(on, None)
    assert c.status == "WARN" and "daemon is not running" in c.message
    entry = {
        "image": "debian-bookworm",
        "size": 1,
        "ready": 1,
        "filling": 0,
        "failures": 0,
        "last_error": None,
        "waiting": None,
    }
    c = run(on, {"pool": [entry]})
    assert c.status == "PASS" and "debian-bookworm 1/1 ready" in c.message
    failing = {**entry, "ready": 0, "failures": 3, "last_error": "boom"}
    c = run(on, {"pool": [failing]})
    assert c.status == "WARN" and "3 failed fill(s), last: boom" in c.message
    assert "pool status" in c.fix
    # A template that failed is reported, but the pool still fills (pre-booted): a PASS.
    fell = {**entry, "strategy": "pre-booted", "fallback": "template failed: disk full"}
    c = run(on, {"pool": [fell]})
    assert c.status == "PASS" and "debian-bookworm 1/1 ready (pre-booted)" in c.message
    assert "not from a template: template failed: disk full" in c.message
