"""Run by test_commit_unprivileged.py (as a plain user, or as root for comparison):
commit an overlay onto a base image, and a work disk, like `vm commit` does.

argv: BASE OVERLAY WORK OUT_DIR STAGING. Exit 1 with a StokerError's message on stderr.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from stoker.daemon.imagemgr import commit
from stoker.errors import StokerError
from stoker.runner import Runner


def main() -> int:
    base, overlay, work, out, staging = (Path(a) for a in sys.argv[1:6])
    try:
        asyncio.run(commit.commit_root(Runner(), base, overlay, out, staging, work_disk=work))
    except StokerError as e:
        print(e.message, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
