"""The JSON shapes of RPC results, as the client sees them (`TypedDict`s: typing only).

The daemon's services return dataclasses (`model.records`, `model.wire`); their JSON is
what the RPC carries, and these are its declaration on the client side: each class here has
the name of the dataclass it is the JSON of, and `tests/unit/test_wire_shapes.py` checks
the keys agree (a key that is `NotRequired` here is a "present when" field there) and that
docs/json-output.md lists them. Nothing here costs anything at run time: the CLI imports
it on every command (see bench/bench_cli.py), and the values are the plain decoded JSON.
"""

# No `from __future__ import annotations`: TypedDict reads NotRequired[...] off evaluated
# annotations (with strings every key would count as required).
from typing import Any, Generic, NotRequired, TypedDict, TypeVar

T = TypeVar("T")

# --- records -------------------------------------------------------------------------------


class VMSpec(TypedDict):
    vcpu: int
    memory_mib: int
    disk_size: int
    overlay_size: int
    nat: bool
    net: str


class Workspace(TypedDict):
    guest_path: str
    host_path: str
    head: str
    branch: str | None
    prepared_at: str | None
    include_untracked: bool


class Teardown(TypedDict):
    tap: str | None
    vmm: str | None
    vmm_pid: int | None
    api_socket: str | None
    nat: bool


class VMRecord(TypedDict):
    id: str
    name: str
    state: str
    image: str
    spec: VMSpec
    guest_ip: str
    dns_name: str
    vm_dir: str
    created_at: str
    updated_at: str
    started_at: str | None
    last_error: str | None
    workspace: Workspace | None
    teardown: Teardown
    expires_at: str | None
    system_image: str | None


class Image(TypedDict):
    name: str
    managed: bool
    rootfs: str
    work_seed: str | None
    kernel: str | None
    source: str
    size: int
    created_at: str
    digest: str | None
    has_sshd: bool
    init: str
    meta: dict[str, Any]
    parent: str | None
    recipe_hash: str | None
    role: str


class Kernel(TypedDict):
    name: str
    version: str
    arch: str
    dir: str
    vmlinux: str | None
    bzimage: str | None
    initrd: str | None
    modules_dir: str | None
    source: str
    created_at: str


# --- images and kernels ----------------------------------------------------------------------


class Deleted(TypedDict):
    name: str


class AvailableKernel(TypedDict):
    name: str
    version: str
    arch: str
    url: str
    sha256: str
    size: int
    description: str
    installed: bool


class CachePruned(TypedDict):
    dry_run: bool
    bytes_freed: int
    removed: int
    in_use: int


class Pushed(TypedDict):
    name: str
    ref: str
    digest: str
    size: int
    uploaded: int
    skipped: int
    seconds: float


# --- VMs -------------------------------------------------------------------------------------


class FanResult(TypedDict, Generic[T]):
    ref: str
    ok: bool
    error: str | None
    result: NotRequired[T | None]  # absent when the name did not resolve


class PortForwardInfo(TypedDict):
    vm: str
    proto: str
    host_addr: str
    host_port: int
    guest_port: int
    guest: str
    listen: str
    namespace: str
    connections: int


class VMShown(VMRecord):
    port_forwards: list[PortForwardInfo]


class VMCreated(VMRecord):
    timings: dict[str, float] | None


class VMDeleted(TypedDict):
    name: str
    id: str


class AgentHealth(TypedDict):
    ok: bool
    uptime_s: float
    boot_id: str
    load: list[float]
    hostname: str
    sshd_running: bool
    agent_version: str


class VMHealth(TypedDict):
    name: str
    state: str
    running: bool
    healthy: bool
    agent: AgentHealth | None
    agent_error: NotRequired[str]
    via: NotRequired[str]
    ssh_error: NotRequired[str]


class VMStats(TypedDict):
    name: str
    state: str
    sampled_at: str | None
    overlay_bytes: int | None
    work_disk_bytes: int | None
    cpu_percent: float | None
    vmm_rss_bytes: int | None
    guest_mem_used: int | None
    guest_mem_total: int | None
    uptime_s: float | None
    last_activity_age_s: float | None
    guest_cpu_percent: NotRequired[float]
    agent_error: NotRequired[str]
    last_sampled_at: NotRequired[str]


class GuestPort(TypedDict):
    proto: str
    port: int
    addr: str | None
    process: str | None
    pid: int | None
    endpoint: str
    loopback_only: bool
    url: str | None
    forwarded_from: NotRequired[list[str]]


class LogsInfo(TypedDict):
    name: str
    path: str
    state: str


class SSHInfo(TypedDict):
    name: str
    state: str
    host: str
    user: str
    key: str
    known_hosts: str
    workspace: str | None
    workspace_record: Workspace | None


class ExecDone(TypedDict):
    transport: str | None
    exit_code: NotRequired[int]
    code: NotRequired[int | None]
    signal: NotRequired[int | None]
    timed_out: NotRequired[bool]
    fallback: NotRequired[str]
    reason: NotRequired[str]


class ExecSignalled(TypedDict):
    exec: str
    signal: str


class ExecInputTaken(TypedDict):
    exec: str
    open: bool


class SnapshotTaken(TypedDict):
    vm: str
    name: str
    dir: str
    bytes: int
    meta: dict[str, Any]


class SnapshotInfo(TypedDict):
    vm_id: str
    name: str
    dir: str
    meta: dict[str, Any]
    created_at: str
    vm: str


class SnapshotDeleted(TypedDict):
    vm: str
    name: str


# --- workspaces ------------------------------------------------------------------------------


class RepoInfo(TypedDict):
    root: str
    head: str | None
    branch: str | None
    origin: str | None
    files: NotRequired[list[str]]


class ChangedFile(TypedDict):
    status: str
    path: str


class WorkspacePatch(TypedDict):
    name: str
    base: str
    guest_path: str
    patch_b64: str
    files: list[ChangedFile]


# --- the daemon ------------------------------------------------------------------------------


class TapPoolStatus(TypedDict):
    size: int
    ready: int


class HelperStatus(TypedDict):
    socket: str
    error: str | None


class NetworkStatus(TypedDict):
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


class PoolImageStatus(TypedDict):
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


class DaemonStatus(TypedDict):
    pid: int
    version: str
    protocol: int
    socket: str
    state_dir: str
    config: str | None
    uptime_s: float
    network: NetworkStatus
    pool: list[PoolImageStatus]


class LogChunk(TypedDict):
    name: str
    state: str
    offset: int
    data: str
    size: int
    last_error: str | None


class Stopping(TypedDict):
    stopping: bool
    pid: int


class OperationInfo(TypedDict):
    id: str
    kind: str
    target: str
    stage: str
    state: str
    error: str | None
    age_s: float
