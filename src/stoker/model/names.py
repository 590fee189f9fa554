"""VM, image and kernel names."""

from __future__ import annotations

import re
import secrets

from stoker.errors import InvalidArgument

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Image and kernel names may also carry dots and underscores (e.g. "debian-12.5").
_ARTIFACT = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$")

_ADJECTIVES = (
    "amber", "brave", "calm", "clever", "crisp", "eager", "fair", "gentle", "glad", "keen",
    "lucid", "merry", "misty", "noble", "quick", "quiet", "rapid", "shy", "solid", "sunny",
    "swift", "tidy", "vivid", "warm", "wise", "young", "bold", "cool", "deft", "zesty",
)  # fmt: skip
_ANIMALS = (
    "otter", "badger", "heron", "lynx", "marten", "newt", "osprey", "puffin", "raven", "seal",
    "stoat", "swift", "tern", "vole", "wren", "yak", "zebu", "ibex", "koala", "lemur",
    "moose", "orca", "panda", "quail", "robin", "sloth", "tapir", "walrus", "bison", "crane",
)  # fmt: skip


def validate_name(name: str, what: str = "VM") -> str:
    """Check an RFC 1123 label: 1-63 of [a-z0-9-], no leading/trailing '-'. No normalisation."""
    if not name:
        raise InvalidArgument(f"{what} name is empty: give a name of 1-63 characters [a-z0-9-]")
    if len(name) > 63:
        raise InvalidArgument(
            f"{what} name {name!r} is {len(name)} characters long: at most 63 are allowed"
        )
    if name != name.lower() and _LABEL.match(name.lower()):
        raise InvalidArgument(
            f"{what} name {name!r} has uppercase letters: names are lowercase "
            f"(try {name.lower()!r})"
        )
    if not _LABEL.match(name):
        raise InvalidArgument(
            f"{what} name {name!r} is invalid: use 1-63 characters of a-z, 0-9 and '-', "
            "not starting or ending with '-'"
        )
    return name


def validate_artifact_name(name: str, what: str = "image") -> str:
    """Image/kernel names: lowercase letters, digits, '.', '_', '-'; 1-128 characters."""
    if not name or not _ARTIFACT.match(name):
        raise InvalidArgument(
            f"{what} name {name!r} is invalid: use 1-128 characters of a-z, 0-9, '.', '_' "
            "and '-', starting and ending with a letter or digit"
        )
    return name


def generate_name(taken: set[str] | frozenset[str] = frozenset()) -> str:
    """A friendly unused name such as 'calm-otter'."""
    for _ in range(200):
        name = f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_ANIMALS)}"
        if name not in taken:
            return name
    while True:
        name = f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_ANIMALS)}-{secrets.token_hex(2)}"
        if name not in taken:
            return name
