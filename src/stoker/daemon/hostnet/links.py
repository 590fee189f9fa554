"""Bridge and tap devices over rtnetlink (pyroute2's asyncio API).

Every operation opens a short-lived netlink socket, optionally inside a named network
namespace (tests run everything in a namespace of their own), and is bounded by a
timeout so a wedged kernel call cannot hang the daemon.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from stoker.errors import Conflict, InvalidArgument, Timeout, Unavailable

T = TypeVar("T")

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
DEFAULT_TIMEOUT = 10.0


def check_ifname(name: str) -> str:
    """Refuse names the kernel would reject (or truncate) before they reach netlink."""
    if not _IFNAME.match(name):
        raise InvalidArgument(f"{name!r} is not a valid interface name: use 1-15 of [A-Za-z0-9_.-]")
    return name


def _hint(what: str, e: NetlinkError) -> str:
    if e.code == errno.EPERM:
        return ": stokerd needs root (CAP_NET_ADMIN) to manage network devices"
    if e.code == errno.ENOENT and what.startswith("creating tap"):
        return ": /dev/net/tun is missing (load the tun module)"
    return ""


async def _collect(res: Any) -> list[Any]:
    # pyroute2 returns a list for "get" and an async iterator for "dump".
    if hasattr(res, "__aiter__"):
        return [m async for m in res]
    return list(res)


class Links:
    """Creates, attaches and deletes stoker's bridge and taps.

    `netns` names a network namespace (as in `ip netns`) to work in; None means the
    daemon's own namespace.
    """

    def __init__(self, netns: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.netns = netns
        self.timeout = timeout

    @asynccontextmanager
    async def _ipr(self) -> AsyncIterator[Any]:
        kw: dict[str, Any] = {}
        if self.netns is not None:
            kw["netns"] = self.netns
        async with AsyncIPRoute(**kw) as ipr:
            yield ipr

    async def _bounded(self, what: str, aw: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(aw, self.timeout)
        except TimeoutError:
            raise Timeout(f"{what} did not finish within {self.timeout:.0f}s") from None

    async def _index(self, ipr: Any, name: str) -> int | None:
        found = await ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    async def exists(self, name: str) -> bool:
        """True when a link called `name` exists."""

        async def go() -> bool:
            async with self._ipr() as ipr:
                return await self._index(ipr, name) is not None

        return await self._wrap(f"looking up {name}", go())

    async def kind(self, name: str) -> str | None:
        """The link's kind ("bridge", "tun", "veth", ...), None if absent or plain."""

        async def go() -> str | None:
            async with self._ipr() as ipr:
                idx = await self._index(ipr, name)
                if idx is None:
                    return None
                msgs = await _collect(await ipr.link("get", index=idx))
                k = msgs[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") if msgs else None
                return str(k) if k is not None else None

        return await self._wrap(f"inspecting {name}", go())

    async def tun_owner(self, name: str) -> int | None:
        """The uid that owns tun/tap `name` (-1: any user), None when absent or not a tap."""

        async def go() -> int | None:
            async with self._ipr() as ipr:
                idx = await self._index(ipr, name)
                if idx is None:
                    return None
                msgs = await _collect(await ipr.link("get", index=idx))
                if not msgs or msgs[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "tun":
                    return None
                owner = msgs[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_TUN_OWNER")
                return int(owner) if owner is not None else -1

        return await self._wrap(f"inspecting {name}", go())

    async def list_links(self, prefix: str = "") -> list[str]:
        """Names of links starting with `prefix`, sorted."""

        async def go() -> list[str]:
            async with self._ipr() as ipr:
                names = [str(m.get("ifname")) for m in await _collect(await ipr.link("dump"))]
            return sorted(n for n in names if n.startswith(prefix))

        return await self._wrap("listing links", go())

    async def ports(self, bridge: str) -> list[str]:
        """Names of links enslaved to `bridge` (empty when the bridge is absent)."""

        async def go() -> list[str]:
            async with self._ipr() as ipr:
                idx = await self._index(ipr, bridge)
                if idx is None:
                    return []
                msgs = await _collect(await ipr.link("dump"))
            return sorted(str(m.get("ifname")) for m in msgs if m.get("master") == idx)

        return await self._wrap(f"listing ports of {bridge}", go())

    async def addresses(self, name: str) -> list[str]:
        """IPv4 addresses on `name` as ADDR/PREFIX."""

        async def go() -> list[str]:
            async with self._ipr() as ipr:
                idx = await self._index(ipr, name)
                if idx is None:
                    return []
                msgs = await _collect(await ipr.addr("dump", index=idx, family=2))
            return sorted(f"{m.get('address')}/{m['prefixlen']}" for m in msgs)

        return await self._wrap(f"listing addresses of {name}", go())

    async def all_addresses(self) -> list[str]:
        """Every IPv4 address on any link in this namespace (no prefix length)."""

        async def go() -> list[str]:
            async with self._ipr() as ipr:
                msgs = await _collect(await ipr.addr("dump", family=2))
            return sorted({str(m.get("address")) for m in msgs if m.get("address")})

        return await self._wrap("listing addresses", go())

    async def ensure_bridge(self, name: str, address: str, prefixlen: int) -> None:
        """Make `name` a bridge carrying `address/prefixlen`, up. Safe to repeat."""
        check_ifname(name)
        addr = str(ipaddress.IPv4Address(address))

        async def go() -> None:
            async with self._ipr() as ipr:
                idx = await self._index(ipr, name)
                if idx is None:
                    try:
                        await ipr.link("add", ifname=name, kind="bridge")
                    except NetlinkError as e:
                        # A concurrent creator won the race: fine, use its bridge.
                        if e.code != errno.EEXIST:
                            raise
                    idx = await self._index(ipr, name)
                    if idx is None:
                        raise Unavailable(f"bridge {name} vanished right after it was created")
                msgs = await _collect(await ipr.link("get", index=idx))
                kind = msgs[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") if msgs else None
                if kind != "bridge":
                    raise Conflict(
                        f"network device {name} exists but is a {kind or 'plain'} device, not a "
                        "bridge: remove it or set bridge_name in the config"
                    )
                try:
                    await ipr.addr("add", index=idx, address=addr, prefixlen=prefixlen)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
                await ipr.link("set", index=idx, state="up")

        await self._wrap(f"setting up bridge {name}", go())

    async def create_tap(self, name: str, owner: int | None = None) -> None:
        """Create a persistent tap (no packet info header, vnet header capable)."""
        check_ifname(name)
        kw: dict[str, Any] = {
            "ifname": name,
            "kind": "tuntap",
            "mode": "tap",
            "ifr": {"no_pi": True, "vnet_hdr": True},
        }
        if owner is not None:
            kw["uid"] = owner

        async def go() -> None:
            async with self._ipr() as ipr:
                await ipr.link("add", **kw)

        await self._wrap(f"creating tap {name}", go())

    async def attach(self, name: str, bridge: str) -> None:
        """Enslave `name` to `bridge` and bring it up."""
        check_ifname(name)
        check_ifname(bridge)

        async def go() -> None:
            async with self._ipr() as ipr:
                idx = await self._index(ipr, name)
                br = await self._index(ipr, bridge)
                if idx is None:
                    raise Unavailable(f"tap {name} does not exist: it cannot join {bridge}")
                if br is None:
                    raise Unavailable(
                        f"bridge {bridge} does not exist: the daemon creates it before a VM starts"
                    )
                await ipr.link("set", index=idx, master=br, state="up")

        await self._wrap(f"attaching {name} to {bridge}", go())

    async def delete(self, name: str) -> bool:
        """Delete a link; False when it was already gone."""
        check_ifname(name)

        async def go() -> bool:
            async with self._ipr() as ipr:
                idx = await self._index(ipr, name)
                if idx is None:
                    return False
                try:
                    await ipr.link("del", index=idx)
                except NetlinkError as e:
                    if e.code == errno.ENODEV:
                        return False
                    raise
                return True

        return await self._wrap(f"deleting {name}", go())

    async def _wrap(self, what: str, aw: Awaitable[T]) -> T:
        try:
            return await self._bounded(what, aw)
        except NetlinkError as e:
            raise Unavailable(f"{what} failed: {e}{_hint(what, e)}") from None
        except OSError as e:
            raise Unavailable(f"{what} failed: {e}") from None
