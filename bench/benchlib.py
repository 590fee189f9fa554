"""Helpers shared by the benchmarks (imported as `benchlib`: bench/ is the scripts' path)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def cpu_seconds() -> tuple[float, float]:
    """(this process with all its threads, its waited-for children): user + system CPU."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:PORT
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU the registry process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def local_registry(work: Path) -> Iterator[Registry]:
    """A `docker-registry` on 127.0.0.1 storing under `work` (log in work/registry.log),
    stopped on exit."""
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
        yield Registry(host, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
