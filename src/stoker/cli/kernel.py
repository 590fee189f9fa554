"""`stoker kernel ...`."""

from __future__ import annotations

import argparse
from typing import Any

from stoker.cli.connect import client
from stoker.cli.render import age, print_json, table


def register(sub: Any) -> None:
    k = sub.add_parser("kernel", help="pull, import and manage guest kernels")
    ksub = k.add_subparsers(dest="kernel_command", metavar="KERNEL_COMMAND")
    k.set_defaults(func=lambda a: (k.print_help(), 2)[1])
    p = ksub.add_parser("list", aliases=["ls"], help="list kernels")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=kernel_list)


def kernel_list(args: argparse.Namespace) -> int:
    with client(args) as c:
        kernels = c.call("kernel.list")
    if args.json:
        print_json(kernels)
        return 0
    if not kernels:
        print("no kernels: `stoker image build debian-bookworm` imports one")
        return 0
    table(
        ["NAME", "VERSION", "ARCH", "VMLINUX", "BZIMAGE", "INITRD", "AGE"],
        [
            [
                k["name"],
                k["version"],
                k["arch"],
                "yes" if k["vmlinux"] else "no",
                "yes" if k["bzimage"] else "no",
                "yes" if k["initrd"] else "no",
                age(k["created_at"]),
            ]
            for k in kernels
        ],
    )
    return 0
