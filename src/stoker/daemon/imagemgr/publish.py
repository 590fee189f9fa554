"""Atomic publish of a finished directory: one rename puts it where readers look.

Builds and imports assemble their output in a staging directory beside its destination (same
filesystem, so `rename` is atomic). `publish_dir` swaps it in: a reader sees the old
directory or the new one, never a half-written one, and a failure leaves the destination as
it was.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from stoker.daemon.imagemgr.safetree import rmtree


def publish_dir(staging: Path, dest: Path) -> None:
    """Rename directory `staging` to `dest`, replacing an existing `dest`.

    An existing `dest` is first renamed aside (`.NAME.old-*`), removed once the new one is
    in place, and renamed back if the swap fails. Blocking (the old tree's removal can take
    a while): call it from a worker thread. On failure `staging` is the caller's to remove.
    """
    old: Path | None = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        rmtree(old, ignore_errors=True)
