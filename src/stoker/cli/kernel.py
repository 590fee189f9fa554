"""`stoker kernel ...`."""

from __future__ import annotations

import argparse
from typing import Any

from stoker.cli.connect import client
from stoker.cli.render import add_output_flags, age, print_json, structured, table
from stoker.rpc.facade import TypedClient


def register(sub: Any) -> None:
    k = sub.add_parser("kernel", help="pull, import and manage guest kernels")
    ksub = k.add_subparsers(dest="kernel_command", metavar="KERNEL_COMMAND")
    k.set_defaults(func=lambda a: (k.print_help(), 2)[1])
    p = ksub.add_parser("list", aliases=["ls"], help="list kernels")
    p.add_argument("--available", action="store_true", help="list the catalog's kernels")
    add_output_flags(p, "kernel", listing=True)
    p.set_defaults(func=kernel_list)
    p = ksub.add_parser("show", help="one kernel in detail")
    p.add_argument("name")
    add_output_flags(p, "kernel", listing=False)
    p.set_defaults(func=kernel_show)
    p = ksub.add_parser("pull", help="download a kernel from the catalog")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=kernel_pull)
    p = ksub.add_parser("import", help="import a kernel from a directory or a .deb")
    p.add_argument("name")
    p.add_argument("--from", dest="source", required=True, metavar="DIR|PACKAGE.deb")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=kernel_import)
    p = ksub.add_parser("rm", aliases=["delete"], help="remove a kernel (not while in use)")
    p.add_argument("name")
    p.set_defaults(func=kernel_rm)


def kernel_list(args: argparse.Namespace) -> int:
    if args.available:
        return _kernels_available(args)
    with client(args) as c:
        kernels = TypedClient(c).kernel.list()
    if structured(args, kernels):
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


def _kernels_available(args: argparse.Namespace) -> int:
    with client(args) as c:
        kernels = TypedClient(c).kernel.available()
    args.output_kind = "kernel-available"
    if structured(args, kernels):
        return 0
    if not kernels:
        print("the catalog lists no kernels: import one with `stoker kernel import`")
    table(
        ["NAME", "VERSION", "ARCH", "SIZE", "INSTALLED"],
        [
            [k["name"], k["version"], k["arch"], k["size"], "yes" if k["installed"] else "no"]
            for k in kernels
        ],
    )
    return 0


def kernel_show(args: argparse.Namespace) -> int:
    with client(args) as c:
        k = TypedClient(c).kernel.show(args.name)
    if structured(args, k):
        return 0
    for key in (
        "name",
        "version",
        "arch",
        "vmlinux",
        "bzimage",
        "initrd",
        "modules_dir",
        "source",
        "created_at",
    ):
        print(f"{key + ':':12} {k[key] or '-'}")
    return 0


def kernel_rm(args: argparse.Namespace) -> int:
    with client(args) as c:
        TypedClient(c).kernel.rm(args.name)
    print(f"removed kernel {args.name}")
    return 0


def kernel_import(args: argparse.Namespace) -> int:
    import os

    with client(args) as c:
        k = TypedClient(c).kernel.import_(args.name, os.path.abspath(args.source))
    if args.json:
        print_json(k)
    else:
        print(f"imported kernel {k['name']} ({k['version']}, {k['arch']})")
    return 0


def kernel_pull(args: argparse.Namespace) -> int:
    from stoker.cli.progress import call_with_progress

    with client(args) as c:
        k = call_with_progress(c, "kernel.pull", {"name": args.name}, quiet=args.json)
    if args.json:
        print_json(k)
    else:
        print(f"kernel {k['name']} ready ({k['version']}, {k['arch']})")
    return 0
