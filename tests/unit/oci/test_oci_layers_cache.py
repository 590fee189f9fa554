"""Layer replay semantics and the blob cache's guarantees, on local files (no registry)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import zstandard

from stoker.daemon.oci import (
    BlobCache,
    DigestMismatch,
    LayerApplier,
    TruncatedBlob,
    UnsafeLayer,
    detect,
)
from stoker.daemon.oci.layers import lookup
from stoker.daemon.oci.registry import TruncatedTransfer

pytestmark = pytest.mark.unit


def tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """(name, kind, data-or-linkname) -> plain tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload in members:
            ti = tarfile.TarInfo(name)
            ti.uid = ti.gid = os.geteuid()
            ti.mtime = 1_600_000_000
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(payload)
                tf.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, str(payload)
                tf.addfile(ti)
            else:
                data = payload if isinstance(payload, bytes) else payload.encode()
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def apply(tmp: Path, *layers: bytes) -> Path:
    root = tmp / "root"
    a = LayerApplier(root, label="test/ref", allow_devices=False)
    for i, blob in enumerate(layers):
        p = tmp / f"layer{i}"
        p.write_bytes(blob)
        a.apply(p, digest=f"sha256:{i}")
    a.finish()
    return root


def listing(root: Path) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        for n in [*dirs, *files]:
            out.append(os.path.relpath(os.path.join(d, n), root))
    return sorted(out)


def test_compressions_and_whiteouts(tmp_path: Path) -> None:
    l1 = gzip.compress(
        tar(("a", "dir", b""), ("a/x", "f", "1"), ("a/y", "f", "2"), ("b", "f", "b"))
    )
    l2 = zstandard.ZstdCompressor().compress(tar(("a/.wh.x", "f", ""), ("c", "f", "c")))
    l3 = tar((".wh.b", "f", ""), ("a/z", "f", "3"))
    root = apply(tmp_path, l1, l2, l3)
    assert listing(root) == ["a", "a/y", "a/z", "c"]


def test_opaque_marker_after_entries_keeps_this_layers_files(tmp_path: Path) -> None:
    l1 = tar(("d", "dir", b""), ("d/old", "f", "o"), ("d/sub", "dir", b""), ("d/sub/old2", "f", ""))
    # The marker comes last; the new entries in d/ and d/sub/ must survive it.
    l2 = tar(("d/new", "f", "n"), ("d/sub/new2", "f", ""), ("d/.wh..wh..opq", "f", ""))
    root = apply(tmp_path, l1, l2)
    assert listing(root) == ["d", "d/new", "d/sub", "d/sub/new2"]


def test_replacements_between_types(tmp_path: Path) -> None:
    l1 = tar(("p", "dir", b""), ("p/in", "f", ""), ("q", "f", "file"), ("s", "sym", "p"))
    l2 = tar(("p", "f", "now a file"), ("q", "dir", b""), ("s", "dir", b""))
    root = apply(tmp_path, l1, l2)
    assert (root / "p").read_text() == "now a file"
    assert (root / "q").is_dir() and (root / "s").is_dir() and not (root / "s").is_symlink()


def test_hardlink_and_relative_symlink_inside(tmp_path: Path) -> None:
    l1 = tar(("d", "dir", b""), ("d/f", "f", "data"), ("d/up", "sym", "../d"), ("h", "link", "d/f"))
    l2 = tar(("d/up/g", "f", "through"))
    root = apply(tmp_path, l1, l2)
    assert os.stat(root / "h").st_ino == os.stat(root / "d/f").st_ino
    assert (root / "d/g").read_text() == "through"


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ((("../x", "f", ""),), "path traversal"),
        ((("/x", "f", ""),), "absolute path"),
        ((("l", "sym", "../../.."), ("l/x", "f", "")), "outside the image root"),
        ((("l", "sym", "a/../../x"), ("l/y", "f", "")), "outside the image root"),
        ((("h", "link", "nope"),), "does not exist"),
        ((("d", "dir", b""), ("h", "link", "d")), "hardlink to directory"),
        ((("f", "f", ""), ("f/x", "f", "")), "to be a directory"),
        ((("a", "sym", "b"), ("b", "sym", "a"), ("a/x", "f", "")), "symlink loop"),
    ],
)
def test_unsafe(
    tmp_path: Path, members: tuple[tuple[str, str, bytes | str], ...], match: str
) -> None:
    with pytest.raises(UnsafeLayer, match=match) as ei:
        apply(tmp_path, tar(*members))
    assert "test/ref" in str(ei.value)
    assert not (tmp_path / "x").exists()


