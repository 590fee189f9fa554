"""Writing a user's file safely: a fresh temp file beside it, then an atomic rename.

The directory may be shared and sticky (/tmp) and the CLI may run as root: a temp name
another user can predict and plant a symlink at would turn "write my patch" into
"overwrite a root-owned file". So the temp file is created with O_CREAT|O_EXCL|O_NOFOLLOW
under an unpredictable name, its mode set on the fd, and renamed over the target (a
rename replaces a symlink at the target itself, never what it points to).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from stoker.errors import InvalidArgument


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically. `mode` None: 0o666 less the umask."""
    directory = path.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o600 if mode is not None else 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise InvalidArgument(
                f"cannot write {path}: {e.strerror} creating a file in {directory}"
            ) from None
    else:  # pragma: no cover - 16 collisions of 64 random bits
        raise InvalidArgument(f"cannot write {path}: no free temporary name in {directory}")
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InvalidArgument(f"cannot write {path}: {e.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
