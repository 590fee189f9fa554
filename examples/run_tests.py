"""Run a repository's tests in a throwaway stoker VM and print the result.

    python examples/run_tests.py [REPO] [-- COMMAND...]

REPO defaults to the current directory (a git work tree); COMMAND defaults to `make test`
when the repo has a Makefile, else `./run-tests.sh`. Output streams as it comes; the exit
status is the command's. The VM is deleted at the end (and by its TTL if this dies).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import stoker


def main(argv: list[str]) -> int:
    cmd: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1 :]
    repo = Path(argv[0] if argv else ".").resolve()
    if not cmd:
        cmd = ["make", "test"] if (repo / "Makefile").exists() else ["./run-tests.sh"]
    t0 = time.monotonic()
    with stoker.sandbox(repo=repo, ttl="1h") as vm:
        print(f"[{vm.name}] ready in {time.monotonic() - t0:.1f}s; running {' '.join(cmd)}")
        gen = vm.stream(cmd, timeout=600)
        while True:
            try:
                fd, chunk = next(gen)
            except StopIteration as done:
                result: stoker.ExecResult = done.value
                break
            out = sys.stdout.buffer if fd == 1 else sys.stderr.buffer
            out.write(chunk)
            out.flush()
    verdict = "PASSED" if result.ok else ("TIMED OUT" if result.timed_out else "FAILED")
    print(f"[{vm.name}] {verdict} (exit {result.exit_code}) in {time.monotonic() - t0:.1f}s")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
