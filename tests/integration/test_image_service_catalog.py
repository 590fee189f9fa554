"""`image pull NAME` / `kernel pull NAME` through ImageService for catalog entries: bundles
served by a local HTTP server, the kernel auto-pulled, concurrent pulls coalesced, a bad
hash publishing nothing."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import struct
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from aiohttp import web

from stoker.config import parse_config
from stoker.daemon.daemon import Daemon
from stoker.errors import StokerError
from stoker.layout import Layout
from stoker.store import Store

pytestmark = pytest.mark.integration


def _noop(*a: Any, **k: Any) -> None:
    pass


def bundle(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(buf.getvalue())


def elf() -> bytes:
    return b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HHI", 2, 0x3E, 1) + bytes(40)


@pytest.fixture
async def served(tmp_path: Path) -> Any:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("cat\n")
    img = tmp_path / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "4M"], check=True)
    blobs = {
        "k.tar.zst": bundle(
            {
                "vmlinux": elf(),
                "manifest.json": json.dumps(
                    {"name": "cat-kernel", "version": "6.1", "arch": "x86_64"}
                ).encode(),
            }
        ),
        "i.tar.zst": bundle(
            {
                "rootfs.ext4": img.read_bytes(),
                "manifest.json": json.dumps(
                    {
                        "name": "cat-image",
                        "version": "1",
                        "arch": "x86_64",
                        "kernel_ref": "cat-kernel",
                    }
                ).encode(),
            }
        ),
    }
    hits: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hits[name] = hits.get(name, 0) + 1
        await asyncio.sleep(0.05)
        return web.Response(body=blobs[name])

    app = web.Application()
    app.router.add_get("/{name}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def entry(name: str, sha: str | None = None) -> dict[str, Any]:
        data = blobs[name]
        return {
            "url": f"http://127.0.0.1:{port}/{name}",
            "sha256": sha or hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }

    yield entry, hits
    await runner.cleanup()


def write_catalog(path: Path, entry: Any, image_sha: str | None = None) -> None:
    path.write_text(
        json.dumps(
            {
                "images": [
                    {
                        "name": "cat-image",
                        "version": "1",
                        "arch": "x86_64",
                        "kernel_ref": "cat-kernel",
                        "description": "test",
                        **entry("i.tar.zst", image_sha),
                    }
                ],
                "kernels": [
                    {"name": "cat-kernel", "version": "6.1", "arch": "x86_64", **entry("k.tar.zst")}
                ],
            }
        )
    )


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    layout = Layout(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "s")
    layout.ensure()
    d = Daemon(
        layout=layout,
        config=parse_config({}),
        store=Store(layout.db_path),
        logger=logging.getLogger("stoker.test"),
    )
    return d


async def test_catalog_pull_with_kernel(
    daemon: Daemon, served: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, hits = served
    cat = tmp_path / "catalog.json"
    write_catalog(cat, entry)
    monkeypatch.setenv("STOKER_CATALOG", str(cat))
    images = daemon.images
    assert images is not None
    avail = images.available_kernels()
    assert [(k.name, k.installed) for k in avail] == [("cat-kernel", False)]
    a, b = await asyncio.gather(
        images.pull("cat-image", None, _noop), images.pull("cat-image", None, _noop)
    )
    assert a.name == b.name == "cat-image" and a.kernel == "cat-kernel"
    assert hits == {"k.tar.zst": 1, "i.tar.zst": 1}
    assert Path(a.rootfs).exists() and a.source == "catalog:cat-image"
    k = await images.get_kernel("cat-kernel")
    assert k.vmlinux and Path(k.vmlinux).exists()
    assert images.available_kernels()[0].installed


async def test_catalog_bad_hash_publishes_nothing(
    daemon: Daemon, served: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, _ = served
    cat = tmp_path / "catalog.json"
    write_catalog(cat, entry, image_sha="0" * 64)
    monkeypatch.setenv("STOKER_CATALOG", str(cat))
    images = daemon.images
    assert images is not None and daemon.layout is not None
    with pytest.raises(StokerError, match=r"sha256|digest"):
        await images.pull("cat-image", None, _noop)
    assert await images.list_images() == []
    assert not (daemon.layout.images_dir / "cat-image").exists()
    assert [p for p in daemon.layout.staging_dir.iterdir()] == []
