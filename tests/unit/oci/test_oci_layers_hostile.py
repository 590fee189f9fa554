"""Hostile layers (issue 9 items 5-6, issue 16 item 7): spec whiteouts within one layer,
nonsense tar metadata refused naming the entry, a per-layer decompressed-size ceiling,
and trees deeper than Python's recursion limit."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from stoker.daemon.imagemgr.owners import OwnerLedger
from stoker.daemon.imagemgr.safetree import rmtree
from stoker.daemon.oci import LayerApplier, UnsafeLayer
from stoker.daemon.oci.errors import LayerTooLarge
from stoker.daemon.oci.layers import tree_usage

pytestmark = pytest.mark.unit

_LEDGER: list[bool] = [False]


@pytest.fixture(autouse=True, params=["as-root", "ledger"])
def unpack_mode(request: pytest.FixtureRequest) -> None:
    """Every hostile layer also goes through the unprivileged mode (stand-ins + ledger)."""
    _LEDGER[0] = request.param == "ledger"


def _info(name: str, kind: str = "f", data: bytes = b"") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.uid = ti.gid = os.geteuid()
    ti.mtime = 1_600_000_000
    if kind == "dir":
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
    else:
        ti.size, ti.mode = len(data), 0o644
    return ti, data


def tar(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isfile() else None)
    return buf.getvalue()


def apply(tmp: Path, *layers: bytes, max_layer_size: int | None = None, **kw: int | None) -> Path:
    root = tmp / "root"
    a = LayerApplier(
        root,
        label="test/ref",
        allow_devices=True,
        max_layer_size=max_layer_size,
        ledger=OwnerLedger() if _LEDGER[0] else None,
        **kw,
    )
    for i, blob in enumerate(layers):
        p = tmp / f"layer{i}"
        p.write_bytes(blob)
        a.apply(p, digest=f"sha256:{i}")
    a.finish()
    return root


# --- whiteouts hide lower layers only (issue 16 item 7) --------------------------------------


def test_whiteout_after_a_file_of_the_same_layer_keeps_that_file(tmp_path: Path) -> None:
    lower = tar(_info("a", "dir"), _info("a/x", data=b"lower"), _info("a/y", data=b"y"))
    upper = tar(_info("a/x", data=b"upper"), _info("a/.wh.x"), _info("a/.wh.y"))
    root = apply(tmp_path, lower, upper)
    assert (root / "a/x").read_bytes() == b"upper"  # this layer's own file stays
    assert not (root / "a/y").exists()  # the lower layer's file is hidden


def test_whiteout_in_the_first_layer_keeps_its_own_file(tmp_path: Path) -> None:
    root = apply(tmp_path, tar(_info("a", "dir"), _info("a/x", data=b"1"), _info("a/.wh.x")))
    assert (root / "a/x").read_bytes() == b"1"


def test_whiteout_of_a_directory_this_layer_wrote_into(tmp_path: Path) -> None:
    lower = tar(_info("d", "dir"), _info("d/old", data=b"o"))
    upper = tar(_info("d/new", data=b"n"), _info(".wh.d"))
    root = apply(tmp_path, lower, upper)
    assert sorted(os.listdir(root / "d")) == ["new"]


# --- tar metadata (issue 9 item 6) ---------------------------------------------------------


def _pax(name: str, **pax: str) -> bytes:
    ti, data = _info(name, data=b"x")
    ti.pax_headers = dict(pax)
    return tar((ti, data))


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (_pax("p", path="etc/pa\x00sswd"), "NUL byte in its path"),
        (_pax("u", uid=str(1 << 40)), "out-of-range uid"),
        (_pax("g", gid="4294967295"), "out-of-range gid"),
        (_pax("n", mtime="nan"), "invalid mtime"),
        (_pax("h", mtime="1e30"), "invalid mtime"),
    ],
    ids=["nul-path", "uid", "gid", "mtime-nan", "mtime-huge"],
)
def test_nonsense_metadata_is_an_unsafe_layer_naming_the_entry(
    tmp_path: Path, blob: bytes, match: str
) -> None:
    with pytest.raises(UnsafeLayer, match=match) as ei:
        apply(tmp_path, blob)
    assert "test/ref" in str(ei.value) and "entry" in str(ei.value)


def test_huge_base256_device_number_is_refused(tmp_path: Path) -> None:
    ti = tarfile.TarInfo("dev/bad")
    ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1 << 50, 3
    blob = tar((ti, b""), fmt=tarfile.GNU_FORMAT)
    with pytest.raises(UnsafeLayer, match=r"'dev/bad'.*out-of-range device major"):
        apply(tmp_path, blob)


# --- decompressed size ceiling (issue 9 item 6) ----------------------------------------------


def test_a_layer_that_inflates_past_the_ceiling_is_refused(tmp_path: Path) -> None:
    bomb = gzip.compress(tar(_info("zeros", data=bytes(8 << 20))), compresslevel=9)
    assert len(bomb) < 64 << 10
    with pytest.raises(LayerTooLarge, match=r"more than 2 MiB \(max_layer_size\).*raise"):
        apply(tmp_path, bomb, max_layer_size=2 << 20)
    # The same layer passes under a larger ceiling.
    root = apply(tmp_path / "ok", bomb, max_layer_size=16 << 20)
    assert (root / "zeros").stat().st_size == 8 << 20


def test_plain_tar_over_the_ceiling_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LayerTooLarge):
        apply(tmp_path, tar(_info("f", data=bytes(3 << 20))), max_layer_size=1 << 20)


# --- deep trees (issue 9 item 5) -------------------------------------------------------------


def test_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    depth = 1100
    members = [_info("/".join(["d"] * i), "dir") for i in range(1, depth + 1)]
    members.append(_info("/".join(["d"] * depth) + "/leaf", data=b"deep"))
    try:
        # Past the path ceiling pulls refuse such a layer (see below); the walks must
        # cope anyway (bundles, golden trees, staging sweeps).
        root = apply(tmp_path, tar(*members), max_path=None)
        size, inodes = tree_usage(root)  # raised RecursionError with os.walk on 3.11
        assert inodes == depth + 2 and size >= (depth + 2) * 4096
        # A later layer whiting the whole tree out removes it without recursion.
        apply(tmp_path, tar(_info(".wh.d")), max_path=None)
        assert os.listdir(root) == []
        # And the cleanup of a deep staging tree works too.
        apply(tmp_path, tar(*members), max_path=None)
        rmtree(root)
        assert not root.exists()
    finally:
        # pytest's own tmp cleanup (shutil.rmtree) would hit the recursion limit.
        rmtree(tmp_path / "root", ignore_errors=True)


def test_directory_mtimes_are_never_set_through_a_later_symlink(tmp_path: Path) -> None:
    """Layer 1 makes a/b (its mtime is set at the end); layer 2 turns `a` into a link to a
    host directory that also has a `b`: the host directory's mtime must not change."""
    host = tmp_path / "host"
    (host / "b").mkdir(parents=True)
    os.utime(host / "b", ns=(5_000_000_000, 5_000_000_000))
    before = (host / "b").stat().st_mtime_ns
    lower = tar(_info("a", "dir"), _info("a/b", "dir"))
    upper = tar(_info(".wh.a"), (_symlink("a", str(host)), b""))
    root = apply(tmp_path, lower, upper)
    assert (root / "a").is_symlink()
    assert (host / "b").stat().st_mtime_ns == before


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    ti.mtime = 1_600_000_000
    return ti


