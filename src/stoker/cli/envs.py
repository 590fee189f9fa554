"""CLI side of derived images: `image build` flags/recipes -> RPC params, and the recipe
step of `vm run` (resolve the repo's stoker.toml, build or reuse its image)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from stoker.cli.render import err

_GOLDEN = re.compile(r"^debian-[a-z]+$")


def setup_steps(items: list[str]) -> list[dict[str, str]]:
    """`--setup FILE-or-CMD`: an existing host file is read and runs as a script (its
    content is what the image key hashes); anything else is a shell command."""
    steps: list[dict[str, str]] = []
    for i, item in enumerate(items):
        if os.path.isfile(item):
            with open(item, encoding="utf-8", errors="strict") as f:
                label = f"{os.path.basename(item)} (--setup {i})"
                steps.append({"label": label, "script": f.read()})
        else:
            steps.append({"label": f"--setup {i}: {item[:60]}", "script": item})
    return steps


def build_params(args: argparse.Namespace) -> dict[str, Any] | None:
    """`image.build` params from the command line; None after printing an error."""
    from stoker.recipe import load_recipe

    common: dict[str, Any] = {"force": args.force}
    copies = getattr(args, "copy", None) or []
    flags = args.from_image or args.packages or args.setup or copies
    if args.recipe:
        if flags:
            err("give either --recipe or --from/--packages/--setup/--copy, not both")
            return None
        recipe = load_recipe(Path(args.recipe).resolve(), required=True)
        assert recipe is not None
        if not (recipe.packages or recipe.setup or recipe.inputs or recipe.copies):
            if _GOLDEN.match(recipe.image_from):
                return {"name": recipe.image_from, **common}
            err(f"{recipe.path} asks for no packages or setup: use image {recipe.image_from}")
            return None
        return {
            **recipe.build_params(),
            "name": args.name,
            "keep_failed": args.keep_failed,
            "setup_timeout": args.setup_timeout,
            **common,
        }
    if not flags:
        return {"name": args.name or "debian-bookworm", **common}
    packages = [p.strip() for p in (args.packages or "").split(",") if p.strip()]
    from stoker.daemon.imagemgr.derived import host_copy, split_copy

    items = [host_copy(*split_copy(spec)) for spec in copies]
    return {
        "name": args.name,
        "from_image": args.from_image or "debian-bookworm",
        "packages": packages,
        "setup": setup_steps(args.setup),
        "copies": [
            {"host": c.host, "guest": c.guest, "sha256": c.sha256, "mode": c.mode} for c in items
        ],
        "repo": os.path.abspath(args.repo) if args.repo else None,
        "keep_failed": args.keep_failed,
        "setup_timeout": args.setup_timeout,
        **common,
    }


def recipe_for_run(c: Any, args: argparse.Namespace, path: str | None) -> dict[str, Any]:
    """For `vm run PATH`: the sizing params the repo's stoker.toml asks for, with its
    image built or reused (progress streamed). Command-line flags win; `--image` skips
    the recipe's image. Returns only the keys to override."""
    if path is None:
        return {}
    from stoker.recipe import load_recipe

    recipe = load_recipe(Path(path))
    if recipe is None:
        return {}
    out: dict[str, Any] = {}
    vm = recipe.vm
    if args.vcpu is None and vm.vcpu is not None:
        out["vcpu"] = vm.vcpu
    if args.memory is None and vm.memory_mib is not None:
        out["memory_mib"] = vm.memory_mib
    if args.disk_size is None and vm.disk_size is not None:
        out["disk_size"] = vm.disk_size
    if not args.nat and vm.nat:
        out["nat"] = True
    if getattr(args, "net", None) is None and not args.nat and vm.net is not None:
        out["net"] = vm.net
    if args.image is None:
        if recipe.packages or recipe.setup or recipe.inputs or recipe.copies:
            from stoker.cli.progress import call_with_progress

            im = call_with_progress(c, "image.build", recipe.build_params())
            out["image"] = im["name"]
        else:
            out["image"] = recipe.image_from
    return out
