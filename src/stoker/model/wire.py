"""Wire shapes of service results that are not records: declared once, as dataclasses.

A service method returns one of these (or a record from `model.records`); the RPC layer
turns it into JSON with `rpc.jsonable.to_jsonable` (`dataclasses.asdict`), so the field
names and their order here are the JSON keys `--json` prints (docs/json-output.md). Stdlib
only: the CLI may import this module without pulling in the daemon.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Generic, TypeVar

T = TypeVar("T")


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
    a time); `strategy` is how the last (or next) fill is made (`template`: a fork of the
    image's template snapshot; `pre-booted`), `fallback` why not the first strategy (the
    template), else null; after a failed fill, `last_error` is why and `backoff_s` how long
    until the next try (0: none pending), `failures` how many fills failed in a row. `waiting` says
    why nothing is being filled (e.g. the image is not here), else null."""

    image: str
    size: int
    ready: int
    filling: int
    strategy: str
    fallback: str | None
    failures: int
    last_error: str | None
    backoff_s: float
    waiting: str | None
    takes: int
    misses: int


# --- the helpers every shape below uses ---------------------------------------------------

# Field metadata: the key is left out of the JSON while the value is None ("present when").
OMIT_IF_NONE = {"omit_if_none": True}


class Shape:
    """Mixin: `to_dict()` is the JSON object, keys in field order, "present when" fields
    (metadata `OMIT_IF_NONE`) left out while None."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = v
        return out


# --- VMs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FanResult(Generic[T]):
    """One VM's outcome of a multi-VM request (`vm start|stop|...|delete NAME...`,
    `vm stats`, `vm ports`, `vm prune`). `result` is left out when the name did not
    resolve (`resolved` False; not on the wire)."""

    ref: str
    ok: bool
    error: str | None
    result: T | None = None
    resolved: bool = True

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ref": self.ref, "ok": self.ok, "error": self.error}
        if self.resolved:
            out["result"] = self.result
        return out


@dataclass(frozen=True)
class VMShown:
    """`vm show`: the VM record (`model.records.VMRecord`) plus its `port_forwards`."""

    record: Any
    port_forwards: list[PortForwardInfo]

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "port_forwards": self.port_forwards}


@dataclass(frozen=True)
class VMCreated:
    """`vm create`: the VM record plus `timings` (seconds per boot stage, or null)."""

    record: Any
    timings: dict[str, float] | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "timings": self.timings}


@dataclass(frozen=True)
class VMDeleted:
    """`vm delete`, `vm prune`: the VM that was removed."""

    name: str
    id: str


@dataclass(frozen=True)
class AgentHealth:
    """What the guest agent's /healthz said."""

    ok: bool
    uptime_s: float
    boot_id: str
    load: list[float]
    hostname: str
    sshd_running: bool
    agent_version: str


@dataclass(frozen=True)
class VMHealth(Shape):
    """`vm health`: the agent's answer, or the SSH fallback's verdict (`via: ssh`)."""

    name: str
    state: str
    running: bool
    healthy: bool
    agent: AgentHealth | None
    agent_error: str | None = field(default=None, metadata=OMIT_IF_NONE)
    via: str | None = field(default=None, metadata=OMIT_IF_NONE)
    ssh_error: str | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True)
class VMStats(Shape):
    """`vm stats`: one sample of a VM (times RFC 3339)."""

    name: str
    state: str
    sampled_at: str | None
    overlay_bytes: int | None
    work_disk_bytes: int | None
    cpu_percent: float | None = None
    vmm_rss_bytes: int | None = None
    guest_mem_used: int | None = None
    guest_mem_total: int | None = None
    uptime_s: float | None = None
    last_activity_age_s: float | None = None
    guest_cpu_percent: float | None = field(default=None, metadata=OMIT_IF_NONE)
    agent_error: str | None = field(default=None, metadata=OMIT_IF_NONE)
    last_sampled_at: str | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class GuestPort:
    """`vm ports`: one listening socket in a guest, as NAME.vm:PORT."""

    proto: str
    port: int
    addr: str | None
    process: str | None
    pid: int | None
    endpoint: str
    loopback_only: bool
    url: str | None
    forwarded_from: list[str] | None = field(default=None, metadata=OMIT_IF_NONE)

    def to_dict(self) -> dict[str, Any]:
        return Shape.to_dict(self)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PortForwardInfo:
    """`vm port-forward` (and --list, --remove): one forward the daemon holds."""

    vm: str
    proto: str
    host_addr: str
    host_port: int
    guest_port: int
    guest: str
    listen: str
    namespace: str
    connections: int


