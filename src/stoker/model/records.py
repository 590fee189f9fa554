"""Plain records that travel between the store, the services and the RPC edge."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class VMState(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass
class VMSpec:
    """Sizing and options of one VM; changes apply at next start."""

    vcpu: int
    memory_mib: int
    disk_size: int  # bytes, the /root work disk
    overlay_size: int  # bytes, the per-VM copy-on-write root disk
    nat: bool = False  # kept in step with `net` (True exactly when it is "nat")
    net: str = "host-only"  # network policy, canonical `--net` form (hostnet.policy)


@dataclass
class Workspace:
    """What `workspace prepare` shipped into a VM."""

    guest_path: str
    host_path: str
    head: str
    branch: str | None = None
    prepared_at: str | None = None
    include_untracked: bool = False


@dataclass
class Teardown:
    """Durable identity of everything a running VM holds on the host."""

    tap: str | None = None
    vmm: str | None = None
    vmm_pid: int | None = None
    api_socket: str | None = None
    nat: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Teardown:
        """From the store's JSON; keys of older versions (`loops`, `dm_names`: never
        filled) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class VMRecord:
    """One VM as the store keeps it."""

    id: str
    name: str
    state: VMState
    image: str
    spec: VMSpec
    guest_ip: str
    dns_name: str
    vm_dir: str
    created_at: str
    updated_at: str
    started_at: str | None = None
    last_error: str | None = None
    workspace: Workspace | None = None
    teardown: Teardown = field(default_factory=Teardown)
    expires_at: str | None = None  # --ttl: deleted at this time (store.set_vm_expiry)
    # the system image a VM on a workload root boots (its `image` is the workload root)
    system_image: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = str(self.state)
        return d


@dataclass(frozen=True)
class PoolMember:
    """A warm-pool VM as the store keeps it (`pool_vms`): the image it is kept for, and
    whether it is ready (booted, agent and SSH answering) or still filling."""

    vm_id: str
    image: str
    ready: bool
    created_at: str


@dataclass
class Kernel:
    """A guest kernel: ELF vmlinux (Firecracker) and/or bzImage (QEMU), optional initrd."""

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Image:
    """A root filesystem plus its kernel reference and optional /root work seed."""

    name: str
    managed: bool
    rootfs: str
    work_seed: str | None
    kernel: str | None
    source: str
    size: int
    created_at: str
    digest: str | None = None
    has_sshd: bool = True
    init: str = "systemd"
    meta: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None  # the image a derived/committed image was made from
    recipe_hash: str | None = None  # content hash of what decided a derived image
    # "system": boots directly; "workload": an OCI root that runs on a system image
    # (docs/guest-boot.md "Workload roots")
    role: str = "system"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Operation:
    """A long-running operation (create, pull, build, prepare) as reported to users."""

    id: str
    kind: str
    target: str
    state: str
    stage: str
    created_at: str
    updated_at: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
