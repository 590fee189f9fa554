"""The warm pool on real guests (QEMU/TCG): with `[pool] size = 1` the daemon makes a VM
ahead (QEMU forks: a hidden template VM is booted and snapshotted once, the pool VM is a
fork of it); `vm run --rm -- hostname` takes it (the guest answers with the new name, in a
fraction of a cold boot's time) and the pool fills again, with a second fork of the same
template, whose identity (host key, machine-id, RNG) is not the first one's.

Uses the session's env (namespace, daemon, golden image): the test adds `[pool]` to its
config and restarts the daemon, and puts the config back (the restarted daemon removes the
pool VMs no longer configured) when it is done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from stokerenv import StokerEnv

pytestmark = pytest.mark.e2e

FILL_TIMEOUT = 600.0
# The guest's name, machine-id, host key and 16 bytes of its RNG: one line each.
IDENT = (
    "hostname; cat /etc/machine-id /etc/ssh/ssh_host_ed25519_key.pub; "
    "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"
)


def pool_status(env: StokerEnv) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(env.run("pool", "status", "--json").stdout)
    return out


def wait_ready(env: StokerEnv, want: int, timeout: float = FILL_TIMEOUT) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    st = pool_status(env)
    while time.monotonic() < deadline:
        st = pool_status(env)
        if st and st[0]["ready"] == want and not st[0]["filling"]:
            return st
        if st and st[0]["last_error"]:
            raise AssertionError(f"a pool fill failed: {st}\n{env.daemon_log_tail()}")
        time.sleep(2)
    raise AssertionError(f"the pool did not reach {want} ready: {st}\n{env.daemon_log_tail()}")


@pytest.fixture(scope="module")
def pooled(env: StokerEnv) -> Iterator[StokerEnv]:
    plain = env.config.read_text()
    env.config.write_text(plain + "\n[pool]\nsize = 1\n")
    env.run("daemon", "stop", check=False)
    try:
        yield env
    finally:
        env.config.write_text(plain)
        env.run("daemon", "stop", check=False)
        # The next daemon (no pool configured) removes the pool VMs left running.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and pool_status(env):
            time.sleep(1)


def test_a_warm_vm_is_taken_renamed_and_the_pool_refills(pooled: StokerEnv) -> None:
    env = pooled
    t0 = time.monotonic()
    (st,) = wait_ready(env, 1)
    fill_s = time.monotonic() - t0
    assert (st["image"], st["size"], st["strategy"]) == ("debian-bookworm", 1, "template")
    assert st["fallback"] is None, st
    # The pool VM and the template are nobody's VMs: not listed, nor the template's snapshot.
    assert json.loads(env.run("vm", "list", "--json").stdout) == []
    assert json.loads(env.run("vm", "snapshot", "list", "--json").stdout) == []

    t0 = time.monotonic()
    r = env.run("vm", "run", "--rm", "--name", "warm1", "--", "sh", "-c", IDENT, timeout=300)
    took = time.monotonic() - t0
    print(f"pool fill {fill_s:.1f}s; vm run --rm -- hostname from the pool {took:.2f}s")
    assert r.stdout.splitlines()[0] == "warm1", r.stderr
    assert "took a warm VM" in r.stderr, r.stderr
    assert "deleted warm1" in r.stderr
    # A cold boot here is ~25 s of guest boot alone; a take is a rename and one exec.
    assert took < 10, f"vm run from the pool took {took:.1f}s:\n{r.stderr}"

    t0 = time.monotonic()
    st = wait_ready(env, 1)[0]
    refill_s = time.monotonic() - t0
    assert st["takes"] == 1 and st["failures"] == 0 and st["strategy"] == "template", st
    r2 = env.run("vm", "run", "--rm", "--name", "warm2", "--", "sh", "-c", IDENT, timeout=300)
    print(f"refill (a fork of the template) {refill_s:.1f}s")
    assert "took a warm VM" in r2.stderr, r2.stderr
    one, two = r.stdout.splitlines(), r2.stdout.splitlines()
    assert two[0] == "warm2" and len(one) == len(two) == 4, (one, two)
    # Two forks of one template: their own machine-id, host key and RNG output.
    assert one[1] != two[1] and one[2] != two[2] and one[3] != two[3], (one, two)
    st = wait_ready(env, 1)[0]
    assert st["takes"] == 2 and st["failures"] == 0
    assert json.loads(env.run("vm", "list", "--json").stdout) == []
    doctor = {c["name"]: c for c in json.loads(env.run("doctor", "--json", check=False).stdout)}
    assert doctor["pool"]["status"] == "PASS"
    assert "debian-bookworm 1/1 ready" in doctor["pool"]["message"]
