"""`stoker.toml`: a repo's recipe for the VM it needs (docs/recipes.md).

    [image]
    from = "debian-bookworm"          # an image name here, debian-SUITE, or an OCI ref
    packages = ["make", "gcc"]        # Debian packages, installed at build time
    setup = ["pip install -r requirements.txt"]   # run in a builder VM, repo at /root/repo
    inputs = ["requirements.txt"]     # repo files whose content is part of the image key
    copy = ["tools/lint.sh:/usr/local/bin/lint"]  # REPO-FILE:GUEST, copied in the builder VM

    [vm]
    vcpu = 2
    memory = 2048                     # MiB (or "2G")
    disk_size = "8G"
    nat = true
    net = "allow=pypi.org,files.pythonhosted.org"   # the --net policy (instead of nat)

Every key is optional. Errors name the file, the key and its line. TOML parsing is
`tomllib`, which reports no positions for keys: the line of a key is found by scanning
the file's text for it inside its table.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.errors import InvalidArgument

RECIPE_FILE = "stoker.toml"
DEFAULT_FROM = "debian-bookworm"
MAX_RECIPE_BYTES = 1024 * 1024

_KEYS: dict[str, tuple[str, ...]] = {
    "image": ("from", "packages", "setup", "inputs", "copy"),
    "vm": ("vcpu", "memory", "disk_size", "nat", "net"),
}
_FROM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}$")


class RecipeError(InvalidArgument):
    """A stoker.toml that cannot be used; the message names file, key and line (on the
    wire it is an `invalid_argument`)."""


@dataclass(frozen=True)
class VMSettings:
    vcpu: int | None = None
    memory_mib: int | None = None
    disk_size: int | None = None  # bytes
    nat: bool | None = None
    net: str | None = None  # the --net policy: none | host-only | nat | allow=NAME,...


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. `repo` is the directory it belongs to."""

    path: Path
    repo: Path
    image_from: str = DEFAULT_FROM
    packages: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    inputs: tuple[tuple[str, str], ...] = ()  # (repo-relative path, sha256)
    # (absolute host path inside the repo, guest path, sha256, mode)
    copies: tuple[tuple[str, str, str, int], ...] = ()
    vm: VMSettings = field(default_factory=VMSettings)

    @property
    def has_image(self) -> bool:
        """True when the recipe asks for anything beyond the default image."""
        return bool(self.packages or self.setup or self.copies) or self.image_from != DEFAULT_FROM

    def build_params(self) -> dict[str, Any]:
        """`image.build` RPC parameters for this recipe's image."""
        return {
            "from_image": self.image_from,
            "packages": list(self.packages),
            "setup": [
                {"label": f"{self.path.name}: setup[{i}]", "script": s}
                for i, s in enumerate(self.setup)
            ],
            "inputs": [list(i) for i in self.inputs],
            "copies": [
                {"host": h, "guest": g, "sha256": d, "mode": m} for h, g, d, m in self.copies
            ],
            "repo": str(self.repo),
            "recipe": str(self.path),
        }


def key_line(text: str, table: str | None, key: str | None) -> int | None:
    """The 1-based line where `key` is set in `[table]` (or where the table starts when
    `key` is None), by a scan of the text; None when it cannot be found."""
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\"' -]+?)\s*\]\s*(#.*)?$")
    current: str | None = None
    for n, raw in enumerate(lines, 1):
        m = header.match(raw)
        if m:
            current = m.group(1).replace('"', "").replace("'", "").strip()
            if key is None and current == table:
                return n
            continue
        if key is None:
            continue
        km = re.match(r"^\s*(?:\"([^\"]+)\"|'([^']+)'|([A-Za-z0-9_-]+))\s*=", raw)
        if km is None:
            # Dotted keys at the top level: image.packages = [...]
            dm = re.match(r"^\s*([A-Za-z0-9_-]+)\s*\.\s*([A-Za-z0-9_-]+)\s*=", raw)
            if dm and current is None and dm.group(1) == table and dm.group(2) == key:
                return n
            continue
        name = km.group(1) or km.group(2) or km.group(3)
        if current == table and name == key:
            return n
    return None


class _Checker:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text

    def fail(self, table: str | None, key: str | None, msg: str) -> RecipeError:
        if table is None and key is not None:
            # A top-level name: a [table] header, or a plain key.
            line = key_line(self.text, key, None) or key_line(self.text, None, key)
        else:
            line = key_line(self.text, table, key)
        where = f"{table}.{key}" if table and key else (key or table or "")
        at = f" (line {line})" if line else ""
        return RecipeError(f"{self.path}: {where}{at}: {msg}")


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _input_file(c: _Checker, repo: Path, rel: str) -> tuple[str, str]:
    if rel.startswith("/") or "\x00" in rel:
        raise c.fail("image", "inputs", f"{rel!r} must be a path relative to the repo")
    root = repo.resolve()
    p = (root / rel).resolve()
    if not p.is_relative_to(root):
        raise c.fail("image", "inputs", f"{rel!r} points outside the repo")
    if not p.is_file():
        raise c.fail("image", "inputs", f"{rel!r} is not a file in {root}")
    return (p.relative_to(root).as_posix(), _sha256(p))


