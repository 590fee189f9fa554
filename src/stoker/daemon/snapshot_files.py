"""Snapshot file helpers (issue 13 item 2): sparse, all-or-nothing copies of a VM's
writable disks taken while its guest is paused."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from stoker.errors import CommandFailed


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of each data extent (SEEK_DATA/SEEK_HOLE); the whole file when
    the filesystem cannot tell."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from here on
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)]
    return out


def copy_sparse(src: Path, dst: Path) -> int:
    """Copy `src` to `dst` keeping its holes (only data extents are copied, with
    copy_file_range). Written to a temporary name and renamed: on any failure (a full
    disk included) nothing is left at `dst`. Returns the bytes of data copied."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    copied = 0
    try:
        with open(src, "rb") as fi, open(tmp, "xb") as fo:
            size = os.fstat(fi.fileno()).st_size
            for off, length in _data_extents(fi.fileno(), size):
                done = 0
                while done < length:
                    n = os.copy_file_range(
                        fi.fileno(), fo.fileno(), length - done, off + done, off + done
                    )
                    if n == 0:
                        break  # src shrank under us: copy what is there
                    done += n
                copied += done
            fo.truncate(size)
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CommandFailed(
            f"could not copy disk {src} into the snapshot at {dst}: {e.strerror or e}"
            + (" (free space on that filesystem and retry)" if e.errno == errno.ENOSPC else "")
        ) from None
    return copied


# What a snapshot was taken on; a restore anywhere these differ is refused (QEMU would
# load a state into a machine that does not match it, or a guest whose disks and kernel
# changed under its RAM).
SNAPSHOT_KEYS: dict[str, str] = {
    "vmm": "the VMM kind",
    "vmm_version": "the VMM version",
    "accel": "the accelerator",
    "kernel": "the kernel",
    "image_id": "the image",
    "vcpu": "the vCPU count",
    "memory_mib": "the memory size",
    "devices": "the device set",
}


def snapshot_refusal(recorded: dict[str, object], current: dict[str, object]) -> str | None:
    """Why a snapshot taken as `recorded` cannot be loaded as `current` (None: it can).
    Every difference is named, with both values and what to do."""
    diffs = [
        f"{what} was {recorded.get(k)!r}, is now {current.get(k)!r}"
        for k, what in SNAPSHOT_KEYS.items()
        if recorded.get(k) != current.get(k)
    ]
    if not diffs:
        return None
    return (
        "this snapshot cannot be restored here: "
        + "; ".join(diffs)
        + ". Start the VM without --from-snapshot (a cold boot) or take a new snapshot"
    )
