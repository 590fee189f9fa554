"""Benchmark the workspace transfer locally: the "guest" is a directory on this machine.

For (a) a generated repository (default 10,000 files / 200 MB) and (b) this project's own
checkout, measures in the same run:

- prepare: inspect + list + state probe + plan + payload streamed into the import script,
  next to the baseline `git archive HEAD | tar -x -C DIR`;
- re-prepare after changing one file;
- export of 100 changed files.

Prints figures and ratios only; nothing is asserted. Run:
    .venv/bin/python bench/bench_workspace_local.py [--files N] [--mb M] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from stoker.daemon.workspace import (
    build_payload,
    check_import_result,
    guest_export_script,
    guest_import_script,
    guest_state_script,
    inspect_repo,
    list_files,
    parse_export_output,
    parse_guest_state,
    plan_transfer,
)
from stoker.runner import Runner


async def run_guest(
    script: str, payload: AsyncIterator[bytes] | None = None
) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin = proc.stdin

    async def feed() -> None:
        if payload is not None:
            async for chunk in payload:
                stdin.write(chunk)
                await stdin.drain()
        stdin.close()

    out, err, _ = await asyncio.gather(proc.stdout.read(), proc.stderr.read(), feed())
    return await proc.wait(), out, err


async def prepare(host: Path, guest: Path) -> tuple[float, int, str]:
    """One full prepare; returns (seconds, payload bytes, mode)."""
    t0 = time.perf_counter()
    runner = Runner()
    info = await inspect_repo(runner, host)
    files = await list_files(runner, info.root, False)
    state = parse_guest_state(*(await run_guest(guest_state_script(str(guest)))))
    plan = await plan_transfer(runner, info, files, state)
    size = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal size
        async for chunk in build_payload(runner, plan):
            size += len(chunk)
            yield chunk

    check_import_result(*(await run_guest(guest_import_script(str(guest), plan), counted())))
    return time.perf_counter() - t0, size, plan.mode


def baseline(host: Path, dest: Path) -> float:
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    subprocess.run(f"git -C {host} archive HEAD | tar -x -C {dest}", shell=True, check=True)
    return time.perf_counter() - t0


def generate(root: Path, n_files: int, total_mb: int) -> None:
    """A repository of n_files: 1% 1 MB random binaries, the rest text of varying size."""
    rnd = random.Random(42)
    words = [
        "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rnd.randint(2, 10)))
        for _ in range(5000)
    ]
    n_bin = max(1, n_files // 100)
    text_total = max(0, total_mb * 1024 * 1024 - n_bin * 1024 * 1024)
    avg = text_total // max(1, n_files - n_bin)
    for i in range(n_files):
        d = root / f"d{i % 50:02d}" / f"s{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        if i % 100 == 0:
            (d / f"b{i:05d}.bin").write_bytes(os.urandom(1024 * 1024))
            continue
        size = rnd.randint(avg // 4, avg * 7 // 4)
        lines = []
        n = 0
        while n < size:
            line = " ".join(rnd.choice(words) for _ in range(12)) + "\n"
            lines.append(line)
            n += len(line)
        (d / f"f{i:05d}.txt").write_text("".join(lines)[:size])
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.org"}
    env |= {"GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.org"}
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, check=True)
    # No background auto-gc racing the measurements; pack once, as a clone would be.
    subprocess.run(["git", "config", "gc.auto", "0"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "-m", "generated"], cwd=root, check=True, env=env)
    subprocess.run(["git", "repack", "-a", "-d", "-q"], cwd=root, check=True)


def tracked(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True)
    return [os.fsdecode(p) for p in out.stdout.split(b"\0") if p]


async def bench_repo(label: str, host: Path, work: Path, repeat: int) -> None:
    files = tracked(host)
    size = sum(os.lstat(host / f).st_size for f in files)
    print(f"\n== {label}: {len(files)} files, {size / 1e6:.1f} MB in HEAD")
    ours: list[float] = []
    base: list[float] = []
    payload = 0
    for i in range(repeat):
        dest = work / f"base{i}"
        base.append(baseline(host, dest))
        shutil.rmtree(dest)
        guest = work / f"guest{i}" / "repo"
        t, payload, _mode = await prepare(host, guest)
        ours.append(t)
        if i + 1 < repeat:
            shutil.rmtree(guest.parent)
    guest = work / f"guest{repeat - 1}" / "repo"
    b, o = min(base), min(ours)
    print(f"baseline git archive | tar -x : {b:7.3f} s")
    print(f"prepare (fresh)               : {o:7.3f} s   payload {payload / 1e6:.1f} MB")
    print(f"ratio prepare / baseline      : {o / b:7.2f}")

    victim = host / files[len(files) // 2]
    original = victim.read_bytes()
    victim.write_bytes(original + b"\none more line\n")
    try:
        t, payload, mode = await prepare(host, guest)
    finally:
        victim.write_bytes(original)
    print(f"re-prepare, 1 file changed    : {t:7.3f} s   payload {payload} B ({mode})")
    t, payload, mode = await prepare(host, guest)
    print(f"re-prepare, 1 file reverted   : {t:7.3f} s   payload {payload} B ({mode})")
    t, payload, mode = await prepare(host, guest)
    print(f"re-prepare, nothing changed   : {t:7.3f} s   payload {payload} B ({mode})")

    # 100 text files spread over the tree (the generated repo keeps its binaries together).
    texts = [f for f in files if not os.path.islink(guest / f) and not f.endswith(".bin")]
    changed = texts[:: max(1, len(texts) // 100)][:100]
    for f in changed:
        with open(guest / f, "ab") as fh:
            fh.write(b"\nguest edit\n")
    t0 = time.perf_counter()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=guest, check=True, capture_output=True, text=True
    ).stdout.strip()
    res = parse_export_output(*(await run_guest(guest_export_script(str(guest), head))))
    t = time.perf_counter() - t0
    print(f"export, {len(res.files)} files changed     : {t:7.3f} s   patch {len(res.patch)} B")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--own", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stoker-bench-ws-") as tmp:
        work = Path(tmp)
        gen = work / "generated"
        gen.mkdir()
        t0 = time.perf_counter()
        generate(gen, args.files, args.mb)
        print(f"(generated {args.files} files / {args.mb} MB in {time.perf_counter() - t0:.1f} s)")
        await bench_repo("generated repository", gen, work / "g", args.repeat)
        own = work / "own"
        # A clone of this project's HEAD, so the benchmark never touches the real checkout.
        subprocess.run(["git", "clone", "-q", str(args.own), str(own)], check=True)
        await bench_repo("this project's repository", own, work / "o", args.repeat)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
