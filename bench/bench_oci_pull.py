"""Benchmark: OCI pull + convert to ext4, cold cache, against skopeo + umoci + mkfs.ext4.

Builds a ~300 MB three-layer image (incompressible files, compressible text, many small
mixed files), pushes it to a local `docker-registry`, then times, in the same run:

  stoker:   pull_image (download + verify + unpack) + build_ext4
  baseline: skopeo copy docker://... oci:DIR  +  umoci raw unpack  +  mkfs.ext4 -d

Each round uses fresh, empty directories (cold blob cache); the registry's own files
are in the page cache for both sides alike. Prints both times, throughput and the ratio.
Needs root and: docker-registry skopeo umoci e2fsprogs.

    sudo .venv/bin/python bench/bench_oci_pull.py [--size-mb 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchlib import local_registry

from stoker.daemon.oci import build_ext4, ext4_size, pull_image
from stoker.runner import Runner

MIB = 1 << 20


def _add(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), mode, 1_700_000_000
    tf.addfile(ti, io.BytesIO(data))


def _dir(tf: tarfile.TarFile, name: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
    tf.addfile(ti)


def _text(rng: random.Random, n: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"stoker", b"layer", b"image", b"root"]
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"%d %s %s %d\n" % (i, rng.choice(words), rng.choice(words), rng.randrange(1000))
        i += 1
    return bytes(out[:n])


def build_layers(total_mb: int) -> list[bytes]:
    """Three uncompressed tars of about total_mb/3 each."""
    rng = random.Random(42)
    per = total_mb * MIB // 3
    tars = []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:  # incompressible
        _dir(tf, "opt")
        _dir(tf, "opt/blobs")
        for i in range(per // (4 * MIB)):
            _add(tf, f"opt/blobs/b{i:03d}.bin", os.urandom(4 * MIB))
    tars.append(buf.getvalue())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:  # compressible
        _dir(tf, "usr")
        _dir(tf, "usr/share")
        _dir(tf, "usr/share/doc")
        chunk = _text(rng, 2 * MIB)
        for i in range(per // (2 * MIB)):
            _add(tf, f"usr/share/doc/t{i:03d}.txt", chunk[i % 97 :] + chunk[: i % 97])
    tars.append(buf.getvalue())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:  # many small mixed files
        _dir(tf, "srv")
        size, i = 0, 0
        text = _text(rng, 64 * 1024)
        while size < per:
            d = f"srv/d{i // 200:03d}"
            if i % 200 == 0:
                _dir(tf, d)
            n = rng.randrange(2048, 40 * 1024)
            data = os.urandom(n) if i % 2 else text[:n]
            _add(tf, f"{d}/f{i:05d}", data, 0o755 if i % 10 == 0 else 0o644)
            size += n
            i += 1
    tars.append(buf.getvalue())
    return tars


def _req(
    method: str, url: str, data: bytes | None = None, ctype: str | None = None
) -> tuple[int, dict[str, str]]:
    r = urllib.request.Request(url, data=data, method=method)
    if ctype:
        r.add_header("Content-Type", ctype)
    with urllib.request.urlopen(r, timeout=300) as resp:
        return resp.status, dict(resp.headers)


def push_blob(host: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _, h = _req("POST", f"http://{host}/v2/{repo}/blobs/uploads/", b"")
    loc = h["Location"]
    if loc.startswith("/"):
        loc = f"http://{host}{loc}"
    _req(
        "PUT", f"{loc}{'&' if '?' in loc else '?'}digest={digest}", data, "application/octet-stream"
    )
    return digest


def push_image(host: str, repo: str, tars: list[bytes]) -> int:
    layers = []
    for t in tars:
        blob = gzip.compress(t, compresslevel=6, mtime=0)
        layers.append(
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": push_blob(host, repo, blob),
                "size": len(blob),
            }
        )
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars],
            },
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": push_blob(host, repo, config),
            "size": len(config),
        },
        "layers": layers,
    }
    _req(
        "PUT",
        f"http://{host}/v2/{repo}/manifests/latest",
        json.dumps(manifest).encode(),
        "application/vnd.docker.distribution.manifest.v2+json",
    )
    return sum(la["size"] for la in layers)


def run(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.monotonic() - t0


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


async def ours(ref: str, work: Path) -> dict[str, float]:
    t0 = time.monotonic()
    pulled = await pull_image(
        ref, cache_dir=work / "cache", staging_dir=work / "staging", progress=None, runner=Runner()
    )
    t1 = time.monotonic()
    try:
        await build_ext4(pulled.rootfs, work / "rootfs.ext4", runner=Runner(), what=ref)
    finally:
        pulled.discard()
    t2 = time.monotonic()
    return {
        "pull+unpack": t1 - t0,
        "mkfs": t2 - t1,
        "total": t2 - t0,
        "content": pulled.content_size,
    }


def baseline(ref: str, work: Path, size: int) -> dict[str, float]:
    oci = work / "oci"
    rootfs = work / "bundle"
    t_copy = run(
        ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", f"docker://{ref}",
         f"oci:{oci}:latest"]
    )  # fmt: skip
    t_unpack = run(["umoci", "raw", "unpack", "--image", f"{oci}:latest", str(rootfs)])
    t_mkfs = run(
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0", "-d", str(rootfs),
         str(work / "baseline.ext4"), f"{size // 1024}k"]
    )  # fmt: skip
    return {"copy": t_copy, "unpack": t_unpack, "mkfs": t_mkfs,
            "total": t_copy + t_unpack + t_mkfs}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_oci_pull: run as root (owners, device nodes)", file=sys.stderr)
        return 2
    for tool in ("docker-registry", "skopeo", "umoci", "mkfs.ext4"):
        if shutil.which(tool) is None:
            print(
                f"bench_oci_pull: {tool} missing (apt-get install -y docker-registry skopeo umoci)"
            )
            return 2
    base = Path(tempfile.mkdtemp(prefix="stoker-bench-oci-", dir=args.workdir))
    try:
        return run_rounds(args, base)
    finally:
        drop(base)


def run_rounds(args: argparse.Namespace, base: Path) -> int:
    with local_registry(base / "registry") as reg:
        host = reg.host
        t0 = time.monotonic()
        tars = build_layers(args.size_mb)
        raw = sum(len(t) for t in tars)
        compressed = push_image(host, "bench/image", tars)
        del tars
        print(
            f"image: 3 layers, {raw / MIB:.0f} MiB uncompressed, {compressed / MIB:.0f} MiB "
            f"compressed (built + pushed in {time.monotonic() - t0:.1f}s)"
        )
        ref = f"{host}/bench/image:latest"
        best_ours, best_base = float("inf"), float("inf")
        for rnd in range(1, args.rounds + 1):
            order = ["ours", "baseline"] if rnd % 2 else ["baseline", "ours"]
            for which in order:
                work = base / f"{which}-{rnd}"
                work.mkdir()
                subprocess.run(["sync"], check=False)
                if which == "ours":
                    r = asyncio.run(ours(ref, work))
                    best_ours = min(best_ours, r["total"])
                    size = ext4_size(int(r["content"]))
                    print(
                        f"round {rnd} stoker:   total {r['total']:6.2f}s  (pull+unpack "
                        f"{r['pull+unpack']:.2f}s, mkfs {r['mkfs']:.2f}s)  "
                        f"{compressed / MIB / r['total']:6.1f} MiB/s compressed, "
                        f"{raw / MIB / r['total']:6.1f} MiB/s unpacked"
                    )
                else:
                    size = ext4_size(raw)
                    b = baseline(ref, work, size)
                    best_base = min(best_base, b["total"])
                    print(
                        f"round {rnd} baseline: total {b['total']:6.2f}s  (skopeo copy "
                        f"{b['copy']:.2f}s, umoci unpack {b['unpack']:.2f}s, mkfs "
                        f"{b['mkfs']:.2f}s)  {compressed / MIB / b['total']:6.1f} MiB/s compressed"
                    )
                drop(work)
        print(
            f"best: stoker {best_ours:.2f}s, baseline {best_base:.2f}s, ratio stoker/baseline "
            f"{best_ours / best_base:.2f} ({'faster' if best_ours < best_base else 'slower'})"
        )
        return 0


if __name__ == "__main__":
    sys.exit(main())
