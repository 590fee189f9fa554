"""Firecracker under the jailer by default (issue 14 item 2): where the jailer is found,
when it is used, as which user, with which cgroup limits, and what `doctor` says."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stoker.config import ConfigError, parse_config
from stoker.daemon.vmm.firecracker import FirecrackerDriver, JailerOptions, size_cgroups
from stoker.daemon.vmm.select import driver_for_config, make_driver
from stoker.errors import Unavailable
from stoker.hostprobe import confine
from stoker.hostprobe.confine import JailPlan, find_jailer, plan_firecracker
from stoker.hostprobe.doctor import BinaryProbe, Context, check_fc_confinement, check_jailer
from stoker.layout import Layout
from stoker.runner import Runner

pytestmark = pytest.mark.unit

NOBODY = pwd.getpwnam("nobody")


def exe(path: Path, body: str = "exit 0") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def fc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A release-style directory: firecracker and jailer side by side; PATH has neither."""
    d = tmp_path / "fc"
    exe(d / "firecracker", 'echo "Firecracker v1.12.1"')
    exe(d / "jailer", 'echo "Jailer v1.12.1"')
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    return d


def v1_cgroups(root: Path) -> Path:
    for c in ("memory", "cpu"):
        (root / c).mkdir(parents=True)
    return root


def as_root(monkeypatch: pytest.MonkeyPatch, root: bool = True) -> None:
    monkeypatch.setattr(confine.os, "geteuid", lambda: 0 if root else 1000)


def test_use_jailer_config_key() -> None:
    assert parse_config({}).use_jailer == "auto"
    assert parse_config({"use_jailer": False}).use_jailer is False
    assert parse_config({"use_jailer": True}).use_jailer is True
    for bad in ("yes", 1, "on"):
        with pytest.raises(ConfigError, match=r'use_jailer.*"auto", true or false'):
            parse_config({"use_jailer": bad})


