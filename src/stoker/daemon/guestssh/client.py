"""SSH to guests through one client library (asyncssh).

The daemon's own SSH use (readiness, stop, workspace I/O) goes through `GuestSSH`.
Interactive sessions use the system `ssh` with the same key and known_hosts file.
Host keys: stoker generates each VM's host key itself and records it in its own
known_hosts before the first boot, so the first connection is already verified; a
mismatch is refused as a possible man-in-the-middle. The user's ~/.ssh is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import asyncssh

from stoker.errors import StokerError, Timeout, Unavailable
from stoker.layout import Layout
from stoker.runner import Runner


class HostKeyMismatch(StokerError):
    """The guest presented a host key other than the one recorded."""

    code = "host_key_mismatch"


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to reach one guest."""

    name: str
    host: str
    key: Path
    known_hosts: Path
    user: str = "root"
    port: int = 22

    @classmethod
    def for_guest(cls, name: str, host: str, layout: Layout) -> SSHTarget:
        """A guest reached as root with stoker's managed key and its own known_hosts."""
        return cls(name=name, host=host, key=layout.ssh_key, known_hosts=layout.known_hosts)


async def ensure_keypair(runner: Runner, key: Path) -> str:
    """Create the managed ed25519 key if missing; return the public key line.

    Concurrent callers (parallel creates, two daemons) are serialised by a file lock and
    the pair is generated under a temporary name, so nobody sees half a key pair."""
    pub = key.with_name(key.name + ".pub")
    if key.exists() and pub.exists():
        return pub.read_text().strip()
    key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = await asyncio.to_thread(_flock, key.with_name(key.name + ".lock"))
    try:
        if not (key.exists() and pub.exists()):
            tmp = key.with_name(f".{key.name}.{os.getpid()}.tmp")
            tmp_pub = tmp.with_name(tmp.name + ".pub")
            for p in (tmp, tmp_pub):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            await runner.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stoker", "-f", str(tmp)]
            )
            os.chmod(tmp, 0o600)
            os.replace(tmp_pub, pub)
            os.replace(tmp, key)
    finally:
        lock.close()
    return pub.read_text().strip()


def _flock(path: Path) -> IO[str]:
    f = open(path, "a")  # noqa: SIM115 - returned to the caller, closed there
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    return f


async def generate_host_key(runner: Runner, dest: Path, comment: str) -> str:
    """Write a fresh ed25519 host key pair at dest{,.pub}; return the public key line."""
    for p in (dest, dest.with_name(dest.name + ".pub")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    await runner.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(dest)]
    )
    return dest.with_name(dest.name + ".pub").read_text().strip()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_name(path.name + ".lock"), "a") as lf:
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lf.fileno(), fcntl.LOCK_UN)


def _rewrite(path: Path, keep: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for line in keep))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _hosts_of(line: str) -> set[str]:
    parts = line.split()
    return set(parts[0].split(",")) if parts and not line.startswith("#") else set()


def add_known_host(known_hosts: Path, names: list[str], pubkey_line: str) -> None:
    """Record `names` -> key, replacing earlier entries for any of those names."""
    key = " ".join(pubkey_line.split()[:2])
    with _locked(known_hosts):
        lines = known_hosts.read_text().splitlines() if known_hosts.exists() else []
        keep = [ln for ln in lines if not (_hosts_of(ln) & set(names))]
        keep.append(f"{','.join(names)} {key}")
        _rewrite(known_hosts, keep)


def remove_known_host(known_hosts: Path, names: list[str]) -> None:
    """Drop every entry naming any of `names`."""
    if not known_hosts.exists():
        return
    with _locked(known_hosts):
        lines = known_hosts.read_text().splitlines()
        keep = [ln for ln in lines if not (_hosts_of(ln) & set(names))]
        if keep != lines:
            _rewrite(known_hosts, keep)


