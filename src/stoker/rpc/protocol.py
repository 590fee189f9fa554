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

import json
from typing import Any

MAX_REQUEST_BYTES = 1024 * 1024
MAX_RESPONSE_LINE = 64 * 1024 * 1024
PROTOCOL_VERSION = 1


def encode(msg: dict[str, Any]) -> bytes:
    """One wire line. Values must already be plain JSON (see rpc.jsonable on the server)."""
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"
