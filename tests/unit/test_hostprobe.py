"""`stoker.hostprobe`: doctor's checks one function each, below the daemon (issue 10 item 5)."""

from __future__ import annotations

import asyncio
import inspect
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stoker.config import parse_config
from stoker.hostprobe import doctor
from stoker.hostprobe.doctor import CHECKS, Check, CheckFn, Context, doctor_check, run_doctor
from stoker.layout import Layout
from stoker.runner import RecordingRunner
from stoker.store import SCHEMA_VERSION

pytestmark = pytest.mark.unit

# The order doctor prints (and `--json` lists) its checks: part of its output.
ORDER = [
    "kvm",
    "vsock",
    "tun",
    "firecracker",
    "jailer",
    "qemu",
    "vmm",
    "confinement",
    "fc-confinement",
    "host-tools",
    "optional-tools",
    "nftables",
    "device-mapper",
    "loop",
    "bridge",
    "network-policy",
    "helper",
    "daemon",
    "pool",
    "dns",
    "guest-dns",
    "resolver",
    "state-store",
    "default-image",
    "default-kernel",
    "disk-space",
    "vm-defaults",
]


def script(dir: Path, name: str, body: str) -> str:
    p = dir / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def doc(
    layout: Layout, data: dict[str, Any] | None = None, *only: CheckFn, **kw: Any
) -> dict[str, Check]:
    """Run doctor (or only the checks given: the full run probes the real QEMU, slowly)."""
    cfg = parse_config(data or {}, cpus=8, mem_bytes=16 * 1024**3)
    return by_name(asyncio.run(run_doctor(layout, cfg, checks=list(only) or None, **kw)))


def make_store(layout: Layout, schema: int, images: dict[str, str], kernels: list[str]) -> None:
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    c = sqlite3.connect(layout.db_path)
    c.execute("CREATE TABLE schema_migrations(version INTEGER)")
    c.execute("INSERT INTO schema_migrations VALUES (?)", (schema,))
    c.execute("CREATE TABLE images(name TEXT, kernel TEXT)")
    c.executemany("INSERT INTO images VALUES (?, ?)", images.items())
    c.execute("CREATE TABLE kernels(name TEXT)")
    c.executemany("INSERT INTO kernels VALUES (?)", [(k,) for k in kernels])
    c.commit()
    c.close()


def test_checks_are_registered_in_output_order(isolated_env: Layout) -> None:
    assert [c.name for c in doc(isolated_env).values()] == ORDER
    assert len(CHECKS) == len(ORDER)


def test_run_doctor_is_a_short_driver() -> None:
    assert len(inspect.getsource(run_doctor).splitlines()) < 60


def test_a_new_check_is_one_function(isolated_env: Layout) -> None:
    """A check is an async function of the Context; the driver runs whatever list it gets."""

    async def check_demo(ctx: Context) -> Check:
        return Check("demo", "WARN", f"bridge {ctx.config.bridge_name}", "do nothing")

    before = list(CHECKS)
    try:
        assert doctor_check(check_demo) is check_demo
        assert CHECKS[-1] is check_demo
    finally:
        CHECKS[:] = before
    out = asyncio.run(run_doctor(isolated_env, parse_config({}), checks=[check_demo]))
    assert out == [Check("demo", "WARN", "bridge br-stoker", "do nothing")]


