"""Per-VM NAT in stoker's own nftables table, through the `nft` command.

Layout of `table inet stoker` (created on first use, deleted by `teardown_all`):

- chain `forward` (filter hook): per VM, accept the guest's traffic leaving the bridge and
  the replies coming back; a final base rule drops anything else routed out of the bridge,
  so a VM created without `--nat` cannot reach beyond the host even when ip_forward is on.
- chain `postrouting` (nat hook): per VM, masquerade the guest's address when it leaves
  through any interface other than the bridge.

Every per-VM rule carries the comment `stoker-vm:<id> tap=<tap>`, so one VM's rules are
found (by handle) and removed without touching any other VM's.
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
VM_TAG = "stoker-vm:"
BASE_TAG = "stoker:base"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

_VM_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TAG_RE = re.compile(r"^stoker-vm:([A-Za-z0-9_.-]+)(?:\s|$)")


@dataclass(frozen=True)
class NatRule:
    """One rule of stoker's table as read back from `nft -j`."""

    chain: str
    handle: int
    comment: str

    @property
    def vm_id(self) -> str | None:
        m = _TAG_RE.match(self.comment)
        return m.group(1) if m else None


def _check_vm_id(vm_id: str) -> str:
    if not _VM_ID.match(vm_id):
        raise InvalidArgument(f"VM id {vm_id!r} cannot tag an nftables rule: use [A-Za-z0-9_.-]")
    return vm_id


class NAT:
    """Adds and removes per-VM NAT and forward rules; owns stoker's nftables table.

    `netns` runs every command inside a named network namespace (`ip netns exec`); the
    daemon itself passes None and works in its own namespace.
    """

    def __init__(
        self,
        runner: Runner,
        bridge: str,
        logger: logging.Logger,
        *,
        netns: str | None = None,
        table: str = TABLE,
        nft: str = "nft",
        timeout: float = 30.0,
    ) -> None:
        self.runner = runner
        self.bridge = check_ifname(bridge)
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

    async def _list(self) -> list[dict[str, Any]] | None:
        """The table's objects from `nft -j`, or None when the table does not exist."""
        res: Result = await self.runner.run(
            self._argv(self.nft, "-j", "list", "table", FAMILY, self.table),
            check=False,
            timeout=self.timeout,
        )
        if res.returncode != 0:
            if "No such file or directory" in res.err:
                return None
            raise CommandFailed(
                f"nft -j list table {FAMILY} {self.table} failed (exit {res.returncode}): "
                f"{res.err.strip()[-2000:] or 'no output'}: is nftables installed and usable?"
            )
        try:
            doc = json.loads(res.stdout)
            items: list[dict[str, Any]] = doc["nftables"]
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"unreadable `nft -j` output for table {self.table}: {e}") from None
        return items

    @staticmethod
    def _rules(items: Sequence[dict[str, Any]]) -> list[NatRule]:
        out = []
        for it in items:
            r = it.get("rule")
            if isinstance(r, dict) and "handle" in r:
                out.append(
                    NatRule(str(r.get("chain")), int(r["handle"]), str(r.get("comment", "")))
                )
        return out

    async def rules(self) -> list[NatRule]:
        """Every rule in stoker's table (empty when the table does not exist)."""
        items = await self._list()
        return self._rules(items) if items is not None else []

    async def vm_ids(self) -> set[str]:
        """Ids of VMs that currently have NAT rules (for reconcile)."""
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
                "stokerd needs root for --nat"
            ) from None

    def _base_script(self, items: list[dict[str, Any]] | None) -> list[str]:
        t = f"{FAMILY} {self.table}"
        br = json.dumps(self.bridge)
        lines = [
            f"add table {t}",
            f"add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}",
            f"add chain {t} postrouting "
            "{ type nat hook postrouting priority srcnat; policy accept; }",
        ]
        has_base = items is not None and any(
            r.comment == BASE_TAG and r.chain == "forward" for r in self._rules(items)
        )
        if not has_base:
            lines.append(
                f'add rule {t} forward iifname {br} oifname != {br} drop comment "{BASE_TAG}"'
            )
        return lines

    async def ensure_vm_nat(self, vm_id: str, guest_ip: str, tap: str) -> None:
        """Install (or replace) the VM's masquerade and forward rules, in one transaction."""
        _check_vm_id(vm_id)
        check_ifname(tap)
        try:
            ip = str(ipaddress.IPv4Address(guest_ip))
        except ValueError:
            raise InvalidArgument(f"{guest_ip!r} is not an IPv4 address") from None
        await self.enable_ip_forward()
        t = f"{FAMILY} {self.table}"
        br = json.dumps(self.bridge)
        tag = json.dumps(f"{VM_TAG}{vm_id} tap={tap}")
        async with self._mu:
            items = await self._list()
            lines = self._base_script(items)
            for r in self._rules(items or []):
                if r.vm_id == vm_id:
                    lines.append(f"delete rule {t} {r.chain} handle {r.handle}")
            # insert: per-VM accepts must sit before the base drop at the chain's end.
            lines += [
                f"insert rule {t} forward iifname {br} oifname != {br} ip saddr {ip} "
                f"accept comment {tag}",
                f"insert rule {t} forward oifname {br} iifname != {br} ip daddr {ip} "
                f"ct state established,related accept comment {tag}",
                f"add rule {t} postrouting ip saddr {ip} oifname != {br} masquerade comment {tag}",
            ]
            await self._nft_script("\n".join(lines) + "\n")
        self.log.info("NAT on for VM %s (%s via %s)", vm_id, ip, tap)

    async def remove_vm_nat(self, vm_id: str) -> bool:
        """Delete the VM's rules, leaving every other VM's. False when it had none."""
        _check_vm_id(vm_id)
        t = f"{FAMILY} {self.table}"
        async with self._mu:
            items = await self._list()
            if items is None:
                return False
            lines = [
                f"delete rule {t} {r.chain} handle {r.handle}"
                for r in self._rules(items)
                if r.vm_id == vm_id
            ]
            if not lines:
                return False
            await self._nft_script("\n".join(lines) + "\n")
        self.log.info("NAT off for VM %s", vm_id)
        return True

    async def teardown_all(self) -> bool:
        """Delete stoker's whole table. False when it did not exist."""
        async with self._mu:
            if await self._list() is None:
                return False
            await self._nft_script(f"delete table {FAMILY} {self.table}\n")
        return True
