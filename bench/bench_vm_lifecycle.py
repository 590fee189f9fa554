"""VM lifecycle timings on real guests (QEMU/TCG here), inside a network namespace this
script creates and removes.

    .venv/bin/python bench/bench_vm_lifecycle.py [--boots 2] [--idle-vms 10]

Prints, per create: stoker's own work before the VMM starts (pre-boot), guest boot to SSH,
the agent's /healthz answer time, and the readiness-detection lag (how long after sshd in
the guest started listening stoker noticed: bounded by its 0.1 s poll plus one SSH
handshake, measured here as a fresh SSH `true` round trip). Then stop (normal and with an
unreachable guest), delete, and the daemon's RSS with 10 VMs. The baseline in the same run
is the guest boot itself: stoker's overhead is reported as a ratio against it.
Targets (issue 4): pre-boot < 200 ms warm, lag < 150 ms, stop < 2 s worst case,
delete < 500 ms. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # prereq
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from stokerenv import StokerEnv, destroy_env, make_env


def timed(e: StokerEnv, *args: str) -> float:
    t0 = time.monotonic()
    e.run(*args)
    return time.monotonic() - t0


def daemon_rss(e: StokerEnv) -> int:
    pid = int((e.state_dir / "stokerd.pid").read_text())
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def daemon_cpu_s(e: StokerEnv) -> float:
    import os

    pid = int((e.state_dir / "stokerd.pid").read_text())
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boots", type=int, default=2)
    ap.add_argument("--idle-vms", type=int, default=10)
    args = ap.parse_args()
    e = make_env("bench")
    try:
        t0 = time.monotonic()
        e.build_image()
        print(f"image build (warm apt cache): {time.monotonic() - t0:.1f}s")
        e.run("vm", "list")  # start the daemon in the namespace; warms the tap pool later
        rows = []
        for i in range(args.boots):
            t0 = time.monotonic()
            out = json.loads(e.run("vm", "create", "--name", f"b{i}", "--json").stdout)
            total = time.monotonic() - t0
            tm = out.get("timings") or {}
            t1 = time.monotonic()
            e.run("vm", "ssh", f"b{i}", "--", "true")
            ssh_rt = time.monotonic() - t1
            rows.append(
                (
                    total,
                    tm.get("pre_boot_s", 0.0),
                    tm.get("boot_s", 0.0),
                    tm.get("agent_s", -1.0),
                    ssh_rt,
                )
            )
            print(
                f"create b{i}: total {total:.2f}s | pre-boot {tm.get('pre_boot_s', 0):.3f}s"
                f" | boot->ssh {tm.get('boot_s', 0):.2f}s | agent {tm.get('agent_s', -1):.2f}s"
                f" | ssh round trip (lag bound) {ssh_rt * 1000:.0f} ms"
            )
        boots = [r[2] for r in rows]
        pre = [r[1] for r in rows]
        print(
            f"median pre-boot {statistics.median(pre) * 1000:.0f} ms (target < 200 ms); "
            f"overhead ratio (total / guest boot) "
            f"{statistics.median([r[0] for r in rows]) / statistics.median(boots):.3f}"
        )
        window = 30.0
        c0 = daemon_cpu_s(e)
        time.sleep(window)
        used = daemon_cpu_s(e) - c0
        print(
            f"daemon CPU with {args.boots} running VMs at the default stats interval: "
            f"{100 * used / window:.2f}% of one CPU ({100 * used / window / args.boots:.2f}% "
            f"per VM; x10 VMs ~ {1000 * used / window / args.boots:.1f}%)"
        )
        stop_normal = timed(e, "vm", "stop", "b0")
        e.run("vm", "start", "b0")
        e.run(
            "vm",
            "ssh",
            "b0",
            "--",
            "bash",
            "-c",
            "systemctl stop ssh.socket ssh.service 2>/dev/null; pkill -x sshd; true",
            check=False,
        )
        stop_unreach = timed(e, "vm", "stop", "b0")
        print(
            f"stop: normal {stop_normal:.2f}s, unreachable guest {stop_unreach:.2f}s (target < 2 s)"
        )
        for i in range(args.idle_vms):
            e.run("vm", "create", "--name", f"idle{i}", "--no-start")
        print(
            f"daemon RSS with {args.idle_vms} created + {args.boots - 1} running VMs: "
            f"{daemon_rss(e) / 1024**2:.1f} MiB"
        )
        dels = [timed(e, "vm", "delete", f"idle{i}") for i in range(args.idle_vms)]
        print(
            f"delete (stopped VM, incl. CLI start): median {statistics.median(dels) * 1000:.0f}"
            " ms (target < 500 ms)"
        )
        print(
            f"delete running VM: {timed(e, 'vm', 'delete', 'b1') * 1000:.0f} ms"
            if args.boots > 1
            else ""
        )
    finally:
        destroy_env(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
