"""A typed facade over `rpc.client.Client.call()`: one method per RPC, results typed by
the shapes in `rpc.shapes` (plain decoded JSON; `cast` costs nothing at run time).

    with Client(path) as c:
        api = TypedClient(c)
        for r in api.vm.stats([]):
            if r["ok"]: ...

The CLI and `stoker.sdk` call the daemon through this; `call()` stays for what has no
typed method yet.
"""

from __future__ import annotations

TYPE_CHECKING = False  # no `typing` import at CLI start-up (bench_cli)
if TYPE_CHECKING:
    from typing import Any, cast

    from stoker.rpc.client import Client, ProgressFn
    from stoker.rpc.shapes import (
        AvailableKernel,
        CachePruned,
        DaemonStatus,
        Deleted,
        ExecDone,
        ExecInputTaken,
        ExecSignalled,
        FanResult,
        GuestPort,
        Image,
        Kernel,
        LogsInfo,
        OperationInfo,
        PortForwardInfo,
        Pushed,
        RepoInfo,
        SnapshotDeleted,
        SnapshotInfo,
        SnapshotTaken,
        SSHInfo,
        Stopping,
        VMCreated,
        VMDeleted,
        VMHealth,
        VMRecord,
        VMShown,
        VMStats,
        Workspace,
        WorkspacePatch,
    )
else:

    def cast(_type: object, value: object) -> object:
        return value


# The groups have `list` methods, so annotations inside them name the builtin so.
List = list


class _Group:
    def __init__(self, client: Client) -> None:
        self._c = client

    def _call(self, method: str, params: dict[str, Any] | None = None, progress: Any = None) -> Any:
        return self._c.call(method, params, progress)


class DaemonCalls(_Group):
    def status(self) -> DaemonStatus:
        return cast("DaemonStatus", self._call("daemon.status"))

    def stop(self) -> Stopping:
        return cast("Stopping", self._call("daemon.stop"))

    def operations(self) -> List[OperationInfo]:
        return cast("List[OperationInfo]", self._call("daemon.operations.list"))


class VMCalls(_Group):
    def list(self) -> List[VMRecord]:
        return cast("List[VMRecord]", self._call("vm.list"))

    def show(self, ref: str) -> VMShown:
        return cast("VMShown", self._call("vm.show", {"ref": ref}))

    def create(self, params: dict[str, Any], progress: ProgressFn | None = None) -> VMCreated:
        return cast("VMCreated", self._call("vm.create", params, progress))

    def start(
        self, refs: List[str], progress: ProgressFn | None = None
    ) -> List[FanResult[VMRecord]]:
        return cast("List[FanResult[VMRecord]]", self._call("vm.start", {"refs": refs}, progress))

    def restart(
        self, refs: List[str], progress: ProgressFn | None = None
    ) -> List[FanResult[VMRecord]]:
        return cast("List[FanResult[VMRecord]]", self._call("vm.restart", {"refs": refs}, progress))

    def stop(self, refs: List[str]) -> List[FanResult[VMRecord]]:
        return cast("List[FanResult[VMRecord]]", self._call("vm.stop", {"refs": refs}))

    def kill(self, refs: List[str]) -> List[FanResult[VMRecord]]:
        return cast("List[FanResult[VMRecord]]", self._call("vm.kill", {"refs": refs}))

    def delete(self, refs: List[str]) -> List[FanResult[VMDeleted]]:
        return cast("List[FanResult[VMDeleted]]", self._call("vm.delete", {"refs": refs}))

    def prune(self, names: List[str]) -> List[FanResult[VMDeleted]]:
        return cast("List[FanResult[VMDeleted]]", self._call("vm.prune", {"names": names}))

    def set(self, params: dict[str, Any]) -> VMRecord:
        return cast("VMRecord", self._call("vm.set", params))

    def stats(self, refs: List[str] | None = None) -> List[FanResult[VMStats]]:
        return cast("List[FanResult[VMStats]]", self._call("vm.stats", {"refs": refs or []}))

    def ports(self, refs: List[str] | None = None) -> List[FanResult[List[GuestPort]]]:
        return cast(
            "List[FanResult[List[GuestPort]]]", self._call("vm.ports", {"refs": refs or []})
        )

    def health(self, ref: str) -> VMHealth:
        return cast("VMHealth", self._call("vm.health", {"ref": ref}))

    def logs(self, ref: str) -> LogsInfo:
        return cast("LogsInfo", self._call("vm.logs", {"ref": ref}))

    def ssh_info(self, ref: str, wait: bool = False, progress: ProgressFn | None = None) -> SSHInfo:
        params: dict[str, Any] = {"ref": ref, "wait": True} if wait else {"ref": ref}
        return cast("SSHInfo", self._call("vm.ssh_info", params, progress))

    def port_forward(self, ref: str, specs: List[str]) -> List[PortForwardInfo]:
        return cast(
            "List[PortForwardInfo]", self._call("vm.port_forward", {"ref": ref, "specs": specs})
        )

    def port_forward_remove(self, ref: str, host_port: int | None) -> List[PortForwardInfo]:
        return cast(
            "List[PortForwardInfo]",
            self._call("vm.port_forward.remove", {"ref": ref, "host_port": host_port}),
        )

    def port_forward_list(self, refs: List[str]) -> List[PortForwardInfo]:
        return cast("List[PortForwardInfo]", self._call("vm.port_forward.list", {"refs": refs}))

    def exec(self, params: dict[str, Any], progress: ProgressFn | None = None) -> ExecDone:
        return cast("ExecDone", self._call("vm.exec", params, progress))

    def exec_signal(self, token: str, signal: str) -> ExecSignalled:
        return cast(
            "ExecSignalled", self._call("vm.exec.signal", {"exec": token, "signal": signal})
        )

    def exec_input(self, token: str, data: str, eof: bool = False) -> ExecInputTaken:
        return cast(
            "ExecInputTaken",
            self._call("vm.exec.input", {"exec": token, "data": data, "eof": eof}),
        )

    def snapshot(
        self, ref: str, name: str | None, progress: ProgressFn | None = None
    ) -> SnapshotTaken:
        return cast(
            "SnapshotTaken", self._call("vm.snapshot", {"ref": ref, "name": name}, progress)
        )

    def snapshot_list(self, ref: str | None = None) -> List[SnapshotInfo]:
        return cast("List[SnapshotInfo]", self._call("vm.snapshot.list", {"ref": ref}))

    def snapshot_delete(self, ref: str, name: str) -> SnapshotDeleted:
        return cast("SnapshotDeleted", self._call("vm.snapshot.delete", {"ref": ref, "name": name}))


