"""Helpers shared by the host-network integration tests (namespaces, commands, polling)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from prereq import require_tools


def need_root_tools() -> None:
    """Skip unless running as root with ip and nft available."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces, bridges, taps and nft tables")
    require_tools("ip", "nft", hint="apt-get install -y iproute2 nftables")


def sh(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a command, returning its output; raise with stderr on failure."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _names(out: str) -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line}


def host_links() -> set[str]:
    """Names of the links in the test process's (the host's) namespace."""
    return _names(sh("ip", "-o", "link", "show").stdout)


def host_nft_tables() -> str:
    """`nft list tables` in the host's namespace."""
    return sh("nft", "list", "tables").stdout


def ns_links(ns: str) -> set[str]:
    """Link names inside `ns`."""
    return _names(sh("ip", "-n", ns, "-o", "link", "show").stdout)


def ns_nft(ns: str) -> str:
    """`nft list ruleset` inside `ns`."""
    return sh("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `pred` until true or the timeout passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@dataclass
class Namespaces:
    """Creates `stoker-test-*` namespaces on demand; deletes them (and their processes)."""

    names: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def new(self) -> str:
        name = f"stoker-test-{secrets.token_hex(3)}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def python(self, ns: str, code: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        """Run Python code inside `ns` and wait for it."""
        argv = ("ip", "netns", "exec", ns, sys.executable, "-c", code)
        return sh(*argv, check=False, timeout=timeout)

    def spawn(self, ns: str, code: str) -> subprocess.Popen[str]:
        """Start Python code inside `ns`; it is killed at teardown."""
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-u", "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        """Kill spawned processes, delete the namespaces."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)
        for name in self.names:
            sh("ip", "netns", "del", name, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces of ours that still exist."""
        listed = {ln.split()[0] for ln in sh("ip", "netns", "list").stdout.splitlines() if ln}
        return [n for n in self.names if n in listed]
