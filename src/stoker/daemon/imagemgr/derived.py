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
import re
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
    """A host file copied into the image at `guest` (its hash is part of the key)."""

    host: str
    guest: str
    sha256: str


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
        "copy": [[c.guest, c.sha256] for c in copies],
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
