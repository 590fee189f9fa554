"""Run as some user: send helper requests, print each outcome as one JSON list.

argv: SOCKET REQUESTS_JSON (a list of [method, params]). An outcome is
{"ok": result, "fds": N} or {"err": code, "msg": message}.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from stoker.errors import StokerError
from stoker.helper.client import HelperClient


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    delay = float(os.environ.get("STK_RETRY_DELAY", "0.2"))
    client = HelperClient(Path(sys.argv[1]), timeout=20, retry_delay=delay)
    out = []
    for method, params in json.loads(sys.argv[2]):
        try:
            result, fds = client.request(method, params)
            for fd in fds:
                os.close(fd)
            out.append({"ok": result, "fds": len(fds)})
        except StokerError as e:
            out.append({"err": e.code, "msg": e.message})
    print(json.dumps(out))


main()
