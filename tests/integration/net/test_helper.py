"""stoker-helper: the peer check and the validation of every argument against what the
caller owns, with the real helper process (root) and callers that are throwaway non-root
users; the helper killed mid-request; HostNetwork as a non-root user whose bridge, taps,
tap descriptor, rules and DNS port all come from the helper, inside a test namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from _netns_helpers import Namespaces, ns_links, ns_nft, sh, wait_for
from _nonroot import NonRootUser, make_user, nonroot_python

from stoker.helper.config import render

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
PREFIX = "tap-tst-"
TABLE = "stktest"
BRIDGE = "br-tst"
CIDR = "172.31.7.0/24"


class HelperProc:
    def __init__(self, root: Path, callers: list[dict[str, Any]]) -> None:
        self.root = root
        self.socket = root / "helper.sock"
        self.config = root / "helper.toml"
        self.log = root / "helper.log"
        self.config.write_text(render(callers, self.socket))
        os.chmod(self.config, 0o644)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stoker.helper", "--config", str(self.config)],
                stdout=log,
                stderr=log,
            )
        ok = wait_for(lambda: self.socket.exists() and "serving" in self.log.read_text(), 10)
        assert ok, f"helper did not start: {self.log.read_text()}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextmanager
def helper_for(callers: list[dict[str, Any]]) -> Iterator[HelperProc]:
    root = Path(tempfile.mkdtemp(prefix="stk-helper-"))
    os.chmod(root, 0o755)
    h = HelperProc(root, callers)
    try:
        h.start()
        yield h
    except BaseException:
        print("helper log:\n" + h.log.read_text())
        raise
    finally:
        h.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def call_as(
    user: NonRootUser | None, h: HelperProc, reqs: list[list[Any]], netns: str | None = None
) -> list[dict[str, Any]]:
    exe, env = nonroot_python()
    argv = [exe, str(HERE / "_helper_call.py"), str(h.socket), json.dumps(reqs)]
    if user is not None:
        argv = [*user.setpriv(), *argv]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    out: list[dict[str, Any]] = json.loads(p.stdout)
    return out


def tap_owner(ns: str, tap: str) -> str | None:
    """The tap's owner as `ip` prints it (a user name, else the uid)."""
    p = sh("ip", "-n", ns, "-d", "-j", "link", "show", "dev", tap, check=False)
    if p.returncode != 0:
        return None
    info = json.loads(p.stdout)[0].get("linkinfo", {}).get("info_data", {})
    return str(info["user"]) if "user" in info else None


def caller(u: NonRootUser, ns: str) -> dict[str, Any]:
    return {
        "uid": u.uid,
        "bridge": BRIDGE,
        "cidr": CIDR,
        "tap_prefix": PREFIX,
        "table": TABLE,
        "netns": ns,
    }


def rules(tap: str, ip: str = "172.31.7.5") -> dict[str, Any]:
    return {"vm_id": "vm1", "guest_ip": ip, "tap": tap, "mac": "02:00:00:00:00:05"}


def test_helper_validates_every_argument_against_what_the_caller_owns(
    namespaces: Namespaces,
) -> None:
    ns = namespaces.new()
    with make_user() as a, make_user() as b, helper_for([caller(a, ns)]) as h:
        mine = f"{PREFIX}a1b2c3"
        # A tap with the right prefix but another owner (say, another daemon's).
        foreign = f"{PREFIX}f00f00"
        sh("ip", "-n", ns, "tuntap", "add", foreign, "mode", "tap", "user", "4242")
        out = call_as(
            a,
            h,
            [
                ["hello", {}],
                ["bridge.ensure", {}],
                ["tap.create", {"name": mine}],
                ["tap.create", {"name": mine}],  # a retry: already the caller's
                ["tap.create", {"name": "tap-other-1"}],
                ["tap.create", {"name": f"{PREFIX}../x"}],
                ["tap.attach", {"name": mine}],
                ["tap.attach", {"name": foreign}],
                ["tap.delete", {"name": foreign}],
                ["tap.open", {"name": mine}],
                ["tap.open", {"name": foreign}],
                ["nft.apply_vm", {"rules": rules(foreign)}],
                ["nft.apply_vm", {"rules": rules(mine, ip="10.9.9.9")}],
                ["nft.apply_vm", {"rules": rules(mine, ip="172.31.7.1")}],
                ["nft.apply_vm", {"rules": rules(mine)}],
                ["nft.remove_vm", {"vm_id": "vm1", "table": "filter"}],
                ["bridge.ensure", {"bridge": "eth0"}],
                ["nft.vm_ids", {}],
            ],
        )
        hello, ensure, create, again, other, dotdot, attach, attach_f = out[:8]
        del_f, open_mine, open_f, nft_f, nft_out, nft_gw, nft_ok, rm_table, br_other, ids = out[8:]
        assert hello["ok"]["bridge"] == BRIDGE and hello["ok"]["uid"] == a.uid
        assert "ok" in ensure and BRIDGE in ns_links(ns)
        assert "ok" in create and "ok" in again
        assert tap_owner(ns, mine) == a.name
        for refused in (other, dotdot):
            assert refused.get("err") in ("permission_denied", "invalid_argument"), refused
        assert other["err"] == "permission_denied" and PREFIX in other["msg"]
        assert "ok" in attach
        master = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", mine).stdout)[0]
        assert master.get("master") == BRIDGE
        for refused in (attach_f, del_f, open_f, nft_f):
            assert refused.get("err") == "permission_denied", refused
            assert "not yours" in refused["msg"] and "4242" in refused["msg"]
        assert foreign in ns_links(ns), "a refused delete deleted the tap"
        assert open_mine == {"ok": {"fds": 1}, "fds": 1}
        assert nft_out["err"] == "permission_denied" and CIDR in nft_out["msg"]
        assert nft_gw["err"] == "permission_denied"
        assert "ok" in nft_ok and f"table inet {TABLE}" in ns_nft(ns)
        assert rm_table["err"] == "permission_denied" and "table" in rm_table["msg"]
        assert br_other["err"] == "permission_denied"
        assert ids == {"ok": {"vm_ids": ["vm1"]}, "fds": 0}

        # Another (non-root) user is no caller at all, whatever it asks.
        (b_hello, b_del) = call_as(b, h, [["hello", {}], ["tap.delete", {"name": mine}]])
        for refused in (b_hello, b_del):
            assert refused["err"] == "permission_denied"
            assert f"uid {b.uid} is not a caller" in refused["msg"]
        assert mine in ns_links(ns)

        log = h.log.read_text()
        assert f"refused uid {b.uid}" in log
        assert f"refused uid {a.uid}" in log and foreign in log

        # Clean up through the helper: what it made, it can remove.
        out = call_as(
            a,
            h,
            [
                ["nft.remove_vm", {"vm_id": "vm1"}],
                ["tap.delete", {"name": mine}],
                ["tap.delete", {"name": mine}],
                ["bridge.delete", {}],
                ["nft.teardown", {}],
            ],
        )
        assert [o.get("ok") for o in out] == [
            {"removed": True},
            {"deleted": True},
            {"deleted": False},
            {"deleted": True},
            {"removed": True},
        ]
        assert BRIDGE not in ns_links(ns) and mine not in ns_links(ns)
        assert TABLE not in ns_nft(ns)


