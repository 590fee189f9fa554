"""Output helpers: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence

TYPE_CHECKING = False  # no `typing` import at start-up
if TYPE_CHECKING:
    from typing import Any


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    sys.stdout.write(_table_text(headers, rows))


def age(ts: str | None) -> str:
    if not ts:
        return "-"
    from datetime import UTC, datetime  # only when a timestamp is shown (start-up time)

    try:
        t = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return ts
    s = int((datetime.now(UTC) - t).total_seconds())
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{max(s, 0)}s"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, mult in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= mult:
            v = n / mult
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"


def err(msg: str) -> None:
    print(f"stoker: {msg}", file=sys.stderr)


class UsageError(Exception):
    """Bad command-line use found after parsing: exit 2 with the subcommand's own usage."""


# Top-level fields of each object kind, for checking `--format` before any output (kept equal
# to the records' fields by a unit test; the CLI does not import the records for start-up time).
FIELDS: dict[str, tuple[str, ...]] = {
    "vm": (
        "id", "name", "state", "image", "spec", "guest_ip", "dns_name", "vm_dir",
        "created_at", "updated_at", "started_at", "last_error", "workspace", "teardown",
        "expires_at", "system_image",
    ),
    "image": (
        "name", "managed", "rootfs", "work_seed", "kernel", "source", "size", "created_at",
        "digest", "has_sshd", "init", "meta", "parent", "recipe_hash", "role",
    ),
    "kernel": (
        "name", "version", "arch", "dir", "vmlinux", "bzimage", "initrd", "modules_dir",
        "source", "created_at",
    ),
    "kernel-available": (
        "name", "version", "arch", "url", "sha256", "size", "description", "installed",
    ),
}  # fmt: skip


def add_output_flags(p: Any, kind: str, listing: bool) -> None:
    """--json, --format and (for lists) -q/--quiet, mutually exclusive."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print JSON (fields: docs/json-output.md)")
    if listing:
        g.add_argument("-q", "--quiet", action="store_true", help="print names only, one a line")
    g.add_argument(
        "--format",
        metavar="FORMAT",
        help="fields to print: a list such as name,state,spec.vcpu (a table), or a "
        "template such as '{{.name}} {{.spec.vcpu}}' (one line per item)",
    )
    p.set_defaults(output_kind=kind)


# `{{.field.sub}}`, `{{json .field}}`, `{{.}}` (compiled on first use: not at start-up).
_TEMPLATE = r"\{\{\s*(json\s+)?\.([A-Za-z_][\w.]*)?\s*\}\}"


def _lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _check_fields(kind: str, paths: Sequence[str], items: Sequence[dict[str, Any]]) -> None:
    known = FIELDS[kind]
    for path in paths:
        top, _, rest = path.partition(".")
        if top not in known:
            raise UsageError(f"--format: unknown field {path!r}; fields are: {', '.join(known)}")
        if not rest:
            continue
        # A nested key must exist wherever the parent is an object.
        parent = top
        for part in rest.split("."):
            subs = [_lookup(i, parent) for i in items]
            objs = [s for s in subs if isinstance(s, dict)]
            if any(part not in o for o in objs) or (not objs and any(s is not None for s in subs)):
                have = sorted({k for o in objs for k in o})
                raise UsageError(
                    f"--format: unknown field {path!r}"
                    + (
                        f"; {parent} has: {', '.join(have)}"
                        if have
                        else f"; {parent} is not an object"
                    )
                )
            parent = f"{parent}.{part}"


def format_items(fmt: str, kind: str, items: Sequence[dict[str, Any]], listing: bool) -> str:
    """Render `--format`: a Go-template-like string, or a comma-separated field list."""
    if "{{" in fmt:
        paths: list[str] = []
        pos = 0
        for m in re.finditer(_TEMPLATE, fmt):
            if "{{" in fmt[pos : m.start()] or "}}" in fmt[pos : m.start()]:
                break
            pos = m.end()
            if m.group(2):
                paths.append(m.group(2))
        rest = fmt[pos:]
        if "{{" in rest or "}}" in rest:
            raise UsageError(
                f"--format: cannot read the template {fmt!r}: use {{{{.field}}}}, "
                "{{.field.sub}} or {{json .field}}"
            )
        _check_fields(kind, paths, items)
        tmpl = fmt.replace("\\t", "\t").replace("\\n", "\n")

        def one(item: dict[str, Any]) -> str:
            def sub(m: re.Match[str]) -> str:
                v = _lookup(item, m.group(2)) if m.group(2) else item
                return json.dumps(v) if m.group(1) else _cell(v)

            return re.sub(_TEMPLATE, sub, tmpl)

        return "".join(one(i) + "\n" for i in items)
    paths = [f.strip() for f in fmt.split(",") if f.strip()]
    if not paths:
        raise UsageError("--format: give field names (name,state) or a template ({{.name}})")
    _check_fields(kind, paths, items)
    if not listing and len(items) == 1 and len(paths) == 1:
        return _cell(_lookup(items[0], paths[0])) + "\n"
    rows = [[_cell(_lookup(i, p)) for p in paths] for i in items]
    return _table_text([p.upper() for p in paths], rows)


def _table_text(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in cells
    )


def structured(args: Any, data: Any) -> bool:
    """--json / -q / --format output of a list (or one object); False: print for people."""
    listing = isinstance(data, list)
    if getattr(args, "format", None):
        items = data if listing else [data]
        sys.stdout.write(format_items(args.format, args.output_kind, items, listing))
        return True
    if listing and getattr(args, "quiet", False):
        for i in data:
            print(i["name"])
        return True
    if getattr(args, "json", False):
        print_json(data)
        return True
    return False
