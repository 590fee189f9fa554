"""VMM process plumbing: handle records, detached spawning, identity checks against pid
reuse, adopt/kill of processes that only pretend to be a VMM (real processes, no root)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stoker.daemon.vmm.base import (
    VMMHandle,
    has_option,
    load_handle,
    pid_alive,
    read_pidfile,
    save_handle,
    wait_exit,
)
from stoker.daemon.vmm.firecracker import FirecrackerDriver
from stoker.daemon.vmm.qemu import QemuDriver
from stoker.runner import Runner

pytestmark = pytest.mark.unit


def test_handle_roundtrips_through_json(tmp_path: Path) -> None:
    h = VMMHandle("qemu", 1234, str(tmp_path / "qmp.sock"), str(tmp_path), {"netns": "ns1"})
    again = VMMHandle.from_dict(json.loads(json.dumps(h.to_dict())))
    assert again == h
    save_handle(h)
    assert load_handle(tmp_path, "qemu") == h
    assert load_handle(tmp_path, "firecracker") is None


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "qemu", "pid": "12", "vm_dir": "/x"},
        {"kind": "qemu", "pid": True, "vm_dir": "/x"},
        {"kind": "qemu", "pid": -1, "vm_dir": "/x"},
        {"pid": 12, "vm_dir": "/x"},
        {"kind": "qemu", "pid": 12, "vm_dir": "/x", "extra": []},
        {"kind": "qemu", "pid": 12, "vm_dir": "/x", "api_socket": 5},
    ],
)
def test_malformed_handles_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises((TypeError, ValueError, KeyError)):
        VMMHandle.from_dict(bad)


def test_corrupt_handle_and_pidfiles_read_as_absent(tmp_path: Path) -> None:
    (tmp_path / "vmm.json").write_text("{not json")
    assert load_handle(tmp_path, "qemu") is None
    for text in ("", "abc", "-5", "0", "12 13"):
        (tmp_path / "vmm.pid").write_text(text)
        assert read_pidfile(tmp_path / "vmm.pid") is None
    (tmp_path / "vmm.pid").write_text("4242\n")
    assert read_pidfile(tmp_path / "vmm.pid") == 4242


def test_has_option_needs_the_exact_pair() -> None:
    argv = ["qemu", "-pidfile", "/a/vmm.pid", "--id=abc"]
    assert has_option(argv, "-pidfile", "/a/vmm.pid")
    assert not has_option(argv, "-pidfile", "/a/vmm.pi")
    assert has_option(argv, "--id", "abc")
    assert not has_option(argv, "--id", "")


async def test_spawn_is_detached_with_stdin_devnull_and_output_in_files(tmp_path: Path) -> None:
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    pid = await Runner().spawn(
        ["sh", "-c", "echo to-stdout; echo to-stderr >&2; exec sleep 30"], stdout=out, stderr=err
    )
    try:
        assert os.getsid(pid) == pid != os.getsid(0), "the VMM must lead its own session"
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        deadline = time.monotonic() + 5
        while "to-stderr" not in err.read_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert out.read_text() == "to-stdout\n" and err.read_text() == "to-stderr\n"
        status = Path(f"/proc/{pid}/status").read_text()
        ignored = int(
            next(ln for ln in status.splitlines() if ln.startswith("SigIgn")).split()[1], 16
        )
        # Python ignores SIGPIPE; a VMM must get the default disposition back.
        assert not ignored & (1 << (signal.SIGPIPE - 1))
    finally:
        os.kill(pid, signal.SIGKILL)
        assert await wait_exit(pid, 5)


def test_spawned_process_outlives_its_parent(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from stoker.runner import Runner\n"
        "pid = asyncio.run(Runner().spawn(['sleep', '30'], stdout=sys.argv[1]))\n"
        "print(pid, flush=True)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out.log")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    pid = int(r.stdout.strip())
    try:
        assert pid_alive(pid), "the spawned process died with the process that spawned it"
    finally:
        os.kill(pid, signal.SIGKILL)


def fake_vmm(argv0: str, *args: str) -> subprocess.Popen[bytes]:
    """A python process whose argv[0] is a VMM's name and whose argv carries `args`."""
    return subprocess.Popen(
        [argv0, "-c", "import time; time.sleep(60)", *args],
        executable=sys.executable,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def wait_argv(p: subprocess.Popen[bytes], needle: str) -> None:
    """Wait until the child has exec'd (its argv is visible in /proc)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if needle in Path(f"/proc/{p.pid}/cmdline").read_bytes().decode():
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"pid {p.pid} never showed {needle!r}")


async def test_qemu_adopt_checks_the_pid_really_is_this_vms_qemu(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    drv = QemuDriver(Runner())
    vm, other = tmp_path / "vm", tmp_path / "other"
    vm.mkdir()
    other.mkdir()
    pidfile = vm / "vmm.pid"
    # A stale pidfile whose pid now belongs to an unrelated process.
    sleeper = fake_vmm("sleep")
    procs.append(sleeper)
    pidfile.write_text(f"{sleeper.pid}\n")
    assert drv.adopt(vm) is None
    # A QEMU, but another VM's.
    foreign = fake_vmm("qemu-system-x86_64", "-pidfile", str(other / "vmm.pid"))
    procs.append(foreign)
    wait_argv(foreign, "-pidfile")
    pidfile.write_text(f"{foreign.pid}\n")
    assert drv.adopt(vm) is None
    # This VM's QEMU is found, and kill() ends it and clears its files.
    ours = fake_vmm("qemu-system-x86_64", "-pidfile", str(pidfile))
    procs.append(ours)
    wait_argv(ours, "-pidfile")
    pidfile.write_text(f"{ours.pid}\n")
    h = drv.adopt(vm)
    assert h is not None and h.pid == ours.pid and drv.is_running(h)
    await drv.kill(h)
    assert not pid_alive(ours.pid)
    assert not drv.is_running(h)
    assert not pidfile.exists()
    # kill() of a handle whose pid was reused by something else must not signal it.
    reused = VMMHandle("qemu", sleeper.pid, None, str(vm), {"pidfile": str(pidfile)})
    await drv.kill(reused)
    assert sleeper.poll() is None


async def test_firecracker_adopt_checks_api_socket(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    drv = FirecrackerDriver(Runner())
    vm = tmp_path / "vm"
    vm.mkdir()
    foreign = fake_vmm("firecracker", "--api-sock", str(tmp_path / "elsewhere" / "fc.sock"))
    procs.append(foreign)
    wait_argv(foreign, "--api-sock")
    (vm / "vmm.pid").write_text(f"{foreign.pid}\n")
    assert drv.adopt(vm) is None
    ours = fake_vmm("firecracker", "--api-sock", str(vm / "fc.sock"), "--id", "vm1")
    procs.append(ours)
    wait_argv(ours, "--id")
    (vm / "vmm.pid").write_text(f"{ours.pid}\n")
    h = drv.adopt(vm)
    assert h is not None and h.pid == ours.pid
    # A qemu handle is never "running" for the firecracker driver.
    assert not drv.is_running(VMMHandle("qemu", ours.pid, h.api_socket, str(vm), {}))
    await drv.kill(h)
    # kill() waited for the exit (and reaped our child, so Popen sees no status).
    assert not pid_alive(ours.pid)
    assert not (vm / "vmm.pid").exists()