def _client(
    user: NonRootUser, h: HelperProc, reqs: list[list[Any]], delay: float
) -> subprocess.Popen[str]:
    exe, env = nonroot_python()
    env["STK_RETRY_DELAY"] = str(delay)
    return subprocess.Popen(
        [*user.setpriv(), exe, str(HERE / "_helper_call.py"), str(h.socket), json.dumps(reqs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("restarted", [True, False], ids=["restarted", "stays-dead"])
def test_helper_killed_mid_request_is_retried_once(namespaces: Namespaces, restarted: bool) -> None:
    ns = namespaces.new()
    with make_user() as a, helper_for([caller(a, ns)]) as h:
        assert h.proc is not None
        # Frozen, the helper has the request queued but never answers; then it is killed.
        os.kill(h.proc.pid, signal.SIGSTOP)
        c = _client(a, h, [["bridge.ensure", {}]], delay=4.0)
        time.sleep(1.0)
        h.kill()
        if restarted:
            h.start()  # what systemd's Restart= does
        out, err = c.communicate(timeout=60)
        assert c.returncode == 0, err
        (res,) = json.loads(out)
        assert "went away before answering during bridge.ensure: retrying once" in err, err
        if restarted:
            assert res == {"ok": {}, "fds": 0}
            assert BRIDGE in ns_links(ns)
        else:
            assert res["err"] == "helper_unavailable"
            assert "went away before answering" in res["msg"]
            assert "again on the retry" in res["msg"] and "bridge.ensure" in res["msg"]
            assert BRIDGE not in ns_links(ns)
        if restarted:
            (done,) = call_as(a, h, [["bridge.delete", {}]])
            assert done["ok"] == {"deleted": True}
        sh("ip", "-n", ns, "link", "del", BRIDGE, check=False)


def test_hostnetwork_as_a_non_root_user_gets_bridge_tap_rules_and_dns_from_the_helper(
    namespaces: Namespaces,
) -> None:
    ns = namespaces.new()
    with make_user() as a, helper_for([caller(a, ns) | {"tap_prefix": "tap-stk-"}]) as h:
        exe, env = nonroot_python()
        p = subprocess.Popen(
            [
                "ip", "netns", "exec", ns, *a.setpriv(), exe,
                str(HERE / "_nonroot_hostnet.py"), str(h.socket), BRIDGE, CIDR,
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        try:
            assert p.stdout is not None and p.stdin is not None
            line = p.stdout.readline()
            assert line, p.stderr.read() if p.stderr else ""
            r = json.loads(line)
            assert r["euid"] == a.uid and r["tun_direct"] == "Permission denied"
            assert r["helper_error"] is None
            assert r["status_helper"] == {"socket": str(h.socket), "error": None}
            tap = r["tap"]
            assert tap.startswith("tap-stk-") and tap_owner(ns, tap) == a.name
            link = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", tap).stdout)[0]
            assert link.get("master") == BRIDGE
            assert r["tap_fd_is_tun"] == "/dev/net/tun"
            assert r["guest_dns"] == ["172.31.7.1", 53] and r["guest_dns_error"] is None
            listening = sh("ip", "netns", "exec", ns, "ss", "-lunH").stdout
            assert "172.31.7.1:53" in listening
            assert r["policy_ids"] == ["vm1"]
            rules = ns_nft(ns)
            assert f"table inet {TABLE}" in rules and f"stoker-vm:vm1 tap={tap}" in rules
            assert r["foreign_delete"] == "permission_denied"
            p.stdin.write("\n")
            p.stdin.flush()
            done = json.loads(p.stdout.readline())
            assert done == {"torn_down": True}
            assert p.wait(30) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        assert BRIDGE not in ns_links(ns) and not [n for n in ns_links(ns) if "stk" in n]
        assert "stoker-vm:vm1" not in ns_nft(ns)
        sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", TABLE, check=False)
        sh("ip", "netns", "exec", ns, "nft", "delete", "table", "bridge", TABLE, check=False)
