"""Human sizes: '8G', '512M', '2048' (MiB where a bare number is a memory size)."""

from __future__ import annotations

import re

from stoker.errors import InvalidArgument

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, what: str = "size", bare_unit: int = 1) -> int:
    """Parse a size to bytes. A bare number is multiplied by `bare_unit`."""
    if isinstance(text, bool):
        raise InvalidArgument(f"{what} must be a size such as 8G, got {text!r}")
    if isinstance(text, int):
        value = text * bare_unit
    elif not isinstance(text, str):
        # Config values arrive untyped from TOML (floats, lists...).
        raise InvalidArgument(f"{what} must be a size such as 8G, got {text!r}")
    else:
        m = _SIZE.match(text)
        if not m:
            raise InvalidArgument(f"{what} {text!r} is not a size: use e.g. 512M, 8G")
        num, unit = m.group(1), m.group(2).lower()
        if unit not in _UNITS:
            raise InvalidArgument(
                f"{what} {text!r} has an unknown unit {m.group(2)!r}: use K, M, G or T"
            )
        mult = _UNITS[unit] if unit else bare_unit
        value = int(float(num) * mult)
    if value <= 0:
        raise InvalidArgument(f"{what} must be greater than zero, got {text!r}")
    return value


def format_size(n: int) -> str:
    """Render bytes compactly: 8G, 512M, 1.5G."""
    for unit, mult in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= mult:
            v = n / mult
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"
