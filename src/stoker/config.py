"""Configuration: load TOML, validate every key, resolve VM defaults with provenance.

Every key is optional. An unknown key, or a value of the wrong type or range, fails
at load time with the key's dotted name and the reason.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stoker.errors import ConfigError, InvalidArgument
from stoker.model.sizes import MIN_DISK_BYTES, check_memory_mib, parse_size

GiB = 1024**3
MiB = 1024**2

BUILTIN_VCPU = 1
BUILTIN_MEMORY_MIB = 1024
BUILTIN_DISK_SIZE = 8 * GiB
BUILTIN_OVERLAY_SIZE = 8 * GiB

Provenance = Literal["config", "host heuristic", "built-in"]


# A `[[file_sync]]` host file is read whole into memory before each start: dotfiles
# (.netrc, .gitconfig, tokens) are small; refuse anything that is not.
FILE_SYNC_MAX_BYTES = 4 * MiB
# Durations are configured in seconds at most this large (a year): enough for any
# timeout, and far from what asyncio's timers overflow on.
MAX_DURATION = 366 * 86400
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class FileSync:
    """One `[[file_sync]]` entry: a host file copied onto the work disk before each start."""

    host: str
    guest: str
    mode: int = 0o600


@dataclass(frozen=True)
class Resolved:
    """A value plus where it came from, for `doctor`."""

    value: int
    source: Provenance


@dataclass(frozen=True)
class VMDefaults:
    vcpu: Resolved
    memory_mib: Resolved
    disk_size: Resolved
    overlay_size: Resolved


@dataclass(frozen=True)
class Config:
    """The daemon's and CLI's settings, typed and validated."""

    path: Path | None = None
    log_level: str = "info"
    vmm: Literal["auto", "firecracker", "qemu"] = "auto"
    firecracker_bin: str = "firecracker"
    jailer_bin: str = "jailer"
    qemu_bin: str = "qemu-system-x86_64"
    use_jailer: bool = False
    bridge_name: str = "br-stoker"
    bridge_cidr: str = "172.30.0.0/24"
    tap_pool_size: int = 2
    dns_listen: str = "127.0.0.1:5354"
    guest_dns: tuple[str, ...] = ("1.1.1.1",)
    default_image: str = "debian-bookworm"
    debian_mirror: str | None = None
    golden_cache_dir: str | None = None  # apt package cache for image builds
    auto_stop_stale_after: int = 0  # seconds; 0 = off
    stats_poll_interval: int = 10  # seconds
    boot_timeout: int = 180  # seconds from VMM start to SSH answering
    max_layer_size: int = 16 * GiB  # decompressed bytes one OCI layer may unpack to
    op_prune_interval: int = 60  # seconds
    vm_defaults: VMDefaults = field(
        default_factory=lambda: resolve_vm_defaults({}, os.cpu_count() or 1, _host_mem())
    )
    file_sync: tuple[FileSync, ...] = ()

    @property
    def bridge_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.bridge_cidr, strict=False)

    @property
    def gateway_ip(self) -> str:
        return str(next(self.bridge_network.hosts()))


def host_memory_bytes() -> int:
    """MemTotal of this host, 0 if unknown: the ceiling for a VM's memory."""
    return _host_mem()


