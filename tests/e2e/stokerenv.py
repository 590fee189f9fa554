"""End-to-end helpers: a stokerd inside a network namespace the test creates.

The daemon, its bridge, taps and guests, and every CLI call that talks to guests run in
`ip netns exec NS`. The namespace is deleted at the end, with anything left in it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prereq import require_tools

CACHE = Path(os.environ.get("STOKER_TEST_CACHE", "/var/cache/stoker-test"))


@dataclass
class StokerEnv:
    """An isolated stoker install (XDG dirs, config) whose processes run in `netns`."""

    netns: str
    root: Path
    env: dict[str, str]
    config: Path
    vmm_user: str = "stoker-vmm"
    log: list[str] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.root / "state" / "stoker"

    def argv(self, *args: str, host: bool = False) -> list[str]:
        cli = [sys.executable, "-m", "stoker.cli.main", *args]
        return cli if host else ["ip", "netns", "exec", self.netns, *cli]

    def build_image(self, timeout: float = 1800) -> None:
        """Build the golden image with a daemon in the host namespace (mmdebstrap needs the
        Debian mirror, which the test namespace cannot reach), then stop that daemon so
        the next command starts one inside the namespace. Building makes no bridge or tap."""
        r = subprocess.run(
            self.argv("image", "build", "debian-bookworm", host=True),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        subprocess.run(
            self.argv("daemon", "stop", host=True), env=self.env, capture_output=True, timeout=30
        )
        if r.returncode != 0:
            raise AssertionError(
                f"image build failed:\n{r.stdout}\n{r.stderr}\n{self.daemon_log_tail()}"
            )

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            self.argv(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        self.log.append(f"$ stoker {' '.join(args)} -> {r.returncode}\n{r.stdout}{r.stderr}")
        if check and r.returncode != 0:
            raise AssertionError(
                f"stoker {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n"
                f"daemon log tail:\n{self.daemon_log_tail()}"
            )
        return r

    def in_ns(
        self, *argv: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def daemon_log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.state_dir / "stokerd.log").read_text().splitlines()[-n:])
        except OSError:
            return "(no daemon log)"


def ns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def make_env(tag: str, extra_config: str = "") -> StokerEnv:
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (network namespaces, taps)")
    require_tools("qemu-system-x86_64", "mkfs.ext4", "debugfs", "ip", "nft")
    token = secrets.token_hex(3)
    ns = f"stoker-{tag}-{token}"
    # Confined QEMU runs as a system user the daemon creates at its first start: a name of
    # this env's own, removed by destroy_env, so no user is left on the host.
    vmm_user = f"stkvm-{token}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    root = Path(tempfile.mkdtemp(prefix="stk-e2e-"))
    env = dict(os.environ)
    env.update(
        HOME=str(root / "home"),
        XDG_CONFIG_HOME=str(root / "config"),
        XDG_STATE_HOME=str(root / "state"),
        XDG_CACHE_HOME=str(root / "cache"),
        STOKER_TEST_CACHE=str(CACHE),
    )
    env.pop("XDG_RUNTIME_DIR", None)
    env.pop("STOKER_CONFIG", None)
    (root / "home").mkdir()
    cfg = root / "config" / "stoker" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        'vmm = "qemu"\n'
        f'vmm_user = "{vmm_user}"\n'
        "tap_pool_size = 1\n"
        'dns_listen = "127.0.0.1:5354"\n'
        f'golden_cache_dir = "{CACHE / "apt"}"\n'
        + extra_config
        + '\n[vm_defaults]\nvcpu = 1\nmemory_mib = 1024\ndisk_size = "2G"\n'
        + 'overlay_size = "2G"\n'
    )
    return StokerEnv(netns=ns, root=root, env=env, config=cfg, vmm_user=vmm_user)


def destroy_env(e: StokerEnv) -> None:
    with contextlib.suppress(Exception):
        subprocess.run(e.argv("daemon", "stop"), env=e.env, capture_output=True, timeout=30)
    # Anything still in the namespace (guests, a stuck daemon) dies with it.
    for _ in range(3):
        pids = ns_pids(e.netns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
    subprocess.run(["ip", "netns", "del", e.netns], check=False)
    shutil.rmtree(e.root, ignore_errors=True)
    subprocess.run(["userdel", e.vmm_user], capture_output=True, check=False)
    subprocess.run(["groupdel", e.vmm_user], capture_output=True, check=False)


@contextlib.contextmanager
def serving_host(
    e: StokerEnv, tag: str, serve_dir: Path | None = None, ip: str = "192.0.2.2"
) -> Iterator[str]:
    """A test host (TEST-NET-1) in a namespace of its own, a veth to `e`'s namespace
    (192.0.2.1 on stoker's side), with `python -m http.server` on IP:8080 serving
    `serve_dir` (else its working directory); yields the URL. All of it is removed on exit.
    `tag` (2-3 letters) names the namespace and the veth pair, unique per caller."""
    host_ns = f"stoker-{tag}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", host_ns], check=True)
    server = None
    try:
        subprocess.run(
            ["ip", "link", "add", f"stk-{tag}0", "netns", e.netns, "type", "veth",
             "peer", "name", f"stk-{tag}1", "netns", host_ns],
            check=True,
        )  # fmt: skip
        e.in_ns("ip", "addr", "add", "192.0.2.1/24", "dev", f"stk-{tag}0")
        e.in_ns("ip", "link", "set", f"stk-{tag}0", "up")
        for cmd in (
            ["ip", "addr", "add", f"{ip}/24", "dev", f"stk-{tag}1"],
            ["ip", "link", "set", f"stk-{tag}1", "up"],
            ["ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "netns", "exec", host_ns, *cmd], check=True)
        where = ["-d", str(serve_dir)] if serve_dir is not None else []
        server = subprocess.Popen(
            ["ip", "netns", "exec", host_ns, sys.executable, "-m", "http.server", "-b", ip,
             *where, "8080"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        yield f"http://{ip}:8080"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", host_ns], check=False)
