"""TapPool: a warm pool of pre-created taps so a VM start does not wait on netlink."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from stoker.daemon.hostnet.links import Links
from stoker.errors import StokerError

TAP_PREFIX = "tap-stk-"
_NAME_ATTEMPTS = 8


def new_tap_name(prefix: str = TAP_PREFIX) -> str:
    """A random tap name such as `tap-stk-1a2b3c` (14 chars, under IFNAMSIZ)."""
    return f"{prefix}{secrets.token_hex(3)}"


class TapPool:
    """Keeps up to `size` unattached taps ready; hands them out and deletes released ones.

    Its lock is a leaf: it guards only the list of pooled names and is never held across
    netlink calls, so an `acquire` never queues behind a slow refill.
    """

    def __init__(
        self,
        links: Links,
        size: int,
        logger: logging.Logger,
        *,
        prefix: str = TAP_PREFIX,
        owner: int | None = None,
    ) -> None:
        self.links = links
        self.size = size
        self.log = logger
        self.prefix = prefix
        self.owner = owner
        self._mu = asyncio.Lock()
        self._ready: list[str] = []
        self._refill_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pooled(self) -> tuple[str, ...]:
        """Names currently waiting in the pool (not handed out)."""
        return tuple(self._ready)

    async def _make(self) -> str:
        last: StokerError | None = None
        for _ in range(_NAME_ATTEMPTS):
            name = new_tap_name(self.prefix)
            if await self.links.exists(name):
                continue  # a leftover from a crash or another pool: pick another name
            try:
                await self.links.create_tap(name, owner=self.owner)
                return name
            except StokerError as e:
                last = e
                if await self.links.exists(name):
                    continue  # lost a naming race; retry
                raise
        raise last or StokerError(
            f"could not find a free tap name with prefix {self.prefix!r}: "
            f"delete leftover {self.prefix}* devices"
        )

    async def acquire(self) -> str:
        """A tap for a VM: from the pool when one is ready, else made now. Kicks a refill."""
        async with self._mu:
            name = self._ready.pop(0) if self._ready else None
        if name is None or not await self.links.exists(name):
            name = await self._make()
        self.start_refill()
        return name

    async def release(self, name: str) -> None:
        """Delete a tap a VM no longer uses. Idempotent."""
        async with self._mu:
            if name in self._ready:
                self._ready.remove(name)
        await self.links.delete(name)

    async def refill(self) -> None:
        """Create taps until the pool holds `size` of them (no-op once closed)."""
        while True:
            async with self._mu:
                if self._closed or len(self._ready) >= self.size:
                    return
            name = await self._make()
            async with self._mu:
                if self._closed:
                    keep = False
                else:
                    self._ready.append(name)
                    keep = True
            if not keep:
                await self.links.delete(name)
                return

    def start_refill(self) -> None:
        """Run `refill` in the background unless one is already running."""
        if self._closed or self.size <= 0:
            return
        if self._refill_task is not None and not self._refill_task.done():
            return
        self._refill_task = asyncio.create_task(self._refill_logged(), name="tap-pool-refill")

    async def _refill_logged(self) -> None:
        try:
            await self.refill()
        except StokerError as e:
            # The pool is an optimisation: acquire() still makes taps on demand.
            self.log.warning("tap pool refill failed: %s", e)

    async def wait_refilled(self) -> None:
        """Wait for a running background refill (tests and benchmarks)."""
        task = self._refill_task
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        """Stop refilling and delete every pooled tap. Taps handed out are left alone."""
        async with self._mu:
            self._closed = True
            task, self._refill_task = self._refill_task, None
        if task is not None and not task.done():
            # Let an in-flight create finish: it sees _closed and deletes its own tap.
            # Cancelling it mid-create could leave a tap nobody knows about.
            await asyncio.wait({task}, timeout=self.links.timeout * 2)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        async with self._mu:
            names, self._ready = self._ready, []
        for name in names:
            try:
                await self.links.delete(name)
            except StokerError as e:
                self.log.warning("could not delete pooled tap %s: %s", name, e)