def test_jailer_is_found_next_to_firecracker_then_on_path(
    fc_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_jailer(str(fc_dir / "firecracker"), "jailer") == str(fc_dir / "jailer")
    # A symlinked firecracker (/usr/local/bin -> the release dir): beside the real file.
    link = tmp_path / "bin" / "firecracker"
    link.parent.mkdir()
    link.symlink_to(fc_dir / "firecracker")
    assert find_jailer(str(link), "jailer") == str(fc_dir / "jailer")
    # Not beside it: PATH.
    other = exe(tmp_path / "other" / "firecracker")
    assert find_jailer(str(other), "jailer") is None
    onpath = exe(tmp_path / "pathdir" / "jailer")
    monkeypatch.setenv("PATH", str(onpath.parent))
    assert find_jailer(str(other), "jailer") == str(onpath)
    # An explicit path is that file or nothing.
    assert find_jailer(str(other), str(fc_dir / "jailer")) == str(fc_dir / "jailer")
    assert find_jailer(str(other), str(tmp_path / "nope" / "jailer")) is None


def test_auto_jails_as_the_vmm_user_with_cgroups(
    fc_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_root(monkeypatch)
    cg = v1_cgroups(tmp_path / "cg")
    p = plan_firecracker(
        str(fc_dir / "firecracker"),
        "jailer",
        "auto",
        user="nobody",
        cgroup_root=cg,
        proc_cgroup=tmp_path / "none",
    )
    assert p.jailer == str(fc_dir / "jailer")
    assert (p.user, p.uid, p.gid) == ("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    assert p.cgroup_version == 1 and p.off == {} and p.pending_user is None
    assert p.describe() == (
        f"jailer {fc_dir / 'jailer'} (chroot, mount+pid namespaces, seccomp); "
        f"runs as nobody (uid {NOBODY.pw_uid}); cgroup v1 memory+cpu limits"
    )
    # v2
    v2 = tmp_path / "cg2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    p2 = plan_firecracker(
        str(fc_dir / "firecracker"), "jailer", "auto", user="nobody", cgroup_root=v2
    )
    assert p2.cgroup_version == 2


def test_what_turns_the_jailer_or_a_part_off(
    fc_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fc = str(fc_dir / "firecracker")
    as_root(monkeypatch)
    nocg = tmp_path / "no-cgroups"
    nocg.mkdir()
    kw: dict[str, Any] = {"cgroup_root": nocg, "proc_cgroup": tmp_path / "none"}
    off = plan_firecracker(fc, "jailer", False, **kw)
    assert off.jailer is None and off.off == {"jailer": "use_jailer = false in the config"}
    missing = plan_firecracker(str(tmp_path / "elsewhere" / "firecracker"), "jailer", "auto", **kw)
    assert missing.jailer is None
    assert missing.describe() == ("jailer off: 'jailer' not found next to firecracker or on PATH")
    # Asked for explicitly: kept, so the start fails naming it instead of running unjailed.
    forced = plan_firecracker(str(tmp_path / "elsewhere" / "firecracker"), "jailer", True, **kw)
    assert forced.jailer == "jailer" and "not found" in forced.off["jailer"]
    # A user that does not exist yet: pending (a root daemon creates it at the first start).
    p = plan_firecracker(fc, "jailer", "auto", user="stoker-nouser-x", **kw)
    assert p.jailer and p.pending_user == "stoker-nouser-x" and p.uid == 0
    assert "created at the first VM start" in p.off["user"]
    assert p.off["cgroup"].startswith("no cgroup v1 memory hierarchy")
    # Not root: the jailer cannot run.
    as_root(monkeypatch, False)
    nr = plan_firecracker(fc, "jailer", "auto", **kw)
    assert nr.jailer is None and "stokerd is not root" in nr.off["jailer"]


def test_size_cgroups_follow_the_vm_size() -> None:
    mib = 1024 * 1024
    assert size_cgroups(1, 1024, 2) == (
        f"memory.limit_in_bytes={(1024 + 256) * mib}",
        "cpu.cfs_period_us=100000",
        "cpu.cfs_quota_us=250000",
    )
    assert size_cgroups(2, 512, 1) == (f"memory.max={(512 + 256) * mib}", "cpu.max=150000 100000")


def test_make_driver_takes_the_plan() -> None:
    plan = JailPlan(jailer="/opt/fc/jailer", user="nobody", uid=65534, gid=65534, cgroup_version=2)
    d = make_driver("firecracker", Runner(), firecracker_bin="/opt/fc/firecracker", jail=plan)
    assert isinstance(d, FirecrackerDriver)
    assert d.jailer == JailerOptions(
        jailer_bin="/opt/fc/jailer", uid=65534, gid=65534, cgroup_version=2, size_limits=True
    )
    unjailed = make_driver("firecracker", Runner(), jail=JailPlan(off={"jailer": "x"}))
    assert isinstance(unjailed, FirecrackerDriver) and unjailed.jailer is None


@dataclass(frozen=True)
class Cfg:
    vmm: str = "firecracker"
    firecracker_bin: str = "firecracker"
    jailer_bin: str = "jailer"
    qemu_bin: str = "qemu-system-x86_64"
    use_jailer: Any = "auto"
    vmm_user: str = "nobody"


def test_the_daemon_jails_firecracker_by_default(
    fc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_root(monkeypatch)
    d = driver_for_config(Cfg(firecracker_bin=str(fc_dir / "firecracker")), Runner())
    assert isinstance(d, FirecrackerDriver) and d.jailer is not None
    assert d.jailer.jailer_bin == str(fc_dir / "jailer")
    assert (d.jailer.uid, d.jailer.gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    off = driver_for_config(
        Cfg(firecracker_bin=str(fc_dir / "firecracker"), use_jailer=False), Runner()
    )
    assert isinstance(off, FirecrackerDriver) and off.jailer is None


def test_a_forced_jailer_that_is_missing_fails_the_start_by_name(tmp_path: Path) -> None:
    d = FirecrackerDriver(Runner(), "firecracker", jailer=JailerOptions(jailer_bin="no-jailer-x"))
    from stoker.daemon.vmm.base import MachineConfig

    cfg = MachineConfig(
        "v1", "n", tmp_path, tmp_path / "k", None, "", 1, 128, [], None, "", tmp_path / "s"
    )
    with pytest.raises(
        Unavailable, match=r"the jailer 'no-jailer-x' was not found.*use_jailer = false"
    ):
        d._prepare_jail(cfg, {})
    assert not (tmp_path / "jail").exists()


def ctx(tmp_path: Path, fc: Path | None, **config: Any) -> Context:
    lay = Layout(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "s")
    c = Context(lay, parse_config(config, cpus=2, mem_bytes=4 << 30), Runner())
    c._memo["fc"] = BinaryProbe(str(fc) if fc else None, "Firecracker v1.12.1", fc is not None)
    return c


async def test_doctor_reports_the_firecracker_confinement(
    fc_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fc = fc_dir / "firecracker"
    as_root(monkeypatch)
    c = await check_fc_confinement(ctx(tmp_path, fc, vmm_user="nobody"))
    assert c.name == "fc-confinement"
    assert c.message.startswith(f"Firecracker: jailer {fc_dir / 'jailer'} (chroot")
    assert f"runs as nobody (uid {NOBODY.pw_uid})" in c.message
    # This host's cgroups decide the rest: either limits, or the reason they are off.
    assert "cgroup v" in c.message or "cgroup off:" in c.message
    assert (c.status == "PASS") == ("off:" not in c.message)

    # Pending user on a root daemon: not a problem, said.
    c = await check_fc_confinement(ctx(tmp_path, fc, vmm_user="stoker-nouser-x"))
    assert "user stoker-nouser-x is created at the first VM start" in c.message

    c = await check_fc_confinement(ctx(tmp_path, fc, use_jailer=False))
    assert c.status == "WARN" and c.message == (
        "Firecracker: jailer off: use_jailer = false in the config"
    )

    os.unlink(fc_dir / "jailer")
    c = await check_fc_confinement(ctx(tmp_path, fc))
    assert c.status == "WARN"
    assert "jailer off: 'jailer' not found next to firecracker or on PATH" in c.message
    assert "install the jailer next to firecracker" in c.fix

    j = await check_jailer(ctx(tmp_path, fc))
    assert j.status == "WARN" and "Firecracker would run unjailed" in j.message
    j = await check_jailer(ctx(tmp_path, fc, use_jailer=True))
    assert j.status == "FAIL" and "but use_jailer = true" in j.message

    c = await check_fc_confinement(ctx(tmp_path, None))
    assert (c.status, c.message) == ("WARN", "not checked: no Firecracker")


async def test_doctor_says_why_a_daemon_that_is_not_root_runs_it_unjailed(
    fc_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_root(monkeypatch, False)
    fc = fc_dir / "firecracker"
    c = await check_fc_confinement(ctx(tmp_path, fc))
    assert c.status == "WARN"
    assert "jailer off: stokerd is not root" in c.message and "run stokerd as root" in c.fix
    j = await check_jailer(ctx(tmp_path, fc))
    assert j.status == "PASS" and str(fc_dir / "jailer") in j.message
