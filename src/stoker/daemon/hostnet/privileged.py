"""Links and Firewall for a daemon that is not root: every change goes to stoker-helper.

Reads that need no privilege (does a link exist, its ports and addresses) stay local:
the daemon runs in the network namespace its helper entry names. Changes (bridge, taps,
tap descriptors, rules, the guest DNS port) are helper requests; the helper decides the
bridge, tables and namespace from its own config and checks every name against what
this daemon's uid owns (see stoker.helper.server).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from stoker.daemon.hostnet.links import Links
from stoker.daemon.hostnet.nat import Firewall, NatRule, VMRules
from stoker.errors import ConfigError
from stoker.helper.client import HelperClient
from stoker.runner import Runner

# (host, port, netns) -> bound UDP + listening TCP socket (netdns.server.Binder's shape)
Binder = Callable[[str, int, str | None], Awaitable[tuple[socket.socket, socket.socket]]]


@dataclass(frozen=True)
class Grant:
    """What the helper says this daemon owns (its `hello` answer)."""

    uid: int
    bridge: str
    cidr: str
    gateway: str
    tap_prefix: str
    table: str
    netns: str | None


async def hello(helper: HelperClient) -> Grant:
    r = await helper.call("hello")
    return Grant(
        uid=int(r["uid"]),
        bridge=str(r["bridge"]),
        cidr=str(r["cidr"]),
        gateway=str(r["gateway"]),
        tap_prefix=str(r["tap_prefix"]),
        table=str(r["table"]),
        netns=None if r.get("netns") is None else str(r["netns"]),
    )


def check_grant(g: Grant, bridge: str, cidr: str) -> None:
    """The daemon's config must name what the helper grants it, or its rules and reads
    would be about another bridge."""
    mine = ipaddress.IPv4Network(cidr, strict=False)
    if g.bridge != bridge or ipaddress.IPv4Network(g.cidr) != mine:
        raise ConfigError(
            f"stoker-helper grants uid {g.uid} bridge {g.bridge} ({g.cidr}) but the config "
            f"says bridge_name = {bridge!r}, bridge_cidr = {str(mine)!r}: make them agree "
            "(stoker system install writes both)"
        )


class HelperLinks(Links):
    """`Links` whose changes are helper requests."""

    def __init__(self, helper: HelperClient, bridge: str, netns: str | None = None) -> None:
        super().__init__(netns)
        self.helper = helper
        self.bridge = bridge

    async def ensure_bridge(self, name: str, address: str, prefixlen: int) -> None:
        await self.helper.call("bridge.ensure")

    async def create_tap(self, name: str, owner: int | None = None) -> None:
        # The helper makes it owned by this daemon's uid, whatever `owner` says.
        await self.helper.call("tap.create", {"name": name})

    async def attach(self, name: str, bridge: str) -> None:
        await self.helper.call("tap.attach", {"name": name})

    async def delete(self, name: str) -> bool:
        if name == self.bridge:
            r = await self.helper.call("bridge.delete")
        else:
            r = await self.helper.call("tap.delete", {"name": name})
        return bool(r.get("deleted"))


class HelperFirewall(Firewall):
    """`Firewall` whose rules the helper writes into this daemon's tables."""

    def __init__(
        self,
        helper: HelperClient,
        runner: Runner,
        bridge: str,
        gateway: str,
        logger: logging.Logger,
    ) -> None:
        super().__init__(runner, bridge, gateway, logger)
        self.helper = helper

    async def ensure_base(self) -> None:
        await self.helper.call("nft.ensure_base")

    async def apply_vm(self, r: VMRules) -> None:
        r.check()
        await self.helper.call(
            "nft.apply_vm",
            {
                "rules": {
                    "vm_id": r.vm_id,
                    "guest_ip": r.guest_ip,
                    "tap": r.tap,
                    "mac": r.mac,
                    "mode": r.mode,
                    "allow_out": [list(x) for x in r.allow_out],
                    "host_ports": list(r.host_ports),
                    "peers": r.peers,
                }
            },
        )
        self.log.info("network policy %s for VM %s (%s via %s)", r.mode, r.vm_id, r.guest_ip, r.tap)

    async def remove_vm(self, vm_id: str) -> bool:
        r = await self.helper.call("nft.remove_vm", {"vm_id": vm_id})
        return bool(r.get("removed"))

    async def vm_ids(self) -> set[str]:
        r = await self.helper.call("nft.vm_ids")
        return {str(x) for x in r.get("vm_ids", [])}

    async def rules(self) -> list[NatRule]:
        raise NotImplementedError("rule listing needs root: ask stoker-helper for vm_ids")

    async def teardown_all(self) -> bool:
        r = await self.helper.call("nft.teardown")
        return bool(r.get("removed"))


def helper_binder(helper: HelperClient) -> Binder:
    """A DNSServer binder: the helper binds the caller's gateway:53 and passes the sockets."""

    async def bind(host: str, port: int, netns: str | None) -> tuple[socket.socket, socket.socket]:
        fds = await helper.call_fds("dns.bind")
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise OSError(f"stoker-helper passed {len(fds)} sockets for DNS, not 2")
        udp = socket.socket(fileno=fds[0])
        tcp = socket.socket(fileno=fds[1])
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp

    return bind


def helper_tap_opener(helper: HelperClient) -> Callable[[str, str | None], int]:
    """open_tap for a daemon that may not open /dev/net/tun: the helper passes the fd."""

    def open_tap(name: str, netns: str | None = None) -> int:
        _r, fds = helper.request("tap.open", {"name": name})
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(f"stoker-helper passed {len(fds)} descriptors for tap {name}, not 1")
        return fds[0]

    return open_tap
