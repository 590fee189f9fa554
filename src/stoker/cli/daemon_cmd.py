"""`stoker daemon status|stop`."""

from __future__ import annotations

import argparse
import time
from typing import Any

from stoker.cli.connect import layout_for, try_client
from stoker.cli.render import print_json
from stoker.errors import Unavailable
from stoker.rpc.facade import TypedClient


def register(sub: Any) -> None:
    d = sub.add_parser("daemon", help="the stokerd daemon")
    dsub = d.add_subparsers(dest="daemon_command", metavar="DAEMON_COMMAND")
    d.set_defaults(func=lambda a: (d.print_help(), 2)[1])
    p = dsub.add_parser("status", help="pid, socket, DNS listener, versions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=daemon_status)
    p = dsub.add_parser("stop", help="stop the daemon (running VMs keep running)")
    p.set_defaults(func=daemon_stop)
    p = dsub.add_parser(
        "unit",
        help="print the systemd unit of a system-wide stokerd, naming this install's stokerd",
    )
    p.set_defaults(func=daemon_unit)


def unit_text(template: str, python: str) -> str:
    """The packaged unit with ExecStart pointing at the stokerd next to `python` (the
    interpreter this stoker is installed for), or at `python -m stoker.daemon.main`."""
    import re
    from pathlib import Path

    stokerd = Path(python).parent / "stokerd"
    start = (
        f"{stokerd} --system" if stokerd.is_file() else f"{python} -m stoker.daemon.main --system"
    )
    return re.sub(r"^ExecStart=.*$", f"ExecStart={start}", template, flags=re.M)


def daemon_unit(args: argparse.Namespace) -> int:
    import sys
    from importlib.resources import files

    template = files("stoker").joinpath("data/stokerd.service").read_text()
    sys.stdout.write(unit_text(template, sys.executable))
    return 0


def daemon_status(args: argparse.Namespace) -> int:
    with try_client(args) as c:
        st = TypedClient(c).daemon.status() if c is not None else None
    if st is None:
        layout = layout_for(args)
        if args.json:
            print_json({"running": False, "socket": str(layout.socket_path)})
        else:
            print(f"stokerd is not running (socket {layout.socket_path})")
        return 1
    if args.json:
        print_json({"running": True, **st})
        return 0
    net = st["network"]
    print(f"stokerd {st['version']} running, pid {st['pid']}, up {st['uptime_s']}s")
    print(f"socket:     {st['socket']}")
    print(f"state dir:  {st['state_dir']}")
    print(f"config:     {st['config'] or '(defaults)'}")
    print(f"bridge:     {net.get('bridge')} {net.get('cidr')} (gateway {net.get('gateway')})")
    print(f"dns:        {net.get('dns_listen') or '(not listening)'}")
    return 0


def daemon_stop(args: argparse.Namespace) -> int:
    with try_client(args) as c:
        if c is None:
            print("stokerd is not running")
            return 0
        pid = TypedClient(c).daemon.stop()["pid"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not _running(pid):
            print(f"stokerd (pid {pid}) stopped; running VMs were left running")
            return 0
        time.sleep(0.05)
    raise Unavailable(f"stokerd (pid {pid}) did not stop within 10s")


def _running(pid: int) -> bool:
    """True while `pid` exists and has not exited. A detached daemon's zombie lingers until
    its reaper (often PID 1) gets to it, which can take seconds or never happen."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False
