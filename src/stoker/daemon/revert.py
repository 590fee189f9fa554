"""One revert stack for half-made operations (after Incus's `revert.Reverter`).

    async with Reverter(log) as revert:
        tap = await acquire()
        revert.add(lambda: release(tap), "release tap")
        ...
        revert.success()

Register an undo right after each acquisition; `success()` drops them all once the
operation is whole. Leaving the block any other way (an exception, a cancellation, or a
return without `success()`) runs the undos newest first. The undos run to their end even
if the caller is cancelled meanwhile (a client that disconnects must not leave half a
VM behind); one undo failing is logged and kept in `errors`, and the others still run.
The original error is what propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

Undo = Callable[[], Awaitable[object] | object]


class Reverter:
    """An undo stack over `contextlib.AsyncExitStack` (see module docstring)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._log = logger or logging.getLogger("stoker.revert")
        self.errors: list[str] = []  # "what: error" (or "error") of each undo that failed

    def add(self, undo: Undo, what: str = "") -> None:
        """Register `undo` (sync or async) for the acquisition just made."""

        async def run() -> None:
            try:
                result = undo()
                if inspect.isawaitable(result):
                    await result
            except Exception as e:
                self._log.warning("revert: %s failed: %s", what or "undo", e)
                self.errors.append(f"{what}: {e}" if what else str(e))

        self._stack.push_async_callback(run)

    def success(self) -> None:
        """The operation is whole: forget every undo registered so far."""
        self._stack.pop_all()

    async def fail(self) -> None:
        """Run the undos now, newest first (runs to its end even under cancellation)."""
        task = asyncio.ensure_future(self._stack.aclose())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                with contextlib.suppress(BaseException):
                    await task
            raise

    async def __aenter__(self) -> Reverter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.fail()
