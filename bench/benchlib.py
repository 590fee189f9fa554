"""Helpers shared by the benchmarks (imported as `benchlib`: bench/ is the scripts' path)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_registry(work: Path) -> Iterator[str]:
    """A `docker-registry` on 127.0.0.1 storing under `work` (log in work/registry.log),
    stopped on exit; yields its host:port."""
    host = f"127.0.0.1:{free_port()}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "registry.yml"
    cfg.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'storage'}\n"
        f"http:\n  addr: {host}\n"
    )
    with open(work / "registry.log", "wb") as log:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(cfg)], stdout=log, stderr=log, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://{host}/v2/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(
                        f"docker-registry did not start (see {work / 'registry.log'})"
                    ) from None
                time.sleep(0.05)
        yield host
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
