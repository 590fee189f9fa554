"""`stokerd`: run the daemon in the foreground (the CLI detaches it in dev mode)."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path
from typing import IO

from stoker import __version__
from stoker.errors import StokerError
from stoker.layout import Layout


def _flock(path: Path) -> tuple[IO[str], str | None]:
    """Open `path` and take an exclusive flock without waiting: (file, None), or
    (closed file, the holder's first line) when another process holds it."""
    f = open(path, "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip().splitlines()
        f.close()
        return f, (holder[0] if holder else "?")
    return f, None


def _take_lock(layout: Layout) -> list[IO[str]]:
    """One stokerd per socket and one per state directory: exclusive flocks held for the
    process's life. Two daemons with different XDG_RUNTIME_DIR (so different sockets)
    but one state dir would both adopt, stop and delete the same VMs."""
    layout.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    f, holder = _flock(layout.lock_path)
    if holder is not None:
        raise StokerError(
            f"another stokerd (pid {holder}) is already serving {layout.socket_path}: "
            "use `stoker daemon stop` first"
        )
    # A file of its own even when the runtime dir is the state dir: two flocks on one
    # file from two open() calls would conflict with each other.
    layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    g, holder = _flock(layout.state_lock_path)
    if holder is not None:
        f.close()
        pid, _, sock = holder.partition(" ")
        raise StokerError(
            f"another stokerd (pid {pid}) already uses the state directory "
            f"{layout.state_dir}" + (f" (serving {sock})" if sock else "") + ": only one "
            "daemon may own it; stop that one first (`stoker daemon stop` with its "
            "XDG_RUNTIME_DIR), or give this one its own XDG_STATE_HOME"
        )
    locks = [f, g]
    for lk in locks:
        lk.seek(0)
        lk.truncate()
        lk.write(f"{os.getpid()}" if lk is f else f"{os.getpid()} {layout.socket_path}")
        lk.flush()
    return locks


async def _amain(args: argparse.Namespace) -> int:
    from stoker.daemon.daemon import Daemon

    layout = Layout.resolve(system=args.system)
    locks = _take_lock(layout)
    # The socket file may be left over from a killed daemon: we hold the lock, so it is
    # stale and the server replaces it.
    d = await Daemon.open(layout, args.config)
    if d.config is not None and args.log_level is None:
        # --log-level or STOKER_LOG_LEVEL (set by `stoker --debug` when it starts us) wins.
        logging.getLogger().setLevel(d.config.log_level.upper())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, d.stop)
    log = logging.getLogger("stoker")

    def ready() -> None:
        layout.pid_path.write_text(str(os.getpid()))
        log.info("stokerd %s serving %s (pid %d)", __version__, layout.socket_path, os.getpid())

    try:
        await d.serve(ready)
    finally:
        try:
            layout.pid_path.unlink()
        except FileNotFoundError:
            pass
        log.info("stokerd stopped")
        for lk in locks:
            lk.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stokerd", description="stoker daemon")
    ap.add_argument("--system", action="store_true", help="use /etc, /var/lib, /run paths")
    ap.add_argument("--config", help="config file (default: the layout's config.toml)")
    ap.add_argument(
        "--log-level",
        default=os.environ.get("STOKER_LOG_LEVEL") or None,
        help="debug, info, warning or error (default: the config's log_level, else info)",
    )
    ap.add_argument("--version", action="version", version=f"stokerd {__version__}")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # asyncssh logs every connection attempt at INFO: readiness polling would flood the log.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    # Never die with the terminal or the CLI that started us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return asyncio.run(_amain(args))
    except StokerError as e:
        print(f"stokerd: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