def _host_mem() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resolve_vm_defaults(section: dict[str, Any], cpus: int, mem_bytes: int) -> VMDefaults:
    """config > host heuristic (CPUs/4 capped at 4, RAM/8 capped at 8 GiB) > built-in."""

    def pick(key: str, heuristic: int | None, builtin: int, conv: Any) -> Resolved:
        if key in section:
            return Resolved(conv(section[key]), "config")
        if heuristic is not None and heuristic >= builtin:
            return Resolved(heuristic, "host heuristic")
        return Resolved(builtin, "built-in")

    heur_vcpu = min(cpus // 4, 4) if cpus else None
    heur_mem = min(mem_bytes // 8, 8 * GiB) // MiB if mem_bytes else None
    return VMDefaults(
        vcpu=pick("vcpu", heur_vcpu, BUILTIN_VCPU, int),
        memory_mib=pick("memory_mib", heur_mem, BUILTIN_MEMORY_MIB, int),
        disk_size=pick("disk_size", None, BUILTIN_DISK_SIZE, lambda v: v),
        overlay_size=pick("overlay_size", None, BUILTIN_OVERLAY_SIZE, lambda v: v),
    )


# --- validation -------------------------------------------------------------------------

# Starts with a letter or digit: "-br" would read as an option to ip(8) and nft(8), and
# "." / ".." / "all" / "default" are directories of /proc/sys/net/*/conf/, not interfaces.
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", re.ASCII)
_IFNAME_RESERVED = {"all", "default", "lo"}
# An octal mode written as a string: "600", "0600", "0o600".
_MODE = re.compile(r"(?:0o?)?([0-7]{3,4})", re.ASCII)


def _bad(key: str, why: str) -> ConfigError:
    return ConfigError(f"invalid config key {key!r}: {why}")


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _bad(key, f"expected a non-empty string, got {v!r}")
    return v


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(key, f"expected true or false, got {v!r}")
    return v


def _int(key: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(key, f"expected an integer, got {_short(v)}")
    if not lo <= v <= hi:
        raise _bad(key, f"{_short(v)} is out of range {lo}..{hi}")
    return v


def _size(key: str, v: Any) -> int:
    try:
        return parse_size(v, key, min_bytes=MIN_DISK_BYTES)
    except InvalidArgument as e:
        raise _bad(key, e.message) from None


def _duration(key: str, v: Any) -> int:
    """Seconds: an integer, or '30s', '10m', '2h', '1d'; at most MAX_DURATION."""
    secs: int | None = None
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 0:
            raise _bad(key, "must not be negative")
        secs = v
    elif isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]{1,12})\s*([smhd]?)\s*", v, re.ASCII)
        if m:
            secs = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if secs is None:
        raise _bad(key, f"expected a duration such as 30m or 2h, got {_short(v)}")
    if secs > MAX_DURATION:
        raise _bad(key, f"{_short(v)} is longer than the maximum of 366d")
    return secs


def _short(v: Any) -> str:
    """A config value for a message, cut short (and safe for huge integers)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 200:
        return f"an integer of {v.bit_length()} bits"
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _guest_path(key: str, guest: str) -> str:
    """A file under /root on the work disk: absolute, no '..', no quote or control chars."""
    bad = [c for c in guest if c == '"' or c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F]
    if bad:
        raise _bad(
            key,
            f"{guest!r} contains {bad[0]!r}: guest paths may not contain quotes, "
            "backslashes, newlines, NUL or other control characters",
        )
    norm = os.path.normpath(guest)
    if not norm.startswith("/root/") or ".." in guest.split("/"):
        raise _bad(key, f"{guest!r} must be a file path under /root, such as /root/.netrc")
    return norm


def _host_file(key: str, host: str) -> str:
    """An existing regular file (a symlink to one is fine: dotfile managers link them)."""
    if "\x00" in host:
        raise _bad(key, f"{host!r} contains a NUL byte")
    try:
        st = os.stat(host)
    except FileNotFoundError:
        raise _bad(key, f"{host} does not exist: create it or remove this entry") from None
    except OSError as e:
        raise _bad(key, f"cannot stat {host}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad(
            key, f"{host} is a {_kind(st.st_mode)}, not a regular file: only files are synced"
        )
    if st.st_size > FILE_SYNC_MAX_BYTES:
        raise _bad(
            key,
            f"{host} is {st.st_size} bytes: file_sync copies small files (at most "
            f"{FILE_SYNC_MAX_BYTES // MiB} MiB)",
        )
    return host


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def _mode(key: str, v: Any) -> int:
    """A file mode as an octal string: "0600". A TOML integer is refused: `mode = 400`
    is decimal 400 (0o620), never what was meant."""
    if isinstance(v, str):
        m = _MODE.fullmatch(v.strip())
        if m and int(m.group(1), 8) <= 0o777:
            return int(m.group(1), 8)
        raise _bad(key, f'{_short(v)} is not an octal mode: write it as a string such as "0600"')
    raise _bad(
        key,
        f'{_short(v)} is not a mode: write it as an octal string such as "0600" '
        "(a bare TOML number is decimal)",
    )


_TOP_KEYS = {
    "log_level",
    "vmm",
    "firecracker_bin",
    "jailer_bin",
    "qemu_bin",
    "use_jailer",
    "bridge_name",
    "bridge_cidr",
    "tap_pool_size",
    "dns_listen",
    "guest_dns",
    "default_image",
    "debian_mirror",
    "golden_cache_dir",
    "auto_stop_stale_after",
    "stats_poll_interval",
    "boot_timeout",
    "max_layer_size",
    "op_prune_interval",
    "vm_defaults",
    "file_sync",
}
_VM_DEFAULT_KEYS = {"vcpu", "memory_mib", "disk_size", "overlay_size"}
_FILE_SYNC_KEYS = {"host", "guest", "mode"}


def parse_config(
    data: dict[str, Any],
    path: Path | None = None,
    cpus: int | None = None,
    mem_bytes: int | None = None,
) -> Config:
    """Validate a parsed TOML document into a Config.

    Each `[[file_sync]]` host path is stat'ed: it must be a regular file now (and it is
    checked again when it is read, at each VM start)."""
    for key in data:
        if key not in _TOP_KEYS:
            raise _bad(key, f"unknown key (known keys: {', '.join(sorted(_TOP_KEYS))})")
    kw: dict[str, Any] = {"path": path}
    if "log_level" in data:
        lvl = _str("log_level", data["log_level"]).lower()
        if lvl not in ("debug", "info", "warning", "error"):
            raise _bad("log_level", f"expected debug, info, warning or error, got {lvl!r}")
        kw["log_level"] = lvl
    if "vmm" in data:
        vmm = _str("vmm", data["vmm"])
        if vmm not in ("auto", "firecracker", "qemu"):
            raise _bad("vmm", f"expected auto, firecracker or qemu, got {vmm!r}")
        kw["vmm"] = vmm
    for k in (
        "firecracker_bin",
        "jailer_bin",
        "qemu_bin",
        "default_image",
        "debian_mirror",
        "golden_cache_dir",
    ):
        if k in data:
            kw[k] = _str(k, data[k])
    if "use_jailer" in data:
        kw["use_jailer"] = _bool("use_jailer", data["use_jailer"])
    if "bridge_name" in data:
        name = _str("bridge_name", data["bridge_name"])
        if not _IFNAME.fullmatch(name) or name in _IFNAME_RESERVED:
            raise _bad(
                "bridge_name",
                f"{name!r} is not a usable interface name: 1-15 characters of letters, "
                "digits, '_', '.' and '-', starting with a letter or digit (not all, "
                "default or lo)",
            )
        kw["bridge_name"] = name
    if "bridge_cidr" in data:
        cidr = _str("bridge_cidr", data["bridge_cidr"])
        try:
            net = ipaddress.IPv4Network(cidr, strict=False)
        except ValueError as e:
            raise _bad("bridge_cidr", str(e)) from None
        if not net.is_private:
            raise _bad("bridge_cidr", f"{cidr} is not a private range: guests must live on one")
        if net.prefixlen > 29:
            raise _bad("bridge_cidr", f"{cidr} is too small: use /29 or larger")
        kw["bridge_cidr"] = str(net)
    if "tap_pool_size" in data:
        kw["tap_pool_size"] = _int("tap_pool_size", data["tap_pool_size"], 0, 64)
    if "dns_listen" in data:
        addr = _str("dns_listen", data["dns_listen"])
        host, _, port = addr.rpartition(":")
        try:
            ipaddress.ip_address(host)
            if not 0 < int(port) < 65536:
                raise ValueError
        except ValueError:
            raise _bad(
                "dns_listen", f"expected ADDRESS:PORT such as 127.0.0.1:5354, got {addr!r}"
            ) from None
        kw["dns_listen"] = addr
    if "guest_dns" in data:
        v = data["guest_dns"]
        if not isinstance(v, list) or not v:
            raise _bad("guest_dns", "expected a non-empty list of IP addresses")
        for s in v:
            try:
                # ip_address() also accepts integers; a config value must be a string.
                if not isinstance(s, str):
                    raise TypeError
                ipaddress.ip_address(s)
            except (ValueError, TypeError):
                raise _bad("guest_dns", f"{s!r} is not an IP address") from None
        kw["guest_dns"] = tuple(v)
    if "auto_stop_stale_after" in data:
        kw["auto_stop_stale_after"] = _duration(
            "auto_stop_stale_after", data["auto_stop_stale_after"]
        )
    if "boot_timeout" in data:
        kw["boot_timeout"] = _duration("boot_timeout", data["boot_timeout"]) or 1
    if "max_layer_size" in data:
        try:  # not a disk size: 1M is a fine (if strict) ceiling
            kw["max_layer_size"] = parse_size(
                data["max_layer_size"], "max_layer_size", min_bytes=1 << 20
            )
        except InvalidArgument as e:
            raise _bad("max_layer_size", e.message) from None
    for k in ("stats_poll_interval", "op_prune_interval"):
        if k in data:
            kw[k] = _duration(k, data[k]) or 1

    vmd = data.get("vm_defaults", {})
    if not isinstance(vmd, dict):
        raise _bad("vm_defaults", "expected a table [vm_defaults]")
    checked: dict[str, Any] = {}
    for k, v in vmd.items():
        key = f"vm_defaults.{k}"
        if k not in _VM_DEFAULT_KEYS:
            raise _bad(key, f"unknown key (known: {', '.join(sorted(_VM_DEFAULT_KEYS))})")
        if k == "vcpu":
            checked[k] = _int(key, v, 1, 64)
        elif k == "memory_mib":
            try:
                checked[k] = check_memory_mib(
                    v, key, _host_mem() if mem_bytes is None else mem_bytes
                )
            except InvalidArgument as e:
                raise _bad(key, e.message) from None
        else:
            checked[k] = _size(key, v)
    kw["vm_defaults"] = resolve_vm_defaults(
        checked,
        os.cpu_count() or 1 if cpus is None else cpus,
        _host_mem() if mem_bytes is None else mem_bytes,
    )

    fs = data.get("file_sync", [])
    if not isinstance(fs, list):
        raise _bad("file_sync", "expected an array of tables [[file_sync]]")
    entries = []
    for i, ent in enumerate(fs):
        base = f"file_sync[{i}]"
        if not isinstance(ent, dict):
            raise _bad(base, "expected a table with host, guest and optional mode")
        for k in ent:
            if k not in _FILE_SYNC_KEYS:
                raise _bad(f"{base}.{k}", "unknown key (known: guest, host, mode)")
        if "host" not in ent or "guest" not in ent:
            raise _bad(base, "both host and guest are required")
        host = os.path.expanduser(_str(f"{base}.host", ent["host"]))
        if not os.path.isabs(host):
            raise _bad(f"{base}.host", f"{host!r} must be an absolute path (or start with ~)")
        _host_file(f"{base}.host", host)
        norm = _guest_path(f"{base}.guest", _str(f"{base}.guest", ent["guest"]))
        mode = _mode(f"{base}.mode", ent["mode"]) if "mode" in ent else 0o600
        entries.append(FileSync(host=host, guest=norm, mode=mode))
    kw["file_sync"] = tuple(entries)
    return Config(**kw)


def load_config(path: Path | None, *, required: bool = False) -> Config:
    """Load and validate the config file; a missing file means all defaults."""
    if path is None or not path.exists():
        if required and path is not None:
            raise ConfigError(f"config file {path} does not exist")
        return parse_config({}, None)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"config file {path} is a {_kind(st.st_mode)}, not a file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {st.st_size} bytes: too large for one")
        with open(path, "rb") as f:
            data = tomllib.loads(f.read(MAX_CONFIG_BYTES + 1).decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except (ValueError, RecursionError) as e:
        # tomllib lets int() errors through (an integer of more than 4300 digits), and
        # deep nesting exhausts the stack: neither may kill stokerd with a traceback.
        raise ConfigError(f"config file {path} is not valid TOML: {str(e)[:200]}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        return parse_config(data, path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}") from None


def config_path(explicit: str | None, default: Path) -> tuple[Path, bool]:
    """Pick --config, then $STOKER_CONFIG, then the layout default. Returns (path, explicit)."""
    if explicit:
        return Path(explicit), True
    env = os.environ.get("STOKER_CONFIG")
    if env:
        return Path(env), True
    return default, False
