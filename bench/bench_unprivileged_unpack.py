"""Benchmark: the unprivileged unpack (owner ledger + debugfs fix-up) against root's.

Builds one layer tar of many small files (mixed owners, setuid binaries, device nodes,
symlinks, hardlinks), then times, in the same run and on the same disk:

  baseline (root):   LayerApplier (chown/mknod on disk) + build_ext4 (mkfs.ext4 -d)
  unprivileged path: LayerApplier with an OwnerLedger (stand-ins) + build_ext4 +
                     ext4_fixup (one debugfs -w run)

The unprivileged path is forced with `ledger=` so both run in one root process; a real
non-root daemon does the same work (tests/integration/oci/test_unprivileged_unpack.py
runs it as a plain user). Prints both times, the fix-up's share and the ratio.

    sudo .venv/bin/python bench/bench_unprivileged_unpack.py [--files 30000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from stoker.daemon.imagemgr.owners import OwnerLedger, ext4_fixup
from stoker.daemon.oci import build_ext4
from stoker.daemon.oci.layers import LayerApplier
from stoker.runner import Runner


def make_layer(path: Path, files: int) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        per_dir = 100
        for d in range(files // per_dir):
            ti = tarfile.TarInfo(f"usr/d{d}")
            ti.type, ti.mode, ti.uid, ti.gid = tarfile.DIRTYPE, 0o755, 0, d % 50
            tf.addfile(ti)
            for f in range(per_dir):
                name = f"usr/d{d}/f{f}"
                data = b"x" * (f * 37 % 3000)
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                ti.mode = 0o4755 if f == 0 else 0o644
                ti.uid, ti.gid = (f % 3) * 1000, f % 7
                if f == 1:
                    ti = tarfile.TarInfo(name)
                    ti.type, ti.linkname = tarfile.SYMTYPE, "f2"
                    tf.addfile(ti)
                elif f == 3:
                    ti = tarfile.TarInfo(name)
                    ti.type, ti.linkname = tarfile.LNKTYPE, f"usr/d{d}/f2"
                    tf.addfile(ti)
                elif f == 4 and d % 10 == 0:
                    ti = tarfile.TarInfo(name)
                    ti.type, ti.devmajor, ti.devminor, ti.mode = tarfile.CHRTYPE, 1, 3, 0o666
                    tf.addfile(ti)
                else:
                    tf.addfile(ti, io.BytesIO(data))


async def one(layer: Path, work: Path, unprivileged: bool) -> tuple[float, float, int]:
    """-> (total seconds, fix-up seconds, fix-up commands)."""
    runner = Runner()
    root = work / "rootfs"
    t0 = time.monotonic()
    ledger = OwnerLedger() if unprivileged else None
    a = LayerApplier(root, label="bench", ledger=ledger)
    await asyncio.to_thread(a.apply, layer, digest="layer")
    await asyncio.to_thread(a.finish)
    img = await build_ext4(root, work / "rootfs.ext4", runner=runner)
    fix, cmds = 0.0, 0
    if a.ledger is not None:
        t1 = time.monotonic()
        cmds = await ext4_fixup(runner, img.path, a.ledger, root)
        fix = time.monotonic() - t1
    return time.monotonic() - t0, fix, cmds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    top = Path(tempfile.mkdtemp(prefix="stoker-bench-unpriv-"))
    try:
        layer = top / "layer.tar"
        make_layer(layer, args.files)
        print(f"layer: {args.files} entries, {layer.stat().st_size / 1e6:.1f} MB tar")
        best: dict[bool, tuple[float, float, int]] = {}
        for r in range(args.rounds):
            for unpriv in (False, True):
                work = top / f"w{r}{int(unpriv)}"
                work.mkdir()
                res = asyncio.run(one(layer, work, unpriv))
                shutil.rmtree(work)
                if unpriv not in best or res[0] < best[unpriv][0]:
                    best[unpriv] = res
        base, (unp, fix, cmds) = best[False][0], best[True]
        print(f"root (baseline):  {base:6.2f} s  unpack + mkfs.ext4 -d")
        print(f"unprivileged:     {unp:6.2f} s  of which fix-up {fix:.2f} s ({cmds} debugfs lines)")
        print(f"ratio unprivileged/root: {unp / base:.2f}x")
    finally:
        shutil.rmtree(top)


if __name__ == "__main__":
    main()
