"""Run by test_golden_unprivileged.py as a plain user: build the golden image.

argv: OUT_DIR APT_CACHE. Prints the GoldenResult as JSON; a StokerError's message on
stderr and exit 1 otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

from stoker.daemon.imagemgr import golden
from stoker.errors import StokerError
from stoker.runner import Runner


def main() -> int:
    out, cache = Path(sys.argv[1]), Path(sys.argv[2])
    t0 = time.monotonic()

    def progress(stage: str, detail: str) -> None:
        print(f"{time.monotonic() - t0:6.1f}s {stage}: {detail}", file=sys.stderr, flush=True)

    try:
        res = asyncio.run(golden.build_golden(Runner(), out, cache_dir=cache, progress=progress))
    except StokerError as e:
        print(e.message, file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(res), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
