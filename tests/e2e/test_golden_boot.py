"""The golden image, built for real, boots under QEMU per docs/guest-boot.md.

The build is cached under $STOKER_TEST_CACHE (default /var/cache/stoker-test): the image in
golden-image/debian-bookworm (rebuilt only when its spec hash changes), downloaded .debs in
apt/. One boot: qemu `microvm` with TCG, the three virtio-blk disks of the contract and a
virtio-net NIC on a tap, bridged inside a network namespace this module creates. From that
namespace: SSH as root with the per-VM keys, then check hostname, address, the overlay root
and the work disk, and that the base image did not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from prereq import require, require_tools
from stoker.daemon.imagemgr import ext4, golden
from stoker.daemon.imagemgr import kernel as km
from stoker.errors import CommandFailed
from stoker.runner import Runner

pytestmark = pytest.mark.e2e

CACHE = Path(os.environ.get("STOKER_TEST_CACHE", "/var/cache/stoker-test"))
GOLDEN_DIR = CACHE / "golden-image" / "debian-bookworm"
APT_CACHE = CACHE / "apt"
CMDLINE = (
    "console=ttyS0 reboot=k panic=-1 root=/dev/vda ro rootwait "
    "init=/usr/lib/stoker/overlay-init 8250.nr_uarts=1"
)
GATEWAY = "172.30.0.1"
GUEST_IP = "172.30.0.2"
GUEST_MAC = "06:53:ac:1e:00:02"
HOSTNAME = "stoker-e2e"
MIB = 1024**2


def _require(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mmdebstrap root mode, network namespaces, taps)")
    require_tools(*tools)


def _mirror_reachable(spec: golden.GoldenSpec) -> bool:
    uri = spec.sources[0].split()[1].rstrip("/")
    if uri.startswith("file://"):
        return True
    try:
        with urllib.request.urlopen(f"{uri}/dists/{spec.suite}/InRelease", timeout=15) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def built() -> golden.GoldenResult:
    """The golden build: reused when up to date, else built (needs the Debian mirror)."""
    _require("mmdebstrap", "unshare", "mkfs.ext4", "debugfs")
    spec = golden.golden_spec()
    current = golden.read_manifest(GOLDEN_DIR)
    if (current is None or current.spec_hash != golden.spec_hash(spec)) and not (
        _mirror_reachable(spec)
    ):
        require(False, f"no up-to-date cached golden image and {spec.sources[0]} is unreachable")
    log: list[str] = []
    t0 = time.monotonic()
    result = asyncio.run(
        golden.build_golden(
            Runner(),
            GOLDEN_DIR,
            cache_dir=APT_CACHE,
            progress=lambda s, d: log.append(f"{time.monotonic() - t0:6.1f}s {s}: {d}"),
        )
    )
    print("\n".join(log[-12:]))
    return result


def test_golden_build_outputs(built: golden.GoldenResult, tmp_path: Path) -> None:
    """What the image must carry without booting it (all read back with debugfs)."""
    r = Runner()

    async def check() -> None:
        assert built.spec_hash == golden.spec_hash(golden.golden_spec())
        assert sorted(p.name for p in GOLDEN_DIR.iterdir()) == [
            "kernel",
            "manifest.json",
            "rootfs.ext4",
            "work-seed.ext4",
        ]
        assert sorted(p.name for p in GOLDEN_DIR.parent.iterdir()) == ["debian-bookworm"]
        rootfs = built.rootfs
        subprocess.run(["e2fsck", "-fn", str(rootfs)], check=True, capture_output=True)
        init = await ext4.stat_path(r, rootfs, "/usr/lib/stoker/overlay-init")
        assert init is not None and init.is_file and init.mode == 0o755
        net = await ext4.stat_path(
            r, rootfs, "/etc/systemd/system/multi-user.target.wants/stoker-net.service"
        )
        assert net is not None and net.kind == "symlink"
        ssh = await ext4.stat_many(
            r, rootfs, [f"/etc/ssh/ssh_host_{k}_key" for k in ("rsa", "ecdsa", "ed25519")]
        )
        assert set(ssh.values()) == {None}, "the image must ship no SSH host keys"
        fstab = (await ext4.read_file(r, rootfs, "/etc/fstab")).decode()
        mounts = [
            ln.split()[1] for ln in fstab.splitlines() if ln.split()[:1] != ["#"] and ln.split()
        ]
        # overlay-init mounts / and /root itself (no fsck job, no udev device wait).
        assert mounts == [], fstab
        # The lean boot: masked units, stoker's own small initramfs.
        reap = await ext4.stat_path(r, rootfs, "/etc/systemd/system/e2scrub_reap.service")
        assert reap is not None and reap.kind == "symlink"
        assert "modules/order" in golden.initramfs_members(built.initrd.read_bytes())
        assert built.initrd.stat().st_size < 4 * MIB
        home = await ext4.stat_path(r, rootfs, "/root")
        assert home is not None and (home.mode, home.uid, home.gid) == (0o755, 0, 0)
        assert not await ext4.exists(r, rootfs, f"/boot/vmlinuz-{built.kernel_version}")
        for binary in ("/usr/bin/python3", "/usr/bin/git", "/usr/bin/jq", "/usr/sbin/sshd"):
            assert await ext4.exists(r, rootfs, binary), binary

        seed = await ext4.stat_path(r, built.work_seed, "/")
        assert seed is not None and (seed.mode, seed.uid, seed.gid) == (0o755, 0, 0)
        assert await ext4.exists(r, built.work_seed, "/.bashrc")
        assert built.work_seed.stat().st_size == golden.WORK_SEED_SIZE

        vmlinuz = built.vmlinuz.read_bytes()
        assert km.bzimage_version(vmlinuz) == built.kernel_version
        builtin = tmp_path / "modules"
        builtin.mkdir()
        (builtin / "modules.builtin").write_bytes(
            await ext4.read_file(
                r, rootfs, f"/usr/lib/modules/{built.kernel_version}/modules.builtin"
            )
        )
        assert golden.missing_initramfs_modules(built.initrd, builtin) == []
        # The kernel dir imports as a kernel (vmlinux extracted for Firecracker).
        files = await km.import_kernel(r, built.kernel_dir, tmp_path / "kernel")
        assert files.version == built.kernel_version and files.initrd is not None
        assert files.vmlinux.read_bytes()[:4] == b"\x7fELF"

    asyncio.run(check())


def test_same_spec_rebuild_is_a_noop(built: golden.GoldenResult) -> None:
    t0 = time.monotonic()
    again = asyncio.run(golden.build_golden(Runner(), GOLDEN_DIR, cache_dir=APT_CACHE))
    elapsed = time.monotonic() - t0
    assert again.reused and again.spec_hash == built.spec_hash
    assert elapsed < 1.0, f"no-op rebuild took {elapsed:.2f}s"


def test_cancelled_build_leaves_nothing(built: golden.GoldenResult, tmp_path: Path) -> None:
    """Cancel a forced build mid-install: no staging dir, no mounts, no apt/dpkg left."""
    parent = tmp_path / "images"
    out = parent / "cancelled"

    async def go() -> None:
        reached = asyncio.Event()

        def progress(stage: str, detail: str) -> None:
            if detail == "installing packages":
                reached.set()

        task = asyncio.create_task(
            golden.build_golden(Runner(), out, cache_dir=APT_CACHE, progress=progress, force=True)
        )
        waiter = asyncio.create_task(reached.wait())
        done, _ = await asyncio.wait(
            {task, waiter}, timeout=600, return_when=asyncio.FIRST_COMPLETED
        )
        assert waiter in done, "the build never reached the install stage"
        await asyncio.sleep(2)  # well inside dpkg
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert not out.exists()
    assert list(parent.iterdir()) == [], "staging left behind"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(parent) not in mounts
    rooted = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/root").startswith(str(parent)):
                rooted.append(pid)
    assert rooted == [], f"processes still chrooted in the staging dir: {rooted}"


# --- the boot ------------------------------------------------------------------------------


def _tsc_khz() -> int | None:
    """The host TSC rate: a TCG guest's TSC runs at it (see the boot test)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        mhz = next(ln for ln in lines if ln.startswith("cpu MHz")).split(":", 1)[1]
        return int(float(mhz) * 1000) or None
    return None


