"""Snapshots on a real guest (issue 13 item 2): one VM booted under QEMU/TCG, a file on
its disk and state only in RAM (a tmpfs file and a running `sleep` with a known pid),
`vm snapshot`, stop, change the disk, `vm start --from-snapshot`: the RAM state, the
process and the disk as they were at the snapshot are back, SSH works and the clock is
the host's. Refusals (stopped VM, another QEMU version) are checked on the same VM."""

from __future__ import annotations

import json
import time

import pytest
from stokerenv import StokerEnv

pytestmark = pytest.mark.e2e


def guest(e: StokerEnv, name: str, cmd: str, check: bool = True) -> str:
    return e.run("vm", "ssh", name, "--", "bash", "-c", cmd, check=check, timeout=120).stdout


def test_snapshot_then_start_from_it(env: StokerEnv) -> None:
    env.run("vm", "create", "--name", "snap1")
    try:
        guest(env, "snap1", "echo on-disk > /root/disk.txt && sync")
        guest(env, "snap1", "mkdir -p /run/ram && echo in-ram > /run/ram/f")
        pid = guest(env, "snap1", "setsid sleep 100000 >/dev/null 2>&1 < /dev/null & echo $!")
        pid = pid.strip()
        assert pid.isdigit()

        t0 = time.monotonic()
        out = json.loads(env.run("vm", "snapshot", "snap1", "--name", "s1", "--json").stdout)
        snap_s = time.monotonic() - t0
        assert out["name"] == "s1" and out["meta"]["vmm"] == "qemu"
        # The source keeps running after its snapshot.
        assert guest(env, "snap1", "cat /run/ram/f").strip() == "in-ram"
        listed = json.loads(env.run("vm", "snapshot", "list", "snap1", "--json").stdout)
        assert [s["name"] for s in listed] == ["s1"]

        guest(env, "snap1", "echo after > /root/disk.txt && rm /run/ram/f && sync")
        env.run("vm", "stop", "snap1")
        r = env.run("vm", "snapshot", "snap1", check=False)
        assert r.returncode != 0 and "not running" in r.stderr

        t0 = time.monotonic()
        env.run("vm", "start", "snap1", "--from-snapshot", "s1")
        restore_s = time.monotonic() - t0
        assert guest(env, "snap1", "cat /run/ram/f").strip() == "in-ram"
        assert guest(env, "snap1", "cat /root/disk.txt").strip() == "on-disk"
        assert guest(env, "snap1", f"cat /proc/{pid}/cmdline | tr '\\0' ' '").split()[:2] == [
            "sleep",
            "100000",
        ]
        skew = abs(float(guest(env, "snap1", "date +%s.%N")) - time.time())
        assert skew < 5, f"guest clock {skew:.1f}s off after the restore"
        print(f"snapshot {snap_s:.1f}s, start --from-snapshot {restore_s:.1f}s, skew {skew:.2f}s")

        env.run("vm", "snapshot", "delete", "snap1", "s1")
        assert json.loads(env.run("vm", "snapshot", "list", "--json").stdout) == []
    finally:
        env.run("vm", "delete", "snap1", check=False)
