"""QEMU confinement without QEMU or root: cgroup discovery and limits on a fake cgroup
tree, the wrapper argv, why parts are off, the handed-over command line, fd passing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stoker.daemon.vmm.base import Disk, MachineConfig
from stoker.daemon.vmm.confine import (
    SANDBOX,
    Confinement,
    Handover,
    cpu_quota_us,
    drop_argv,
    find_cgroups,
    join_argv,
    memory_limit,
)
from stoker.daemon.vmm.qemu import _marked, qemu_argv
from stoker.hostprobe import confine
from stoker.runner import Runner

pytestmark = pytest.mark.unit
MiB = 1024 * 1024


def test_limits_follow_the_vm_size() -> None:
    assert memory_limit(1024, "tcg") == (1024 + 512) * MiB
    assert memory_limit(1024, "kvm") == (1024 + 256) * MiB
    assert cpu_quota_us(1) == 150_000 and cpu_quota_us(4) == 450_000


def test_cgroup_v1_under_the_daemons_own_cgroups(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "memory" / "svc" / "stokerd").mkdir(parents=True)
    (root / "cpu").mkdir()
    proc = tmp_path / "self.cgroup"
    proc.write_text("4:memory:/svc/stokerd\n2:cpu,cpuacct:/\n0::/\n")
    cg, why = find_cgroups(root, proc)
    assert cg is not None and cg.version == 1 and why == "cgroup v1 (memory, cpu)"
    assert cg.parents == {
        "memory": root / "memory/svc/stokerd/stoker-vms",
        "cpu": root / "cpu/stoker-vms",
    }
    procs = cg.create("vm1", 768 * MiB, 2)
    assert procs == [
        root / "memory/svc/stokerd/stoker-vms/vm1/cgroup.procs",
        root / "cpu/stoker-vms/vm1/cgroup.procs",
    ]
    mem = root / "memory/svc/stokerd/stoker-vms/vm1"
    assert (mem / "memory.limit_in_bytes").read_text() == f"{768 * MiB}\n"
    assert (root / "cpu/stoker-vms/vm1/cpu.cfs_quota_us").read_text() == "250000\n"
    with pytest.raises(ValueError, match="cannot name a cgroup"):
        cg.dirs("../../etc")


def test_cgroup_v2_and_why_not(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset io pids\n")
    proc = tmp_path / "self.cgroup"
    proc.write_text("0::/system.slice/stokerd.service\n")
    cg, why = find_cgroups(root, proc)
    assert cg is None and why == "cgroup v2 without the memory and cpu controller"
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    cg, why = find_cgroups(root, proc)
    assert cg is not None and cg.version == 2
    (root / "cgroup.subtree_control").write_text("")
    (root / "stoker-vms").mkdir()
    (root / "stoker-vms" / "cgroup.subtree_control").write_text("")
    cg.create("vm1", 512 * MiB, 1)
    assert (root / "stoker-vms/vm1/memory.max").read_text() == f"{512 * MiB}\n"
    assert (root / "stoker-vms/vm1/cpu.max").read_text() == "150000 100000\n"
    assert "+memory" in (root / "stoker-vms/cgroup.subtree_control").read_text()
    cg2, why = find_cgroups(tmp_path / "nothing", proc)
    assert cg2 is None and "no cgroup v1 memory hierarchy" in why


def test_plan_says_why_parts_are_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confine.os, "geteuid", lambda: 1000)
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'usage: qemu [options]'\n")
    fake.chmod(0o755)
    c = confine.plan(str(fake), cgroup_root=tmp_path / "none", create_user=False)
    assert c.uid is None and not c.sandbox and c.cgroups is None
    # A stokerd that is not root still hands QEMU its files and tap as descriptors: it
    # cannot give QEMU a /dev/net/tun it may not open itself (stoker-helper passes the tap).
    assert c.fds
    assert c.off["sandbox"].endswith("was built without seccomp (no -sandbox)")
    assert c.off["user"] == "stokerd is not root: QEMU runs as the daemon's own user"
    assert "no cgroup v1 memory hierarchy" in c.off["cgroup"]
    assert "sandbox off:" in c.describe()
    fake.write_text("#!/bin/sh\necho '-sandbox on[=off][,obsolete=allow|deny]'\n")
    assert confine.plan(str(fake), cgroup_root=tmp_path, create_user=False).sandbox


def test_bad_user_names_are_refused_before_useradd() -> None:
    pw, why = confine.ensure_user("x; rm -rf /")
    assert pw is None and "is not a valid user name" in why


def test_wrapper_joins_cgroups_then_drops_privileges(tmp_path: Path) -> None:
    procs = [tmp_path / "a" / "cgroup.procs", tmp_path / "b" / "cgroup.procs"]
    for p in procs:
        p.parent.mkdir()
    argv = [*join_argv(procs), sys.executable, "-c", "import os; print(os.getpid())"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    # the shell wrote its own pid, then exec'd: the same pid runs the command
    assert [p.read_text().strip() for p in procs] == [out, out]
    assert join_argv([]) == []
    c = Confinement(user="stoker-vmm", uid=999, gid=998, setpriv="/usr/bin/setpriv")
    assert drop_argv(c) == [
        "/usr/bin/setpriv",
        "--reuid=999",
        "--regid=998",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]
    assert "--groups" in drop_argv(Confinement(uid=999, gid=998, kvm_gid=105))
    assert drop_argv(Confinement()) == []


def _machine(tmp_path: Path, **kw: Any) -> MachineConfig:
    base: dict[str, Any] = dict(
        vm_id="abc",
        name="t1",
        vm_dir=tmp_path,
        kernel=tmp_path / "vmlinuz",
        initrd=None,
        cmdline="console=ttyS0",
        vcpu=1,
        memory_mib=256,
        disks=[Disk(tmp_path / "rootfs.ext4", True, "rootfs")],
        tap="tap0",
        mac="06:00:ac:1e:00:02",
        serial_log=tmp_path / "serial.log",
        agent_socket=tmp_path / "agent.sock",
    )
    base.update(kw)
    return MachineConfig(**base)


def test_handed_over_argv_names_no_host_path(tmp_path: Path) -> None:
    cfg = _machine(tmp_path)
    h = Handover(tap_fd=9, qmp_fd=10, agent_fd=11)
    h.add_fd = ["fd=3,set=1,opaque=/vm/vmm.pid", "fd=4,set=2,opaque=serial"]
    h.paths = {"serial": "/dev/fdset/2", "kernel": "/proc/self/fd/5", "disk:rootfs": "/dev/fdset/3"}
    pidfile = tmp_path / "vmm.pid"
    argv = qemu_argv(
        cfg, "qemu", "tcg", tmp_path / "qmp.sock", pidfile, handover=h, sandbox=True, paused=True
    )
    text = " ".join(argv)
    assert str(tmp_path) not in text  # no path QEMU's user could not open
    assert "-pidfile" not in argv and "-qmp" not in argv
    assert argv[argv.index("-sandbox") + 1] == SANDBOX and "-S" in argv
    assert "tap,id=net0,fd=9" in argv and "socket,id=qmp,fd=10,server=on,wait=off" in argv
    assert "socket,id=agent,fd=11,server=on,wait=off" in argv
    assert "if=none,id=rootfs,file=/dev/fdset/3,format=raw,readonly=on" in argv
    assert argv.index("-add-fd") < argv.index("-drive")
    assert _marked(argv, "/vm/vmm.pid") and not _marked(argv, "/other/vmm.pid")
    plain = qemu_argv(cfg, "qemu", "tcg", tmp_path / "qmp.sock", pidfile)
    assert "-sandbox" not in plain and "-S" not in plain and "-pidfile" in plain


def test_handover_copies_unreadable_files_into_memfds(tmp_path: Path) -> None:
    secret, public = tmp_path / "kernel", tmp_path / "initrd"
    secret.write_bytes(b"K" * 5000)
    secret.chmod(0o600)
    public.write_bytes(b"I" * 10)
    public.chmod(0o644)
    h = Handover()
    try:
        k, i = h.reopenable(secret, "kernel"), h.reopenable(public, "initrd")
        assert (k, i) == ("/proc/self/fd/3", "/proc/self/fd/4")
        kfd, ifd = h.fds[3], h.fds[4]
        assert os.readlink(f"/proc/self/fd/{kfd}").startswith("/memfd:stoker-kernel")
        assert os.readlink(f"/proc/self/fd/{ifd}") == str(public)
        assert os.pread(kfd, 5000, 0) == b"K" * 5000
        assert h.fdset(os.open(os.devnull, os.O_RDONLY), opaque="a,b") == "/dev/fdset/1"
        assert h.add_fd == ["fd=5,set=1,opaque=a,,b"]
    finally:
        h.close()
    with pytest.raises(OSError):
        os.fstat(kfd)


async def test_spawn_hands_over_fds_without_clobbering(tmp_path: Path) -> None:
    # Two descriptors whose numbers are each other's targets: a naive dup2 loses one.
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("from a")
    b.write_text("from b")
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    out = tmp_path / "out"
    code = f"import os; print(os.read({fa}, 9).decode(), '|', os.read({fb}, 9).decode())"
    try:
        pid = await Runner().spawn(
            [sys.executable, "-c", code], stdout=out, pass_fds={fa: fb, fb: fa}
        )
        await asyncio.to_thread(os.waitpid, pid, 0)
    finally:
        os.close(fa)
        os.close(fb)
    assert out.read_text().strip() == "from b | from a"


async def test_doctor_reports_confinement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stoker.config import parse_config
    from stoker.hostprobe.doctor import BinaryProbe, Context, check_confinement
    from stoker.layout import Layout

    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho '-sandbox on[=off]'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(confine.os, "geteuid", lambda: 1000)
    lay = Layout(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "s")
    ctx = Context(lay, parse_config({}, cpus=2, mem_bytes=4 << 30), Runner())
    ctx._memo["qemu"] = BinaryProbe(str(fake), "QEMU 7.2", True)
    c = await check_confinement(ctx)
    assert c.name == "confinement" and c.status == "WARN"
    assert "seccomp -sandbox on" in c.message
    assert "user off: stokerd is not root" in c.message
    assert "run stokerd as root" in c.fix


def test_mount_namespace_wrapper(tmp_path: Path) -> None:
    from stoker.daemon.vmm.confine import mount_argv

    hide = [tmp_path, tmp_path / "missing"]
    root = Confinement(uid=999, gid=998, mountns="root", unshare="/usr/bin/unshare")
    argv = mount_argv(root, hide)
    assert argv[:5] == ["/usr/bin/unshare", "--mount", "--propagation", "private", "--"]
    # only existing dirs are covered; the list ends at "--", then the rest is exec'd
    assert argv[-2:] == [str(tmp_path), "--"] and str(tmp_path / "missing") not in argv
    assert "own mount namespace" in root.describe()
    user = Confinement(mountns="user", setpriv="setpriv")
    if os.geteuid() == 0:  # `fds` is true for a non-root daemon only (or a dropped uid)
        assert mount_argv(user, hide) == []
    else:
        u = mount_argv(user, hide)
        assert "--user" in u and "--keep-caps" in u
        assert u[-6:] == [
            "setpriv",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]
    assert mount_argv(Confinement(uid=999, gid=998), hide) == []  # off: nothing
