"""`vm fork` against a cold `vm create` on real guests (QEMU/TCG here), in one run, inside
a network namespace this script creates and removes.

    .venv/bin/python bench/bench_fork.py [--forks 3] [--memory 1024]

The baseline is measured first in the same run: a cold `vm create` (boot until SSH answers,
as `vm fork` also waits for) followed by a `vm exec true`. Then, from that VM:

- `vm fork SRC --name N --snapshot tpl` (from a kept snapshot: disk copies, restore,
  identity) and `vm fork SRC --name N` (a fresh snapshot of the running source first),
  each timed to a usable VM: the command returned (the VM answered SSH) and `vm exec
  true` answered;
- the daemon's own split of a fork (`timings.restore_identity_s`: QEMU restore with the
  link down, agent answer, identity applied, link up);
- the forked guest's clock offset from the host's.

Target (issue 13): `vm fork` <= 1 s to a usable VM under TCG. Asserts nothing.
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


def timed(e: StokerEnv, *args: str) -> tuple[float, str]:
    t0 = time.monotonic()
    r = e.run(*args, timeout=900)
    return time.monotonic() - t0, r.stdout


def usable(e: StokerEnv, *args: str) -> tuple[float, float, dict[str, object]]:
    """Seconds until the command returned, and until `vm exec true` answered after it."""
    t0 = time.monotonic()
    out = json.loads(e.run(*args, "--json", timeout=900).stdout)
    t_cmd = time.monotonic() - t0
    e.run("vm", "exec", str(out["name"]), "--", "true", timeout=120)
    return t_cmd, time.monotonic() - t0, out


def skew(e: StokerEnv, name: str) -> float:
    t0 = time.time()
    g = float(e.run("vm", "exec", name, "--", "date +%s.%N").stdout)
    t1 = time.time()
    return max(0.0, t0 - g, g - t1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forks", type=int, default=3, help="forks of each kind")
    ap.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    args = ap.parse_args()
    e = make_env("bfork")
    names: list[str] = []
    try:
        print("building the golden image (cached apt)...", flush=True)
        e.build_image()
        cold_cmd, cold, _ = usable(
            e, "vm", "create", "--name", "bsrc", "--memory", str(args.memory)
        )
        names.append("bsrc")
        print(f"baseline  cold vm create (to SSH): {cold_cmd:.2f}s, exec answers {cold:.2f}s")
        snap_s, _ = timed(e, "vm", "snapshot", "bsrc", "--name", "tpl")
        print(f"vm snapshot (kept, the template): {snap_s:.2f}s")
        rows: dict[str, list[tuple[float, float, float, float]]] = {"snapshot": [], "fresh": []}
        for i in range(args.forks):
            for kind in ("snapshot", "fresh"):
                name = f"bf{kind[0]}{i}"
                extra = ["--snapshot", "tpl"] if kind == "snapshot" else []
                t_cmd, t_use, out = usable(e, "vm", "fork", "bsrc", "--name", name, *extra)
                names.append(name)
                timings = out.get("timings") or {}
                inner = float(timings.get("restore_identity_s", -1.0)) if timings else -1.0
                rows[kind].append((t_cmd, t_use, inner, skew(e, name)))
                print(
                    f"fork ({kind:8}) {name}: command {t_cmd:.2f}s, exec answers {t_use:.2f}s, "
                    f"restore+identity {inner:.2f}s, clock offset {rows[kind][-1][3]:.3f}s; "
                    f"daemon timings {timings}",
                    flush=True,
                )
                e.run("vm", "delete", name)
                names.remove(name)
        print("\nsummary (median of each):")
        print(f"  cold vm create -> exec answers     {cold:7.2f}s  (1.00x)")
        for kind, r in rows.items():
            use = statistics.median(x[1] for x in r)
            inner = statistics.median(x[2] for x in r)
            print(
                f"  vm fork ({kind:8}) -> exec answers {use:7.2f}s  ({use / cold:.2f}x of cold;"
                f" restore+identity {inner:.2f}s; target <= 1 s)"
            )
    finally:
        for n in names:
            e.run("vm", "delete", n, check=False)
        destroy_env(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
