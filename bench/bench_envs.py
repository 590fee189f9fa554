"""Derived images: build time next to a plain golden build, and cached recipe resolution.

    .venv/bin/python bench/bench_envs.py [--packages make,gcc,libc6-dev] [--resolves 10]

Runs a daemon in the host namespace of a throwaway state dir (package builds need the
Debian mirror; no bridge, tap or guest is made), with the test apt cache
($STOKER_TEST_CACHE/apt). In one run: the golden build (`image build debian-bookworm`,
then `--force` so both builds start equally warm), the derived build with packages
(`image build --recipe`), and then the same recipe resolved again N times (what `vm run
./repo` pays before creating the VM when the image is cached). apt's own share is read
from the derived build's progress (download + install stages). Targets (issue 11):
derived build <= golden + apt install + 20 %; cached resolution < 200 ms. Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # prereq
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from stokerenv import StokerEnv, destroy_env, make_env


def host(e: StokerEnv, *args: str, timeout: float = 3600) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run(
        e.argv(*args, host=True), env=e.env, capture_output=True, text=True, timeout=timeout
    )
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"stoker {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return dt, r.stderr


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packages", default="make,gcc,libc6-dev")
    ap.add_argument("--resolves", type=int, default=10)
    args = ap.parse_args()
    e = make_env("benv")
    try:
        repo = e.root / "repo"
        repo.mkdir()
        pk = ", ".join(f'"{p}"' for p in args.packages.split(","))
        (repo / "stoker.toml").write_text(f"[image]\npackages = [{pk}]\n")
        host(e, "image", "build", "debian-bookworm")  # warms the apt cache for both
        golden_s, _ = host(e, "image", "build", "debian-bookworm", "--force")
        derived_s, log = host(e, "image", "build", "--recipe", str(repo))
        # Resolution as vm run does it: one CLI process, one image.build RPC, cache hit.
        times = []
        for _ in range(args.resolves):
            dt, out = host(e, "image", "build", "--recipe", str(repo))
            assert "up to date" in out
            times.append(dt)
        from stoker.recipe import load_recipe
        from stoker.rpc.client import Client

        recipe = load_recipe(repo)
        assert recipe is not None
        sock = e.state_dir / "stokerd.sock"
        rpc = []
        with Client(sock) as c:
            for _ in range(args.resolves):
                t0 = time.monotonic()
                c.call("image.build", recipe.build_params())
                rpc.append(time.monotonic() - t0)
        print(f"golden build (--force, warm cache): {golden_s:7.1f} s")
        print(
            f"derived build (+{args.packages}):   {derived_s:7.1f} s "
            f"({derived_s / golden_s:.2f}x golden, +{derived_s - golden_s:.1f} s)"
        )
        print(
            f"cached recipe resolution, CLI:     median {statistics.median(times) * 1000:6.0f} ms"
            f"  max {max(times) * 1000:6.0f} ms  (n={len(times)})"
        )
        print(
            f"cached recipe resolution, RPC:     median {statistics.median(rpc) * 1000:6.1f} ms"
            f"  max {max(rpc) * 1000:6.1f} ms"
        )
        lines = [ln for ln in log.splitlines() if "packages" in ln][-3:]
        print("derived build progress (last package lines):", *lines, sep="\n  ")
    finally:
        subprocess.run(e.argv("daemon", "stop", host=True), env=e.env, capture_output=True)
        destroy_env(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