class WorkspaceCalls(_Group):
    def inspect(self, params: dict[str, Any]) -> RepoInfo:
        return cast("RepoInfo", self._call("vm.workspace.inspect", params))

    def prepare(self, params: dict[str, Any], progress: ProgressFn | None = None) -> Workspace:
        return cast("Workspace", self._call("vm.workspace.prepare", params, progress))

    def export(self, ref: str, base_commit: str | None = None) -> WorkspacePatch:
        return cast(
            "WorkspacePatch",
            self._call("vm.workspace.export", {"ref": ref, "base_commit": base_commit}),
        )


class ImageCalls(_Group):
    def list(self) -> List[Image]:
        return cast("List[Image]", self._call("image.list"))

    def show(self, name: str) -> Image:
        return cast("Image", self._call("image.show", {"name": name}))

    def register(self, params: dict[str, Any]) -> Image:
        return cast("Image", self._call("image.register", params))

    def promote(self, name: str) -> Image:
        return cast("Image", self._call("image.promote", {"name": name}))

    def delete(self, name: str) -> Deleted:
        return cast("Deleted", self._call("image.delete", {"name": name}))

    def cache_prune(self, dry_run: bool) -> CachePruned:
        return cast("CachePruned", self._call("image.cache.prune", {"dry_run": dry_run}))

    def push(self, params: dict[str, Any], progress: ProgressFn | None = None) -> Pushed:
        return cast("Pushed", self._call("image.push", params, progress))


class KernelCalls(_Group):
    def list(self) -> List[Kernel]:
        return cast("List[Kernel]", self._call("kernel.list", {"available": False}))

    def available(self) -> List[AvailableKernel]:
        return cast("List[AvailableKernel]", self._call("kernel.list", {"available": True}))

    def show(self, name: str) -> Kernel:
        return cast("Kernel", self._call("kernel.show", {"name": name}))

    def rm(self, name: str) -> Deleted:
        return cast("Deleted", self._call("kernel.rm", {"name": name}))

    def import_(self, name: str, source: str) -> Kernel:
        return cast("Kernel", self._call("kernel.import", {"name": name, "source": source}))


class TypedClient:
    """The daemon's RPC methods, grouped and typed, over one `Client` connection."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.daemon = DaemonCalls(client)
        self.vm = VMCalls(client)
        self.workspace = WorkspaceCalls(client)
        self.image = ImageCalls(client)
        self.kernel = KernelCalls(client)

    def call(
        self, method: str, params: dict[str, Any] | None = None, progress: ProgressFn | None = None
    ) -> Any:
        """An RPC with no typed method here (yet)."""
        return self.client.call(method, params, progress)
