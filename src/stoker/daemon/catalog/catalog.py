"""The catalog: named images and kernels, each a URL + sha256 of a `.tar.zst` bundle.

The catalog is a JSON file shipped inside the package (`stoker/data/catalog.json`);
`STOKER_CATALOG=/path/to/catalog.json` replaces it (tests and private mirrors use this).
Schema (every field required unless marked optional, no other keys):

    {
      "comment": "...",                                  optional
      "images": [{"name", "version", "arch", "url", "sha256", "size",
                  "kernel_ref", "description"}],
      "kernels": [{"name", "version", "arch", "url", "sha256", "size",
                   "description" (optional)}]
    }

`sha256` is the hash of the compressed bundle as downloaded; `size` its length in bytes;
`kernel_ref` names a kernel of the same catalog, so pulling an image can always pull its
kernel too. An image entry may instead name a stoker image published with `stoker image
push` (an OCI artifact that carries its own kernel): {"name", "version", "arch", "ref",
"description"}, e.g. "ref": "ghcr.io/team/env:1"; `image pull NAME` then pulls that ref.
A malformed catalog fails at load with the entry and field named.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stoker.daemon.catalog.errors import CatalogError
from stoker.errors import InvalidArgument, NotFound
from stoker.model.names import validate_artifact_name
from stoker.model.wire import CatalogKernel as CatalogKernel  # re-exported: parsed here

CATALOG_ENV = "STOKER_CATALOG"
EMBEDDED = "embedded"
SCHEMA_VERSION = 1
MAX_CATALOG_BYTES = 4 << 20

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~_-]{0,127}$")
_ARCH = re.compile(r"^[a-z0-9_]{1,32}$")
_TOP_KEYS = frozenset({"comment", "schema_version", "images", "kernels"})
_KERNEL_KEYS = ("name", "version", "arch", "url", "sha256", "size")
_KERNEL_OPTIONAL = ("description",)
_IMAGE_KEYS = ("name", "version", "arch", "url", "sha256", "size", "kernel_ref", "description")
_IMAGE_REF_KEYS = ("name", "version", "arch", "ref", "description")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\[\]-]*(/[a-z0-9._-]+)+([:@][A-Za-z0-9_.:+-]+)?$")


@dataclass(frozen=True)
class CatalogImage:
    """An image bundle: `rootfs.ext4` (+ optional `work-seed.ext4`) booting `kernel_ref`."""

    name: str
    version: str
    arch: str
    url: str = ""
    sha256: str = ""
    size: int = 0
    kernel_ref: str = ""
    description: str = ""
    ref: str | None = None  # a registry ref (a pushed stoker artifact) instead of a bundle

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class Catalog:
    """A validated catalog; `source` is the file it came from, or "embedded"."""

    source: str
    images: tuple[CatalogImage, ...]
    kernels: tuple[CatalogKernel, ...]

    def find_image(self, name: str) -> CatalogImage | None:
        """The image entry called `name`, or None (then `image pull` tries OCI)."""
        return next((e for e in self.images if e.name == name), None)

    def find_kernel(self, name: str) -> CatalogKernel | None:
        """The kernel entry called `name`, or None."""
        return next((e for e in self.kernels if e.name == name), None)

    def image(self, name: str) -> CatalogImage:
        """The image entry called `name`, or a NotFound listing what the catalog has."""
        e = self.find_image(name)
        if e is None:
            raise NotFound(
                f"image {name!r} is not in the catalog ({_known(self.images)}): check the "
                "name, or pull an OCI image by reference"
            )
        return e

    def kernel(self, name: str) -> CatalogKernel:
        """The kernel entry called `name`, or a NotFound listing what the catalog has."""
        e = self.find_kernel(name)
        if e is None:
            raise NotFound(
                f"kernel {name!r} is not in the catalog ({_known(self.kernels)}): see "
                "`stoker kernel list --available`, or `stoker kernel import` a kernel you have"
            )
        return e

    def kernel_for(self, image: CatalogImage) -> CatalogKernel:
        """The kernel entry an image boots with (guaranteed present by validation)."""
        return self.kernel(image.kernel_ref)


def _known(entries: tuple[CatalogImage, ...] | tuple[CatalogKernel, ...]) -> str:
    if not entries:
        return "it is empty"
    names = sorted(e.name for e in entries)
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f"it has {shown}"


def default_catalog_text() -> str:
    """The catalog shipped inside the package."""
    return (resources.files("stoker") / "data" / "catalog.json").read_text(encoding="utf-8")


def load_catalog(path: Path | None = None, *, env: Mapping[str, str] | None = None) -> Catalog:
    """Load and validate the catalog: `path`, else `$STOKER_CATALOG`, else the embedded one.

    Raises CatalogError naming the file, the entry and the field for anything malformed.
    """
    e = os.environ if env is None else env
    if path is None and e.get(CATALOG_ENV):
        path = Path(e[CATALOG_ENV])
    if path is None:
        try:
            text = default_catalog_text()
        except (OSError, UnicodeDecodeError) as err:
            raise CatalogError(
                f"the catalog shipped with stoker cannot be read ({err}): reinstall stoker, "
                f"or set {CATALOG_ENV} to a catalog file"
            ) from None
        return parse_catalog(text, EMBEDDED)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CATALOG_BYTES + 1)
    except OSError as err:
        raise CatalogError(
            f"cannot read catalog {path}: {err.strerror or err}: fix the path"
            + (f" (set by {CATALOG_ENV})" if e.get(CATALOG_ENV) else "")
        ) from None
    if len(raw) > MAX_CATALOG_BYTES:
        raise CatalogError(f"catalog {path} is larger than {MAX_CATALOG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CatalogError(f"catalog {path} is not UTF-8 text") from None
    return parse_catalog(text, str(path))


def parse_catalog(text: str, source: str) -> Catalog:
    """Validate catalog JSON text; `source` names it in error messages."""
    where = "the catalog shipped with stoker" if source == EMBEDDED else f"catalog {source}"
    fix = (
        f"report this, or set {CATALOG_ENV} to a valid catalog"
        if source == EMBEDDED
        else "fix the file"
    )

    def bad(what: str) -> CatalogError:
        return CatalogError(f"{where}: {what}: {fix}")

    try:
        doc = json.loads(text)
    except ValueError as err:
        raise bad(f"not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise bad(f"the top level must be an object, not {_json_type(doc)}")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise bad(f"unknown top-level key(s) {', '.join(map(repr, unknown))}")
    schema = doc.get("schema_version", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION or isinstance(schema, bool):
        raise bad(f"schema_version {schema!r} is not supported (this stoker reads 1)")
    if "comment" in doc and not isinstance(doc["comment"], str):
        raise bad('"comment" must be a string')
    for key in ("images", "kernels"):
        if key not in doc:
            raise bad(f'"{key}" is missing (use [] for none)')
        if not isinstance(doc[key], list):
            raise bad(f'"{key}" must be a list, not {_json_type(doc[key])}')

    kernels: list[CatalogKernel] = []
    for i, raw in enumerate(doc["kernels"]):
        f = _fields(raw, f"kernels[{i}]", _KERNEL_KEYS, _KERNEL_OPTIONAL, bad)
        kernels.append(CatalogKernel(**f))
    images: list[CatalogImage] = []
    for i, raw in enumerate(doc["images"]):
        keys = _IMAGE_REF_KEYS if isinstance(raw, dict) and "ref" in raw else _IMAGE_KEYS
        f = _fields(raw, f"images[{i}]", keys, (), bad)
        images.append(CatalogImage(**f))

    for kind, names in (
        ("kernels", [k.name for k in kernels]),
        ("images", [m.name for m in images]),
    ):
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                raise bad(f'{kind}[{i}] ("{name}"): the name is listed twice')
            seen.add(name)
    kernel_names = {k.name for k in kernels}
    for i, im in enumerate(images):
        if im.ref is not None:
            continue  # the artifact brings its kernel
        if im.kernel_ref not in kernel_names:
            raise bad(
                f'images[{i}] ("{im.name}"): kernel_ref "{im.kernel_ref}" is not a kernel '
                "of this catalog"
            )
        k = next(k for k in kernels if k.name == im.kernel_ref)
        if k.arch != im.arch:
            raise bad(
                f'images[{i}] ("{im.name}"): it is {im.arch} but its kernel "{k.name}" is {k.arch}'
            )
    return Catalog(source=source, images=tuple(images), kernels=tuple(kernels))


def _json_type(v: object) -> str:
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    return "null"


def _fields(
    raw: object,
    label: str,
    required: tuple[str, ...],
    optional: tuple[str, ...],
    bad: Callable[[str], CatalogError],
) -> dict[str, Any]:
    """Check one entry and return its fields, raising `bad(...)` naming entry and field."""
    if not isinstance(raw, dict):
        raise bad(f"{label} must be an object, not {_json_type(raw)}")
    name = raw.get("name")
    who = f'{label} ("{name}")' if isinstance(name, str) and name else label
    unknown = sorted(set(raw) - set(required) - set(optional))
    if unknown:
        raise bad(f"{who}: unknown field(s) {', '.join(map(repr, unknown))}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise bad(f"{who}: missing field(s) {', '.join(map(repr, missing))}")
    out: dict[str, Any] = {}
    for key in (*required, *(k for k in optional if k in raw)):
        value = raw[key]
        problem = _check_field(key, value)
        if problem:
            raise bad(f'{who}: "{key}" {problem}, got {value!r}')
        out[key] = value
    return out


def _check_field(key: str, value: object) -> str | None:
    """Why `value` is not acceptable for `key`, or None when it is."""
    if key == "size":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return "must be the bundle's length in bytes (a positive integer)"
        return None
    if not isinstance(value, str):
        return "must be a string"
    if key in ("name", "kernel_ref"):
        try:
            validate_artifact_name(value, "kernel" if key == "kernel_ref" else "image")
        except InvalidArgument:
            return "must be 1-128 characters of a-z, 0-9, '.', '_', '-'"
    elif key == "ref":
        if not _REF.match(value):
            return "must be a registry reference such as ghcr.io/team/env:1"
    elif key == "version":
        if not _VERSION.match(value):
            return "must be a version string such as 6.1.0-18 (letters, digits, .+~_-)"
    elif key == "arch":
        if not _ARCH.match(value):
            return "must be an architecture name such as x86_64"
    elif key == "sha256":
        if not _SHA256.match(value):
            return "must be 64 lowercase hex digits (the sha256 of the .tar.zst)"
    elif key == "url":
        u = urlsplit(value)
        if u.scheme not in ("http", "https") or not u.hostname:
            return "must be an http:// or https:// URL"
    elif key == "description" and len(value) > 1000:
        return "must be at most 1000 characters"
    return None
