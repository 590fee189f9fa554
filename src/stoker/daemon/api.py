"""RPC parameter schemas (pydantic, at the edge only) and validation into typed params."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stoker.errors import InvalidParams


class Params(BaseModel):
    """Base for every method's parameters: strict types, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoParams(Params):
    pass


class VMRef(Params):
    ref: str


class ListParams(Params):
    pass


P = TypeVar("P", bound=Params)


def validate(model: type[P], method: str, raw: dict[str, Any]) -> P:
    """Validate raw JSON params; errors name the field and what was wrong."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "params"
            parts.append(f"{loc}: {err['msg']}")
        raise InvalidParams(f"invalid parameters for {method}: " + "; ".join(parts)) from None


class LogRead(Params):
    ref: str
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=1 << 20, ge=1, le=1 << 20)


class VMRefs(Params):
    refs: list[str]


class CreateVM(Params):
    name: str | None = None
    image: str | None = None
    vcpu: int | None = None
    memory_mib: int | None = None
    disk_size: str | int | None = None
    nat: bool = False
    net: str | None = None
    no_start: bool = False
    ready: Literal["ssh", "agent"] = "ssh"  # "agent": running once the agent can exec
    ttl: float | int | None = None  # seconds from now; the VM is deleted then
    from_snapshot: str | None = None  # VM/SNAP (or a SNAP only one VM has): a fork of it


class SetVM(Params):
    ref: str
    vcpu: int | None = None
    memory_mib: int | None = None
    disk_size: str | int | None = None
    net: str | None = None
    ttl: float | int | None = None  # seconds from now (replaces any earlier TTL)
    clear_ttl: bool = False


class NameParam(Params):
    name: str


class RegisterImage(Params):
    name: str
    rootfs: str
    kernel: str
    work_seed: str | None = None
    has_sshd: bool = True


class SetupStepParam(Params):
    label: str
    script: str


class CopyParam(Params):
    host: str
    guest: str
    sha256: str
    mode: int = 0o644


class BuildImage(Params):
    """`image build`: a golden image by name, or a derived image (from/packages/setup)."""

    name: str | None = None
    force: bool = False
    from_image: str | None = None
    packages: list[str] = []
    setup: list[SetupStepParam] = []
    inputs: list[list[str]] = []
    copies: list[CopyParam] = []
    repo: str | None = None
    recipe: str | None = None
    keep_failed: bool = False
    setup_timeout: float | int | None = None


class CommitVM(Params):
    ref: str
    image: str
    with_work_disk: bool = False
    force: bool = False


class PullRef(Params):
    ref: str
    name: str | None = None
    # The one credential the CLI resolved for REF's registry (see oci/auth.py).
    auth: dict[str, str] | None = None


class PushImage(Params):
    name: str
    ref: str
    auth: dict[str, str] | None = None


class ImportKernel(Params):
    name: str
    source: str


class PruneCache(Params):
    dry_run: bool = False


class PruneVMs(Params):
    names: list[str]


class OptionalRefs(Params):
    refs: list[str] = []


class WorkspaceInspect(Params):
    path: str
    include_untracked: bool = False
    list_files: bool = False


class WorkspacePrepare(Params):
    ref: str
    path: str
    guest_path: str = "/root/repo"
    branch: str | None = None
    from_ref: str | None = None
    include_untracked: bool | None = None


class WorkspaceExport(Params):
    ref: str
    base_commit: str | None = None


class PortForward(Params):
    ref: str
    specs: list[str]


class PortForwardRemove(Params):
    ref: str
    host_port: int | None = None


class KernelList(Params):
    available: bool = False


class ExecVM(Params):
    """`vm.exec`: exactly one of argv (words, no shell) and shell (one command line)."""

    ref: str
    argv: list[str] | None = None
    shell: str | None = None
    cwd: str | None = None
    env: dict[str, str] = {}
    user: str | None = None
    stdin: bool = False
    timeout: float | int | None = None


class ExecSignal(Params):
    exec: str
    signal: str


class ExecInput(Params):
    exec: str
    data: str = ""
    eof: bool = False


class SSHInfo(Params):
    ref: str
    wait: bool = False  # wait until SSH answers (a VM made ready by its agent may be early)


class SnapshotCreate(Params):
    ref: str
    name: str | None = None


class SnapshotRef(Params):
    ref: str
    name: str


class ForkVM(Params):
    ref: str  # the VM to fork
    name: str  # the new VM
    snapshot: str | None = None  # one of ref's snapshots instead of a fresh one
    ready: Literal["ssh", "agent"] = "ssh"


class SnapshotList(Params):
    ref: str | None = None
