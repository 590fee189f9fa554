"""ImageService's pulls go through one `SingleFlight`: one op in `ops`, joiners told they
joined, a caller going away cancels neither the pull nor the op, a failure is recorded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stoker.daemon.image_service import ImageService
from stoker.model.records import Image
from stoker.store.db import now

pytestmark = pytest.mark.unit


def _image(name: str) -> Image:
    return Image(
        name=name,
        managed=True,
        rootfs=f"/x/{name}/rootfs.ext4",
        work_seed=None,
        kernel=None,
        source="oci:test",
        size=1,
        created_at=now(),
    )


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, stage: str, message: str = "", **kw: Any) -> None:
        self.lines.append((stage, message))


async def test_concurrent_pulls_share_one_op_and_survive_a_caller_leaving(
    daemon_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    images: ImageService = daemon_factory().images
    release = asyncio.Event()
    calls = 0

    async def fake_pull(ref: str, name: str | None, progress: Any) -> Image:
        nonlocal calls
        calls += 1
        progress("download", "1/2 MiB")
        await release.wait()
        return _image("alpine")

    monkeypatch.setattr(images, "_pull", fake_pull)
    first, second = Recorder(), Recorder()
    a = asyncio.create_task(images.pull("alpine:3", None, first))
    await asyncio.sleep(0)
    b = asyncio.create_task(images.pull("alpine:3", None, second))
    await asyncio.sleep(0.01)
    assert calls == 1
    assert second.lines == [("pull", "joining the pull of alpine:3 already in progress")]
    (op,) = images.ops.list()
    assert (op.kind, op.target, op.stage, op.done) == ("pull", "alpine:3", "download", False)
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    release.set()
    assert (await b).name == "alpine"
    await asyncio.sleep(0)
    assert op.done and op.error is None
    assert "pull:alpine:3" not in images._inflight


async def test_a_failed_pull_reaches_every_caller_and_is_recorded(
    daemon_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    images: ImageService = daemon_factory().images
    release = asyncio.Event()

    async def failing_pull(ref: str, name: str | None, progress: Any) -> Image:
        await release.wait()
        raise RuntimeError("registry said no")

    monkeypatch.setattr(images, "_pull", failing_pull)
    callers = [asyncio.create_task(images.pull("x:1", None, Recorder())) for _ in range(2)]
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert [str(r) for r in results] == ["registry said no"] * 2
    (op,) = images.ops.list()
    assert op.done and op.error == "registry said no"
