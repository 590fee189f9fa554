"""Human sizes: '8G', '512M', '1.5G', '300M'.

The rule, the same in the config file, on the command line and over RPC:

- a string carries its unit: K, M, G or T (powers of 1024; KB/KiB... are the same) or B
  for bytes. A bare number such as "1" is refused, because it could mean bytes, MiB or GiB;
- an integer (a TOML or JSON number) is bytes;
- digits are ASCII only, and a size lies between a floor and a ceiling the host can back
  (disks: 256M .. 16383G, the largest file ext4 holds being just under 16T).
"""

from __future__ import annotations

import re

from stoker.errors import InvalidArgument

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

MIN_DISK_BYTES = 256 * MiB
# A disk is one sparse file on the state dir's filesystem: ext4 with 4 KiB blocks holds
# files up to 16 TiB minus one block, so a larger disk cannot be created at all.
MAX_DISK_BYTES = 16 * TiB - GiB
MIN_MEMORY_MIB = 128
# Without /proc/meminfo (never on Linux, but keep a bound): 1 TiB.
FALLBACK_MAX_MEMORY_MIB = 1024 * 1024

_UNITS = {
    "b": 1,
    "k": KiB,
    "kb": KiB,
    "kib": KiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": TiB,
    "tb": TiB,
    "tib": TiB,
}
# ASCII digits only (\d would take "٣"), and few of them: nothing here needs more than
# 20 integer digits, and a short cap keeps int() and float() away from huge inputs.
_SIZE = re.compile(r"\s*([0-9]{1,20})(?:\.([0-9]{1,9}))?\s*([A-Za-z]{0,3})\s*", re.ASCII)


def parse_size(
    text: str | int,
    what: str = "size",
    *,
    min_bytes: int = 1,
    max_bytes: int = MAX_DISK_BYTES,
) -> int:
    """Parse a size to bytes (see the module docstring for the rule).

    Raises InvalidArgument naming `what` (a config key or option) for anything else."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        # Config values arrive untyped from TOML (floats, lists...).
        raise InvalidArgument(f"{what} must be a size such as 8G, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.fullmatch(text)
        if not m:
            raise InvalidArgument(f"{what} {_show(text)} is not a size: use e.g. 512M, 8G")
        whole, frac, unit = m.group(1), m.group(2) or "", m.group(3).lower()
        if int(whole) == 0 and not frac.strip("0"):
            raise InvalidArgument(f"{what} must be greater than zero, got {text!r}")
        if not unit:
            raise InvalidArgument(
                f"{what} {text!r} has no unit: write e.g. {whole}G or {whole}M "
                "(a bare number could mean bytes, MiB or GiB, so it is refused)"
            )
        if unit not in _UNITS:
            raise InvalidArgument(
                f"{what} {text!r} has an unknown unit {m.group(3)!r}: use K, M, G or T"
            )
        mult = _UNITS[unit]
        # Exact integer arithmetic: a float would overflow on long inputs and round.
        value = int(whole) * mult + (int(frac) * mult // 10 ** len(frac) if frac else 0)
    if value <= 0:
        raise InvalidArgument(f"{what} must be greater than zero, got {_show(text)}")
    if value < min_bytes:
        raise InvalidArgument(f"{what} must be at least {_exact(min_bytes)}, got {_show(text)}")
    if value > max_bytes:
        raise InvalidArgument(f"{what} must be at most {_exact(max_bytes)}, got {_show(text)}")
    return value


def check_memory_mib(value: object, what: str, host_mem_bytes: int) -> int:
    """A memory size in MiB: an integer from 128 to the host's RAM."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be a whole number of MiB, got {_show(value)}")
    hi = host_mem_bytes // MiB if host_mem_bytes > 0 else FALLBACK_MAX_MEMORY_MIB
    hi = max(hi, MIN_MEMORY_MIB)
    if value < MIN_MEMORY_MIB:
        raise InvalidArgument(f"{what} must be at least {MIN_MEMORY_MIB} MiB, got {value}")
    if value > hi:
        raise InvalidArgument(
            f"{what} must be at most {hi} MiB (the host's memory), got {_show(value)}"
        )
    return value


def _show(v: object) -> str:
    """A value for an error message, cut short: hostile input may be megabytes long."""
    r = repr(v) if not isinstance(v, int) or isinstance(v, bool) else _int_repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _int_repr(v: int) -> str:
    # str() of an int past sys.get_int_max_str_digits() raises ValueError.
    return str(v) if v.bit_length() < 200 else f"an integer of {v.bit_length()} bits"


def _exact(n: int) -> str:
    """The largest unit that renders `n` exactly (a bound in a message must be exact)."""
    for unit, mult in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def format_size(n: int) -> str:
    """Render bytes compactly: 8G, 512M, 1.5G."""
    for unit, mult in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= mult:
            v = n / mult
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"
