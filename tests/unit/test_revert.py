"""The daemon's one revert stack (`stoker.daemon.revert.Reverter`)."""

from __future__ import annotations

import asyncio

import pytest

from stoker.daemon.revert import Reverter

pytestmark = pytest.mark.unit


async def test_failure_runs_undos_newest_first_and_keeps_the_error() -> None:
    done: list[str] = []

    async def release() -> None:
        done.append("tap")

    with pytest.raises(RuntimeError, match="boom"):
        async with Reverter() as revert:
            revert.add(lambda: done.append("row"))
            revert.add(release)
            raise RuntimeError("boom")
    assert done == ["tap", "row"]


async def test_success_drops_every_undo() -> None:
    done: list[str] = []
    async with Reverter() as revert:
        revert.add(lambda: done.append("row"))
        revert.success()
    assert done == []


async def test_leaving_without_success_reverts() -> None:
    done: list[str] = []
    async with Reverter() as revert:
        revert.add(lambda: done.append("row"))
    assert done == ["row"]


async def test_a_failing_undo_is_recorded_and_the_rest_still_run() -> None:
    done: list[str] = []

    def bad() -> None:
        raise OSError("busy")

    revert = Reverter()
    with pytest.raises(ValueError):
        async with revert:
            revert.add(lambda: done.append("first"))
            revert.add(bad, "release tap")
            raise ValueError("original")
    assert done == ["first"]
    assert revert.errors == ["release tap: busy"]


async def test_undos_finish_when_the_caller_is_cancelled() -> None:
    done: list[str] = []
    started = asyncio.Event()

    async def slow_undo() -> None:
        await asyncio.sleep(0.2)
        done.append("undone")

    async def op() -> None:
        async with Reverter() as revert:
            revert.add(slow_undo)
            started.set()
            await asyncio.sleep(10)

    task = asyncio.ensure_future(op())
    await started.wait()
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()  # a second cancellation while the undo runs
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["undone"]
