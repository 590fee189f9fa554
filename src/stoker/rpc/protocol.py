"""Wire format.

A request is one JSON object on one line:

    {"id": 1, "method": "vm.list", "params": {...}}

The server answers with zero or more progress lines and exactly one final line:

    {"id": 1, "progress": {"stage": "boot", "message": "..."}}
    {"id": 1, "result": ...}            or
    {"id": 1, "error": {"code": "not_found", "message": "...", "detail": null}}

A connection carries one request at a time. Closing the connection cancels the
request in flight.

Every line the server cannot take as a request (not JSON, an id that is not an integer,
a string or null, numbers JSON cannot carry such as NaN, nesting deeper than
MAX_NESTING) is answered with an error line, `"id": null` where no usable id was read.
A connection with no request in flight that sends no complete line for IDLE_TIMEOUT
seconds gets a `timeout` error line and is closed (a request in flight is never cut,
however long it runs); past MAX_CONNECTIONS, a new connection gets a
`too_many_connections` error line before anything is read and is closed (the client
reconnects and resends, with backoff).
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # no `typing` import at start-up
if TYPE_CHECKING:
    from typing import Any

MAX_REQUEST_BYTES = 1024 * 1024
MAX_RESPONSE_LINE = 64 * 1024 * 1024
PROTOCOL_VERSION = 1
IDLE_TIMEOUT = 60.0
MAX_CONNECTIONS = 256
LISTEN_BACKLOG = 512
MAX_NESTING = 64
MAX_ID_LENGTH = 256


def encode(msg: dict[str, Any]) -> bytes:
    """One wire line. Values must already be plain JSON (see rpc.jsonable on the server).

    NaN and infinities raise ValueError: `NaN` is not JSON and a peer could not parse it."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\n"
