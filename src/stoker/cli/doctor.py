"""`stoker doctor [--json]`."""

from __future__ import annotations

import argparse
from typing import Any

from stoker.cli.connect import layout_for, try_client
from stoker.cli.render import print_json


def register(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check this host can run VMs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=doctor)


def doctor(args: argparse.Namespace) -> int:
    from stoker.config import config_path, load_config
    from stoker.hostprobe.doctor import run_doctor_sync

    layout = layout_for(args)
    path, explicit = config_path(args.config, layout.config_file)
    config = load_config(path, required=explicit)

    def status() -> dict[str, Any] | None:
        with try_client(args) as c:
            if c is None:
                return None
            try:
                from stoker.rpc.facade import TypedClient

                return dict(TypedClient(c).daemon.status())
            except Exception:
                return None

    checks = run_doctor_sync(layout, config, status)
    failed = any(c.status == "FAIL" for c in checks)
    if args.json:
        print_json([c.to_dict() for c in checks])
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            line = f"{c.status:4}  {c.name.ljust(width)}  {c.message}"
            print(line)
            if c.fix and c.status != "PASS":
                print(f"{'':4}  {'':{width}}  fix: {c.fix}")
        n = {s: sum(1 for c in checks if c.status == s) for s in ("PASS", "WARN", "FAIL")}
        print(f"\nPASS {n['PASS']} · WARN {n['WARN']} · FAIL {n['FAIL']}")
    return 1 if failed else 0
