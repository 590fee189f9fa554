"""Transient per-VM handles (pid, tap, loop devices, dm names), cached in memory.

Each VM directory holds `handles.json`; it is written to disk before the memory map
so a daemon restart can rebuild the cache.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Handles:
    pid: int | None = None
    vmm: str | None = None
    tap: str | None = None
    api_socket: str | None = None
    loops: list[str] = field(default_factory=list)
    dm_names: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class HandleCache:
    """In-memory map vm_id -> Handles; a leaf lock guards it."""

    FILE = "handles.json"

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._h: dict[str, Handles] = {}

    def get(self, vm_id: str) -> Handles | None:
        with self._mu:
            return self._h.get(vm_id)

    def put(self, vm_id: str, vm_dir: Path, h: Handles) -> None:
        """Persist to `<vm_dir>/handles.json` (atomically), then cache."""
        vm_dir.mkdir(parents=True, exist_ok=True)
        tmp = vm_dir / (self.FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(h), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, vm_dir / self.FILE)
        with self._mu:
            self._h[vm_id] = h

    def drop(self, vm_id: str, vm_dir: Path) -> None:
        try:
            (vm_dir / self.FILE).unlink()
        except FileNotFoundError:
            pass
        with self._mu:
            self._h.pop(vm_id, None)

    def load(self, vm_id: str, vm_dir: Path) -> Handles | None:
        """Read handles.json; a missing or corrupt file yields None (the caller falls back
        to the durable teardown identity in the store)."""
        try:
            data = json.loads((vm_dir / self.FILE).read_text())
            if not isinstance(data, dict):
                raise ValueError("not an object")
            h = Handles(**{k: v for k, v in data.items() if k in Handles.__dataclass_fields__})
            if h.pid is not None and not isinstance(h.pid, int):
                raise ValueError("bad pid")
        except (OSError, ValueError, TypeError):
            return None
        with self._mu:
            self._h[vm_id] = h
        return h
