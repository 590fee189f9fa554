"""The one way stoker runs external commands.

Every external program (ip, nft, mkfs.ext4, debugfs, git, ssh-keygen, qemu...) goes
through a `Runner`, so commands are logged, always have a timeout, and fail with an
error that carries the command line and its stderr. Tests substitute a recording or
fake runner through the `Daemon`'s `runner` field.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stoker.errors import CommandFailed, Timeout, Unavailable

log = logging.getLogger("stoker.runner")

DEFAULT_TIMEOUT = 120.0


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
        full_env = None
        if env is not None or self._env is not None:
            full_env = dict(os.environ)
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
            raise CommandFailed(
                f"{_cmdline(argv)} failed (exit {res.returncode}): "
                f"{res.err.strip()[-2000:] or res.out.strip()[-2000:] or 'no output'}"
            )
        return res

    async def ok(self, argv: Sequence[str], timeout: float = 30.0) -> bool:
        """True when the command exits 0 (missing binaries count as failure)."""
        try:
            r = await self.run(argv, check=False, timeout=timeout)
        except (Unavailable, Timeout):
            return False
        return r.returncode == 0


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
