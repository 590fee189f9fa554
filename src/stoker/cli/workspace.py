"""`stoker vm workspace prepare|export`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from stoker.cli.connect import client
from stoker.cli.render import print_json
from stoker.rpc.facade import TypedClient

if TYPE_CHECKING:
    from stoker.rpc.shapes import RepoInfo


def register(vsub: Any) -> None:
    w = vsub.add_parser("workspace", help="copy a git workspace in, get a patch out")
    wsub = w.add_subparsers(dest="ws_command", metavar="WORKSPACE_COMMAND")
    w.set_defaults(func=lambda a: (w.print_help(), 2)[1])

    p = wsub.add_parser("prepare", help="ship a git work tree into a running VM")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--guest-path", default="/root/repo")
    p.add_argument("--branch", help="create this guest-only branch")
    p.add_argument("--from", dest="from_ref", metavar="REF", help="start --branch from REF")
    p.add_argument(
        "--include-untracked",
        action="store_true",
        help="also ship untracked files that are not ignored",
    )
    p.add_argument("--dry-run", action="store_true", help="print the files and mode only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=prepare)

    p = wsub.add_parser("export", help="print a patch of the guest's changes (git apply)")
    p.add_argument("name")
    p.add_argument("--output", "-o", help="write the patch to this file")
    p.add_argument("--base-commit", help="diff against this commit (default: prepared HEAD)")
    p.add_argument("--json", action="store_true", help="the changed files as JSON on stderr")
    p.set_defaults(func=export)


def prepare(args: argparse.Namespace) -> int:
    from stoker.cli.progress import call_with_progress

    path = os.path.abspath(args.path)
    if args.from_ref and not args.branch:
        from stoker.cli.render import UsageError

        raise UsageError("--from needs --branch")
    with client(args) as c:
        if args.dry_run:
            plan = TypedClient(c).workspace.inspect(
                {"path": path, "include_untracked": args.include_untracked, "list_files": True},
            )
            return print_dry_run(plan, args.include_untracked)
        w = call_with_progress(
            c,
            "vm.workspace.prepare",
            {
                "ref": args.name,
                "path": path,
                "guest_path": args.guest_path,
                "branch": args.branch,
                "from_ref": args.from_ref,
                "include_untracked": True if args.include_untracked else None,
            },
            quiet=args.json,
        )
    if args.json:
        print_json(w)
    else:
        print(f"{w['host_path']} -> {args.name}:{w['guest_path']} @ {w['head'][:12]}")
    return 0


def export(args: argparse.Namespace) -> int:
    import base64

    with client(args) as c:
        r = TypedClient(c).workspace.export(args.name, args.base_commit)
    patch = base64.b64decode(r["patch_b64"])
    if args.output:
        from pathlib import Path

        from stoker.cli.fsutil import write_atomic

        write_atomic(Path(os.path.abspath(args.output)), patch)
    else:
        sys.stdout.buffer.write(patch)
        sys.stdout.buffer.flush()
    if args.json:
        import json

        json.dump(r["files"], sys.stderr)
        sys.stderr.write("\n")
    else:
        n = len(r["files"])
        print(
            f"stoker: {n} file{'s' if n != 1 else ''} changed since {r['base'][:12]}"
            + (f" (patch in {args.output})" if args.output else ""),
            file=sys.stderr,
        )
    return 0


def print_dry_run(plan: RepoInfo, include_untracked: bool) -> int:
    """--dry-run: the files that would be shipped and the mode; nothing is created."""
    mode = "tracked + untracked" if include_untracked else "tracked only"
    print(
        f"repo: {plan['root']} @ {(plan['head'] or 'no commits')[:12]} "
        f"({plan.get('branch') or 'detached'}); mode: {mode}"
    )
    files = plan.get("files", [])
    for f in files:
        print(f"  {f}")
    print(f"{len(files)} files")
    return 0
