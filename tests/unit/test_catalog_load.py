"""The catalog file: the embedded one, the STOKER_CATALOG override, and every malformation."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from stoker.daemon.catalog import (
    CATALOG_ENV,
    CatalogError,
    CatalogImage,
    CatalogKernel,
    load_catalog,
    parse_catalog,
)
from stoker.errors import NotFound

pytestmark = pytest.mark.unit

SHA_K = "a" * 64
SHA_I = "b" * 64


def good_doc() -> dict[str, Any]:
    return {
        "comment": "test catalog",
        "kernels": [
            {
                "name": "linux-6.1",
                "version": "6.1.0-18",
                "arch": "x86_64",
                "url": "http://127.0.0.1:1/k.tar.zst",
                "sha256": SHA_K,
                "size": 1234,
            }
        ],
        "images": [
            {
                "name": "debian-12",
                "version": "2024.1",
                "arch": "x86_64",
                "url": "https://example.invalid/i.tar.zst",
                "sha256": SHA_I,
                "size": 99,
                "kernel_ref": "linux-6.1",
                "description": "Debian 12",
            }
        ],
    }


def write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "catalog.json"
    p.write_text(json.dumps(doc))
    return p


def test_embedded_catalog_is_packaged_and_valid() -> None:
    # Shipped as package data: found through importlib.resources in this (editable) install.
    res = resources.files("stoker") / "data" / "catalog.json"
    assert res.is_file()
    doc = json.loads(res.read_text())
    assert "comment" in doc
    cat = load_catalog(env={})
    assert cat.source == "embedded"
    # No bundles are published yet: an honest, empty catalog.
    assert cat.images == () and cat.kernels == ()
    assert cat.find_image("debian-bookworm") is None
    with pytest.raises(NotFound, match="it is empty"):
        cat.kernel("anything")


def test_env_override_and_lookups(tmp_path: Path) -> None:
    p = write(tmp_path, good_doc())
    cat = load_catalog(env={CATALOG_ENV: str(p)})
    assert cat.source == str(p)
    im = cat.image("debian-12")
    assert isinstance(im, CatalogImage)
    assert (im.version, im.arch, im.size, im.sha256) == ("2024.1", "x86_64", 99, SHA_I)
    k = cat.kernel_for(im)
    assert isinstance(k, CatalogKernel) and k.name == "linux-6.1" and k.description == ""
    assert cat.find_kernel("nope") is None
    assert k.to_dict()["url"] == "http://127.0.0.1:1/k.tar.zst"
    with pytest.raises(NotFound) as ei:
        cat.image("ubuntu")
    assert "'ubuntu'" in str(ei.value) and "debian-12" in str(ei.value)


def test_env_read_from_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CATALOG_ENV, str(write(tmp_path, good_doc())))
    assert [e.name for e in load_catalog().kernels] == ["linux-6.1"]


def test_explicit_path_beats_env(tmp_path: Path) -> None:
    doc = good_doc()
    doc["images"] = []
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    cat = load_catalog(other, env={CATALOG_ENV: str(write(tmp_path, good_doc()))})
    assert cat.images == ()


def test_missing_file_names_path_and_variable(tmp_path: Path) -> None:
    p = tmp_path / "nope.json"
    with pytest.raises(CatalogError) as ei:
        load_catalog(env={CATALOG_ENV: str(p)})
    assert str(p) in str(ei.value) and CATALOG_ENV in str(ei.value)


Mutate = Callable[[dict[str, Any]], object]


def _set(path: tuple[Any, ...], value: object) -> Mutate:
    def f(doc: dict[str, Any]) -> object:
        d: Any = doc
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        return doc

    return f


def _del(path: tuple[Any, ...]) -> Mutate:
    def f(doc: dict[str, Any]) -> object:
        d: Any = doc
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
        return doc

    return f


def _dup_kernel(doc: dict[str, Any]) -> object:
    doc["kernels"].append(copy.deepcopy(doc["kernels"][0]))
    return doc


BAD: list[tuple[str, Mutate, list[str]]] = [
    ("top-level list", lambda d: [d], ["top level must be an object"]),
    ("unknown top key", _set(("extra",), 1), ["'extra'"]),
    ("images missing", _del(("images",)), ['"images" is missing']),
    ("kernels not list", _set(("kernels",), {}), ['"kernels" must be a list']),
    ("schema version", _set(("schema_version",), 2), ["schema_version 2"]),
    ("entry not object", _set(("images", 0), "x"), ["images[0] must be an object"]),
    (
        "missing sha256",
        _del(("images", 0, "sha256")),
        ['images[0] ("debian-12")', "'sha256'"],
    ),
    (
        "bad sha256",
        _set(("images", 0, "sha256"), "XYZ"),
        ['images[0] ("debian-12")', '"sha256"', "64 lowercase hex"],
    ),
    (
        "uppercase sha256",
        _set(("kernels", 0, "sha256"), "A" * 64),
        ['kernels[0] ("linux-6.1")', '"sha256"'],
    ),
    (
        "ftp url",
        _set(("kernels", 0, "url"), "ftp://h/k.tar.zst"),
        ['kernels[0] ("linux-6.1")', '"url"'],
    ),
    ("url without host", _set(("kernels", 0, "url"), "http:///k"), ['"url"']),
    ("size zero", _set(("kernels", 0, "size"), 0), ['"size"', "positive integer"]),
    ("size bool", _set(("kernels", 0, "size"), True), ['"size"']),
    ("size string", _set(("images", 0, "size"), "10"), ['images[0] ("debian-12")', '"size"']),
    ("bad name", _set(("images", 0, "name"), "Bad Name"), ["images[0]", '"name"']),
    ("version empty", _set(("kernels", 0, "version"), ""), ['"version"']),
    ("arch odd", _set(("kernels", 0, "arch"), "x86 64"), ['"arch"']),
    ("description number", _set(("images", 0, "description"), 3), ['"description"']),
    (
        "unknown entry field",
        _set(("images", 0, "extra"), 1),
        ['images[0] ("debian-12")', "'extra'"],
    ),
    ("duplicate name", _dup_kernel, ['kernels[1] ("linux-6.1")', "listed twice"]),
    (
        "kernel_ref unknown",
        _set(("images", 0, "kernel_ref"), "linux-9"),
        ['images[0] ("debian-12")', 'kernel_ref "linux-9"'],
    ),
    (
        "arch mismatch",
        _set(("kernels", 0, "arch"), "aarch64"),
        ['images[0] ("debian-12")', "aarch64"],
    ),
]


@pytest.mark.parametrize(("mutate", "fragments"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_catalog_names_entry_and_field(
    tmp_path: Path, mutate: Mutate, fragments: list[str]
) -> None:
    p = write(tmp_path, mutate(good_doc()))
    with pytest.raises(CatalogError) as ei:
        load_catalog(p)
    msg = str(ei.value)
    assert f"catalog {p}" in msg
    for frag in fragments:
        assert frag in msg, msg
    assert msg.endswith("fix the file")


def test_not_json(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_text("{nope")
    with pytest.raises(CatalogError, match="not valid JSON"):
        load_catalog(p)


def test_embedded_catalog_errors_say_report_it() -> None:
    with pytest.raises(CatalogError) as ei:
        parse_catalog("[]", "embedded")
    assert "shipped with stoker" in str(ei.value) and CATALOG_ENV in str(ei.value)
