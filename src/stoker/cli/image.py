"""`stoker image ...`."""

from __future__ import annotations

import argparse
from typing import Any

from stoker.cli.connect import client
from stoker.cli.render import age, print_json, size, table


def register(sub: Any) -> None:
    im = sub.add_parser("image", help="pull, build and manage root filesystem images")
    isub = im.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND")
    im.set_defaults(func=lambda a: (im.print_help(), 2)[1])
    p = isub.add_parser("list", aliases=["ls"], help="list images")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=image_list)


def image_list(args: argparse.Namespace) -> int:
    with client(args) as c:
        images = c.call("image.list")
    if args.json:
        print_json(images)
        return 0
    if not images:
        print("no images: build one with `stoker image build debian-bookworm`")
        return 0
    table(
        ["NAME", "KERNEL", "SIZE", "MANAGED", "SOURCE", "AGE"],
        [
            [
                i["name"],
                i["kernel"] or "-",
                size(i["size"]),
                "yes" if i["managed"] else "no",
                i["source"],
                age(i["created_at"]),
            ]
            for i in images
        ],
    )
    return 0
