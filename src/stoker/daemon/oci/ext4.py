"""Build an ext4 image from a directory tree without mounting anything (`mkfs.ext4 -d`).

mke2fs copies owners, modes (setuid included), mtimes, xattrs, symlinks, hardlinks and
device nodes from the source tree, so a tree unpacked as root arrives intact; a tree
unpacked by another user comes with an `OwnerLedger` whose metadata is set afterwards. The image is
written to a temporary name next to `dest` and renamed into place only when mkfs succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from stoker.daemon.imagemgr.owners import OwnerLedger, ext4_fixup
from stoker.daemon.imagemgr.safetree import check_no_symlink
from stoker.daemon.oci.errors import NoSpace
from stoker.daemon.oci.layers import tree_usage
from stoker.errors import CommandFailed, InvalidArgument
from stoker.runner import Runner

MIB = 1 << 20
GIB = 1 << 30
MIN_SIZE = GIB
SIZE_FACTOR = 1.5
DEFAULT_INODE_RATIO = 16384
MKFS_TIMEOUT = 1800.0
_NO_SPACE_MARKERS = ("No space left on device",)


@dataclass(frozen=True)
class Ext4Image:
    """A built ext4 file and what went into it."""

    path: Path
    size: int
    content_bytes: int
    inodes: int


def ext4_size(content_bytes: int, *, minimum: int = MIN_SIZE) -> int:
    """Image size for `content_bytes` of content: x1.5, at least 1 GiB, whole MiB."""
    want = math.ceil(content_bytes * SIZE_FACTOR / MIB) * MIB
    return max(minimum, want)


async def build_ext4(
    root: Path,
    dest: Path,
    *,
    runner: Runner,
    fs_label: str = "stoker-root",
    what: str | None = None,
    minimum: int = MIN_SIZE,
    timeout: float = MKFS_TIMEOUT,
    ledger: OwnerLedger | None = None,
) -> Ext4Image:
    """Make `dest` an ext4 image holding the tree at `root` (size = content x 1.5, >= 1 GiB).

    `what` names the image in error messages (defaults to `dest`). On any failure,
    including cancellation, nothing is left at `dest` or next to it. With `ledger` (a
    tree unpacked by a user that is not root) the owners, modes and devices it recorded
    are set in the image before it is renamed into place (`owners.ext4_fixup`).
    """
    name = what or str(dest)
    # mkfs follows `root` itself on the host: never hand it a symlink.
    check_no_symlink(root)
    if not root.is_dir():
        raise InvalidArgument(f"building {name}: {root} is not a directory")
    if len(fs_label.encode()) > 16:
        raise InvalidArgument(f"building {name}: ext4 label {fs_label!r} is over 16 bytes")
    content, inodes = await asyncio.to_thread(tree_usage, root)
    size = ext4_size(content, minimum=minimum)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The file is sparse, so only what mkfs writes (content + metadata) must fit.
    vfs = os.statvfs(dest.parent)
    free = vfs.f_bavail * vfs.f_frsize
    need = content + content // 16 + 32 * MIB
    if free < need:
        raise NoSpace(
            f"building {name}: not enough space in {dest.parent} for the ext4 image: "
            f"{need // MIB} MiB needed, {free // MIB} MiB free; free disk space and retry"
        )
    argv = ["mkfs.ext4", "-q", "-F", "-L", fs_label, "-m", "0", "-E", "root_owner=0:0"]
    # Keep 25% spare inodes over what the tree uses when the default ratio would not.
    want_inodes = inodes + inodes // 4 + 1024
    if want_inodes > size // DEFAULT_INODE_RATIO:
        argv += ["-N", str(want_inodes)]
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.tmp"
    argv += ["-d", str(root), str(tmp), f"{size // 1024}k"]
    try:
        await runner.run(argv, timeout=timeout)
        if ledger is not None:
            await ext4_fixup(runner, tmp, ledger, root)
        os.replace(tmp, dest)
    except CommandFailed as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if any(m in e.message for m in _NO_SPACE_MARKERS):
            raise NoSpace(
                f"building {name}: no space left in {dest.parent} while writing the ext4 "
                "image: free disk space and retry"
            ) from None
        raise CommandFailed(f"building {name}: {e.message}") from None
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if e.errno == errno.ENOSPC:
            raise NoSpace(
                f"building {name}: no space left in {dest.parent}: free disk space and retry"
            ) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return Ext4Image(path=dest, size=size, content_bytes=content, inodes=inodes)
