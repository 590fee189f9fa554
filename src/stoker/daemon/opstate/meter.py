"""`DownloadMeter`: one download progress line, at most every `interval` seconds."""

from __future__ import annotations

import time
from typing import Any, Protocol

PROGRESS_INTERVAL = 0.5
_MIB = 1 << 20


class Progress(Protocol):
    """Where an operation reports what it is doing (matches `RequestContext.progress`)."""

    def __call__(self, stage: str, message: str = "", **fields: Any) -> None: ...


class DownloadMeter:
    """Adds up bytes as they arrive and reports `download` progress ("12/80 MiB", or
    "12 MiB" when the total is not known) with `done` and `total` fields, throttled."""

    def __init__(
        self,
        progress: Progress | None,
        total: int | None,
        interval: float = PROGRESS_INTERVAL,
        stage: str = "download",
    ) -> None:
        self.progress = progress
        self.total = total
        self.stage = stage
        self.interval = interval
        self.done = 0
        self._last = float("-inf")  # the first bytes are reported at once

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.progress is not None and now - self._last >= self.interval:
            self._last = now
            of = f"/{self.total // _MIB}" if self.total else ""
            self.progress(
                self.stage, f"{self.done // _MIB}{of} MiB", done=self.done, total=self.total
            )