def test_paths_past_the_mkfs_ceiling_are_refused(tmp_path: Path) -> None:
    """mke2fs 1.47 `-d` aborts with heap corruption on paths past ~2040 bytes."""
    long_name = "/".join(["d" * 99] * 16)  # 1599 characters
    with pytest.raises(UnsafeLayer, match=r"name of 1599 characters, over the 1536"):
        apply(tmp_path, tar(_info(long_name, data=b"x")))
    # The same depth reached through a symlink is caught on the resolved path.
    deep = "/".join(["d" * 99] * 15)
    blob = tar(
        _info(deep + "/f", data=b"x"),
        (_symlink("s", deep), b""),
        _info("s/" + "e" * 99 + "/g", data=b"y"),
    )
    with pytest.raises(UnsafeLayer, match=r"lands at a path of \d+ bytes, over the 1536"):
        apply(tmp_path / "two", blob)


def test_max_layer_size_config_key() -> None:
    from stoker.config import parse_config
    from stoker.errors import ConfigError

    assert parse_config({}).max_layer_size == 16 << 30
    assert parse_config({"max_layer_size": "2G"}).max_layer_size == 2 << 30
    for bad in ("1K", "lots", -5):
        with pytest.raises(ConfigError, match="max_layer_size"):
            parse_config({"max_layer_size": bad})
