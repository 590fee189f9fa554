"""Per-VM network policy in stoker's own nftables tables, through the `nft` command.

Two tables, both stoker's alone, created on first use and deleted by `teardown_all`:

`table inet stoker` (routed traffic: guest -> host, guest -> outside)
- chain `input`: from the bridge only replies to connections the host opened, plus what
  each VM's rules accept (DNS on the bridge address; `allow=` ports on it); then drop.
- chain `forward`: per VM, accept what its policy lets out (`nat`: everything, `allow=`:
  the listed addresses/ports) and the replies; base rules drop everything else routed out
  of or into the bridge, so a VM cannot leave the host even when ip_forward is on.
- chain `postrouting` (nat hook): per VM with outbound traffic, masquerade its address.

`table bridge stoker` (frames between the bridge's ports, i.e. guest -> guest)
- chain `prerouting`: per VM, anti-spoofing on its tap: only its MAC, only its IPv4
  address, only IPv4 and ARP (no IPv6, nothing else). Source addresses are what every
  other rule (and the DNS server's per-guest answers) trusts.
- set `ports`: every VM's tap; chain `forward` drops frames between two of them unless both
  are in one peer group (set `peers_GROUP`, rule `iifname @peers_G oifname @peers_G accept`).

Every per-VM rule and set element carries the comment `stoker-vm:<id> tap=<tap>`, so one
VM's rules are found (by handle) and removed without touching any other VM's; a VM's whole
rule set is replaced in one `nft -f` transaction, so there is no moment with half of it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.daemon.hostnet.links import check_ifname
from stoker.errors import CommandFailed, InvalidArgument, StateError
from stoker.runner import Result, Runner

TABLE = "stoker"
FAMILY = "inet"
BRIDGE_FAMILY = "bridge"
VM_TAG = "stoker-vm:"
BASE_TAG = "stoker:base"
GROUP_TAG = "stoker:group:"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

_VM_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TAG_RE = re.compile(r"^stoker-vm:([A-Za-z0-9_.-]+)(?:\s|$)")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_GROUP = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
MODES = ("none", "host-only", "nat", "allow")


@dataclass(frozen=True)
class NatRule:
    """One rule of stoker's tables as read back from `nft -j`."""

    chain: str
    handle: int
    comment: str
    family: str = FAMILY

    @property
    def vm_id(self) -> str | None:
        m = _TAG_RE.match(self.comment)
        return m.group(1) if m else None


@dataclass(frozen=True)
class SetElem:
    """One element of a set in the bridge table."""

    set: str
    value: str
    comment: str

    @property
    def vm_id(self) -> str | None:
        m = _TAG_RE.match(self.comment)
        return m.group(1) if m else None


@dataclass(frozen=True)
class VMRules:
    """Everything one VM's rules say, as plain checked values (HostNetwork builds it)."""

    vm_id: str
    guest_ip: str
    tap: str
    mac: str
    mode: str = "host-only"
    # allow=: (network, port or None) to the outside; ports on the bridge address
    allow_out: tuple[tuple[str, int | None], ...] = ()
    host_ports: tuple[int, ...] = ()
    peers: str | None = None

    def check(self) -> None:
        """Refuse any value that is not what it claims before it reaches an nft script."""
        if not _VM_ID.match(self.vm_id):
            raise InvalidArgument(
                f"VM id {self.vm_id!r} cannot tag an nftables rule: use [A-Za-z0-9_.-]"
            )
        check_ifname(self.tap)
        try:
            ipaddress.IPv4Address(self.guest_ip)
        except ValueError:
            raise InvalidArgument(f"{self.guest_ip!r} is not an IPv4 address") from None
        if not _MAC.match(self.mac):
            raise InvalidArgument(f"{self.mac!r} is not a lower-case MAC address")
        if self.mode not in MODES:
            raise InvalidArgument(f"unknown network mode {self.mode!r}")
        for net, port in self.allow_out:
            ipaddress.IPv4Network(net)
            if port is not None and not 1 <= int(port) <= 65535:
                raise InvalidArgument(f"port {port} is out of range")
        for port in self.host_ports:
            if not 1 <= int(port) <= 65535:
                raise InvalidArgument(f"port {port} is out of range")
        if self.peers is not None and not _GROUP.match(self.peers):
            raise InvalidArgument(f"peer group {self.peers!r} must be 1-24 of [a-z0-9-]")

    @property
    def outbound(self) -> bool:
        return self.mode == "nat" or (self.mode == "allow" and bool(self.allow_out))


