"""Lock primitives named by the seed: per-key lock sets.

Lock ordering (acquire left to right, release in reverse, never the other way):

    VMService.vm_locks[id] -> WorkspaceService.workspace_locks[id]
        -> {VMService.create_vm_lock, ImageService.image_ops_lock}
        -> subsystem-local locks (tap pool, opstate registry, handle cache)

vm_locks[id] and workspace_locks[id] are never held at the same time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class LockSet:
    """One asyncio.Lock per key, created on demand and dropped when nobody holds or waits."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                del self._locks[key]

    def locked(self, key: str) -> bool:
        lock = self._locks.get(key)
        return lock is not None and lock.locked()
