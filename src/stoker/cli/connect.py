"""Reach the daemon: connect, or start it detached (dev mode) and wait for it."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from stoker.errors import Unavailable
from stoker.layout import Layout
from stoker.rpc.client import Client, DaemonNotRunning

START_TIMEOUT = 20.0


def layout_for(args: argparse.Namespace) -> Layout:
    return Layout.resolve(system=getattr(args, "system", False))


def daemon_starting(layout: Layout) -> bool:
    """True when a live stokerd holds the lock (so a missing or refusing socket means it is
    still starting, not gone). Reads the pid the daemon wrote into its lock file: taking
    the lock to test it could make a daemon starting at that instant fail its own."""
    try:
        pid = int(layout.lock_path.read_text().strip() or "0")
        if pid <= 0:
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        # `python -m stoker.daemon.main` (dev mode) or `.../stokerd` (a system install).
        return any(a == b"stoker.daemon.main" or os.path.basename(a) == b"stokerd" for a in argv)
    except (OSError, ValueError):
        return False


def client(args: argparse.Namespace, autostart: bool = True) -> Client:
    """A connected client; starts stokerd first if nothing answers (unless --system)."""
    layout = layout_for(args)
    try:
        return Client(
            layout.socket_path,
            connect_timeout=START_TIMEOUT,
            daemon_starting=lambda: daemon_starting(layout),
        )
    except DaemonNotRunning:
        if not autostart or layout.system:
            raise DaemonNotRunning(
                f"stokerd is not running on {layout.socket_path}: start it with "
                "`systemctl start stokerd`"
                if layout.system
                else f"stokerd is not running on {layout.socket_path}"
            ) from None
    start_daemon(layout, getattr(args, "config", None))
    return Client(layout.socket_path, connect_timeout=START_TIMEOUT)


@contextmanager
def try_client(args: argparse.Namespace) -> Iterator[Client | None]:
    """A client if the daemon is up, else None (never starts it)."""
    try:
        c = Client(layout_for(args).socket_path, timeout=2.0)
    except Exception:
        yield None
        return
    try:
        yield c
    finally:
        c.close()


def start_daemon(layout: Layout, config: str | None) -> None:
    """Spawn stokerd in its own session with its log in the state dir, and wait."""
    import subprocess

    layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = [sys.executable, "-m", "stoker.daemon.main"]
    if config:
        argv += ["--config", config]
    with open(layout.log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            env=os.environ.copy(),
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with Client(layout.socket_path, timeout=2.0) as c:
                c.call("daemon.status")
                return
        except DaemonNotRunning:
            pass
        rc = proc.poll()
        if rc is not None:
            # It may have lost a race to another stokerd that is now serving.
            try:
                with Client(layout.socket_path, timeout=2.0) as c:
                    c.call("daemon.status")
                    return
            except DaemonNotRunning:
                pass
            raise Unavailable(
                f"stokerd exited with status {rc} while starting: {_log_tail(layout)}"
            )
        time.sleep(0.05)
    raise Unavailable(
        f"stokerd did not answer on {layout.socket_path} within {START_TIMEOUT:.0f}s: "
        f"see {layout.log_path}"
    )


def _log_tail(layout: Layout) -> str:
    try:
        lines = layout.log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"see {layout.log_path}"
    return (lines[-1] if lines else "no log output") + f" (log: {layout.log_path})"
