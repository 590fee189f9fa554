"""Wire format.

A request is one JSON object on one line:

    {"id": 1, "method": "vm.list", "params": {...}}

The server answers with zero or more progress lines and exactly one final line:

    {"id": 1, "progress": {"stage": "boot", "message": "..."}}
    {"id": 1, "result": ...}            or
    {"id": 1, "error": {"code": "not_found", "message": "...", "detail": null}}

A connection carries one request at a time. Closing the connection cancels the
request in flight.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

MAX_REQUEST_BYTES = 1024 * 1024
MAX_RESPONSE_LINE = 64 * 1024 * 1024
PROTOCOL_VERSION = 1


def to_jsonable(value: Any) -> Any:
    """Convert records to plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        if callable(to_dict):
            return to_jsonable(to_dict())
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return value


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(to_jsonable(msg), separators=(",", ":")).encode() + b"\n"