@dataclass
class ExecResult:
    exit_status: int
    stdout: bytes
    stderr: bytes


# stoker's own commands run in the system root of a VM with a workload root: its sshd
# sends every other session into the workload (stoker-enter, docs/guest-boot.md).
SYSTEM_ENV = {"STOKER_ROOT": "system"}


class GuestSSHLike(Protocol):
    """What the services need of guest SSH (`GuestSSH`; tests pass fakes). One instance
    is daemon infrastructure, shared by VMService and WorkspaceService, so a VM that
    stops has its kept connection dropped for both."""

    async def run(
        self,
        t: SSHTarget,
        command: str,
        *,
        input: bytes | None = None,
        timeout: float = 60.0,
        connect_timeout: float | None = None,
    ) -> ExecResult: ...

    async def run_stream(
        self,
        t: SSHTarget,
        command: str,
        stdin: AsyncIterator[bytes],
        *,
        timeout: float = 3600.0,
        on_stdout_line: Callable[[bytes], None] | None = None,
    ) -> ExecResult: ...

    async def wait_ready(self, t: SSHTarget, timeout: float, alive: object = None) -> float: ...

    async def forget(self, t: SSHTarget) -> None: ...

    async def close(self) -> None: ...


class GuestSSH:
    """Connect and run commands on guests with the managed key."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        # One kept connection per guest: an SSH handshake costs ~1.4 s on a TCG guest, and
        # prepare/exec/export/stop each need one. Dropped on any error and by `forget`
        # (VMService calls it whenever a VM's VMM goes away).
        self._pool: dict[str, asyncssh.SSHClientConnection] = {}
        self._pool_locks: dict[str, asyncio.Lock] = {}

    @staticmethod
    def _key(t: SSHTarget) -> str:
        return f"{t.user}@{t.host}:{t.port}/{t.name}"

    async def _dial(self, t: SSHTarget, timeout: float | None) -> asyncssh.SSHClientConnection:
        try:
            return await asyncio.wait_for(
                asyncssh.connect(
                    t.host,
                    port=t.port,
                    username=t.user,
                    client_keys=[str(t.key)],
                    known_hosts=str(t.known_hosts),
                    agent_path=None,
                    config=None,
                    connect_timeout=timeout or self.connect_timeout,
                    keepalive_interval=15,
                    keepalive_count_max=2,
                ),
                (timeout or self.connect_timeout) + 1,
            )
        except asyncssh.HostKeyNotVerifiable as e:
            raise HostKeyMismatch(
                f"VM {t.name} ({t.host}) presented an SSH host key that does not match the one "
                f"stoker recorded in {t.known_hosts}: this may be a man-in-the-middle; if the VM "
                "was rebuilt, delete and recreate it"
            ) from e
        except (OSError, asyncssh.Error, TimeoutError) as e:
            raise Unavailable(f"cannot reach VM {t.name} over SSH at {t.host}: {e}") from None

    @contextlib.asynccontextmanager
    async def connect(
        self, t: SSHTarget, timeout: float | None = None
    ) -> AsyncIterator[asyncssh.SSHClientConnection]:
        """An authenticated connection (kept for reuse); host key checked against stoker's
        known_hosts. An error inside the block drops it from the pool."""
        key = self._key(t)
        lock = self._pool_locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._pool.get(key)
            if conn is None or conn.is_closed():
                conn = await self._dial(t, timeout)
                self._pool[key] = conn
        try:
            yield conn
        except BaseException:
            if self._pool.get(key) is conn:
                del self._pool[key]
            conn.close()
            raise

    async def forget(self, t: SSHTarget) -> None:
        """Close and drop the kept connection to a guest (its VM stopped or went away)."""
        conn = self._pool.pop(self._key(t), None)
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 2)

    async def close(self) -> None:
        """Close every kept connection (daemon shutdown)."""
        for conn in list(self._pool.values()):
            conn.close()
        self._pool.clear()

    async def run(
        self,
        t: SSHTarget,
        command: str,
        *,
        input: bytes | None = None,
        timeout: float = 60.0,
        connect_timeout: float | None = None,
    ) -> ExecResult:
        """Run one command; returns its exit status and output (bytes). A kept connection
        that turns out dead before the command starts is replaced once."""
        for attempt in (0, 1):
            try:
                async with self.connect(t, connect_timeout) as conn:
                    r = await asyncio.wait_for(
                        conn.run(command, input=input, encoding=None, check=False, env=SYSTEM_ENV),
                        timeout,
                    )
                break
            except TimeoutError:
                raise Timeout(
                    f"`{command}` on VM {t.name} did not finish in {timeout:.0f}s"
                ) from None
            except (asyncssh.ChannelOpenError, asyncssh.ConnectionLost, BrokenPipeError) as e:
                if attempt == 0:
                    continue  # the command never started: a stale kept connection
                raise Unavailable(f"lost the SSH connection to VM {t.name}: {e}") from None
            except (OSError, asyncssh.Error) as e:
                raise Unavailable(f"SSH to VM {t.name} failed: {e}") from None
        out = r.stdout if isinstance(r.stdout, bytes) else (r.stdout or "").encode()
        err = r.stderr if isinstance(r.stderr, bytes) else (r.stderr or "").encode()
        return ExecResult(r.exit_status if r.exit_status is not None else 255, out, err)

    async def run_stream(
        self,
        t: SSHTarget,
        command: str,
        stdin: AsyncIterator[bytes],
        *,
        timeout: float = 3600.0,
        on_stdout_line: Callable[[bytes], None] | None = None,
    ) -> ExecResult:
        """Run one command with `stdin` streamed from an async iterator (flow-controlled);
        stdout lines are passed to `on_stdout_line` as they arrive and also collected."""
        async with self.connect(t) as conn:
            proc = await conn.create_process(command, encoding=None, env=SYSTEM_ENV)
            out = bytearray()
            err = bytearray()

            async def feed() -> None:
                try:
                    async for chunk in stdin:
                        proc.stdin.write(chunk)
                        await proc.stdin.drain()
                finally:
                    with contextlib.suppress(Exception):
                        proc.stdin.write_eof()

            async def read_out() -> None:
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        return
                    out.extend(line)
                    if on_stdout_line is not None:
                        on_stdout_line(line)

            async def read_err() -> None:
                while True:
                    chunk = await proc.stderr.read(65536)
                    if not chunk:
                        return
                    if len(err) < 1 << 20:
                        err.extend(chunk)

            try:
                await asyncio.wait_for(
                    asyncio.gather(feed(), read_out(), read_err(), proc.wait()), timeout
                )
            except TimeoutError:
                raise Timeout(f"`{command[:60]}` on VM {t.name} ran past {timeout:.0f}s") from None
            except (OSError, asyncssh.Error) as e:
                raise Unavailable(f"lost the SSH connection to VM {t.name}: {e}") from None
            status = proc.exit_status if proc.exit_status is not None else 255
            return ExecResult(status, bytes(out), bytes(err))

    async def wait_ready(self, t: SSHTarget, timeout: float, alive: object = None) -> float:
        """Poll until SSH answers `true`. Returns seconds waited. `alive` is an optional
        callable returning False when the VMM died (stop waiting at once)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if callable(alive) and not alive():
                raise Unavailable(f"VM {t.name}'s VMM exited during boot")
            try:
                r = await self.run(t, "true", timeout=5, connect_timeout=2)
                if r.exit_status == 0:
                    return time.monotonic() - t0
            except HostKeyMismatch:
                raise
            except StokerError as e:
                last = e
            await asyncio.sleep(0.1)
        raise Timeout(
            f"VM {t.name} did not answer SSH within {timeout:.0f}s "
            f"({last}): see `stoker vm logs {t.name}`"
        )
