"""`vm exec` inside a workload root vs the system root, on real guests (QEMU/TCG).

    .venv/bin/python bench/bench_workload.py [--runs 15]

In a namespace of its own (tests/e2e/stokerenv.py): the golden image, and a busybox-static
OCI image without sshd (the e2e test's, pushed to a local docker-registry and pulled as a
workload root), both built/pulled by a host-namespace daemon. Two VMs of the same shape
(1 vCPU, 1 GiB): `sys1` on the golden image, `wl1` on the workload root.

1. End to end: `stoker vm exec VM -- CMD` from the CLI, for `true` and `sleep 0.5`, on
   each VM, interleaved.
2. Same VM, agent only: the daemon is stopped (its VMs keep running) and exec frames go
   straight to wl1's agent, with and without `root: "workload"`, so the only difference
   is entering the workload root (`unshare --mount --root --wd`).

Prints medians, the overhead in ms and the ratio. Targets (issue 11): overhead < 5 % of
the command's time and < 50 ms absolute. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration" / "oci"))

from ocitestlib import RegistryProcess
from stokerenv import StokerEnv, destroy_env, make_env
from test_workload_e2e import push_tiny


def host(e: StokerEnv, *args: str, timeout: float = 3600) -> str:
    r = subprocess.run(
        e.argv(*args, host=True), env=e.env, capture_output=True, text=True, timeout=timeout
    )
    if r.returncode != 0:
        raise SystemExit(f"stoker {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def timed(e: StokerEnv, *args: str) -> float:
    t0 = time.monotonic()
    e.run(*args)
    return time.monotonic() - t0


def med(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def report(label: str, base: list[float], wl: list[float]) -> None:
    b, w = med(base), med(wl)
    print(
        f"{label:34s} system {b:8.1f} ms  workload {w:8.1f} ms  "
        f"overhead {w - b:+7.1f} ms ({(w - b) / b * 100:+5.1f} %, ratio {w / b:.3f})"
    )


async def agent_runs(sock: Path, runs: int) -> dict[str, tuple[list[float], list[float]]]:
    from stoker.daemon.agent import AgentClient, ExecSpec, SerialTransport

    client = AgentClient(SerialTransport(sock), name="wl1")
    out: dict[str, tuple[list[float], list[float]]] = {}
    try:
        await client.healthz(10)
        for label, argv in (("true", ["true"]), ("sleep 0.5", ["sleep", "0.5"])):
            base: list[float] = []
            wl: list[float] = []
            for _ in range(runs):
                for root, acc in ((None, base), ("workload", wl)):
                    spec = ExecSpec(argv=argv, cwd="/", env={"PATH": "/bin"}, root=root)
                    t0 = time.monotonic()
                    s = await client.exec(spec, 30)
                    async for _ in s.output():
                        pass
                    acc.append(time.monotonic() - t0)
                    assert s.status is not None and s.status.exit_code == 0, s.status
            out[label] = (base, wl)
    finally:
        await client.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    e = make_env("bwl", 'boot_timeout = "8m"\n')
    reg = RegistryProcess(e.root / "registry").start()
    try:
        host(e, "image", "build", "debian-bookworm")
        asyncio.run(push_tiny(reg.host))
        host(e, "image", "pull", f"{reg.host}/tiny/busybox:1", "--name", "tiny", timeout=600)
        host(e, "daemon", "stop", timeout=60)
        e.run("vm", "create", "--name", "sys1", timeout=900)
        e.run("vm", "create", "--name", "wl1", "--image", "tiny", timeout=900)
        print("1. CLI `stoker vm exec VM -- CMD` (sys1: golden image, wl1: workload root)")
        print(
            "   (not the same work: a command line runs under `bash -lc`, a login shell, in a\n"
            "   system root, and under the image's `/bin/sh -c` in a workload root)"
        )
        for label, cmd in (("true", ["true"]), ("sleep 0.5", ["sleep", "0.5"])):
            base: list[float] = []
            wl: list[float] = []
            for _ in range(args.runs):
                base.append(timed(e, "vm", "exec", "sys1", "--", *cmd))
                wl.append(timed(e, "vm", "exec", "wl1", "--", *cmd))
            report(f"  {label}", base, wl)
        vm_dir = Path(json.loads(e.run("vm", "show", "wl1", "--json").stdout)["vm_dir"])
        e.run("daemon", "stop", timeout=60)
        print("2. agent only, same VM (wl1), exec frames with and without root=workload")
        for label, (base, wl) in asyncio.run(agent_runs(vm_dir / "agent.sock", args.runs)).items():
            report(f"  {label}", base, wl)
    finally:
        reg.stop()
        destroy_env(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