def test_cli_doctor_does_not_import_the_daemon(isolated_env: Layout) -> None:
    code = (
        "import sys; from stoker.cli.main import main; rc = main(['doctor', '--json']); "
        "print([m for m in sys.modules if m.startswith('stoker.daemon')], file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.lstrip().startswith("["), r.stderr
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr


def test_shared_probes_run_once(isolated_env: Layout, tmp_path: Path) -> None:
    """firecracker/qemu are probed once although both their checks and `vmm` read them."""
    fc = script(tmp_path, "fc", 'echo "Firecracker v1.12.1"')
    qemu = script(tmp_path, "qemu", '[ "$1" = -machine ] && echo microvm; echo QEMU 9.0')
    runner = RecordingRunner()
    checks = doc(isolated_env, {"firecracker_bin": fc, "qemu_bin": qemu}, runner=runner)
    assert sum(1 for c in runner.calls if c[0] == fc) == 1
    assert sum(1 for c in runner.calls if c[0] == qemu) == 2  # --version, -machine help
    assert checks["firecracker"].status == "PASS" and "v1.12.1" in checks["firecracker"].message
    assert checks["qemu"].status == "PASS"


def test_firecracker_outside_the_tested_range_warns(isolated_env: Layout, tmp_path: Path) -> None:
    fc = script(tmp_path, "fc", 'echo "Firecracker v1.20.0"')
    c = doc(
        isolated_env,
        {"firecracker_bin": fc, "vmm": "firecracker"},
        doctor.check_firecracker,
        doctor.check_vmm,
    )
    assert c["firecracker"].status == "WARN"
    assert "outside the tested range 1.8 to <1.17" in c["firecracker"].message
    # not a usable firecracker: the VMM choice says so
    assert "firecracker is missing" in c["vmm"].message


def test_missing_vmm_binary_fails_only_when_configured(isolated_env: Layout) -> None:
    c = doc(isolated_env, {"qemu_bin": "/nonexistent/qemu", "vmm": "qemu"}, doctor.check_qemu)
    assert c["qemu"].status == "FAIL" and c["qemu"].fix == "apt-get install qemu-system-x86"
    c = doc(isolated_env, {"qemu_bin": "/nonexistent/qemu"}, doctor.check_qemu)
    assert c["qemu"].status == "WARN"


def test_qemu_without_microvm_fails(isolated_env: Layout, tmp_path: Path) -> None:
    qemu = script(tmp_path, "qemu", 'echo "QEMU emulator version 5.0"')
    c = doc(isolated_env, {"qemu_bin": qemu}, doctor.check_qemu)["qemu"]
    assert c.status == "FAIL" and "no 'microvm' machine" in c.message


STORE_CHECKS = (doctor.check_state_store, doctor.check_default_image, doctor.check_default_kernel)


def test_state_store_and_default_image(isolated_env: Layout) -> None:
    c = doc(isolated_env, None, *STORE_CHECKS)
    assert c["state-store"].status == "PASS" and "not created yet" in c["state-store"].message
    assert c["default-image"].status == "WARN" and c["default-kernel"].status == "WARN"

    make_store(isolated_env, SCHEMA_VERSION, {"debian-bookworm": "k1"}, [])
    c = doc(isolated_env, None, *STORE_CHECKS)
    assert c["state-store"] == Check(
        "state-store", "PASS", f"{isolated_env.db_path} opens (schema {SCHEMA_VERSION})"
    )
    assert c["default-image"].status == "PASS"
    assert c["default-kernel"] == Check(
        "default-kernel", "FAIL", "kernel 'k1' missing", "stoker kernel pull k1"
    )


def test_state_store_newer_or_broken_fails(isolated_env: Layout) -> None:
    make_store(isolated_env, SCHEMA_VERSION + 1, {}, [])
    c = doc(isolated_env, None, doctor.check_state_store)["state-store"]
    assert c.status == "FAIL" and c.fix == "upgrade stoker"
    isolated_env.db_path.write_bytes(b"this is not sqlite" * 100)
    c = doc(isolated_env, None, doctor.check_state_store)["state-store"]
    assert c.status == "FAIL" and "move the file aside" in c.fix


def test_daemon_and_dns_come_from_one_status_call(isolated_env: Layout) -> None:
    calls = []

    def status() -> dict[str, Any]:
        calls.append(1)
        return {"version": "9", "pid": 42, "socket": "/s", "network": {"dns_listen": "1.2.3.4:53"}}

    dd = (doctor.check_daemon, doctor.check_dns)
    c = doc(isolated_env, None, *dd, daemon_status=status)
    assert calls == [1]
    assert c["daemon"] == Check("daemon", "PASS", "stokerd 9 pid 42 on /s")
    assert c["dns"] == Check("dns", "PASS", "NAME.vm served on 1.2.3.4:53")
    c = doc(isolated_env, {"dns_listen": "127.0.0.1:9"}, *dd, daemon_status=lambda: {"pid": 1})
    assert c["dns"].status == "WARN" and c["dns"].fix == "check dns_listen (127.0.0.1:9) is free"


def test_every_tool_missing(isolated_env: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "which", lambda name: None)
    c = doc(isolated_env)
    assert c["host-tools"].status == "FAIL" and c["nftables"].status == "FAIL"
    assert c["vmm"].status == "FAIL" and c["vmm"].fix == "install qemu-system-x86 or firecracker"
    assert c["optional-tools"].fix.endswith(
        "apt-get install mmdebstrap dmsetup lz4 zstd mount) (image build, kernel import)"
    )


def test_helper_line_installed_reachable_and_socket_owner(
    isolated_env: Layout, tmp_path: Path
) -> None:
    import socket

    sock = tmp_path / "helper.sock"
    cfg = {"helper_socket": str(sock)}
    hc = (doctor.check_helper,)
    # Nothing installed, no daemon: fine for a root stokerd.
    c = doc(isolated_env, cfg, *hc)["helper"]
    assert c.status == "PASS" and c.message.startswith("not installed")
    # A root daemon (no helper in its status).
    root_st = {"pid": 1, "network": {"helper": None}}
    c = doc(isolated_env, cfg, *hc, daemon_status=lambda: root_st)["helper"]
    assert c.status == "PASS" and "not used: stokerd runs as root" in c.message
    # A non-root daemon that reaches it / cannot.
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    try:
        os.chmod(sock, 0o666)
        ok_st = {"pid": 1, "network": {"helper": {"socket": str(sock), "error": None}}}
        c = doc(isolated_env, cfg, *hc, daemon_status=lambda: ok_st)["helper"]
        if os.geteuid() == 0:
            assert c.status == "PASS" and c.message.startswith("stokerd uses stoker-helper")
            assert "mode 0666, root:" in c.message
            bad = {"pid": 1, "network": {"helper": {"socket": str(sock), "error": "refused"}}}
            c = doc(isolated_env, cfg, *hc, daemon_status=lambda: bad)["helper"]
            assert c.status == "FAIL" and "cannot use stoker-helper: refused" in c.message
            assert "systemctl start stoker-helper" in c.fix
            os.chown(sock, 65534, -1)
        # A socket at the helper's path that root does not own: refused by doctor.
        c = doc(isolated_env, cfg, *hc, daemon_status=lambda: ok_st)["helper"]
        assert c.status == "FAIL" and "not a socket owned by root" in c.message
    finally:
        s.close()


def test_network_policy_line_shows_the_default_and_running_vms(isolated_env: Layout) -> None:
    np = (doctor.check_network_policy,)
    c = doc(isolated_env, None, *np)["network-policy"]
    assert "default host-only" in c.message and "running VMs" not in c.message
    st = {"network": {"policies": {"a": "host-only", "b": "allow=x.org:443,peers", "c": "nat"}}}
    c = doc(isolated_env, None, *np, daemon_status=lambda: st)["network-policy"]
    assert "running VMs: 1 allow, 1 host-only, 1 nat" in c.message
    st = {"network": {"policies": {}}}
    c = doc(isolated_env, None, *np, daemon_status=lambda: st)["network-policy"]
    assert "running VMs: none" in c.message
