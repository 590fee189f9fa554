"""`Registry[T]`: in-memory bookkeeping of async operations; owns its own (leaf) lock."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar


class AsyncOp(Protocol):
    """What the registry needs to know about an operation."""

    id: str

    @property
    def done(self) -> bool: ...

    @property
    def finished_at(self) -> float | None: ...


@dataclass
class OpState:
    """A plain operation record usable with `Registry`."""

    kind: str
    target: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    stage: str = "queued"
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    def finish(self, error: str | None = None) -> None:
        self.error = error
        self.finished_at = time.time()

    def tracking(self, progress: Callable[..., None]) -> Callable[..., None]:
        """Wrap a progress callback so each stage is also recorded on this op."""

        def wrapped(stage: str, message: str = "", **kw: Any) -> None:
            self.stage = stage
            progress(stage, message, **kw)

        return wrapped

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        t = time.time() if now is None else now
        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "stage": self.stage,
            "state": ("failed" if self.error else "done") if self.done else "running",
            "error": self.error,
            "age_s": round(t - self.started_at, 1),
        }


T = TypeVar("T", bound=AsyncOp)


class Registry(Generic[T]):
    """Thread-safe map of id -> op. Finished ops stay until `prune` drops them."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._ops: dict[str, T] = {}

    def add(self, op: T) -> T:
        with self._mu:
            self._ops[op.id] = op
        return op

    def get(self, op_id: str) -> T | None:
        with self._mu:
            return self._ops.get(op_id)

    def list(self) -> list[T]:
        with self._mu:
            return list(self._ops.values())

    def remove(self, op_id: str) -> None:
        with self._mu:
            self._ops.pop(op_id, None)

    def prune(self, older_than: float, now: float | None = None) -> int:
        """Drop finished ops whose end is older than `older_than` seconds."""
        t = time.time() if now is None else now
        with self._mu:
            stale = [
                k
                for k, op in self._ops.items()
                if op.done and op.finished_at is not None and t - op.finished_at > older_than
            ]
            for k in stale:
                del self._ops[k]
        return len(stale)
