"""`stoker pool status`: the warm pools (docs/json-output.md)."""

from __future__ import annotations

import argparse
from typing import Any

from stoker.cli.connect import client
from stoker.cli.render import print_json, table


def register(sub: Any) -> None:
    p = sub.add_parser("pool", help="the warm pool of booted VMs ([pool] in the config)")
    psub = p.add_subparsers(dest="pool_command", metavar="POOL_COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    s = psub.add_parser(
        "status", help="per image: target size, ready, filling, strategy, last error, backoff"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=pool_status)


def pool_status(args: argparse.Namespace) -> int:
    with client(args) as c:
        pools: list[dict[str, Any]] = c.call("pool.status")
    if args.json:
        print_json(pools)
        return 0
    if not pools:
        print("no warm pool: set [pool] size = N in the config (see README)")
        return 0
    rows = []
    for p in pools:
        note = p["waiting"] or ""
        if p["last_error"]:
            note = f"{p['failures']} failed: {p['last_error']}"
        elif p.get("fallback"):
            note = f"not {p['fallback']}"
        rows.append(
            [
                p["image"],
                p["size"],
                p["ready"],
                p["filling"],
                p["strategy"] or "-",
                f"{p['backoff_s']:g}s" if p["backoff_s"] else "-",
                f"{p['takes']}/{p['misses']}",
                note or "-",
            ]
        )
    table(
        ["IMAGE", "SIZE", "READY", "FILLING", "STRATEGY", "BACKOFF", "TAKEN/MISSED", "NOTE"], rows
    )
    return 0
