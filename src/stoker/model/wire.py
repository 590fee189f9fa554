"""Wire shapes of service results that are not records: declared once, as dataclasses.

A service method returns one of these (or a record from `model.records`); the RPC layer
turns it into JSON with `rpc.jsonable.to_jsonable` (`dataclasses.asdict`), so the field
names and their order here are the JSON keys `--json` prints (docs/json-output.md). Stdlib
only: the CLI may import this module without pulling in the daemon.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Deleted:
    """`image delete`, `kernel rm`: what was removed."""

    name: str


@dataclass(frozen=True)
class LogChunk:
    """`vm.logs.read`: bytes of a VM's console log from `offset` (base64), for a CLI that
    may not open the file itself (a group member of a system install)."""

    name: str
    state: str
    offset: int
    data: str  # base64
    size: int  # the log's size when read
    last_error: str | None = None


@dataclass(frozen=True)
class CatalogKernel:
    """A catalog's kernel bundle: `vmlinux` (+ optional `bzImage`, `initrd.img`,
    `modules/`). Parsed by `daemon.catalog`, which re-exports it."""

    name: str
    version: str
    arch: str
    url: str
    sha256: str
    size: int
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class AvailableKernel(CatalogKernel):
    """`kernel list --available`: a catalog kernel and whether it is installed here."""

    installed: bool = False


@dataclass(frozen=True)
class CachePruned:
    """`image cache prune`: bytes freed and blob counts (removed, kept for a running pull)."""

    dry_run: bool
    bytes_freed: int
    removed: int
    in_use: int


@dataclass(frozen=True)
class Pushed:
    """`image push`: where the artifact went, its manifest digest, what was uploaded."""

    name: str
    ref: str
    digest: str
    size: int  # compressed bytes of its blobs
    uploaded: int  # blobs sent
    skipped: int  # blobs the registry already had
    seconds: float


@dataclass(frozen=True)
class PoolImageStatus:
    """`pool status`: one image's warm pool. `size` is the configured target, `ready` the
    VMs booted and waiting, `filling` 1 while one boots for it (the filler makes one VM at
    a time); after a failed fill, `last_error` is why and `backoff_s` how long until the
    next try (0: none pending), `failures` how many fills failed in a row. `waiting` says
    why nothing is being filled (e.g. the image is not here), else null."""

    image: str
    size: int
    ready: int
    filling: int
    strategy: str
    failures: int
    last_error: str | None
    backoff_s: float
    waiting: str | None
    takes: int
    misses: int