def _copy_file(c: _Checker, repo: Path, spec: str) -> tuple[str, str, str, int]:
    """A `copy` entry REPO-FILE:GUEST: the file resolved inside the repo (a link out of
    it is refused: the recipe comes with the repo), the guest path checked."""
    from stoker.daemon.imagemgr.derived import check_guest_path, read_host_file

    rel, sep, guest = spec.rpartition(":")
    if not sep or not rel or not guest:
        raise c.fail("image", "copy", f"{spec!r} is not REPO-FILE:GUEST-PATH")
    try:
        check_guest_path(guest, "copy")
    except InvalidArgument as e:
        raise c.fail("image", "copy", e.message.removeprefix("copy: ")) from None
    if rel.startswith("/") or "\x00" in rel:
        raise c.fail("image", "copy", f"{rel!r} must be a path relative to the repo")
    root = repo.resolve()
    p = (root / rel).resolve()
    if not p.is_relative_to(root):
        raise c.fail("image", "copy", f"{rel!r} points outside the repo")
    try:
        data, mode = read_host_file(str(p), "copy")
    except InvalidArgument as e:
        raise c.fail("image", "copy", e.message.removeprefix("copy: ")) from None
    return (str(p), guest, hashlib.sha256(data).hexdigest(), mode)


def parse_recipe(text: str, path: Path, repo: Path | None = None) -> Recipe:
    """Validate a recipe's text (`path` is only used in messages and for `repo`)."""
    from stoker.daemon.imagemgr.derived import validate_packages
    from stoker.model.sizes import parse_size

    c = _Checker(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    repo = repo if repo is not None else path.parent
    for top, val in data.items():
        if top not in _KEYS:
            raise c.fail(
                None, top, f"unknown table or key (known tables: {', '.join(sorted(_KEYS))})"
            )
        if not isinstance(val, dict):
            raise c.fail(None, top, f"expected a table [{top}]")
        for k in val:
            if k not in _KEYS[top]:
                raise c.fail(top, k, f"unknown key (known: {', '.join(_KEYS[top])})")
    img: dict[str, Any] = data.get("image", {})
    vm: dict[str, Any] = data.get("vm", {})

    image_from = img.get("from", DEFAULT_FROM)
    if not isinstance(image_from, str):
        raise c.fail("image", "from", f"expected a string, got {type(image_from).__name__}")
    if not _FROM.match(image_from):
        raise c.fail("image", "from", f"{image_from!r} is not an image name or OCI reference")

    def str_list(key: str) -> list[str]:
        v = img.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise c.fail("image", key, "expected a list of strings")
        return list(v)

    try:
        packages = validate_packages(str_list("packages"), "packages")
    except InvalidArgument as e:
        raise c.fail("image", "packages", e.message.removeprefix("packages: ")) from None
    setup = str_list("setup")
    for i, s in enumerate(setup):
        if not s.strip():
            raise c.fail("image", "setup", f"step {i} is empty")
    inputs = tuple(_input_file(c, repo, rel) for rel in str_list("inputs"))
    copies = tuple(_copy_file(c, repo, spec) for spec in str_list("copy"))

    def int_in(key: str, lo: int, hi: int) -> int | None:
        v = vm.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise c.fail("vm", key, f"expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise c.fail("vm", key, f"{v} is out of range ({lo}-{hi})")
        return v

    vcpu = int_in("vcpu", 1, 64)
    memory: int | None = None
    if "memory" in vm:
        raw = vm["memory"]
        if isinstance(raw, int) and not isinstance(raw, bool):
            mib = raw  # a bare number is MiB, as `--memory` takes it
        else:
            try:
                mib = parse_size(raw, "memory") // 1024**2
            except InvalidArgument as e:
                raise c.fail("vm", "memory", e.message) from None
        if not 128 <= mib <= 1024 * 1024:
            raise c.fail("vm", "memory", f"{mib} MiB is out of range (128 MiB - 1 TiB)")
        memory = mib
    disk: int | None = None
    if "disk_size" in vm:
        try:
            # The one size rule: a string carries its unit, an integer is bytes.
            disk = parse_size(vm["disk_size"], "disk_size", min_bytes=256 * 1024**2)
        except InvalidArgument as e:
            raise c.fail("vm", "disk_size", e.message) from None
    nat = vm.get("nat")
    if nat is not None and not isinstance(nat, bool):
        raise c.fail("vm", "nat", f"expected true or false, got {nat!r}")
    net = vm.get("net")
    if net is not None:
        from stoker.daemon.hostnet.policy import parse_policy

        if not isinstance(net, str):
            raise c.fail("vm", "net", f"expected a string, got {type(net).__name__}")
        if nat:
            raise c.fail("vm", "net", 'give net or nat = true, not both (net = "nat")')
        try:
            net = str(parse_policy(net))
        except InvalidArgument as e:
            raise c.fail("vm", "net", e.message) from None
    return Recipe(
        path=path,
        repo=repo,
        image_from=image_from,
        packages=packages,
        setup=tuple(setup),
        inputs=inputs,
        copies=copies,
        vm=VMSettings(vcpu=vcpu, memory_mib=memory, disk_size=disk, nat=nat, net=net),
    )


def recipe_path(target: Path) -> Path:
    """`target` itself when it is a file, else `target/stoker.toml`."""
    return target if target.is_file() else target / RECIPE_FILE


def load_recipe(target: Path, *, required: bool = False) -> Recipe | None:
    """The recipe of a repo dir (None when it has no stoker.toml, unless `required`) or
    of a recipe file."""
    path = recipe_path(target)
    if not path.exists():
        if required:
            raise RecipeError(f"recipe {path} does not exist")
        return None
    if not path.is_file():
        raise RecipeError(f"recipe {path} is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path} is larger than {MAX_RECIPE_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text") from None
    return parse_recipe(text, path, path.parent)
