"""ImageService results are typed (dataclasses from `stoker.model.wire` or records), and the
JSON the RPC layer makes of them is the shape docs/json-output.md describes."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Any

import pytest

from stoker.daemon.catalog.catalog import CatalogKernel
from stoker.daemon.image_service import ImageService
from stoker.model import wire
from stoker.model.records import Image
from stoker.rpc.server import RequestContext
from stoker.store.db import now

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[2] / "docs" / "json-output.md"


def ctx() -> RequestContext:
    return RequestContext(peer_uid=0, peer_pid=0)


def _mentions_dict(tp: Any) -> bool:
    if tp is dict:
        return True
    return any(_mentions_dict(a) for a in typing.get_args(tp)) or typing.get_origin(tp) is dict


def test_no_image_service_method_returns_a_dict() -> None:
    offenders = []
    for name, fn in inspect.getmembers(ImageService, inspect.isfunction):
        if name.startswith("_"):
            continue
        ret = typing.get_type_hints(fn).get("return")
        if ret is None or ret is Any or _mentions_dict(ret):
            offenders.append(f"{name} -> {ret}")
    assert offenders == []


def test_available_kernel_is_a_catalog_kernel_plus_installed() -> None:
    catalog = [f.name for f in dataclasses.fields(CatalogKernel)]
    assert [f.name for f in dataclasses.fields(wire.AvailableKernel)] == [*catalog, "installed"]


@pytest.mark.parametrize("shape", [wire.AvailableKernel, wire.CachePruned])
def test_documented_fields(shape: type[Any]) -> None:
    text = DOCS.read_text()
    missing = [f.name for f in dataclasses.fields(shape) if f"`{f.name}`" not in text]
    assert missing == []


async def test_wire_json_of_image_results(
    daemon_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = {
        "name": "cat-kernel",
        "version": "6.1",
        "arch": "x86_64",
        "url": "http://127.0.0.1:9/k.tar.zst",  # listed only, never fetched
        "sha256": "ab" * 32,
        "size": 123,
        "description": "a test kernel",
    }
    cat = tmp_path / "catalog.json"
    cat.write_text(json.dumps({"images": [], "kernels": [kernel]}))
    monkeypatch.setenv("STOKER_CATALOG", str(cat))
    d = daemon_factory()
    kernels = await d.dispatch("kernel.list", {"available": True}, ctx())
    assert kernels == [{**kernel, "installed": False}]
    assert list(kernels[0]) == [f.name for f in dataclasses.fields(wire.AvailableKernel)]
    pruned = await d.dispatch("image.cache.prune", {"dry_run": True}, ctx())
    assert pruned == {"dry_run": True, "bytes_freed": 0, "removed": 0, "in_use": 0}
    d.store.upsert_image(
        Image(
            name="img",
            managed=False,
            rootfs="/nonexistent/rootfs.ext4",
            work_seed=None,
            kernel=None,
            source="register:/nonexistent",
            size=1,
            created_at=now(),
        )
    )
    assert await d.dispatch("image.delete", {"name": "img"}, ctx()) == {"name": "img"}
    assert d.store.get_image("img") is None