def test_devices_refused_when_not_allowed(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("null")
        ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
        tf.addfile(ti)
    with pytest.raises(UnsafeLayer, match="device node"):
        apply(tmp_path, buf.getvalue())


def test_lookup_and_detect_stay_inside(tmp_path: Path) -> None:
    root = apply(
        tmp_path,
        tar(
            ("usr", "dir", b""),
            ("usr/lib", "dir", b""),
            ("usr/lib/systemd", "dir", b""),
            ("usr/lib/systemd/systemd", "f", "x"),
            ("lib", "sym", "/usr/lib"),
            ("sbin", "sym", "../../../../../../bin"),
            ("bin", "dir", b""),
            ("bin/sshd", "sym", "/../../../usr/sbin/sshd-real"),
        ),
    )
    assert lookup(root, "lib/systemd/systemd") == root / "usr/lib/systemd/systemd"
    assert lookup(root, "sbin") == root / "bin"  # clamped at the image root
    assert lookup(root, "bin/sshd") is None
    assert detect(root) == (True, False)


def _source(chunks: list[bytes], calls: list[int], fail: Exception | None = None):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def open_() -> AsyncIterator[AsyncIterator[bytes]]:
        calls.append(1)

        async def gen() -> AsyncIterator[bytes]:
            for c in chunks:
                await asyncio.sleep(0.01)
                yield c
            if fail is not None:
                raise fail

        yield gen()

    return open_


async def test_cache_verifies_and_coalesces(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    calls: list[int] = []
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    c1, c2 = BlobCache(tmp_path / "c"), BlobCache(tmp_path / "c")  # two owners, one dir
    p1, p2 = await asyncio.gather(
        c1.fetch(digest, len(data), _source(chunks, calls), label="r"),
        c2.fetch(digest, len(data), _source(chunks, calls), label="r"),
    )
    assert p1 == p2 and p1.read_bytes() == data and len(calls) == 1
    assert os.listdir(c1.tmp_dir) == []


async def test_cache_rejects_bad_content(tmp_path: Path) -> None:
    data = b"x" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache = BlobCache(tmp_path / "c")
    with pytest.raises(DigestMismatch, match="tampered"):
        await cache.fetch(digest, 1000, _source([b"y" * 1000], []), label="r")
    with pytest.raises(DigestMismatch, match="larger than"):
        await cache.fetch(digest, 1000, _source([data, b"z"], []), label="r")
    with pytest.raises(TruncatedBlob, match="ended after 500 of 1000"):
        await cache.fetch(digest, 1000, _source([data[:500]], []), label="r")
    with pytest.raises(TruncatedBlob, match="cut off after 500"):
        await cache.fetch(
            digest, 1000, _source([data[:500]], [], TruncatedTransfer("reset")), label="r"
        )
    assert not cache.contains(digest)
    assert os.listdir(cache.tmp_dir) == []


async def test_prune_skips_pinned(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c")
    blobs = [os.urandom(1000 + i) for i in range(2)]
    digests = ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
    for b, d in zip(blobs, digests, strict=True):
        await cache.fetch(d, len(b), _source([b], []), label="r")
    async with cache.pinned([digests[0]]):
        dry = await cache.prune(dry_run=True)
        assert dry.bytes_freed == 1001 and dry.in_use == [digests[0]]
        res = await cache.prune()
        assert res.removed == [digests[1]] and res.bytes_freed == 1001
    assert cache.contains(digests[0]) and not cache.contains(digests[1])
    res = await cache.prune()
    assert res.removed == [digests[0]] and res.bytes_freed == 1000
