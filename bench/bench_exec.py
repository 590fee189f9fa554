"""Exec round trip through the guest agent vs SSH on the same VM (prints figures; asserts
nothing).

Needs a running VM and its stokerd (the user's, found the way the CLI finds it):

    .venv/bin/python bench/bench_exec.py NAME [-n 20] [--run-rm]

Per round, median/p95/min of:
  * `vm.exec ["true"]` over the daemon RPC (what the CLI and the Python API do),
  * the system `ssh ... true` with stoker's key (a fresh connection, as `vm ssh -- true`),
  * the whole CLI: `stoker vm exec NAME -- true` and `stoker vm exec --ssh NAME -- true`.
`--run-rm` also times what `stoker vm run --rm -- true` does, step by step (create, exec,
delete), with agent readiness next to SSH readiness (+ `vm exec --ssh`), four boots in
the order agent, ssh, ssh, agent.
`--cp-mb N` times `vm cp` of an N MB file in and out next to `ssh cat` both ways.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from stoker.cli.connect import layout_for
from stoker.cli.vm import ssh_argv
from stoker.rpc.client import Client


def _ms(samples: list[float]) -> str:
    s = sorted(samples)
    p95 = s[min(len(s) - 1, int(len(s) * 0.95))]
    return (
        f"median {statistics.median(s) * 1000:8.1f} ms   p95 {p95 * 1000:8.1f} ms   "
        f"min {s[0] * 1000:8.1f} ms   (n={len(s)})"
    )


def _rounds(n: int, fn: Callable[[], None]) -> list[float]:
    fn()  # warm up
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "stoker.cli.main", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("name")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--run-rm", action="store_true")
    ap.add_argument("--cp-mb", type=int, default=0)
    args = ap.parse_args()
    sock = layout_for(argparse.Namespace(system=False)).socket_path

    def rpc_true() -> None:
        with Client(sock) as c:
            r: dict[str, Any] = c.call("vm.exec", {"ref": args.name, "argv": ["true"]})
        if r.get("transport") != "agent" or r.get("exit_code") != 0:
            raise SystemExit(f"vm.exec did not run through the agent: {r}")

    with Client(sock) as c:
        info = c.call("vm.ssh_info", {"ref": args.name, "wait": True})
    ssh = [*ssh_argv(info, tty=False), "true"]

    def ssh_true() -> None:
        subprocess.run(ssh, stdin=subprocess.DEVNULL, check=True, capture_output=True)

    agent = _rounds(args.n, rpc_true)
    over_ssh = _rounds(args.n, ssh_true)
    print(f"agent  vm.exec true (RPC)     {_ms(agent)}")
    print(f"ssh    ssh ... true           {_ms(over_ssh)}")
    ratio = statistics.median(over_ssh) / statistics.median(agent)
    print(f"       ratio (median)         {ratio:.1f}x")
    cli_agent = _rounds(args.n, lambda: _check(_cli("vm", "exec", args.name, "--", "true")))
    cli_ssh = _rounds(args.n, lambda: _check(_cli("vm", "exec", "--ssh", args.name, "--", "true")))
    print(f"cli    vm exec -- true        {_ms(cli_agent)}")
    print(f"cli    vm exec --ssh -- true  {_ms(cli_ssh)}")
    if args.cp_mb:
        _bench_cp(args.name, args.cp_mb, ssh[:-1])
    if args.run_rm:
        _bench_run_rm(sock)
    return 0


def _bench_run_rm(sock: Any) -> None:
    """`vm run --rm -- true` in steps over the RPC, agent readiness vs SSH readiness (twice,
    alternating, since the host's load moves a lot between boots)."""

    def steps(ready: str, name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        t0 = time.perf_counter()
        with Client(sock) as c:
            v = c.call("vm.create", {"name": name, "ready": ready})
        out["create"] = time.perf_counter() - t0
        t = v.get("timings") or {}
        out["boot"] = float(t.get("boot_s", -1))
        out["agent"] = float(t.get("agent_s", -1))
        t1 = time.perf_counter()
        if ready == "agent":
            with Client(sock) as c:
                r = c.call("vm.exec", {"ref": name, "argv": ["true"]})
            assert r.get("exit_code") == 0, r
        else:
            _check(_cli("vm", "exec", "--ssh", name, "--", "true"))
        out["exec"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        _check(_cli("vm", "delete", name))
        out["delete"] = time.perf_counter() - t2
        out["total"] = time.perf_counter() - t0
        return out

    for i, ready in enumerate(("agent", "ssh", "ssh", "agent")):
        s = steps(ready, f"bench-{ready}-{i}")
        print(
            f"vm run --rm -- true, {ready:5} readiness: total {s['total']:5.1f} s = create "
            f"{s['create']:5.1f} s (boot to ready {s['boot']:5.1f} s, agent answered at "
            f"{s['agent']:5.1f} s) + exec {s['exec']:4.1f} s + delete {s['delete']:4.1f} s"
        )


def _bench_cp(name: str, mb: int, ssh: list[str]) -> None:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "payload")
        with open(src, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
        t0 = time.perf_counter()
        _check(_cli("vm", "cp", src, f"{name}:/root/bench-payload"))
        cp_in = time.perf_counter() - t0
        t0 = time.perf_counter()
        _check(_cli("vm", "cp", f"{name}:/root/bench-payload", os.path.join(d, "back")))
        cp_out = time.perf_counter() - t0
        with open(src, "rb") as f:
            t0 = time.perf_counter()
            subprocess.run([*ssh, "cat > /root/bench-ssh"], stdin=f, check=True)
            ssh_in = time.perf_counter() - t0
        with open(os.path.join(d, "back-ssh"), "wb") as f:
            t0 = time.perf_counter()
            subprocess.run([*ssh, "cat /root/bench-ssh"], stdout=f, check=True)
            ssh_out = time.perf_counter() - t0
        _check(_cli("vm", "exec", name, "--", "rm -f /root/bench-payload /root/bench-ssh"))
    for what, cp_s, ssh_s in (("in ", cp_in, ssh_in), ("out", cp_out, ssh_out)):
        print(
            f"cp {what} {mb} MB: vm cp {mb / cp_s:6.1f} MB/s   ssh cat {mb / ssh_s:6.1f} MB/s   "
            f"ratio {ssh_s / cp_s:.2f}x"
        )


def _check(r: subprocess.CompletedProcess[bytes]) -> None:
    if r.returncode != 0:
        raise SystemExit(f"{r.args} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")


if __name__ == "__main__":
    sys.exit(main())
