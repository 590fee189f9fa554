"""Guest-side timings on a real VM (QEMU/TCG here), inside a namespace this script makes.

    .venv/bin/python bench/bench_guest.py [--files 10000] [--mb 200] [--skip-big]

Prints, each next to a baseline measured in the same run on the same VM:
- agent health round trip (`vm health`: CLI -> daemon -> agent over virtio-serial) vs an
  SSH `true` round trip (`ssh VM true`, the system client stoker's `vm ssh` uses);
- workspace prepare of this project's repo and of a generated repo (N files / M MB) vs
  `git archive HEAD | ssh VM tar -x`; re-prepare after changing one file; export of 100
  changed files;
- `vm run --rm -- true` broken down into create (incl. boot + readiness), prepare, command.
Targets (issues 5, 6): prepare <= 1.3x baseline; re-prepare of one file < 1 s + one SSH
round trip; export of 100 files < 1 s + one SSH round trip; agent >= 10x faster than SSH.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # prereq
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from stokerenv import StokerEnv, destroy_env, make_env

ROOT = Path(__file__).resolve().parent.parent


def timed(e: StokerEnv, *args: str) -> float:
    t0 = time.monotonic()
    e.run(*args)
    return time.monotonic() - t0


def ssh_base(e: StokerEnv, name: str) -> list[str]:
    info = json.loads(e.run("vm", "show", name, "--json").stdout)
    st = e.state_dir / "ssh"
    return [
        "ssh",
        "-i",
        str(st / "id_ed25519"),
        "-o",
        f"UserKnownHostsFile={st / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "LogLevel=ERROR",
        "-T",
        f"root@{info['guest_ip']}",
    ]


def in_ns_timed(e: StokerEnv, shell: str) -> float:
    t0 = time.monotonic()
    subprocess.run(
        ["ip", "netns", "exec", e.netns, "bash", "-c", shell], check=True, capture_output=True
    )
    return time.monotonic() - t0


def gen_repo(root: Path, files: int, mb: int) -> Path:
    repo = root / "gen"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    per = max(1, mb * 1024 * 1024 // files)
    rnd = os.urandom(per)
    for i in range(files):
        d = repo / f"d{i % 100:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(rnd[: per // 2] + i.to_bytes(4, "little") * (per // 8))
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@x",
            "commit",
            "-qm",
            "gen",
        ],
        check=True,
    )
    return repo


def bench_prepare(e: StokerEnv, vm: str, repo: Path, label: str) -> None:
    ssh = " ".join(ssh_base(e, vm))
    base = in_ns_timed(
        e,
        f"git -C {repo} archive HEAD | {ssh} 'rm -rf /tmp/base; "
        "mkdir -p /tmp/base && tar -x -C /tmp/base'",
    )
    gp = f"/root/{label}"
    prep = timed(e, "vm", "workspace", "prepare", vm, str(repo), "--guest-path", gp)
    first = sorted(p for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts)[0]
    with open(first, "ab") as f:
        f.write(b"one more line\n")
    again = timed(e, "vm", "workspace", "prepare", vm, str(repo), "--guest-path", gp)
    rt = in_ns_timed(e, f"{ssh} true")
    print(
        f"[{label}] baseline archive|ssh tar: {base:.2f}s | prepare: {prep:.2f}s "
        f"(ratio {prep / base:.2f}x, target <= 1.3x) | re-prepare 1 file: {again:.2f}s "
        f"(target < 1 s + SSH round trip {rt:.2f}s)"
    )
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "--", "."], check=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--skip-big", action="store_true")
    args = ap.parse_args()
    e = make_env("bguest")
    tmp = Path(tempfile.mkdtemp(prefix="stk-bench-"))
    try:
        e.build_image()
        e.run("vm", "create", "--name", "bg", "--memory", "2048", "--disk-size", "4G")
        ssh = " ".join(ssh_base(e, "bg"))
        agent = [timed(e, "vm", "health", "bg") for _ in range(10)]
        sshs = [in_ns_timed(e, f"{ssh} true") for _ in range(10)]
        a, s = statistics.median(agent), statistics.median(sshs)
        print(
            f"health via agent (CLI+RPC+agent): median {a * 1000:.0f} ms | ssh true: "
            f"{s * 1000:.0f} ms | ssh/agent {s / a:.1f}x (target >= 10x for the agent hop)"
        )
        own = tmp / "self"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(own)], check=True)
        bench_prepare(e, "bg", own, "self")
        if not args.skip_big:
            bench_prepare(e, "bg", gen_repo(tmp, args.files, args.mb), "gen")
        # Export of 100 changed files.
        e.run(
            "vm",
            "exec",
            "bg",
            "--",
            "bash",
            "-c",
            "cd /root/self && for f in $(git ls-files | head -100); do echo x >> $f; done",
        )
        t_exp = timed(e, "vm", "workspace", "export", "bg", "--output", str(tmp / "p.patch"))
        print(f"export of 100 changed files: {t_exp:.2f}s (target < 1 s + SSH round trip)")
        e.run("vm", "delete", "bg")
        # vm run -- true, broken down by its own progress stages.
        t0 = time.monotonic()
        r = e.run("vm", "run", str(own), "--rm", "--", "true")
        total = time.monotonic() - t0
        print(f"vm run PATH --rm -- true: total {total:.1f}s; stages:")
        for line in r.stderr.splitlines():
            print(f"    {line.strip()}")
    finally:
        destroy_env(e)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
