"""systemd-resolved wiring: route `~vm` queries on the bridge link to stoker's DNS server.

Where systemd-resolved runs, `resolvectl dns BRIDGE ADDR[:PORT]` plus
`resolvectl domain BRIDGE ~vm` makes plain `NAME.vm` lookups on the host reach the
in-process server; `resolvectl revert BRIDGE` undoes both. Elsewhere this is a no-op and
the reason is logged (and shown by `status`).
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from stoker.errors import StokerError
from stoker.runner import Runner

RESOLVED_RUN_DIR = Path("/run/systemd/resolve")


def dns_server_arg(host: str, port: int) -> str:
    """resolvectl's server syntax: ADDR, ADDR:PORT, or [ADDR6]:PORT."""
    ip = ipaddress.ip_address(host)
    if port == 53:
        return str(ip)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class ResolvedWiring:
    """Applies and reverts per-link DNS routing through `resolvectl`.

    `which` and `run_dir` are seams for tests: by default the real `resolvectl` lookup and
    systemd-resolved's runtime directory decide whether it is present.
    """

    def __init__(
        self,
        runner: Runner,
        logger: logging.Logger,
        *,
        zone: str = "vm",
        which: Callable[[str], str | None] = shutil.which,
        run_dir: Path = RESOLVED_RUN_DIR,
        timeout: float = 10.0,
    ) -> None:
        self.runner = runner
        self.log = logger
        self.zone = zone
        self.which = which
        self.run_dir = run_dir
        self.timeout = timeout
        self.applied_link: str | None = None
        self.state = "not applied"

    async def available(self) -> tuple[bool, str]:
        """Whether resolvectl can be used here, and why not when it cannot."""
        if self.which("resolvectl") is None:
            return False, "resolvectl is not installed"
        if not self.run_dir.is_dir():
            return False, f"systemd-resolved is not running ({self.run_dir} is missing)"
        if not await self.runner.ok(
            ["systemctl", "is-active", "--quiet", "systemd-resolved"], timeout=self.timeout
        ):
            return False, "systemd-resolved is not active"
        return True, ""

    def commands(self, link: str, host: str, port: int) -> list[list[str]]:
        """The resolvectl commands `apply` runs, in order."""
        return [
            ["resolvectl", "dns", link, dns_server_arg(host, port)],
            ["resolvectl", "domain", link, f"~{self.zone}"],
        ]

    async def apply(self, link: str, host: str, port: int) -> bool:
        """Route `~zone` on `link` to host:port. False (logged) when not possible here."""
        ok, why = await self.available()
        if not ok:
            self.state = f"skipped: {why}"
            self.log.info("not wiring .%s into the host resolver: %s", self.zone, why)
            return False
        try:
            for argv in self.commands(link, host, port):
                await self.runner.run(argv, timeout=self.timeout)
        except StokerError as e:
            self.state = f"failed: {e}"
            self.log.warning("could not wire .%s into systemd-resolved: %s", self.zone, e)
            await self._revert(link)
            return False
        self.applied_link = link
        self.state = f"applied on {link}"
        return True

    async def _revert(self, link: str) -> None:
        try:
            await self.runner.run(["resolvectl", "revert", link], timeout=self.timeout)
        except StokerError as e:
            self.log.warning("resolvectl revert %s failed: %s", link, e)

    async def revert(self) -> None:
        """Undo `apply` (no-op when nothing was applied)."""
        link, self.applied_link = self.applied_link, None
        if link is None:
            return
        await self._revert(link)
        self.state = "reverted"
