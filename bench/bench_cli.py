"""CLI latency and RPC throughput, with a daemon running in an isolated layout.

    .venv/bin/python bench/bench_cli.py [--runs 30] [--rpc-seconds 2]

Prints figures only; asserts nothing. Targets (issue 2): `stoker vm list` median under
120 ms here and under 3x a bare interpreter start measured in the same run; (issue 15) a
completion TAB under 150 ms.

The stoker package's modules are byte-compiled first, as an installed wheel has them (a
checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module on every
start, ~30 ms here); `--no-compile` measures without that.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stoker.layout import Layout
from stoker.rpc.client import Client

BIN = Path(sys.executable).parent


def stoker_argv() -> list[str]:
    exe = BIN / "stoker"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stoker.cli.main"]


def isolated_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HOME=str(root / "h"),
        XDG_CONFIG_HOME=str(root / "c"),
        XDG_STATE_HOME=str(root / "s"),
        XDG_CACHE_HOME=str(root / "k"),
        XDG_RUNTIME_DIR=str(root / "r"),
    )
    for k in ("STOKER_CONFIG", "STOKER_SYSTEM"):
        env.pop(k, None)
    return env


def wall_times(argv: list[str], env: dict[str, str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
        )
        out.append(time.perf_counter() - t0)
    return out


def fmt(ts: list[float]) -> str:
    ms = sorted(t * 1000 for t in ts)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"median {statistics.median(ms):7.1f} ms   min {ms[0]:7.1f}   p90 {p90:7.1f}"


def rpc_rate(socket_path: Path, seconds: float) -> tuple[int, float]:
    with Client(socket_path, timeout=5) as c:
        c.call("daemon.status")  # warm
        n = 0
        t0 = time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            c.call("daemon.status")
            n += 1
    return n, elapsed


def importtime_top(env: dict[str, str], k: int = 12) -> list[tuple[int, int, str]]:
    """(cumulative us, self us, module) of the slowest imports of `stoker vm list`."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stoker.cli.main", "vm", "list"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(2)), int(m.group(1)), m.group(3), m.group(4)))
    # top-level entries only (least indented) give the honest cumulative picture
    top = sorted(rows, key=lambda x: -x[0])[:k]
    return [(c, s, f"{ind[1:]}{name}") for c, s, ind, name in top]


def _is_script(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def stop_daemon(layout: Layout) -> None:
    try:
        pid = int(layout.pid_path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"stoker" not in cmd:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(500):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rpc-seconds", type=float, default=2.0)
    ap.add_argument("--no-importtime", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="do not byte-compile stoker first")
    args = ap.parse_args()
    if not args.no_compile:
        import compileall

        import stoker

        compileall.compile_dir(str(Path(stoker.__file__).parent), quiet=1)
        print(f"byte-compiled {Path(stoker.__file__).parent} (as an install has it)")

    root = Path(tempfile.mkdtemp(prefix="stkb", dir="/tmp"))
    env = isolated_env(root)
    layout = Layout.resolve(env=env)
    try:
        t0 = time.perf_counter()
        subprocess.run([*stoker_argv(), "vm", "list"], env=env, check=True, capture_output=True)
        first_ms = (time.perf_counter() - t0) * 1000
        print(f"daemon auto-start + first `stoker vm list`: {first_ms:.0f} ms")

        # interleave warm-ups, then measure both in the same run
        wall_times([sys.executable, "-c", "pass"], env, 3)
        wall_times([*stoker_argv(), "vm", "list"], env, 3)
        # The honest baseline is the interpreter stoker itself runs on; `python3` on PATH
        # may be another build or a wrapper (pyenv shims are shell scripts).
        path_py = shutil.which("python3")
        rows: list[tuple[str, list[float]]] = []
        rows.append(
            (
                f"{sys.executable} -c pass",
                wall_times([sys.executable, "-c", "pass"], env, args.runs),
            )
        )
        if path_py:
            real = os.path.realpath(path_py)
            note = " (shell wrapper)" if _is_script(real) else ""
            rows.append(
                (
                    f"python3 -c pass [{path_py}{note}]",
                    wall_times([path_py, "-c", "pass"], env, args.runs),
                )
            )
        cli = wall_times([*stoker_argv(), "vm", "list"], env, args.runs)
        rows.append(("stoker vm list", cli))
        rows.append(
            ("stoker ps --json", wall_times([*stoker_argv(), "ps", "--json"], env, args.runs))
        )
        # One completion TAB (issue 15 target < 150 ms): `stoker vm show <TAB>` asks the
        # running daemon for VM names.
        tab = [*stoker_argv(), "__complete", "bash", "3", "stoker", "vm", "show", ""]
        rows.append(("TAB: stoker vm show <TAB>", wall_times(tab, env, args.runs)))

        print(f"\nwall time, N={args.runs} each")
        width = max(len(r[0]) for r in rows)
        for label, ts in rows:
            print(f"  {label.ljust(width)}  {fmt(ts)}")
        med = statistics.median(cli)
        for label, ts in rows[: 2 if path_py else 1]:
            base = label.split(" -c")[0]
            print(f"  ratio stoker vm list / {base}: {med / statistics.median(ts):.2f}x")
        print(f"  targets: median < 120 ms (now {med * 1000:.0f} ms), < 3x the same interpreter")

        n, el = rpc_rate(layout.socket_path, args.rpc_seconds)
        print(f"\nRPC daemon.status over one connection: {n} calls in {el:.2f} s = {n / el:,.0f}/s")
        print(f"  mean round trip {el / n * 1e6:.0f} us")

        if not args.no_importtime:
            print("\nslowest imports of `stoker vm list` (python -X importtime, cumulative us):")
            for cum, self_us, name in importtime_top(env):
                print(f"  {cum:8d} {self_us:8d}  {name}")
    finally:
        stop_daemon(layout)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
