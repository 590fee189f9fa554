"""The helper's config: its socket and, per caller uid, what that caller owns.

```toml
socket = "/run/stoker-helper.sock"    # optional
[[caller]]
user = "stoker"          # or uid = 1234
bridge = "br-stoker"     # the one bridge this caller may create, attach to and delete
cidr = "172.30.0.0/24"   # the bridge's network; the gateway is its first address
tap_prefix = "tap-stk-"  # taps it may create; a tap is its own only if the kernel says
                         # the tap's owner is the caller's uid
table = "stoker"         # its nftables tables (inet and bridge family)
netns = "ns"             # optional: work inside this network namespace (tests)
```

Nothing a request says can widen this: requests name no bridge, table or namespace.
"""

from __future__ import annotations

import ipaddress
import pwd
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/stoker/helper.toml")
DEFAULT_SOCKET = Path("/run/stoker-helper.sock")

_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{1,8}$")
_TABLE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_NETNS = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEYS = {"user", "uid", "bridge", "cidr", "tap_prefix", "table", "netns"}


@dataclass(frozen=True)
class Caller:
    """What one uid owns."""

    uid: int
    bridge: str
    cidr: str
    tap_prefix: str
    table: str
    netns: str | None = None

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)

    @property
    def gateway(self) -> str:
        return str(next(self.network.hosts()))

    def describe(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "bridge": self.bridge,
            "cidr": self.cidr,
            "gateway": self.gateway,
            "tap_prefix": self.tap_prefix,
            "table": self.table,
            "netns": self.netns,
        }


@dataclass(frozen=True)
class HelperConfig:
    socket: Path
    callers: dict[int, Caller]


def _caller(i: int, raw: Any, where: str) -> Caller:
    what = f"{where}: caller #{i + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(sorted(unknown))}")
    if ("user" in raw) == ("uid" in raw):
        raise ConfigError(f"{what}: give exactly one of user = NAME or uid = N")
    if "user" in raw:
        try:
            uid = pwd.getpwnam(str(raw["user"])).pw_uid
        except KeyError:
            raise ConfigError(f"{what}: user {raw['user']!r} does not exist") from None
    else:
        uid = raw["uid"]
        if not isinstance(uid, int) or isinstance(uid, bool) or not 0 < uid < 2**31:
            raise ConfigError(f"{what}: uid must be a positive integer (not root)")
    if uid == 0:
        raise ConfigError(f"{what}: root needs no helper")

    def get(key: str, pat: re.Pattern[str], default: str | None) -> str:
        v = raw.get(key, default)
        if not isinstance(v, str) or not pat.match(v):
            raise ConfigError(f"{what}: {key} = {v!r} is not valid")
        return v

    bridge = get("bridge", _IFNAME, "br-stoker")
    prefix = get("tap_prefix", _PREFIX, "tap-stk-")
    table = get("table", _TABLE, "stoker")
    cidr_raw = raw.get("cidr", "172.30.0.0/24")
    try:
        net = ipaddress.IPv4Network(str(cidr_raw))
    except ValueError:
        raise ConfigError(f"{what}: cidr = {cidr_raw!r} is not an IPv4 network") from None
    if not net.is_private or net.prefixlen > 29:
        raise ConfigError(f"{what}: cidr {net} must be private and /29 or larger")
    netns = raw.get("netns")
    if netns is not None and (not isinstance(netns, str) or not _NETNS.match(netns)):
        raise ConfigError(f"{what}: netns = {netns!r} is not a namespace name")
    return Caller(uid, bridge, str(net), prefix, table, netns)


def parse(doc: dict[str, Any], where: str = "helper config") -> HelperConfig:
    unknown = set(doc) - {"socket", "caller"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    sock = Path(str(doc.get("socket", DEFAULT_SOCKET)))
    if not sock.is_absolute():
        raise ConfigError(f"{where}: socket must be an absolute path")
    raw = doc.get("caller", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: caller must be an array of tables ([[caller]])")
    callers: dict[int, Caller] = {}
    for i, ent in enumerate(raw):
        c = _caller(i, ent, where)
        if c.uid in callers:
            raise ConfigError(f"{where}: uid {c.uid} is listed twice")
        for o in callers.values():
            same_ns = o.netns == c.netns
            if same_ns and (o.bridge == c.bridge or o.table == c.table):
                raise ConfigError(f"{where}: uid {c.uid} and {o.uid} share a bridge or table")
            if same_ns and (
                o.tap_prefix.startswith(c.tap_prefix) or c.tap_prefix.startswith(o.tap_prefix)
            ):
                raise ConfigError(f"{where}: uid {c.uid} and {o.uid} have overlapping tap prefixes")
        callers[c.uid] = c
    return HelperConfig(sock, callers)


def load(path: Path) -> HelperConfig:
    """Read and check the helper's config. It must be root's and not writable by others:
    it decides what every caller may do as root."""
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"cannot read helper config {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"helper config {path} is not a regular file")
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise ConfigError(
            f"helper config {path} must be owned by root and writable by nobody else "
            f"(chown root {path}; chmod 644 {path})"
        )
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"helper config {path}: {e}") from None
    return parse(doc, str(path))


def render(callers: list[dict[str, Any]], socket: Path = DEFAULT_SOCKET) -> str:
    """TOML text of a config (what `stoker system install` writes)."""
    lines = [f"socket = {str(socket)!r}".replace("'", '"')]
    for c in callers:
        lines.append("")
        lines.append("[[caller]]")
        for k, v in c.items():
            lines.append(f"{k} = {v}" if isinstance(v, int) else f'{k} = "{v}"')
    return "\n".join(lines) + "\n"
