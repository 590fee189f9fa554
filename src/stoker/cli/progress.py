"""Progress rendering: live stages on a TTY, plain lines otherwise."""

from __future__ import annotations

import os
import sys
import time
from typing import Any


class ProgressPrinter:
    """Callable given to the RPC client; prints each stage once."""

    def __init__(self, stream: Any = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        # Live (rewritten) lines need a terminal that understands \r and ESC[K: never on a
        # pipe or a file, nor with TERM=dumb (Emacs shells, CI logs).
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) and os.environ.get(
            "TERM", ""
        ) not in ("dumb", "")
        self.quiet = quiet
        self.t0 = time.monotonic()
        self._live = False

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.quiet:
            return
        stage = ev.get("stage", "")
        msg = ev.get("message", "")
        vm = ev.get("vm")
        prefix = f"[{vm}] " if vm else ""
        if stage == "spec":
            self._end_live()
            print(f"{prefix}spec: {msg}", file=self.stream, flush=True)
            return
        el = time.monotonic() - self.t0
        line = f"{prefix}{stage:>8}  {msg}"
        if self.tty and stage not in ("ready", "created"):
            self.stream.write(f"\r\033[K{line} ({el:.1f}s)")
            self.stream.flush()
            self._live = True
        else:
            self._end_live()
            print(f"{line} ({el:.1f}s)", file=self.stream, flush=True)

    def _end_live(self) -> None:
        if self._live:
            self.stream.write("\n")
            self._live = False

    def done(self) -> None:
        self._end_live()


def call_with_progress(c: Any, method: str, params: dict[str, Any], quiet: bool = False) -> Any:
    """One RPC call whose progress stages are rendered as they stream in."""
    pp = ProgressPrinter(quiet=quiet)
    try:
        return c.call(method, params, pp)
    finally:
        pp.done()
