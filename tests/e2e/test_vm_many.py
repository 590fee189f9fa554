"""Ten concurrent creates on real guests: ten distinct IPs, all reach SSH.

Opt-in (STOKER_E2E_HEAVY=1): meant for hosts where KVM boots or with many cores. Tried on
the 2-core development machine under TCG: all ten VMMs started within a second, but the
guests were still in early userspace after 13 minutes (load ~15). The same orchestration
runs on every CI pass with a stand-in VMM
(tests/integration/test_vm_lifecycle_fake_vmm.py::test_ten_concurrent_creates_get_distinct_ips).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from stokerenv import StokerEnv, destroy_env, make_env

pytestmark = pytest.mark.e2e

N = 10


@pytest.fixture(scope="module")
def heavy_env() -> Iterator[StokerEnv]:
    if os.environ.get("STOKER_E2E_HEAVY") != "1":
        pytest.skip(
            f"{N} concurrent guests need KVM or many cores (under TCG on 2 cores they did not "
            "reach SSH in 13 min): set STOKER_E2E_HEAVY=1 to run; the stand-in-VMM variant "
            "runs always"
        )
    e = make_env("many", extra_config="boot_timeout = 900\n")
    try:
        e.build_image()
        yield e
    finally:
        destroy_env(e)


@pytest.mark.timeout(2700)
def test_ten_concurrent_creates_all_reach_ssh(heavy_env: StokerEnv) -> None:
    e = heavy_env
    procs = [
        subprocess.Popen(
            e.argv("vm", "create", "--name", f"m{i}", "--memory", "512"),
            env=e.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(N)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, err
    vms = json.loads(e.run("vm", "list", "--json").stdout)
    assert len({v["guest_ip"] for v in vms}) == N
    assert all(v["state"] == "running" for v in vms)
    for i in range(N):
        assert e.run("vm", "ssh", f"m{i}", "--", "hostname").stdout.strip() == f"m{i}"
    e.run("vm", "delete", *[f"m{i}" for i in range(N)])
