"""The one way stoker runs external commands.

Every external program (ip, nft, mkfs.ext4, debugfs, git, ssh-keygen, qemu...) goes
through a `Runner`, so commands are logged, always have a timeout, and fail with a
`CommandFailed` that carries argv, exit status and stderr. `run` (whose output callers
parse: `nft list`, `debugfs`, `git`, `--version`...) runs commands in the C locale
(`LC_ALL=C`), so messages and number formats are the untranslated ones the parsers expect
whatever the user's locale; an explicit `env` may still set LC_ALL. `spawn` (long-lived
VMMs, output only logged) keeps the environment as it is. Tests substitute a recording or
fake runner through the `Daemon`'s `runner` field.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shlex
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stoker.errors import CommandFailed, Timeout, Unavailable

log = logging.getLogger("stoker.runner")

DEFAULT_TIMEOUT = 120.0
# Set for every `run`: parsed output must not depend on the user's locale.
PARSE_LOCALE = {"LC_ALL": "C"}
# How much of a failed command's stderr (or stdout) its error message quotes.
MESSAGE_TAIL = 2000


@dataclass(frozen=True)
class Result:
    """What a finished command left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    elapsed: float

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


def _cmdline(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _short_cmdline(argv: Sequence[str], limit: int = 300) -> str:
    line = _cmdline(argv)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def command_failed(res: Result) -> CommandFailed:
    """The error for a finished command that exited non-zero: the command line (cut at
    300 characters), how it ended, and the tail of its stderr (else stdout)."""
    err, out = res.err.strip(), res.out.strip()
    said = err[-MESSAGE_TAIL:] or out[-MESSAGE_TAIL:] or "no output"
    return CommandFailed(
        f"{_short_cmdline(res.argv)} failed ({_exit_status(res.returncode)}): {said}",
        argv=res.argv,
        returncode=res.returncode,
        stderr=res.err,
    )


class Runner:
    """Runs argv lists with a timeout; raises `CommandFailed` on a non-zero exit when asked."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(env) if env is not None else None

    async def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Result:
        argv = [str(a) for a in argv]
        full_env = dict(os.environ)
        full_env.update(PARSE_LOCALE)
        full_env.update(self._env or {})
        full_env.update(env or {})
        log.debug("run: %s", _cmdline(argv))
        t0 = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=full_env,
                cwd=cwd,
            )
        except FileNotFoundError:
            raise Unavailable(
                f"{argv[0]} is not installed or not on PATH: install it (see `stoker doctor`)"
            ) from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise Timeout(f"{_cmdline(argv)} did not finish within {timeout:.0f}s") from None
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        res = Result(tuple(argv), proc.returncode or 0, out, err, time.monotonic() - t0)
        if check and res.returncode != 0:
            raise command_failed(res)
        return res

    async def ok(self, argv: Sequence[str], timeout: float = 30.0) -> bool:
        """True when the command exits 0 (missing binaries count as failure)."""
        try:
            r = await self.run(argv, check=False, timeout=timeout)
        except (Unavailable, Timeout):
            return False
        return r.returncode == 0

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: str | os.PathLike[str],
        stderr: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Mapping[int, int] | None = None,
    ) -> int:
        """Start a long-lived process fully detached and return its pid without waiting.

        For VMMs, which must outlive the daemon: the child gets its own session (terminal
        signals to the daemon never reach it), stdin from /dev/null, default SIGPIPE/SIGXFSZ
        dispositions and an empty signal mask, and its output appended to files (`stderr`
        defaults to `stdout`). It is spawned without a `Popen`/asyncio object, so nothing
        in this process kills it on garbage collection or loop shutdown; the caller reaps it
        (`os.waitpid(pid, WNOHANG)`) when it sees it exit. `pass_fds` maps a descriptor
        number in the child to one of ours (handed over; ours stay open for the caller).
        """
        argv = [str(a) for a in argv]
        full_env = dict(os.environ)
        full_env.update(self._env or {})
        full_env.update(env or {})
        log.debug("spawn: %s", _cmdline(argv))
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        out_fd = os.open(stdout, flags, 0o600)
        err_fd = os.open(stderr, flags, 0o600) if stderr is not None else out_fd
        # Copies far above any target number first, so no dup2 clobbers a later source.
        staged = {
            child: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000)
            for child, fd in (pass_fds or {}).items()
        }
        try:
            pid = os.posix_spawnp(
                argv[0],
                argv,
                full_env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_fd, 1),
                    (os.POSIX_SPAWN_DUP2, err_fd, 2),
                    *((os.POSIX_SPAWN_DUP2, fd, child) for child, fd in staged.items()),
                ],
                setsid=True,
                setsigmask=(),
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except FileNotFoundError:
            raise Unavailable(
                f"{argv[0]} is not installed or not on PATH: install it (see `stoker doctor`)"
            ) from None
        finally:
            os.close(out_fd)
            if err_fd != out_fd:
                os.close(err_fd)
            for fd in staged.values():
                os.close(fd)
        return pid


class RecordingRunner(Runner):
    """A runner that remembers every command it ran (for tests)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        self.calls: list[tuple[str, ...]] = []

    async def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Result:
        self.calls.append(tuple(str(a) for a in argv))
        return await super().run(argv, check=check, input=input, timeout=timeout, env=env, cwd=cwd)

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        stdout: str | os.PathLike[str],
        stderr: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Mapping[int, int] | None = None,
    ) -> int:
        self.calls.append(tuple(str(a) for a in argv))
        return await super().spawn(argv, stdout=stdout, stderr=stderr, env=env, pass_fds=pass_fds)
