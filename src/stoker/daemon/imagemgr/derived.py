"""Derived images: a parent image plus Debian packages and/or setup steps.

A derived image is built in up to two cached stages, each keyed by a content hash of
everything that decides it (`recipe_key`):

1. packages: the golden mmdebstrap build with extra `--include` packages (no repo code
   runs on the host; apt's own errors are reported as they are);
2. setup: steps run in a builder VM made from stage 1 (or from the parent directly), with
   NAT on and the repo's files at /root/repo; the VM's root (and /root, without the repo)
   is then committed as the image (`imagemgr/commit.py`).

Building the same recipe twice finds the image by its key and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stoker.errors import InvalidArgument
from stoker.model.records import Image

# Bump when what a derived build does changes in a way that changes the image.
DERIVED_BUILDER_VERSION = 1

# Debian package names (policy 5.6.1), optionally :arch and =version.
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?$")


@dataclass(frozen=True)
class SetupStep:
    """One setup step: `label` names it in progress and errors, `script` is what runs."""

    label: str
    script: str


@dataclass(frozen=True)
class CopyItem:
    """A host file copied into the image at `guest` (its hash and mode are part of the
    key). `host` is an absolute host path, read by the daemon when it builds."""

    host: str
    guest: str
    sha256: str
    mode: int = 0o644


MAX_COPY_BYTES = 256 * 1024 * 1024
# Where a copied file cannot go: kernel/API filesystems and what the VM mounts at boot.
_RESERVED = ("/proc", "/sys", "/dev", "/run", "/tmp")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def split_copy(spec: str, where: str = "--copy") -> tuple[str, str]:
    """HOST:GUEST -> (host, guest): split at the last ':' (a guest path has none)."""
    host, sep, guest = spec.rpartition(":")
    if not sep or not host or not guest:
        raise InvalidArgument(
            f"{where}: {spec!r} is not HOST:GUEST (e.g. ./tool.sh:/usr/local/bin/tool)"
        )
    check_guest_path(guest, where)
    return host, guest


def check_guest_path(guest: str, where: str = "--copy") -> str:
    """A copy's guest path: absolute, normal (no '.', '..' or empty components), printable,
    a file (not /) and outside the API filesystems; returned as given."""
    parts = guest.split("/")
    bad = (
        not guest.startswith("/")
        or guest == "/"
        or guest.endswith("/")
        or any(p in ("", ".", "..") for p in parts[1:])
        or any(ord(ch) < 32 or ch in ":\\\"'" or ord(ch) == 127 for ch in guest)
        or len(guest) > 1024
    )
    if bad:
        raise InvalidArgument(
            f"{where}: guest path {guest!r} must be an absolute file path without '.', '..', "
            "empty components, quotes, backslashes, ':' or control characters"
        )
    for r in _RESERVED:
        if guest == r or guest.startswith(r + "/"):
            raise InvalidArgument(
                f"{where}: {guest} is under {r}, which the VM mounts at boot: pick a path "
                "in the image's own filesystem"
            )
    return guest


def read_host_file(path: str, where: str = "--copy") -> tuple[bytes, int]:
    """(content, mode) of a host file to copy: a regular file (a link to one is followed:
    the host path is the caller's own) of at most MAX_COPY_BYTES; opened non-blocking and
    checked with fstat, so a FIFO or device is refused, not read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidArgument(f"{where}: cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(
                f"{where}: {path} is not a regular file (copy files; for a directory, copy "
                "a tarball and unpack it in a setup step)"
            )
        if st.st_size > MAX_COPY_BYTES:
            raise InvalidArgument(
                f"{where}: {path} is {st.st_size} bytes, over the {MAX_COPY_BYTES} a copy may be"
            )
        chunks, n = [], 0
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            n += len(b)
            if n > MAX_COPY_BYTES:
                raise InvalidArgument(f"{where}: {path} grew past {MAX_COPY_BYTES} bytes")
            chunks.append(b)
        return b"".join(chunks), (0o755 if st.st_mode & 0o111 else 0o644)
    finally:
        os.close(fd)


def host_copy(host: str, guest: str, where: str = "--copy") -> CopyItem:
    """A copy request for a host file (hashed here; the daemon checks the hash again)."""
    path = os.path.abspath(host)
    data, mode = read_host_file(path, where)
    return CopyItem(path, check_guest_path(guest, where), hashlib.sha256(data).hexdigest(), mode)


def check_copy(c: CopyItem, where: str = "--copy") -> CopyItem:
    """Validate a copy request as the daemon receives it."""
    check_guest_path(c.guest, where)
    if not c.host.startswith("/") or "\0" in c.host:
        raise InvalidArgument(f"{where}: host path {c.host!r} must be absolute")
    if not _HEX64.match(c.sha256):
        raise InvalidArgument(f"{where}: {c.host}: sha256 must be 64 hex digits")
    if c.mode not in (0o644, 0o755):
        raise InvalidArgument(f"{where}: {c.host}: mode must be 0644 or 0755")
    return c


def validate_packages(packages: Iterable[str], where: str = "--packages") -> tuple[str, ...]:
    """Packages as given, checked for Debian package-name syntax, duplicates dropped."""
    out: list[str] = []
    for p in packages:
        if not isinstance(p, str) or not _PACKAGE.match(p):
            raise InvalidArgument(
                f"{where}: {p!r} is not a Debian package name (lowercase letters, digits, "
                "'+', '-', '.'; optionally :ARCH or =VERSION)"
            )
        if p not in out:
            out.append(p)
    return tuple(out)


def image_identity(im: Image) -> str:
    """What stands for an image in a child's key: its content digest where it has one
    (golden spec hash, recipe hash, OCI manifest digest), else its source and birth."""
    if im.recipe_hash:
        return f"recipe:{im.recipe_hash}"
    if im.digest:
        return f"digest:{im.digest}"
    return f"{im.source}@{im.created_at}:{im.size}"


def recipe_key(
    parent_id: str,
    packages: Sequence[str] = (),
    setup: Sequence[SetupStep] = (),
    copies: Sequence[CopyItem] = (),
    inputs: Sequence[tuple[str, str]] = (),
) -> str:
    """The content hash of one build stage. Package order does not matter (apt installs a
    set); setup order does. `inputs` are (repo path, sha256) pairs of repo files the
    setup depends on."""
    doc = {
        "builder": DERIVED_BUILDER_VERSION,
        "parent": parent_id,
        "packages": sorted(set(packages)),
        "setup": [s.script for s in setup],
        "copy": [[c.guest, c.sha256, c.mode] for c in copies],
        "inputs": sorted([list(i) for i in inputs]),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def auto_name(key: str, stage: str = "env") -> str:
    """The image name a recipe without an explicit name gets: `env-<12 hex>`."""
    return f"{stage}-{key[:12]}"


def parent_chain(images: dict[str, Image], start: str) -> list[str]:
    """Names from `start` up through its parents (as recorded), stopping at a loop."""
    chain: list[str] = []
    cur: str | None = start
    while cur is not None and cur not in chain:
        chain.append(cur)
        im = images.get(cur)
        cur = im.parent if im is not None else None
    return chain


def check_no_cycle(images: dict[str, Image], name: str, parent: str) -> None:
    """Refuse building `name` from `parent` when `name` is `parent` or one of its ancestors."""
    chain = parent_chain(images, parent)
    if name in chain:
        path = " -> ".join([name, *chain[: chain.index(name) + 1]])
        raise InvalidArgument(
            f"image {name!r} cannot be built from {parent!r}: that would make a cycle of "
            f"derived images ({path}); pick another name or another `from`"
        )
