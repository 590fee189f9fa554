"""Run by tests as a plain user (or as root, for comparison): unpack layer tars, inject
stoker's guest files and build the work seed and root ext4 the way `ImageService` does.

argv[1]: JSON {"blobs": [paths], "work": dir}. Prints JSON {"uid", "ledger", "fixups"}
on success; a StokerError's message on stderr and exit 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from stoker.daemon.imagemgr import ext4, inject
from stoker.daemon.oci.ext4 import build_ext4
from stoker.daemon.oci.layers import LayerApplier
from stoker.errors import StokerError
from stoker.runner import Runner


async def main() -> int:
    spec = json.loads(sys.argv[1])
    work = Path(spec["work"])
    rootfs = work / "rootfs"
    runner = Runner()
    applier = LayerApplier(rootfs, label="test/unpriv")
    try:
        for i, blob in enumerate(spec["blobs"]):
            applier.apply(Path(blob), digest=f"layer{i}")
        applier.finish()
        inject.inject_guest_files(rootfs, init="systemd")
        home = inject.work_seed_source(rootfs)
        await ext4.build_from_dir(
            runner, home, work / "work-seed.ext4", None, within=rootfs, ledger=applier.ledger
        )
        await build_ext4(rootfs, work / "rootfs.ext4", runner=runner, ledger=applier.ledger)
    except StokerError as e:
        print(e.message, file=sys.stderr)
        return 1
    print(json.dumps({"uid": os.geteuid(), "ledger": applier.ledger is not None}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
