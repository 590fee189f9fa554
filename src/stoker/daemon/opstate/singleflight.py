"""`SingleFlight[K, T]`: concurrent requests for one key share one task.

The first caller for a key starts the work as a task of its own; callers that arrive while
it runs await the same task. Each caller awaits it through `asyncio.shield`, so one caller
going away (a client disconnect cancels its request) cancels neither the work nor the
other callers. When the task ends, success or failure, its key is free again: a failure
reaches every waiter and the next call starts afresh.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """At most one in-flight task per key; every caller for that key gets its outcome."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Future[T]] = {}

    def __contains__(self, key: K) -> bool:
        fut = self._tasks.get(key)
        return fut is not None and not fut.done()

    def __len__(self) -> int:
        """How many keys hold a slot (a finished task's is freed as it ends)."""
        return len(self._tasks)

    async def run(
        self,
        key: K,
        start: Callable[[], Awaitable[T]],
        *,
        on_join: Callable[[], None] | None = None,
    ) -> T:
        """The outcome of the task for `key`, started with `start()` when none is running.

        `start` is called only by the first caller (it returns a coroutine or a future);
        `on_join` is called instead by each caller that joins a running task."""
        fut = self._tasks.get(key)
        if fut is None or fut.done():
            fut = asyncio.ensure_future(start())
            self._tasks[key] = fut
            fut.add_done_callback(lambda f: self._finished(key, f))
        elif on_join is not None:
            on_join()
        return await asyncio.shield(fut)

    def _finished(self, key: K, fut: asyncio.Future[T]) -> None:
        if self._tasks.get(key) is fut:
            del self._tasks[key]
        if not fut.cancelled():
            # Retrieved here: when every caller went away nobody else will, and the
            # waiters that remain get it from their own shield.
            fut.exception()
