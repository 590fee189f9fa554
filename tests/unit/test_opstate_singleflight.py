"""`SingleFlight`: coalescing, per-caller cancellation, failure reaching every waiter, and
`DownloadMeter`, the shared download progress line."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stoker.daemon.opstate.meter import DownloadMeter
from stoker.daemon.opstate.singleflight import SingleFlight

pytestmark = pytest.mark.unit


class Work:
    """A start function that counts its calls and finishes when told to."""

    def __init__(self) -> None:
        self.starts = 0
        self.release = asyncio.Event()
        self.error: BaseException | None = None
        self.result = "built"

    async def __call__(self) -> str:
        self.starts += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return f"{self.result}-{self.starts}"


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_callers_share_one_task() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    work = Work()
    joined: list[int] = []
    callers = [
        asyncio.create_task(flights.run("k", work, on_join=lambda: joined.append(1)))
        for _ in range(3)
    ]
    await _settle()
    assert "k" in flights
    work.release.set()
    assert await asyncio.gather(*callers) == ["built-1"] * 3
    assert work.starts == 1
    assert len(joined) == 2  # everyone but the first caller joined
    await _settle()
    assert "k" not in flights
    assert len(flights) == 0


async def test_different_keys_do_not_coalesce() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    work = Work()
    work.release.set()
    a, b = await asyncio.gather(flights.run("a", work), flights.run("b", work))
    assert work.starts == 2
    assert {a, b} == {"built-1", "built-2"}


async def test_a_cancelled_caller_does_not_cancel_the_task_or_the_others() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    work = Work()
    first = asyncio.create_task(flights.run("k", work))
    second = asyncio.create_task(flights.run("k", work))
    await _settle()
    first.cancel()  # the caller that started the work goes away
    with pytest.raises(asyncio.CancelledError):
        await first
    assert "k" in flights  # the work goes on
    work.release.set()
    assert await second == "built-1"
    assert work.starts == 1


async def test_the_task_finishes_when_every_caller_went_away() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    finished = asyncio.Event()

    async def work() -> str:
        await asyncio.sleep(0.01)
        finished.set()
        return "done"

    caller = asyncio.create_task(flights.run("k", work))
    await _settle()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(finished.wait(), 5)
    await _settle()
    assert "k" not in flights


async def test_failure_reaches_every_waiter_and_frees_the_key() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    work = Work()
    work.error = RuntimeError("mirror unreachable")
    callers = [asyncio.create_task(flights.run("k", work)) for _ in range(3)]
    await _settle()
    work.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "mirror unreachable" for r in results)
    assert work.starts == 1
    await _settle()
    assert "k" not in flights
    assert len(flights) == 0  # the slot itself is gone, not just finished
    # The next call starts afresh instead of getting the old failure.
    work.error = None
    assert await flights.run("k", work) == "built-2"
    assert work.starts == 2


async def test_a_finished_failure_is_not_handed_to_a_late_caller() -> None:
    """A caller arriving after the task failed but before its clean-up callback ran starts
    a new task rather than inheriting the stale error."""
    flights: SingleFlight[str, str] = SingleFlight()
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    first = asyncio.create_task(flights.run("k", lambda: gate))
    await _settle()
    work = Work()

    async def late() -> str:
        gate.set_exception(RuntimeError("boom"))  # done; its callbacks have not run yet
        return await flights.run("k", work)

    second = asyncio.create_task(late())
    await _settle()
    # The old task's clean-up ran after the new one took the key: it left that one alone.
    assert "k" in flights
    work.release.set()
    assert await second == "built-1"
    with pytest.raises(RuntimeError):
        await first


async def test_unobserved_failure_is_not_reported_as_never_retrieved() -> None:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    try:
        flights: SingleFlight[str, str] = SingleFlight()
        work = Work()
        work.error = RuntimeError("nobody is listening")
        caller = asyncio.create_task(flights.run("k", work))
        await _settle()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        work.release.set()
        await _settle()
        import gc

        gc.collect()
        await _settle()
        assert "k" not in flights
        assert seen == []
    finally:
        loop.set_exception_handler(None)


# --- DownloadMeter ----------------------------------------------------------------------


def test_meter_reports_done_of_total_and_throttles() -> None:
    lines: list[tuple[str, str, dict[str, Any]]] = []
    meter = DownloadMeter(
        lambda stage, message="", **kw: lines.append((stage, message, kw)), 80 << 20, 3600
    )
    meter.add(12 << 20)
    meter.add(1 << 20)  # within the interval: not reported
    assert lines == [("download", "12/80 MiB", {"done": 12 << 20, "total": 80 << 20})]
    assert meter.done == 13 << 20


def test_meter_without_a_total_and_without_a_listener() -> None:
    lines: list[str] = []
    meter = DownloadMeter(lambda stage, message="", **kw: lines.append(message), None, 0)
    meter.add(3 << 20)
    meter.add(2 << 20)
    assert lines == ["3 MiB", "5 MiB"]
    silent = DownloadMeter(None, 10)
    silent.add(5)
    assert silent.done == 5