def _check_vm_id(vm_id: str) -> str:
    if not _VM_ID.match(vm_id):
        raise InvalidArgument(f"VM id {vm_id!r} cannot tag an nftables rule: use [A-Za-z0-9_.-]")
    return vm_id


def _port(port: int | None) -> str:
    return f" meta l4proto {{ tcp, udp }} th dport {int(port)}" if port is not None else ""


class Firewall:
    """Adds and removes per-VM policy rules; owns stoker's two nftables tables.

    `netns` runs every command inside a named network namespace (`ip netns exec`); the
    daemon itself passes None and works in its own namespace.
    """

    def __init__(
        self,
        runner: Runner,
        bridge: str,
        gateway: str,
        logger: logging.Logger,
        *,
        netns: str | None = None,
        table: str = TABLE,
        nft: str = "nft",
        timeout: float = 30.0,
    ) -> None:
        self.runner = runner
        self.bridge = check_ifname(bridge)
        self.gateway = str(ipaddress.IPv4Address(gateway))
        self.log = logger
        self.netns = netns
        self.table = table
        self.nft = nft
        self.timeout = timeout
        # nftables handles are only valid between a listing and the next change: serialise
        # list-then-edit sequences within this daemon. A leaf lock.
        self._mu = asyncio.Lock()

    def _argv(self, *args: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns is not None else []
        return [*prefix, *args]

    async def _nft_script(self, script: str) -> None:
        await self.runner.run(
            self._argv(self.nft, "-f", "-"), input=script.encode(), timeout=self.timeout
        )

    async def _list(self, family: str = FAMILY) -> list[dict[str, Any]] | None:
        """The table's objects from `nft -j`, or None when the table does not exist."""
        res: Result = await self.runner.run(
            self._argv(self.nft, "-j", "list", "table", family, self.table),
            check=False,
            timeout=self.timeout,
        )
        if res.returncode != 0:
            if "No such file or directory" in res.err:
                return None
            raise CommandFailed(
                f"nft -j list table {family} {self.table} failed (exit {res.returncode}): "
                f"{res.err.strip()[-2000:] or 'no output'}: is nftables installed and usable?"
            )
        try:
            doc = json.loads(res.stdout)
            items: list[dict[str, Any]] = doc["nftables"]
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"unreadable `nft -j` output for table {self.table}: {e}") from None
        return items

    @staticmethod
    def _rules(items: Sequence[dict[str, Any]], family: str = FAMILY) -> list[NatRule]:
        out = []
        for it in items:
            r = it.get("rule")
            if isinstance(r, dict) and "handle" in r:
                out.append(
                    NatRule(
                        str(r.get("chain")), int(r["handle"]), str(r.get("comment", "")), family
                    )
                )
        return out

    @staticmethod
    def _elems(items: Sequence[dict[str, Any]]) -> list[SetElem]:
        out = []
        for it in items:
            s = it.get("set")
            if not isinstance(s, dict):
                continue
            for e in s.get("elem", []) or []:
                if isinstance(e, dict) and isinstance(e.get("elem"), dict):
                    inner = e["elem"]
                    out.append(
                        SetElem(str(s["name"]), str(inner.get("val")), str(inner.get("comment")))
                    )
                else:
                    out.append(SetElem(str(s["name"]), str(e), ""))
        return out

    @staticmethod
    def _sets(items: Sequence[dict[str, Any]]) -> set[str]:
        return {str(it["set"]["name"]) for it in items if isinstance(it.get("set"), dict)}

    async def _both(self) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
        return await self._list(FAMILY), await self._list(BRIDGE_FAMILY)

    async def rules(self) -> list[NatRule]:
        """Every rule in stoker's tables (empty when they do not exist)."""
        inet, br = await self._both()
        return [*self._rules(inet or []), *self._rules(br or [], BRIDGE_FAMILY)]

    async def vm_ids(self) -> set[str]:
        """Ids of VMs that currently have rules (for reconcile)."""
        return {r.vm_id for r in await self.rules() if r.vm_id is not None}

    async def enable_ip_forward(self) -> None:
        """Turn on IPv4 forwarding in this network namespace (sysctls are per netns)."""
        if self.netns is not None:
            await self.runner.run(
                self._argv("sh", "-c", f"echo 1 > {IP_FORWARD}"), timeout=self.timeout
            )
            return
        try:
            if IP_FORWARD.read_text().strip() == "1":
                return
            IP_FORWARD.write_text("1\n")
        except OSError as e:
            raise CommandFailed(
                f"cannot enable IPv4 forwarding ({IP_FORWARD}): {e.strerror}: "
                "stokerd needs root for --net nat and --net allow="
            ) from None

    # --- script building ----------------------------------------------------------------

    def _base_script(
        self, inet: list[dict[str, Any]] | None, br: list[dict[str, Any]] | None
    ) -> list[str]:
        """Tables, chains, sets and the base rules; only what is missing is added."""
        t, b = f"{FAMILY} {self.table}", f"{BRIDGE_FAMILY} {self.table}"
        bq = json.dumps(self.bridge)
        lines = [
            f"add table {t}",
            f"add chain {t} input {{ type filter hook input priority filter; policy accept; }}",
            f"add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}",
            f"add chain {t} postrouting "
            "{ type nat hook postrouting priority srcnat; policy accept; }",
            f"add table {b}",
            f"add chain {b} prerouting "
            "{ type filter hook prerouting priority filter; policy accept; }",
            f"add chain {b} forward {{ type filter hook forward priority filter; policy accept; }}",
            f"add set {b} ports {{ type ifname; }}",
        ]
        have = {r.comment for r in self._rules(inet or [])} | {
            r.comment for r in self._rules(br or [], BRIDGE_FAMILY)
        }
        # (tag, rule): appended in order, so each chain ends with its drop.
        base = [
            (f"{BASE_TAG}:in-reply", f"{t} input iifname {bq} ct state established,related accept"),
            (f"{BASE_TAG}:in-drop", f"{t} input iifname {bq} drop"),
            (BASE_TAG, f"{t} forward iifname {bq} oifname != {bq} drop"),
            (f"{BASE_TAG}:fwd-in", f"{t} forward oifname {bq} iifname != {bq} drop"),
            (f"{BASE_TAG}:l2-from", f"{b} forward iifname @ports drop"),
            (f"{BASE_TAG}:l2-to", f"{b} forward oifname @ports drop"),
        ]
        for tag, rule in base:
            if tag not in have:
                lines.append(f"add rule {rule} comment {json.dumps(tag)}")
        return lines

    def _vm_script(self, r: VMRules, br: list[dict[str, Any]] | None) -> list[str]:
        t, b = f"{FAMILY} {self.table}", f"{BRIDGE_FAMILY} {self.table}"
        bq, tap, ip, gw = json.dumps(self.bridge), json.dumps(r.tap), r.guest_ip, self.gateway
        tag = json.dumps(f"{VM_TAG}{r.vm_id} tap={r.tap}")
        c = f"comment {tag}"
        # `insert` puts a rule at the top of its chain: before the base drops.
        lines = [
            f"add element {b} ports {{ {tap} {c} }}",
            f"insert rule {b} prerouting iifname {tap} ether saddr != {r.mac} drop {c}",
            f"insert rule {b} prerouting iifname {tap} ether type != {{ ip, arp }} drop {c}",
            f"insert rule {b} prerouting iifname {tap} ether type ip ip saddr != {ip} drop {c}",
            f"insert rule {b} prerouting iifname {tap} ether type arp arp saddr ip != {ip} "
            f"drop {c}",
            f"insert rule {b} prerouting iifname {tap} ether type arp arp saddr ether != {r.mac} "
            f"drop {c}",
        ]
        if r.mode != "none":
            lines.append(
                f"insert rule {t} input iifname {bq} ip saddr {ip} ip daddr {gw}{_port(53)} "
                f"accept {c}"
            )
        for hport in r.host_ports:
            lines.append(
                f"insert rule {t} input iifname {bq} ip saddr {ip} ip daddr {gw}{_port(hport)} "
                f"accept {c}"
            )
        out = f"{t} forward iifname {bq} oifname != {bq} ip saddr {ip}"
        if r.mode == "nat":
            lines.append(f"insert rule {out} accept {c}")
        elif r.mode == "allow":
            for net, port in r.allow_out:
                lines.append(f"insert rule {out} ip daddr {net}{_port(port)} accept {c}")
        if r.outbound:
            lines += [
                f"insert rule {t} forward oifname {bq} iifname != {bq} ip daddr {ip} "
                f"ct state established,related accept {c}",
                f"add rule {t} postrouting ip saddr {ip} oifname != {bq} masquerade {c}",
            ]
        if r.peers is not None:
            group = f"peers_{r.peers.replace('-', '_')}"
            gtag = json.dumps(f"{GROUP_TAG}{r.peers}")
            lines.append(f"add set {b} {group} {{ type ifname; }}")
            if not any(x.comment == f"{GROUP_TAG}{r.peers}" for x in self._rules(br or [])):
                lines.append(
                    f"insert rule {b} forward iifname @{group} oifname @{group} accept "
                    f"comment {gtag}"
                )
            lines.append(f"add element {b} {group} {{ {tap} {c} }}")
        return lines

    def _removal(
        self, vm_id: str, inet: list[dict[str, Any]] | None, br: list[dict[str, Any]] | None
    ) -> list[str]:
        lines = []
        for fam, items in ((FAMILY, inet), (BRIDGE_FAMILY, br)):
            for rule in self._rules(items or [], fam):
                if rule.vm_id == vm_id:
                    lines.append(
                        f"delete rule {fam} {self.table} {rule.chain} handle {rule.handle}"
                    )
        for e in self._elems(br or []):
            if e.vm_id == vm_id:
                elem = json.dumps(e.value)
                lines.append(f"delete element {BRIDGE_FAMILY} {self.table} {e.set} {{ {elem} }}")
        return lines

    def _empty_groups(self, vm_id: str, br: list[dict[str, Any]] | None) -> list[str]:
        """Group sets (and their accept rule) that only `vm_id` is in: dropped with it."""
        elems = self._elems(br or [])
        lines = []
        for name in sorted(self._sets(br or [])):
            if not name.startswith("peers_"):
                continue
            members = [e for e in elems if e.set == name]
            if members and all(e.vm_id == vm_id for e in members):
                group = name[len("peers_") :].replace("_", "-")
                for rule in self._rules(br or [], BRIDGE_FAMILY):
                    if rule.comment == f"{GROUP_TAG}{group}":
                        lines.append(
                            f"delete rule {BRIDGE_FAMILY} {self.table} {rule.chain} "
                            f"handle {rule.handle}"
                        )
                lines.append(f"delete set {BRIDGE_FAMILY} {self.table} {name}")
        return lines

    # --- operations ---------------------------------------------------------------------

    async def ensure_base(self) -> None:
        """Create the tables with their base drops (before any tap joins the bridge)."""
        async with self._mu:
            inet, br = await self._both()
            await self._nft_script("\n".join(self._base_script(inet, br)) + "\n")

    async def apply_vm(self, r: VMRules) -> None:
        """Install (or replace) every rule of one VM, in one transaction."""
        r.check()
        if r.outbound:
            await self.enable_ip_forward()
        async with self._mu:
            inet, br = await self._both()
            lines = [*self._base_script(inet, br), *self._removal(r.vm_id, inet, br)]
            lines += self._vm_script(r, br)
            await self._nft_script("\n".join(lines) + "\n")
        self.log.info("network policy %s for VM %s (%s via %s)", r.mode, r.vm_id, r.guest_ip, r.tap)

    async def remove_vm(self, vm_id: str) -> bool:
        """Delete the VM's rules and set elements, leaving every other VM's. False when it
        had none."""
        _check_vm_id(vm_id)
        async with self._mu:
            inet, br = await self._both()
            lines = self._removal(vm_id, inet, br)
            if not lines:
                return False
            lines += self._empty_groups(vm_id, br)
            await self._nft_script("\n".join(lines) + "\n")
        self.log.info("network policy removed for VM %s", vm_id)
        return True

    async def teardown_all(self) -> bool:
        """Delete stoker's tables. False when neither existed."""
        async with self._mu:
            lines = [
                f"delete table {fam} {self.table}"
                for fam in (FAMILY, BRIDGE_FAMILY)
                if await self._list(fam) is not None
            ]
            if not lines:
                return False
            await self._nft_script("\n".join(lines) + "\n")
        return True
