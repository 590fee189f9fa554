"""Configuration: load TOML, validate every key, resolve VM defaults with provenance.

Every key is optional. An unknown key, or a value of the wrong type or range, fails
at load time with the key's dotted name and the reason.

Each key is declared once, as a field of `Config` (or of `VMDefaults` / `FileSync` for the
keys of `[vm_defaults]` and `[[file_sync]]`) made with `setting()`: its type, default,
validator and one-line description live there. `parse_config` (which keys exist, how each
is checked), `resolve_vm_defaults` (defaults with provenance) and `settings_table()` (the
key table in README.md, checked by a unit test) all read those declarations.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

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


class Host(NamedTuple):
    """What validation and the VM-default heuristics know about this host."""

    cpus: int
    mem_bytes: int


# A validator: (dotted key, raw TOML value, host) -> the typed value, or raises ConfigError.
Parser = Callable[[str, Any, Host], Any]


def setting(
    default: Any = MISSING,
    *,
    parse: Parser,
    doc: str,
    shown: str | None = None,
    default_factory: Callable[[], Any] | None = None,
    heuristic: Callable[[Host], int | None] | None = None,
) -> Any:
    """Declare one config key as a dataclass field.

    `parse` validates the raw TOML value; `doc` is its line in README's key table and
    `shown` how that table writes the default (else its TOML form). `heuristic` (only for
    `[vm_defaults]`) derives a default from the host, used when at least the built-in."""
    meta = {"parse": parse, "doc": doc, "shown": shown, "heuristic": heuristic}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def declared(cls: type) -> Iterator[Field[Any]]:
    """The fields of a settings dataclass that are config keys (made with `setting()`)."""
    return (f for f in fields(cls) if "parse" in f.metadata)


# --- validators ---------------------------------------------------------------------------

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


def _plain(check: Callable[[str, Any], Any]) -> Parser:
    return lambda key, v, _host: check(key, v)


def _log_level(key: str, v: Any, _host: Host) -> str:
    lvl = _str(key, v).lower()
    if lvl not in ("debug", "info", "warning", "error"):
        raise _bad(key, f"expected debug, info, warning or error, got {lvl!r}")
    return lvl


def _vmm(key: str, v: Any, _host: Host) -> str:
    vmm = _str(key, v)
    if vmm not in ("auto", "firecracker", "qemu"):
        raise _bad(key, f"expected auto, firecracker or qemu, got {vmm!r}")
    return vmm


def _use_jailer(key: str, v: Any, _host: Host) -> bool | Literal["auto"]:
    if v == "auto":
        return "auto"
    if not isinstance(v, bool):
        raise _bad(key, f'expected "auto", true or false, got {_short(v)}')
    return v


_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def _vmm_user(key: str, v: Any, _host: Host) -> str:
    name = _str(key, v)
    if not _USER_NAME.fullmatch(name) or name == "root":
        raise _bad(
            key,
            f"{name!r} is not a usable system user name: 1-32 lowercase letters, digits, "
            "'_' and '-', starting with a letter or '_' (not root)",
        )
    return name


def _socket_group(key: str, v: Any, _host: Host) -> str:
    if v == "":
        return ""
    name = _str(key, v)
    if not _USER_NAME.fullmatch(name) or name == "root":
        raise _bad(key, f"{name!r} is not a usable group name (not root)")
    return name


def _abs_path(key: str, v: Any, _host: Host) -> str:
    p = _str(key, v)
    if not os.path.isabs(p):
        raise _bad(key, f"{p!r} is not an absolute path")
    return p


def _bridge_name(key: str, v: Any, _host: Host) -> str:
    name = _str(key, v)
    if not _IFNAME.fullmatch(name) or name in _IFNAME_RESERVED:
        raise _bad(
            key,
            f"{name!r} is not a usable interface name: 1-15 characters of letters, "
            "digits, '_', '.' and '-', starting with a letter or digit (not all, "
            "default or lo)",
        )
    return name


def _bridge_cidr(key: str, v: Any, _host: Host) -> str:
    cidr = _str(key, v)
    try:
        net = ipaddress.IPv4Network(cidr, strict=False)
    except ValueError as e:
        raise _bad(key, str(e)) from None
    if not net.is_private:
        raise _bad(key, f"{cidr} is not a private range: guests must live on one")
    if net.prefixlen > 29:
        raise _bad(key, f"{cidr} is too small: use /29 or larger")
    return str(net)


def _dns_listen(key: str, v: Any, _host: Host) -> str:
    addr = _str(key, v)
    host, _, port = addr.rpartition(":")
    try:
        ipaddress.ip_address(host)
        if not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise _bad(key, f"expected ADDRESS:PORT such as 127.0.0.1:5354, got {addr!r}") from None
    return addr


_REGISTRY_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9a-fA-F:.]+\])(?::\d{1,5})?$"
)


def _registry_host(key: str, v: Any) -> str:
    s = _str(key, v).strip()
    if "://" in s:
        s = s.split("://", 1)[1]
    s = s.rstrip("/")
    if not _REGISTRY_HOST.match(s):
        raise _bad(key, f"{v!r} is not a registry host[:port] such as registry.lan:5000")
    return s.lower()


def _insecure_registries(key: str, v: Any, _host: Host) -> frozenset[str]:
    if not isinstance(v, list):
        raise _bad(key, 'expected a list such as ["registry.lan:5000"]')
    return frozenset(_registry_host(f"{key}[{i}]", h) for i, h in enumerate(v))


def _registry_mirrors(key: str, v: Any, _host: Host) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(v, dict):
        raise _bad(key, 'expected a table such as {"docker.io" = ["mirror.lan:5000"]}')
    mirrors: dict[str, tuple[str, ...]] = {}
    for reg, hosts in v.items():
        k = f"{key}.{reg}"
        if not isinstance(hosts, list) or not hosts:
            raise _bad(k, "expected a non-empty list of mirror hosts (host[:port])")
        name = _registry_host(k, reg)
        if name in ("index.docker.io", "registry-1.docker.io"):
            name = "docker.io"
        mirrors[name] = tuple(_registry_host(f"{k}[{i}]", h) for i, h in enumerate(hosts))
    return tuple(mirrors.items())


def _guest_dns(key: str, v: Any, _host: Host) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise _bad(key, "expected a non-empty list of IP addresses")
    for s in v:
        try:
            # ip_address() also accepts integers; a config value must be a string.
            if not isinstance(s, str):
                raise TypeError
            ipaddress.ip_address(s)
        except (ValueError, TypeError):
            raise _bad(key, f"{s!r} is not an IP address") from None
    return tuple(v)


def _interval(key: str, v: Any, _host: Host) -> int:
    """A duration where 0 would mean "spin": at least one second."""
    return _duration(key, v) or 1


def _layer_size(key: str, v: Any, _host: Host) -> int:
    try:  # not a disk size: 1M is a fine (if strict) ceiling
        return parse_size(v, key, min_bytes=1 << 20)
    except InvalidArgument as e:
        raise _bad(key, e.message) from None


def _vcpu(key: str, v: Any, _host: Host) -> int:
    return _int(key, v, 1, 64)


def _memory_mib(key: str, v: Any, host: Host) -> int:
    try:
        return check_memory_mib(v, key, host.mem_bytes)
    except InvalidArgument as e:
        raise _bad(key, e.message) from None


def _disk_size(key: str, v: Any, _host: Host) -> int:
    return _size(key, v)


def _heur_vcpu(host: Host) -> int | None:
    return min(host.cpus // 4, 4) if host.cpus else None


def _heur_memory_mib(host: Host) -> int | None:
    return min(host.mem_bytes // 8, 8 * GiB) // MiB if host.mem_bytes else None


def _file_sync_host(key: str, v: Any, _host: Host) -> str:
    host = os.path.expanduser(_str(key, v))
    if not os.path.isabs(host):
        raise _bad(key, f"{host!r} must be an absolute path (or start with ~)")
    return _host_file(key, host)


def _file_sync_guest(key: str, v: Any, _host: Host) -> str:
    return _guest_path(key, _str(key, v))


def _file_sync_mode(key: str, v: Any, _host: Host) -> int:
    return _mode(key, v)


# --- the declarations -------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSync:
    """One `[[file_sync]]` entry: a host file copied onto the work disk before each start."""

    host: str = setting(
        parse=_file_sync_host,
        doc="an existing regular file on the host (at most 4 MiB; `~` expands)",
        shown="required",
    )
    guest: str = setting(
        parse=_file_sync_guest, doc="where it goes: a file path under /root", shown="required"
    )
    mode: int = setting(
        0o600, parse=_file_sync_mode, doc="its mode, an octal string", shown='`"0600"`'
    )


@dataclass(frozen=True)
class Resolved:
    """A value plus where it came from, for `doctor`."""

    value: int
    source: Provenance


@dataclass(frozen=True)
class VMDefaults:
    """`[vm_defaults]`: each value is config > host heuristic > built-in (`doctor` shows which)."""

    vcpu: Resolved = setting(  # noqa: RUF009 (setting() is a field specifier)
        Resolved(BUILTIN_VCPU, "built-in"),
        parse=_vcpu,
        heuristic=_heur_vcpu,
        doc="vCPUs of a new VM (1-64)",
        shown=f"CPUs/4 (at most 4), else `{BUILTIN_VCPU}`",
    )
    memory_mib: Resolved = setting(  # noqa: RUF009 (setting() is a field specifier)
        Resolved(BUILTIN_MEMORY_MIB, "built-in"),
        parse=_memory_mib,
        heuristic=_heur_memory_mib,
        doc="memory of a new VM in MiB (128 up to the host's RAM)",
        shown=f"RAM/8 (at most 8192), else `{BUILTIN_MEMORY_MIB}`",
    )
    disk_size: Resolved = setting(  # noqa: RUF009 (setting() is a field specifier)
        Resolved(BUILTIN_DISK_SIZE, "built-in"),
        parse=_disk_size,
        doc="work disk of a new VM (a size with a unit)",
        shown='`"8G"`',
    )
    overlay_size: Resolved = setting(  # noqa: RUF009 (setting() is a field specifier)
        Resolved(BUILTIN_OVERLAY_SIZE, "built-in"),
        parse=_disk_size,
        doc="root overlay disk of a new VM (a size with a unit)",
        shown='`"8G"`',
    )


def _vm_defaults(key: str, v: Any, host: Host) -> VMDefaults:
    if not isinstance(v, dict):
        raise _bad(key, "expected a table [vm_defaults]")
    known = {f.name: f for f in declared(VMDefaults)}
    checked: dict[str, Any] = {}
    for k, raw in v.items():
        sub = f"{key}.{k}"
        if k not in known:
            raise _bad(sub, f"unknown key (known: {', '.join(sorted(known))})")
        checked[k] = known[k].metadata["parse"](sub, raw, host)
    return resolve_vm_defaults(checked, host.cpus, host.mem_bytes)


def _file_sync(key: str, v: Any, host: Host) -> tuple[FileSync, ...]:
    if not isinstance(v, list):
        raise _bad(key, "expected an array of tables [[file_sync]]")
    known = {f.name: f for f in declared(FileSync)}
    entries = []
    for i, ent in enumerate(v):
        base = f"{key}[{i}]"
        if not isinstance(ent, dict):
            raise _bad(base, "expected a table with host, guest and optional mode")
        for k in ent:
            if k not in known:
                raise _bad(f"{base}.{k}", f"unknown key (known: {', '.join(sorted(known))})")
        if "host" not in ent or "guest" not in ent:
            raise _bad(base, "both host and guest are required")
        # In declaration order: host (stat'ed now, and again at each VM start), guest, mode.
        kw = {
            name: f.metadata["parse"](f"{base}.{name}", ent[name], host)
            for name, f in known.items()
            if name in ent
        }
        entries.append(FileSync(**kw))
    return tuple(entries)


MAX_POOL_SIZE = 8  # warm VMs per image: each holds its memory while it waits


def _pool_size(key: str, v: Any, _host: Host) -> int:
    return _int(key, v, 0, MAX_POOL_SIZE)


def _pool_images(key: str, v: Any, host: Host) -> tuple[tuple[str, int], ...]:
    if not isinstance(v, dict):
        raise _bad(key, 'expected a table of image name -> size, such as {"my-env" = 1}')
    out: list[tuple[str, int]] = []
    for name, n in v.items():
        if not name:
            raise _bad(key, "an image name is empty")
        out.append((name, _pool_size(f"{key}.{name}", n, host)))
    return tuple(out)


@dataclass(frozen=True)
class PoolSettings:
    """`[pool]`: warm VMs kept booted per image, taken by `vm run` / `vm create`."""

    size: int = setting(
        0,
        parse=_pool_size,
        doc=f"warm VMs of `default_image` kept booted (0-{MAX_POOL_SIZE}; 0: no pool)",
    )
    images: tuple[tuple[str, int], ...] = setting(
        (),
        parse=_pool_images,
        doc='table: warm VMs per image, e.g. `"my-env" = 1` (overrides `size` for that image)',
        shown="",
    )

    def sizes(self, default_image: str) -> dict[str, int]:
        """Target size per image (only those above 0), `images` over `size`."""
        out = {default_image: self.size} if self.size else {}
        for name, n in self.images:
            out[name] = n
        return {k: v for k, v in out.items() if v > 0}


def _pool(key: str, v: Any, host: Host) -> PoolSettings:
    if not isinstance(v, dict):
        raise _bad(key, "expected a table [pool]")
    known = {f.name: f for f in declared(PoolSettings)}
    kw: dict[str, Any] = {}
    for k, raw in v.items():
        sub = f"{key}.{k}"
        if k not in known:
            raise _bad(sub, f"unknown key (known: {', '.join(sorted(known))})")
        kw[k] = known[k].metadata["parse"](sub, raw, host)
    return PoolSettings(**kw)


@dataclass(frozen=True)
class Config:
    """The daemon's and CLI's settings, typed and validated: one field per config key."""

    path: Path | None = None  # the file it came from (not a key)
    log_level: str = setting(
        "info", parse=_log_level, doc="stokerd's log level: debug, info, warning or error"
    )
    vmm: Literal["auto", "firecracker", "qemu"] = setting(
        "auto", parse=_vmm, doc="auto, firecracker or qemu (`doctor` shows what auto picks)"
    )
    firecracker_bin: str = setting(
        "firecracker", parse=_plain(_str), doc="Firecracker binary (name on PATH or path)"
    )
    jailer_bin: str = setting(
        "jailer",
        parse=_plain(_str),
        doc="Firecracker's jailer (a bare name: next to firecracker_bin, else on PATH)",
    )
    qemu_bin: str = setting("qemu-system-x86_64", parse=_plain(_str), doc="QEMU binary")
    use_jailer: bool | Literal["auto"] = setting(
        "auto",
        parse=_use_jailer,
        doc='run Firecracker under the jailer: "auto" (when found and stokerd is root), '
        "true or false",
    )
    vmm_user: str = setting(
        "stoker-vmm",
        parse=_vmm_user,
        doc="system user a root daemon runs QEMU and jailed Firecracker as (made if missing)",
    )
    socket_group: str = setting(
        "",
        parse=_socket_group,
        doc="group whose members may use stokerd's socket (`stoker system install` sets it)",
        shown='`""` (only the daemon\'s user and root)',
    )
    helper_socket: str = setting(
        "/run/stoker-helper.sock",
        parse=_abs_path,
        doc="stoker-helper's socket: a stokerd that is not root asks it for bridge, taps, rules",
    )
    bridge_name: str = setting(
        "br-stoker", parse=_bridge_name, doc="host bridge the guests live on"
    )
    bridge_cidr: str = setting(
        "172.30.0.0/24", parse=_bridge_cidr, doc="guest network: private, /29 or larger"
    )
    tap_pool_size: int = setting(
        2, parse=lambda k, v, _h: _int(k, v, 0, 64), doc="taps kept ready for the next start (0-64)"
    )
    dns_listen: str = setting(
        "127.0.0.1:5354", parse=_dns_listen, doc="where the host asks stoker's DNS for NAME.vm"
    )
    guest_dns: tuple[str, ...] = setting(
        ("1.1.1.1",), parse=_guest_dns, doc="upstream nameservers (IP addresses)"
    )
    default_image: str = setting(
        "debian-bookworm", parse=_plain(_str), doc="image of a VM made without --image"
    )
    debian_mirror: str | None = setting(
        None,
        parse=_plain(_str),
        doc="Debian mirror for image builds",
        shown="the host's apt sources, else Debian's",
    )
    golden_cache_dir: str | None = setting(
        None,
        parse=_plain(_str),
        doc="apt package cache for image builds",
        shown="the cache dir's `apt`",
    )
    auto_stop_stale_after: int = setting(
        0, parse=_plain(_duration), doc="stop VMs idle this long (0: never)", shown="`0`"
    )
    stats_poll_interval: int = setting(
        10, parse=_interval, doc="how often VM stats are sampled", shown='`"10s"`'
    )
    boot_timeout: int = setting(
        180,
        parse=_interval,
        doc="VMM start to SSH answering (slow hosts: raise it)",
        shown='`"3m"`',
    )
    max_layer_size: int = setting(
        16 * GiB,
        parse=_layer_size,
        doc="what one OCI layer may decompress to (at least 1M)",
        shown='`"16G"`',
    )
    op_prune_interval: int = setting(
        60, parse=_interval, doc="how often finished operations are pruned", shown='`"1m"`'
    )
    vm_defaults: VMDefaults = setting(  # noqa: RUF009 (setting() is a field specifier)
        parse=_vm_defaults,
        default_factory=lambda: resolve_vm_defaults({}, os.cpu_count() or 1, _host_mem()),
        doc="table: defaults of a new VM (below)",
        shown="",
    )
    file_sync: tuple[FileSync, ...] = setting(
        (),
        parse=_file_sync,
        doc="array of tables: host files copied in at each start (below)",
        shown="",
    )
    pool: PoolSettings = setting(  # noqa: RUF009 (setting() is a field specifier)
        PoolSettings(),
        parse=_pool,
        doc="table: the warm pool (below)",
        shown="",
    )
    insecure_registries: frozenset[str] = setting(
        frozenset(),
        parse=_insecure_registries,
        doc="registries (host[:port]) spoken to over unverified TLS or plain HTTP",
        shown="`[]`",
    )
    registry_mirrors: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        (),
        parse=_registry_mirrors,
        doc='table: registry -> mirrors tried first, e.g. `"docker.io" = ["mirror.lan:5000"]`',
        shown="",
    )

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
    """config > host heuristic (CPUs/4 capped at 4, RAM/8 capped at 8 GiB) > built-in.

    `section` holds already-validated values of `[vm_defaults]`."""
    host = Host(cpus, mem_bytes)
    kw: dict[str, Resolved] = {}
    for f in declared(VMDefaults):
        builtin: Resolved = f.default  # type: ignore[assignment]
        heuristic = f.metadata["heuristic"]
        guess = heuristic(host) if heuristic is not None else None
        if f.name in section:
            kw[f.name] = Resolved(int(section[f.name]), "config")
        elif guess is not None and guess >= builtin.value:
            kw[f.name] = Resolved(guess, "host heuristic")
        else:
            kw[f.name] = builtin
    return VMDefaults(**kw)


def parse_config(
    data: dict[str, Any],
    path: Path | None = None,
    cpus: int | None = None,
    mem_bytes: int | None = None,
) -> Config:
    """Validate a parsed TOML document into a Config.

    Each `[[file_sync]]` host path is stat'ed: it must be a regular file now (and it is
    checked again when it is read, at each VM start)."""
    keys = {f.name: f for f in declared(Config)}
    for key in data:
        if key not in keys:
            raise _bad(key, f"unknown key (known keys: {', '.join(sorted(keys))})")
    host = Host(
        os.cpu_count() or 1 if cpus is None else cpus,
        _host_mem() if mem_bytes is None else mem_bytes,
    )
    kw: dict[str, Any] = {"path": path}
    for name, f in keys.items():
        if name in data:
            kw[name] = f.metadata["parse"](name, data[name], host)
    if "vm_defaults" not in kw:
        # The host heuristics follow the host given (tests pass cpus and mem_bytes).
        kw["vm_defaults"] = resolve_vm_defaults({}, host.cpus, host.mem_bytes)
    return Config(**kw)


# --- the key table in README.md -----------------------------------------------------------


def _shown(f: Field[Any]) -> str:
    """The default as README shows it: `shown` verbatim, else the default's TOML form."""
    if f.metadata["shown"] is not None:
        return str(f.metadata["shown"])
    v = f.default
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if isinstance(v, str):
        return f'`"{v}"`'
    if isinstance(v, tuple):
        return "`[" + ", ".join(f'"{x}"' for x in v) + "]`"
    return f"`{v}`"


def settings_table() -> str:
    """README's table of every config key, made from the declarations (Markdown)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for prefix, cls in (
        ("", Config),
        ("vm_defaults.", VMDefaults),
        ("file_sync[].", FileSync),
        ("pool.", PoolSettings),
    ):
        for f in declared(cls):
            rows.append(f"| `{prefix}{f.name}` | {_shown(f)} | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"


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
