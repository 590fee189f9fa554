"""stoker's Python API: throwaway VMs for programs (CI jobs, test harnesses, agents).

    import stoker

    with stoker.sandbox(repo=".", ttl="1h") as vm:        # created, repo at /root/repo
        r = vm.exec(["make", "test"], timeout=600)      # through the guest agent
        print(r.exit_code, r.stdout.decode())
        for fd, chunk in vm.stream("pytest -q"):        # output as it comes
            ...
        vm.cp_out("/root/repo/report.xml", "report.xml")
    # deleted here (its TTL deletes it too if this process dies)

Built on the daemon RPC the CLI uses (docs/protocol.md); stdlib only, synchronous, safe to
use from several threads with one `Client` (each call opens its own connection). Errors
are the typed `stoker.errors` classes with stable `code`s: `NotFound`, `Conflict`,
`InvalidArgument`, `Unavailable`, `Timeout`, ... and `CommandFailed` from `check=True`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from stoker.errors import CommandFailed, StokerError
from stoker.layout import Layout
from stoker.rpc.client import Client as RPCClient
from stoker.rpc.facade import TypedClient

if TYPE_CHECKING:
    from stoker.rpc.shapes import VMRecord, VMShown, Workspace

__all__ = ["Client", "ExecResult", "Sandbox", "sandbox"]

Command = str | Sequence[str]


@dataclass(frozen=True)
class ExecResult:
    """How a command ended, with its whole output (`Sandbox.exec`)."""

    exit_code: int  # the code; 128+N for signal N; 124 after a timeout
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def _duration(value: float | str | None, what: str) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    from stoker.cli.vm import parse_duration

    try:
        return parse_duration(value, what)
    except ValueError as e:
        from stoker.errors import InvalidArgument

        raise InvalidArgument(str(e)) from None


def _command(cmd: Command) -> dict[str, Any]:
    """A string is a shell command line (`bash -lc`); a list is argv, run as it is."""
    if isinstance(cmd, str):
        return {"shell": cmd}
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv):
        from stoker.errors import InvalidArgument

        raise InvalidArgument("a command is a string (shell line) or a non-empty list of str")
    return {"argv": argv}


class Client:
    """A connection point to stokerd (the user's, or `system=True`, or `socket_path`)."""

    def __init__(
        self, socket_path: str | Path | None = None, *, system: bool = False, autostart: bool = True
    ) -> None:
        self.layout = Layout.resolve(system=system)
        self.socket_path = Path(socket_path) if socket_path else self.layout.socket_path
        self.autostart = autostart and socket_path is None and not system
        self._system = system

    def connect(self, autostart: bool = True) -> RPCClient:
        """One fresh RPC connection (started daemon on demand, as the CLI does)."""
        from stoker.rpc.client import DaemonNotRunning

        try:
            return RPCClient(self.socket_path)
        except DaemonNotRunning:
            if not (autostart and self.autostart):
                raise
        from stoker.cli.connect import start_daemon

        start_daemon(self.layout, None)
        return RPCClient(self.socket_path)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """One RPC call (see docs/protocol.md); raises the typed error on failure."""
        with self.connect() as c:
            return c.call(method, params or {})

    @contextlib.contextmanager
    def api(self, autostart: bool = True) -> Iterator[TypedClient]:
        """The typed RPC facade (`rpc.facade`) over one fresh connection."""
        with self.connect(autostart) as c:
            yield TypedClient(c)

    def list(self) -> list[VMRecord]:
        """Every VM, as `vm list --json` shows them."""
        with self.api() as api:
            return api.vm.list()

    def get(self, name: str) -> Sandbox:
        """A handle on an existing VM (not deleted on exit)."""
        with self.api() as api:
            info = api.vm.show(name)
        return Sandbox(self, info["name"], owned=False)

    def create(
        self,
        *,
        image: str | None = None,
        name: str | None = None,
        vcpu: int | None = None,
        memory_mib: int | None = None,
        disk_size: str | None = None,
        nat: bool = False,
        ttl: float | str | None = None,
        wait_ssh: bool = False,
    ) -> Sandbox:
        """Create and boot a VM. It is ready once its agent runs commands (`wait_ssh`:
        once SSH answers too). `ttl` (seconds, or "30m") bounds its life."""
        params: dict[str, Any] = {
            "name": name,
            "image": image,
            "vcpu": vcpu,
            "memory_mib": memory_mib,
            "disk_size": disk_size,
            "nat": nat,
            "ready": "ssh" if wait_ssh else "agent",
        }
        t = _duration(ttl, "ttl")
        if t is not None:
            params["ttl"] = t
        with self.api() as api:
            v = api.vm.create(params)
        return Sandbox(self, v["name"], owned=True)


class Sandbox:
    """One VM. As a context manager it deletes the VM on exit when it created it."""

    def __init__(self, client: Client, name: str, owned: bool) -> None:
        self.client = client
        self.name = name
        self.owned = owned

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.owned:
            self.delete()

    def __repr__(self) -> str:
        return f"Sandbox({self.name!r})"

    def info(self) -> VMShown:
        """`vm show --json` of this VM."""
        with self.client.api() as api:
            return api.vm.show(self.name)

    def delete(self) -> None:
        """Stop and delete the VM with its disks."""
        with self.client.api() as api:
            r = api.vm.delete([self.name])
        if r and not r[0]["ok"] and "not found" not in str(r[0]["error"]):
            raise StokerError(f"could not delete {self.name}: {r[0]['error']}")

    def prepare(self, repo: str | Path, **options: Any) -> Workspace:
        """Copy a git work tree to /root/repo (`vm workspace prepare`)."""
        params = {"ref": self.name, "path": str(Path(repo).resolve()), **options}
        with self.client.api() as api:
            return api.workspace.prepare(params)

    # --- commands ----------------------------------------------------------------------

    def _params(
        self,
        cmd: Command,
        cwd: str | None,
        env: Mapping[str, str] | None,
        user: str | None,
        timeout: float | str | None,
    ) -> dict[str, Any]:
        return {
            "ref": self.name,
            **_command(cmd),
            "cwd": cwd,
            "env": dict(env or {}),
            "user": user,
            "timeout": _duration(timeout, "timeout"),
        }

    def run(
        self,
        cmd: Command,
        *,
        on_output: Callable[[int, bytes], None],
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | str | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run a command, calling `on_output(fd, chunk)` as output arrives (fd 1 stdout,
        2 stderr). The result's stdout/stderr are empty: the output went to the callback."""
        params = self._params(cmd, cwd, env, user, timeout)
        params["stdin"] = stdin is not None
        token: list[str] = []
        fed: list[BaseException] = []

        def feed() -> None:
            try:
                with self.client.api(autostart=False) as api:
                    view = memoryview(stdin or b"")
                    while True:
                        chunk = bytes(view[:65536])
                        view = view[65536:]
                        r = api.vm.exec_input(
                            token[0], base64.b64encode(chunk).decode(), eof=not chunk
                        )
                        if not chunk or not r["open"]:
                            return
            except BaseException as e:  # the exec ended first: nothing more to feed
                fed.append(e)

        def on_event(ev: dict[str, Any]) -> None:
            stage = ev.get("stage")
            if stage == "exec.output":
                on_output(int(ev.get("fd", 1)), base64.b64decode(ev.get("data", "")))
            elif stage == "exec.started" and stdin is not None:
                token.append(str(ev["exec"]))
                threading.Thread(target=feed, daemon=True).start()

        with self.client.api() as api:
            r = api.vm.exec(params, on_event)
        if r.get("transport") != "agent":
            raise StokerError(
                f"VM {self.name} cannot run commands through its agent ({r.get('reason')}); "
                "use `stoker vm ssh`"
            )
        return ExecResult(
            exit_code=int(r["exit_code"]),
            stdout=b"",
            stderr=b"",
            signal=r.get("signal"),
            timed_out=bool(r.get("timed_out")),
        )

    def exec(
        self,
        cmd: Command,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | str | None = None,
        stdin: bytes | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run a command to its end and return its output and exit code. A string is a
        shell command line (`bash -lc`), a list is argv. `check`: raise CommandFailed on
        a non-zero exit. For large output use `run` or `stream` (this keeps it all)."""
        out = {1: bytearray(), 2: bytearray()}

        def collect(fd: int, data: bytes) -> None:
            out[2 if fd == 2 else 1] += data

        r = self.run(
            cmd, on_output=collect, cwd=cwd, env=env, user=user, timeout=timeout, stdin=stdin
        )
        res = ExecResult(r.exit_code, bytes(out[1]), bytes(out[2]), r.signal, r.timed_out)
        if check and not res.ok:
            tail = res.stderr.decode(errors="replace").strip()[-500:]
            raise CommandFailed(
                f"{cmd!r} in VM {self.name} exited {res.exit_code}" + (f": {tail}" if tail else ""),
                returncode=res.exit_code,
                stderr=res.stderr.decode(errors="replace"),
            )
        return res

    def stream(
        self,
        cmd: Command,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | str | None = None,
    ) -> Generator[tuple[int, bytes], None, ExecResult]:
        """Yield (fd, chunk) as the command writes them; the generator's return value
        (StopIteration.value) is the ExecResult. Consuming slowly slows the command."""
        import queue

        q: queue.Queue[tuple[int, bytes] | ExecResult | BaseException] = queue.Queue(maxsize=8)

        def work() -> None:
            try:
                q.put(
                    self.run(
                        cmd,
                        on_output=lambda fd, d: q.put((fd, d)),
                        cwd=cwd,
                        env=env,
                        user=user,
                        timeout=timeout,
                    )
                )
            except BaseException as e:
                q.put(e)

        threading.Thread(target=work, daemon=True).start()
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, ExecResult):
                return item
            yield item

    # --- files -------------------------------------------------------------------------

    def _cp_args(self) -> argparse.Namespace:
        return argparse.Namespace(system=self.client._system)

    def cp_in(self, src: str | Path, dst: str) -> None:
        """Copy a host file or directory into the guest (`vm cp SRC NAME:DST`)."""
        from stoker.cli import cp

        try:
            cp.copy_in(self._cp_args(), Path(src), self.name, dst, connect=self.client.connect)
        except cp.CopyError as e:
            raise CommandFailed(str(e)) from None

    def cp_out(self, src: str, dst: str | Path) -> None:
        """Copy a guest file or directory to the host (`vm cp NAME:SRC DST`)."""
        from stoker.cli import cp

        try:
            cp.copy_out(self._cp_args(), self.name, src, Path(dst), connect=self.client.connect)
        except cp.CopyError as e:
            raise CommandFailed(str(e)) from None


def sandbox(
    image: str | None = None,
    repo: str | Path | None = None,
    *,
    ttl: float | str | None = "2h",
    client: Client | None = None,
    **create: Any,
) -> Sandbox:
    """A fresh VM (deleted when the `with` block ends; `ttl` deletes it anyway if this
    process dies first). With `repo`, the git work tree is copied to /root/repo and
    commands run there by default."""
    c = client or Client()
    vm = c.create(image=image, ttl=ttl, wait_ssh=repo is not None, **create)
    if repo is not None:
        try:
            vm.prepare(repo)
        except BaseException:
            vm.delete()
            raise
    return vm