@dataclass(frozen=True)
class LogsInfo:
    """`vm logs`: where the VM's serial console log is."""

    name: str
    path: str
    state: str


@dataclass(frozen=True)
class SSHInfo:
    """`vm ssh` / `vm ssh-config`: what the CLI needs to run the system ssh."""

    name: str
    state: str
    host: str
    user: str
    key: str
    known_hosts: str
    workspace: str | None
    workspace_record: Any  # a records.Workspace, or None


@dataclass(frozen=True)
class ExecDone:
    """`vm.exec`: how the command ended (`transport: agent`: `exit_code`, `code`, `signal`,
    `timed_out`), or why the agent cannot run it (`transport: null`, `fallback: ssh`,
    `reason`: nothing ran)."""

    transport: str | None
    exit_code: int | None = None
    code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    fallback: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.transport is None:
            return {"transport": None, "fallback": self.fallback, "reason": self.reason}
        return {
            "transport": self.transport,
            "exit_code": self.exit_code,
            "code": self.code,
            "signal": self.signal,
            "timed_out": self.timed_out,
        }


@dataclass(frozen=True)
class ExecSignalled:
    """`vm.exec.signal`: which signal went to the exec's process group."""

    exec: str
    signal: str


@dataclass(frozen=True)
class ExecInputTaken:
    """`vm.exec.input`: the agent took the chunk; `open` False: stop sending."""

    exec: str
    open: bool


@dataclass(frozen=True)
class SnapshotTaken:
    """`vm snapshot`: the snapshot made (`bytes`: state + disk copies)."""

    vm: str
    name: str
    dir: str
    bytes: int
    meta: dict[str, Any]


@dataclass(frozen=True)
class SnapshotInfo:
    """`vm snapshot list`: one snapshot."""

    vm_id: str
    name: str
    dir: str
    meta: dict[str, Any]
    created_at: str
    vm: str


@dataclass(frozen=True)
class SnapshotDeleted:
    """`vm snapshot delete`."""

    vm: str
    name: str


# --- workspaces ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoInfo(Shape):
    """`vm.workspace.inspect`: a host repository's facts (and its files for --dry-run)."""

    root: str
    head: str | None
    branch: str | None
    origin: str | None
    files: list[str] | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True)
class ChangedFile:
    status: str
    path: str


@dataclass(frozen=True)
class WorkspacePatch:
    """`vm.workspace.export`: the patch (base64) and the files it changes."""

    name: str
    base: str
    guest_path: str
    patch_b64: str
    files: list[ChangedFile]


# --- the daemon ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TapPoolStatus:
    size: int
    ready: int


@dataclass(frozen=True)
class HelperStatus:
    socket: str
    error: str | None


@dataclass(frozen=True)
class NetworkStatus:
    """`daemon status`'s `network`."""

    bridge: str
    cidr: str
    gateway: str
    dns_listen: str | None
    dns_error: str | None
    guest_dns: str | None
    guest_dns_error: str | None
    policies: dict[str, str]
    resolver: str
    helper: HelperStatus | None
    tap_pool: TapPoolStatus


@dataclass(frozen=True)
class DaemonStatus:
    """`daemon status`: the daemon's own facts."""

    pid: int
    version: str
    protocol: int
    socket: str
    state_dir: str
    config: str | None
    uptime_s: float
    network: NetworkStatus
    pool: list[PoolImageStatus]


@dataclass(frozen=True)
class Stopping:
    """`daemon stop`."""

    stopping: bool
    pid: int


@dataclass(frozen=True)
class OperationInfo:
    """`daemon.operations.list`: one running (or recently ended) operation."""

    id: str
    kind: str
    target: str
    stage: str
    state: str  # running, done or failed
    error: str | None
    age_s: float
