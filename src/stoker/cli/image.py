"""`stoker image ...`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from stoker.cli.connect import client
from stoker.cli.render import add_output_flags, age, print_json, size, structured, table
from stoker.rpc.facade import TypedClient

if TYPE_CHECKING:
    from stoker.rpc.shapes import Image


def register(sub: Any) -> None:
    im = sub.add_parser("image", help="pull, build and manage root filesystem images")
    isub = im.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND")
    im.set_defaults(func=lambda a: (im.print_help(), 2)[1])
    p = isub.add_parser("list", aliases=["ls"], help="list images")
    add_output_flags(p, "image", listing=True)
    p.set_defaults(func=image_list)

    p = isub.add_parser("show", help="one image in detail")
    p.add_argument("name")
    add_output_flags(p, "image", listing=False)
    p.set_defaults(func=image_show)

    p = isub.add_parser("register", help="record an image from host paths (unmanaged)")
    p.add_argument("name")
    p.add_argument("--rootfs", required=True, help="ext4 root filesystem image")
    p.add_argument("--kernel", required=True, help="name of a registered kernel")
    p.add_argument("--work-seed", help="ext4 image holding the image's /root")
    p.add_argument("--no-sshd", action="store_true", help="the image has no SSH server")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=image_register)

    p = isub.add_parser("promote", help="copy a registered image into managed storage")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=image_promote)

    p = isub.add_parser("pull", help="pull an image: catalog name or any OCI reference")
    p.add_argument("ref", help="catalog name, or an OCI reference such as debian:bookworm")
    p.add_argument("--name", help="register under this name (default: derived from REF)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=image_pull)

    p = isub.add_parser("push", help="publish an image to an OCI registry (as an artifact)")
    p.add_argument("name", help="the image to publish (with its kernel)")
    p.add_argument("ref", help="where: REGISTRY/REPOSITORY:TAG, e.g. registry.lan:5000/team/env:1")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=image_push)

    p = isub.add_parser("login", help="save credentials for a registry (Docker's config.json)")
    p.add_argument("registry", help="host[:port] of the registry (docker.io for Docker Hub)")
    p.add_argument("-u", "--username", help="user name (prompted when omitted)")
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    p.set_defaults(func=image_login)

    p = isub.add_parser("logout", help="forget the credentials saved for a registry")
    p.add_argument("registry", help="host[:port] of the registry")
    p.set_defaults(func=image_logout)

    p = isub.add_parser(
        "build",
        help="build a golden image, or a derived one (--from/--packages/--setup/--recipe)",
    )
    p.add_argument("name", nargs="?", help="image name (default: debian-bookworm, or env-HASH)")
    p.add_argument("--from", dest="from_image", metavar="IMAGE", help="parent image or OCI ref")
    p.add_argument("--packages", metavar="A,B", help="Debian packages to install at build time")
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="FILE-or-CMD",
        help="a setup step run in a builder VM (NAT on); repeatable",
    )
    p.add_argument(
        "--copy",
        action="append",
        default=[],
        metavar="HOST:GUEST",
        help="copy a host file into the image at GUEST (builder VM; hashed into the image "
        "key); repeatable",
    )
    p.add_argument("--recipe", metavar="PATH", help="a stoker.toml (or a repo dir holding one)")
    p.add_argument("--repo", metavar="DIR", help="repo copied to /root/repo for setup steps")
    p.add_argument("--setup-timeout", type=float, metavar="S", help="per step (default 3600)")
    p.add_argument("--keep-failed", action="store_true", help="keep the builder VM on failure")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=image_build)

    cache = isub.add_parser("cache", help="the OCI blob cache")
    csub = cache.add_subparsers(dest="cache_command", metavar="CACHE_COMMAND")
    cache.set_defaults(func=lambda a: (cache.print_help(), 2)[1])
    p = csub.add_parser("prune", help="delete cached blobs no running pull uses")
    p.add_argument("--dry-run", action="store_true", help="report only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cache_prune)

    p = isub.add_parser("delete", aliases=["rm"], help="delete an image (not while in use)")
    p.add_argument("name")
    p.set_defaults(func=image_delete)


def image_list(args: argparse.Namespace) -> int:
    with client(args) as c:
        images = TypedClient(c).image.list()
    if structured(args, images):
        return 0
    if not images:
        print("no images: build one with `stoker image build debian-bookworm`")
        return 0
    table(
        ["NAME", "KERNEL", "SIZE", "MANAGED", "SOURCE", "PARENT", "RECIPE", "AGE"],
        [
            [
                i["name"],
                i["kernel"] or "-",
                size(i["size"]),
                "yes" if i["managed"] else "no",
                i["source"],
                i.get("parent") or "-",
                (i.get("recipe_hash") or "-")[:12],
                age(i["created_at"]),
            ]
            for i in images
        ],
    )
    return 0


def _print_image(i: Image) -> None:
    print(f"name:       {i['name']}")
    print(f"kernel:     {i['kernel'] or '-'}")
    print(f"rootfs:     {i['rootfs']} ({size(i['size'])})")
    print(f"work seed:  {i['work_seed'] or '-'}")
    print(f"managed:    {'yes' if i['managed'] else 'no'}")
    print(f"source:     {i['source']}")
    if i.get("digest"):
        print(f"digest:     {i['digest']}")
    if i.get("parent"):
        print(f"parent:     {i['parent']}")
    if i.get("recipe_hash"):
        print(f"recipe:     {i['recipe_hash']}")
    meta = i.get("meta") or {}
    if meta.get("packages"):
        print(f"packages:   {', '.join(meta['packages'])}")
    if meta.get("setup"):
        print(f"setup:      {len(meta['setup'])} step(s)")
    if i.get("role") == "workload":
        wl = meta.get("workload") or {}
        print("role:       workload root (runs on a system image; no SSH server of its own)")
        print(f"workdir:    {wl.get('working_dir') or '/'}")
        print(f"user:       {wl.get('user') or 'root'} ({wl.get('uid', 0)}:{wl.get('gid', 0)})")
        for e in wl.get("env") or []:
            print(f"env:        {e}")
    else:
        print(f"init:       {i['init']}{'' if i['has_sshd'] else ' (no SSH server)'}")
    print(f"created:    {i['created_at']}")


def image_show(args: argparse.Namespace) -> int:
    with client(args) as c:
        i = TypedClient(c).image.show(args.name)
    if not structured(args, i):
        _print_image(i)
    return 0


def image_register(args: argparse.Namespace) -> int:
    import os

    params = {
        "name": args.name,
        "rootfs": os.path.abspath(args.rootfs),
        "kernel": args.kernel,
        "work_seed": os.path.abspath(args.work_seed) if args.work_seed else None,
        "has_sshd": not args.no_sshd,
    }
    with client(args) as c:
        i = TypedClient(c).image.register(params)
    if args.json:
        print_json(i)
    else:
        print(f"registered {i['name']} (unmanaged: stoker will not delete {i['rootfs']})")
    return 0


def image_promote(args: argparse.Namespace) -> int:
    with client(args) as c:
        i = TypedClient(c).image.promote(args.name)
    if args.json:
        print_json(i)
    else:
        print(f"{i['name']} is now managed ({i['rootfs']})")
    return 0


def image_delete(args: argparse.Namespace) -> int:
    with client(args) as c:
        TypedClient(c).image.delete(args.name)
    print(f"deleted image {args.name}")
    return 0


def image_pull(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"ref": args.ref, "name": args.name}
    auth = _auth_for(args.ref)
    if auth is not None:
        params["auth"] = auth
    return _image_op(args, "image.pull", params)


def _auth_for(ref: str) -> dict[str, str] | None:
    """The user's credential for REF's registry, resolved here (as the user, with the
    user's keyring) and sent to the daemon for that registry only."""
    from stoker.daemon.catalog import load_catalog

    entry = load_catalog().find_image(ref)
    if entry is not None and not entry.ref:
        return None  # a bundle: plain HTTPS download, no registry
    if entry is not None and entry.ref:
        ref = entry.ref
    from stoker.daemon.oci.auth import lookup
    from stoker.daemon.oci.reference import parse_reference

    cred = lookup(parse_reference(ref).domain)
    return cred.to_wire() if cred is not None else None


def image_push(args: argparse.Namespace) -> int:
    from stoker.cli.progress import call_with_progress

    params: dict[str, Any] = {"name": args.name, "ref": args.ref}
    auth = _auth_for(args.ref)
    if auth is not None:
        params["auth"] = auth
    with client(args) as c:
        r = call_with_progress(c, "image.push", params, quiet=args.json)
    if args.json:
        print_json(r)
    else:
        print(
            f"pushed {r['name']} to {r['ref']} ({size(r['size'])}, {r['uploaded']} blobs "
            f"uploaded, {r['skipped']} already there)\ndigest: {r['digest']}"
        )
    return 0


def _registry_arg(raw: str) -> str:
    import re

    from stoker.daemon.oci.auth import normalize_key
    from stoker.errors import InvalidArgument

    host = normalize_key(raw)
    if not re.fullmatch(
        r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?|\[[0-9a-f:.]+\](:\d{1,5})?", host
    ):
        raise InvalidArgument(
            f"{raw!r} is not a registry: give host[:port], e.g. registry.lan:5000 or docker.io"
        )
    return host


def _check_login(args: argparse.Namespace, registry: str, username: str, password: str) -> None:
    """Ask the registry (from here, as the user) whether the credentials work."""
    import asyncio

    from stoker.cli.connect import layout_for
    from stoker.config import config_path, load_config
    from stoker.daemon.oci.auth import Credential
    from stoker.daemon.oci.reference import Reference
    from stoker.daemon.oci.registry import open_client

    layout = layout_for(args)
    path, explicit = config_path(getattr(args, "config", None), layout.config_file)
    config = load_config(path, required=explicit)
    cred = Credential(registry, username, password, source="the login")
    ref = Reference(domain=registry, repository="stoker/login", tag="latest", digest=None)

    async def check() -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            c = await open_client(
                session,
                ref,
                display=registry,
                insecure_registries=set(config.insecure_registries),
                credential=cred,
                verb="logging in to",
            )
            await c.ping()

    asyncio.run(check())


def image_login(args: argparse.Namespace) -> int:
    import getpass
    import sys

    from stoker.daemon.oci.auth import store_credential
    from stoker.errors import InvalidArgument

    registry = _registry_arg(args.registry)
    username = args.username
    if not username:
        if not sys.stdin.isatty() or args.password_stdin:
            raise InvalidArgument("give the user name with -u USER (stdin is not a terminal)")
        username = input("Username: ").strip()
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise InvalidArgument("stdin is not a terminal: pipe the password with --password-stdin")
    if not username or not password:
        raise InvalidArgument("a user name and a password are both needed to log in")
    _check_login(args, registry, username, password)
    where = store_credential(registry, username, password)
    print(f"logged in to {registry} as {username} (saved in {where})")
    return 0


def image_logout(args: argparse.Namespace) -> int:
    from stoker.daemon.oci.auth import erase_credential

    registry = _registry_arg(args.registry)
    removed = erase_credential(registry)
    if removed:
        print(f"logged out of {registry} (removed from {', '.join(removed)})")
    else:
        print(f"not logged in to {registry}: nothing to remove")
    return 0


def _image_op(args: argparse.Namespace, method: str, params: dict[str, Any]) -> int:
    """pull/build: stream progress, then one line (or the image as JSON)."""
    from stoker.cli.progress import call_with_progress

    with client(args) as c:
        i = call_with_progress(c, method, params, quiet=args.json)
    if args.json:
        print_json(i)
    else:
        print(f"{i['name']} ready ({size(i['size'])}, kernel {i['kernel']})")
    return 0


def cache_prune(args: argparse.Namespace) -> int:
    with client(args) as c:
        r = TypedClient(c).image.cache_prune(args.dry_run)
    if args.json:
        print_json(r)
    else:
        verb = "would free" if r["dry_run"] else "freed"
        print(f"{verb} {size(r['bytes_freed'])} ({r['removed']} blobs; {r['in_use']} in use kept)")
    return 0


def image_build(args: argparse.Namespace) -> int:
    from stoker.cli.envs import build_params

    params = build_params(args)
    if params is None:
        return 1
    return _image_op(args, "image.build", params)
