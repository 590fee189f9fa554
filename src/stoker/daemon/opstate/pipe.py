"""Bytes between the event loop and a worker thread, and waiting for that thread.

A download hands what it receives to a thread that decompresses or unpacks it (a bundle's
tar, an artifact's sparse stream) while the rest arrives: `ThreadPipe` is the bounded
queue between them (the producer awaits space, the thread blocks for data). An upload
goes the other way: a thread compresses, the loop sends (`ThreadToLoop`). `settle` waits
until the thread has really stopped (a thread cannot be cancelled), and `worker_error`
reads the thread's failure once it ended.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

PIPE_LIMIT = 8 << 20  # downloaded bytes waiting for the worker


class Aborted(Exception):
    """The download side gave up; the worker stops at its next read (or step)."""


class ThreadPipe:
    """Bytes handed from the event loop to the unpacking thread, with a bounded backlog."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = PIPE_LIMIT) -> None:
        self._loop = loop
        self._limit = limit
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._eof = False
        self.aborted = False
        self.head = b""  # the first bytes, to say "not zstd" rather than a zstd error
        self._space = asyncio.Event()

    # --- thread side ---

    def read(self, n: int = -1) -> bytes:
        """Blocking read for the decompressor: up to `n` bytes, b"" at the end."""
        with self._cond:
            while not self._chunks and not self._eof and not self.aborted:
                self._cond.wait()
            if self.aborted:
                raise Aborted()
            if not self._chunks:
                return b""
            chunk = self._chunks[0]
            if n < 0 or len(chunk) <= n:
                self._chunks.popleft()
                out = chunk
            else:
                out = chunk[:n]
                self._chunks[0] = chunk[n:]
            self._queued -= len(out)
        if len(self.head) < 4:
            self.head += out[: 4 - len(self.head)]
        self._loop.call_soon_threadsafe(self._space.set)
        return out

    def wake_producer(self) -> None:
        """Called by the thread as it exits, so a producer waiting for space notices."""
        self._loop.call_soon_threadsafe(self._space.set)

    # --- event-loop side ---

    async def put(self, chunk: bytes, worker: asyncio.Future[Any]) -> None:
        """Queue `chunk`, waiting while the backlog is full (unless the worker has ended)."""
        while True:
            self._space.clear()
            with self._cond:
                if self._queued < self._limit or self.aborted:
                    self._chunks.append(chunk)
                    self._queued += len(chunk)
                    self._cond.notify()
                    return
            if worker.done():
                return
            await self._space.wait()

    def close(self) -> None:
        """No more data: the reader sees the end of the stream."""
        with self._cond:
            self._eof = True
            self._cond.notify()

    def abort(self) -> None:
        """Make the reader raise at its next read (and the unpacker stop at its next step)."""
        with self._cond:
            self.aborted = True
            self._chunks.clear()
            self._queued = 0
            self._cond.notify()


async def settle(worker: asyncio.Future[Any]) -> bool:
    """Wait until the worker thread has really stopped; True if we were cancelled meanwhile."""
    cancelled = False
    while not worker.done():
        try:
            await asyncio.wait([worker])
        except asyncio.CancelledError:
            cancelled = True
    if not worker.cancelled():
        worker.exception()  # retrieved: the caller reports its own error
    return cancelled


def worker_error(worker: asyncio.Future[Any]) -> BaseException | None:
    if not worker.done() or worker.cancelled():
        return None
    return worker.exception()


class Abandoned(Exception):
    """The event loop stopped taking a worker's chunks (its consumer failed)."""


class ThreadToLoop:
    """Chunks from a worker thread to the event loop, at most `limit` in flight.

    The worker blocks in `put` while the loop is behind; `abandon` (loop side) makes every
    further `put` raise `Abandoned`, so a failed consumer (an upload) never leaves the worker stuck.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = 16) -> None:
        self.loop = loop
        self.limit = limit
        self.items: asyncio.Queue[bytes | bytearray | None] = asyncio.Queue()
        self.room = threading.Semaphore(limit)
        self.abandoned = False

    def put(self, b: bytes | bytearray) -> None:  # worker thread
        self.room.acquire()
        if self.abandoned:
            raise Abandoned
        self.loop.call_soon_threadsafe(self.items.put_nowait, b)

    def end(self) -> None:  # worker thread
        self.loop.call_soon_threadsafe(self.items.put_nowait, None)

    async def get(self) -> bytes | bytearray | None:
        b = await self.items.get()
        self.room.release()
        return b

    def abandon(self) -> None:
        self.abandoned = True
        self.room.release(self.limit + 1)
