"""`vm fork` and `vm create --from-snapshot` on real guests under QEMU/TCG (issue 13 item
3). One source VM; a snapshot of it; two forks of that one snapshot (one per command);
right after them each has its own kernel RNG output, IP, MAC, hostname, SSH host key and
machine-id, answers `vm exec` and ssh (with the key stoker pinned), and its clock is the
host's within 2 s. Then a fresh fork of the running source is timed, refusals (a stopped
source, a taken name) are checked, and the daemon is killed mid-fork: after its restart
no half VM is left (no row, no directory, no QEMU) and the source runs again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from stokerenv import StokerEnv

pytestmark = pytest.mark.e2e


def ex(e: StokerEnv, name: str, cmd: str) -> str:
    return e.run("vm", "exec", name, "--", cmd, timeout=120).stdout.strip()


def facts(e: StokerEnv, name: str) -> dict[str, str]:
    """What must differ between forks, read right after the fork, through the agent."""
    out = ex(
        e,
        name,
        "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
        " hostname; cat /etc/machine-id;"
        " ip -o -4 addr show scope global | awk '{print $4}';"
        " cat /sys/class/net/$(ip -o -4 route show default | awk '{print $5}')/address;"
        " cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub",
    )
    rnd, host, mid, ip, mac, key = out.splitlines()
    return {"rng": rnd, "hostname": host, "machine_id": mid, "ip": ip, "mac": mac, "key": key}


def skew(e: StokerEnv, name: str) -> float:
    t0 = time.time()
    guest = float(ex(e, name, "date +%s.%N"))
    t1 = time.time()
    # The guest read its clock at some instant of [t0, t1]: its distance from that span.
    return max(0.0, t0 - guest, guest - t1)


def vm(e: StokerEnv, name: str) -> dict[str, object] | None:
    vms = json.loads(e.run("vm", "list", "--json").stdout)
    return next((v for v in vms if v["name"] == name), None)


def test_two_forks_of_one_snapshot_have_their_own_identity(env: StokerEnv) -> None:
    env.run("vm", "create", "--name", "fsrc")
    forks: list[str] = []
    try:
        ex(env, "fsrc", "echo from-source > /root/mark && sync")
        env.run("vm", "snapshot", "fsrc", "--name", "tpl")
        src = facts(env, "fsrc")

        t0 = time.monotonic()
        a = json.loads(
            env.run("vm", "create", "--name", "fa", "--from-snapshot", "fsrc/tpl", "--json").stdout
        )
        forks.append("fa")
        t_a = time.monotonic() - t0
        t0 = time.monotonic()
        b = json.loads(
            env.run("vm", "fork", "fsrc", "--name", "fb", "--snapshot", "tpl", "--json").stdout
        )
        forks.append("fb")
        t_b = time.monotonic() - t0
        fa, fb = facts(env, "fa"), facts(env, "fb")
        print(f"fork from a snapshot: {t_a:.2f}s and {t_b:.2f}s; source {src}; fa {fa}; fb {fb}")

        assert fa["rng"] != fb["rng"] and src["rng"] not in (fa["rng"], fb["rng"])
        for k in ("hostname", "machine_id", "ip", "mac", "key"):
            assert len({src[k], fa[k], fb[k]}) == 3, f"{k} shared: {src[k]} {fa[k]} {fb[k]}"
        assert (fa["hostname"], fb["hostname"]) == ("fa", "fb")
        assert fa["ip"].split("/")[0] == a["guest_ip"] and fb["ip"].split("/")[0] == b["guest_ip"]
        # The snapshot's disk came along (a copy: the forks' writes stay their own).
        assert ex(env, "fa", "cat /root/mark") == "from-source"
        ex(env, "fa", "echo fa > /root/mark && sync")
        assert ex(env, "fb", "cat /root/mark") == "from-source"
        # ssh checks the host key against stoker's known_hosts: the fork's own key.
        for name in ("fa", "fb"):
            r = env.run("vm", "ssh", name, "--", "hostname", timeout=120)
            assert r.stdout.strip() == name
            s = skew(env, name)
            assert s < 2.0, f"{name}'s clock is {s:.2f}s off the host's"
        kh = (env.root / "state" / "stoker" / "ssh" / "known_hosts").read_text()
        assert fa["key"] in kh and fb["key"] in kh

        # A fresh fork of the running source (a snapshot taken for it, not kept).
        t0 = time.monotonic()
        env.run("vm", "fork", "fsrc", "--name", "fc")
        forks.append("fc")
        t_c = time.monotonic() - t0
        assert ex(env, "fc", "hostname") == "fc"
        assert ex(env, "fsrc", "cat /root/mark") == "from-source"  # the source runs on
        snaps = json.loads(env.run("vm", "snapshot", "list", "fsrc", "--json").stdout)
        assert [s["name"] for s in snaps] == ["tpl"]
        print(f"fresh fork of a running VM: {t_c:.2f}s")

        # Refusals: a taken name, then a stopped source (its snapshot still forks).
        r = env.run("vm", "fork", "fsrc", "--name", "fa", check=False)
        assert r.returncode != 0 and "already exists" in r.stderr
        env.run("vm", "stop", "fsrc")
        r = env.run("vm", "fork", "fsrc", "--name", "fz", check=False)
        assert r.returncode != 0 and "not running" in r.stderr and "--snapshot" in r.stderr
        assert vm(env, "fz") is None
        env.run("vm", "start", "fsrc")
    finally:
        for name in [*forks, "fsrc"]:
            env.run("vm", "delete", name, check=False)


def test_a_daemon_killed_mid_fork_leaves_no_half_vm(env: StokerEnv) -> None:
    env.run("vm", "create", "--name", "ksrc")
    try:
        pid = json.loads(env.run("daemon", "status", "--json").stdout)["pid"]
        p = subprocess.Popen(
            env.argv("vm", "fork", "ksrc", "--name", "khalf"),
            env=env.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        vm_dir: Path | None = None
        while time.monotonic() < deadline:
            half = vm(env, "khalf")
            if half is not None:
                vm_dir = env.state_dir / "vms" / str(half["id"])
                if (vm_dir / "qmp.sock").exists() or (vm_dir / ".fork-state.bin").exists():
                    break  # mid-restore: the new QEMU runs, or is about to
            time.sleep(0.05)
        assert vm_dir is not None, "the fork never showed up"
        os.kill(int(pid), signal.SIGKILL)
        p.wait(30)
        assert p.returncode != 0
        # The next command starts a daemon; its reconcile removes the half fork.
        assert vm(env, "khalf") is None
        assert not vm_dir.exists()
        left = env.in_ns("pgrep", "-f", "stoker-khalf", check=False).stdout.split()
        assert left == [], f"the half fork's QEMU is still running: {left}"
        assert ex(env, "ksrc", "echo alive") == "alive"  # resumed if it was left paused
        r = env.run("vm", "fork", "ksrc", "--name", "khalf")  # the name is free again
        assert r.returncode == 0 and ex(env, "khalf", "hostname") == "khalf"
    finally:
        env.run("vm", "delete", "khalf", check=False)
        env.run("vm", "delete", "ksrc", check=False)