def _sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with a bridge (gateway address) and a tap on it; deleted afterwards."""
    ns = f"stoker-test-{secrets.token_hex(3)}"
    _sh("ip", "netns", "add", ns)
    try:
        for cmd in (
            ["link", "set", "lo", "up"],
            ["link", "add", "stkbr0", "type", "bridge"],
            ["addr", "add", f"{GATEWAY}/24", "dev", "stkbr0"],
            ["link", "set", "stkbr0", "up"],
            ["tuntap", "add", "dev", "stktap0", "mode", "tap"],
            ["link", "set", "stktap0", "master", "stkbr0"],
            ["link", "set", "stktap0", "up"],
        ):
            _sh("ip", "-n", ns, *cmd)
        yield ns
    finally:
        for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _sh("ip", "netns", "del", ns, check=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def _make_disks(built: golden.GoldenResult, d: Path) -> None:
    """Per-VM disks exactly as the contract describes, built without mounting."""
    r = Runner()
    for name in ("host", "user"):
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / f"{name}_key"))
    upper = d / "overlay-tree" / "upper"
    (d / "overlay-tree" / "work").mkdir(parents=True)
    etc = upper / "etc"
    (etc / "stoker").mkdir(parents=True)
    (etc / "ssh").mkdir()
    (etc / "hostname").write_text(f"{HOSTNAME}\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{GUEST_IP}\t{HOSTNAME}\n")
    (etc / "resolv.conf").write_text("nameserver 1.1.1.1\n")
    (etc / "stoker" / "network.env").write_text(
        f"STOKER_IP={GUEST_IP}\nSTOKER_PREFIX=24\nSTOKER_GATEWAY={GATEWAY}\n"
        f'STOKER_MAC={GUEST_MAC}\nSTOKER_DNS="1.1.1.1"\nSTOKER_HOSTNAME={HOSTNAME}\n'
    )
    shutil.copyfile(d / "host_key", etc / "ssh" / "ssh_host_ed25519_key")
    shutil.copyfile(d / "host_key.pub", etc / "ssh" / "ssh_host_ed25519_key.pub")
    os.chmod(etc / "ssh" / "ssh_host_ed25519_key", 0o600)
    for p in (upper, etc, etc / "stoker", etc / "ssh"):
        os.chmod(p, 0o755)
    await ext4.build_from_dir(r, d / "overlay-tree", d / "overlay.ext4", 1024 * MIB)
    await ext4.clone_grow(r, built.work_seed, d / "work.ext4", 2048 * MIB)
    await ext4.set_mode(r, d / "work.ext4", "/", 0o755, 0, 0)
    await ext4.mkdir_p(r, d / "work.ext4", "/.ssh", 0o700)
    await ext4.write_file(
        r, d / "work.ext4", "/.ssh/authorized_keys", (d / "user_key.pub").read_bytes(), 0o600
    )


def test_golden_image_boots(built: golden.GoldenResult, netns: str, tmp_path: Path) -> None:
    _require("qemu-system-x86_64", "ssh", "ssh-keygen", "ip")
    require(Path("/dev/net/tun").exists(), "/dev/net/tun is missing")
    d = tmp_path
    asyncio.run(_make_disks(built, d))
    base_before = _sha256(built.rootfs)
    # Under TCG on a busy host the guest's TSC calibration against the emulated PIT fails
    # and the boot hangs right after "tsc: Marking TSC unstable"; the TCG TSC runs at the
    # host's rate, so give it (the QEMU driver does the same).
    khz = _tsc_khz()
    cmdline = f"{CMDLINE} tsc_early_khz={khz}" if khz else CMDLINE
    console = d / "console.log"
    qemu = [
        "ip", "netns", "exec", netns,
        "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", "1024", "-smp", "1",
        "-nographic", "-nodefaults", "-no-user-config", "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(built.vmlinuz), "-initrd", str(built.initrd), "-append", cmdline,
        "-drive", f"id=vda,file={built.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=vda",
        "-drive", f"id=vdb,file={d / 'overlay.ext4'},format=raw,if=none",
        "-device", "virtio-blk-device,drive=vdb",
        "-drive", f"id=vdc,file={d / 'work.ext4'},format=raw,if=none",
        "-device", "virtio-blk-device,drive=vdc",
        "-netdev", "tap,id=n0,ifname=stktap0,script=no,downscript=no",
        "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}",
    ]  # fmt: skip
    (d / "known_hosts").write_text(
        f"{GUEST_IP} {' '.join((d / 'host_key.pub').read_text().split()[:2])}\n"
    )
    ssh_base = [
        "ip", "netns", "exec", netns, "ssh", "-F", "/dev/null", "-i", str(d / "user_key"),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
        "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
        f"root@{GUEST_IP}",
    ]  # fmt: skip

    def console_tail() -> str:
        with contextlib.suppress(OSError):
            return "\n".join(console.read_text(errors="replace").splitlines()[-40:])
        return "(no console output)"

    def guest(cmd: str, timeout: float = 60) -> str:
        res = subprocess.run([*ssh_base, cmd], capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{cmd!r} failed: {res.stderr}\n{console_tail()}"
        return res.stdout.strip()

    qemu_log = (d / "qemu.log").open("w")
    proc = subprocess.Popen(qemu, stdout=qemu_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, f"qemu exited ({proc.returncode}):\n{console_tail()}"
            res = subprocess.run([*ssh_base, "true"], capture_output=True, text=True, timeout=30)
            if res.returncode == 0:
                break
            assert "Host key verification failed" not in res.stderr, res.stderr
            assert time.monotonic() - t0 < 300, f"no SSH after 300s:\n{console_tail()}"
            time.sleep(2)
        print(f"SSH answered {time.monotonic() - t0:.1f}s after qemu started")

        assert guest("hostname") == HOSTNAME
        addrs = guest("ip -4 -o addr show")
        nic = next(line for line in addrs.splitlines() if f"{GUEST_IP}/24" in line).split()[1]
        assert guest(f"cat /sys/class/net/{nic}/address") == GUEST_MAC
        assert guest("ip route show default").startswith(f"default via {GATEWAY}")
        state = guest("systemctl is-system-running --wait || true", timeout=180)
        failed = guest("systemctl --failed --no-legend --plain")
        assert state == "running", f"system state {state!r}, failed units: {failed}"
        assert guest("systemctl is-active stoker-net.service") == "active"

        # The root is the overlay with its upper layer on vdb; the base is vda, read-only.
        assert guest("findmnt -no FSTYPE /") == "overlay"
        assert guest("findmnt -no SOURCE /run/stoker/rw") == "/dev/vdb"
        assert guest("findmnt -no SOURCE,OPTIONS /run/stoker/base").startswith("/dev/vda ro")
        # /root is the work disk, 0755 root:root for sshd's StrictModes.
        assert guest("findmnt -no SOURCE,FSTYPE /root").split() == ["/dev/vdc", "ext4"]
        assert guest("stat -c '%a %u %g' /root /root/.ssh /root/.ssh/authorized_keys") == (
            "755 0 0\n700 0 0\n600 0 0"
        )
        marker = secrets.token_hex(8)
        guest(f"echo {marker} > /etc/stoker-e2e-marker && echo {marker} > /root/from-guest")
        guest("sync")
        # Power off from inside: the disks are then consistent to read on the host.
        subprocess.run([*ssh_base, "systemctl poweroff"], capture_output=True, timeout=30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        qemu_log.close()

    async def after() -> None:
        r = Runner()
        overlay = d / "overlay.ext4"
        assert await ext4.read_file(r, overlay, "/upper/etc/stoker-e2e-marker") == (
            f"{marker}\n".encode()
        )
        assert await ext4.read_file(r, d / "work.ext4", "/from-guest") == f"{marker}\n".encode()
        assert not await ext4.exists(r, built.rootfs, "/etc/stoker-e2e-marker")

    asyncio.run(after())
    assert _sha256(built.rootfs) == base_before, "the read-only base image changed"


def test_build_failure_names_the_mirror(tmp_path: Path) -> None:
    """An unreachable mirror fails the build clearly and leaves nothing behind."""
    _require("mmdebstrap", "unshare")
    out = tmp_path / "img" / "broken"
    with pytest.raises(CommandFailed, match=r"127\.0\.0\.1:9"):
        asyncio.run(
            golden.build_golden(Runner(), out, mirror="http://127.0.0.1:9/debian", force=True)
        )
    assert list((tmp_path / "img").iterdir()) == []
