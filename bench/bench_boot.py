"""Guest boot timings of the golden image under QEMU/TCG, inside a namespace this script
creates and removes.

    .venv/bin/python bench/bench_boot.py [--build DIR] [--image DIR[=LABEL][;nopvh][;args=..]]
        [--baseline DIR] [--boots 3] [--verbose] [--keep DIR] [--cmd CMD]

`--build DIR` builds (or reuses, when its spec is current) the golden image of this tree
into DIR, with the e2e apt cache; `--image` boots an existing golden output dir;
`--baseline` boots one with the pre-lean-boot VMM settings (the old kernel command line,
bzImage, no virtio-rng, no TCG extras), for a before/after in one run. Boots are
interleaved (one of each image per round) so host load hits them alike.

Each boot goes through the QEMU driver's own argv (`qemu_argv`: the disks, NIC and agent
port of `vm create`, the ELF vmlinux where it has a PVH entry) with per-VM disks made as
`vm create` makes them. Printed per boot: spawn -> agent-ready (the agent's /healthz
answers on the virtio-serial port), spawn -> SSH-ready (an SSH login ran `true`, polled as
stoker polls), the CPU seconds the QEMU process had used at each (the figure that host
load does not move much: under TCG the guest only progresses while QEMU runs), one more
SSH `true` on the booted guest, and a guest timeline: kernel-clock timestamps (the serial
log's clock) of the boot milestones, read back from the guest's journal, which keeps
kernel and unit messages with their monotonic times even when the console is quiet.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from stoker.daemon.agent.client import AgentClient, SerialTransport
from stoker.daemon.imagemgr import ext4, golden
from stoker.daemon.imagemgr import kernel as km
from stoker.daemon.vm_service import BOOT_CMDLINE
from stoker.daemon.vmm import qemu
from stoker.daemon.vmm.base import Disk, MachineConfig
from stoker.runner import Runner

CACHE = Path(os.environ.get("STOKER_TEST_CACHE", "/var/cache/stoker-test"))
GATEWAY = "172.30.0.1"
GUEST_IP = "172.30.0.2"
GUEST_MAC = "06:53:ac:1e:00:02"
MIB = 1024**2
BRIDGE, TAP = "stkbr0", "stktap0"
# What `vm create` booted before the lean boot (for --baseline).
LEGACY_CMDLINE = (
    "console=ttyS0 reboot=k panic=-1 root=/dev/vda ro rootwait init=/usr/lib/stoker/overlay-init"
)
# First match of each pattern in the guest's journal (short-monotonic), in boot order.
MILESTONES: tuple[tuple[str, str], ...] = (
    ("initramfs /init", r"Run /init as init process"),
    ("base root mounted", r"EXT4-fs \(vda\): mounted"),
    ("overlay rw disk mounted", r"EXT4-fs \(vdb\): mounted"),
    ("systemd exec'd", r"systemd\[1\]: systemd \d+"),
    ("journald up", r"systemd-journald\[\d+\]: Journal started"),
    ("agent started", r"Started stoker-agent\.service"),
    ("/root mounted", r"EXT4-fs \(vdc\): mounted"),
    ("stoker-net done", r"stoker-net: \S+ \d"),
    ("sshd started", r"sshd\[\d+\]: Server listening"),
    ("startup finished", r"Startup finished in"),
)


@dataclass
class Image:
    label: str
    dir: Path
    legacy: bool = False
    pvh: bool = True  # the ELF vmlinux (PVH entry) where it has one, as `vm create` does
    args: str = ""  # appended to the kernel command line
    vmlinux: Path | None = None
    runs: list[dict[str, float]] = field(default_factory=list)


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def enter_netns(ns: str) -> None:
    """Move this process (its only thread, so every later thread and child too) into ns."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(fd)


def make_netns() -> str:
    ns = f"stoker-bboot-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    for cmd in (
        ["link", "set", "lo", "up"],
        ["link", "add", BRIDGE, "type", "bridge"],
        ["addr", "add", f"{GATEWAY}/24", "dev", BRIDGE],
        ["link", "set", BRIDGE, "up"],
        ["tuntap", "add", "dev", TAP, "mode", "tap"],
        ["link", "set", TAP, "master", BRIDGE],
        ["link", "set", TAP, "up"],
    ):
        sh("ip", "-n", ns, *cmd)
    return ns


def remove_netns(ns: str) -> None:
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        if int(pid) == os.getpid():
            continue  # this script entered the namespace itself
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", ns, check=False)


async def make_disks(img: Image, d: Path) -> None:
    """The per-VM overlay and work disks, with identity and keys, as `vm create` makes them."""
    r = Runner()
    for name in ("host", "user"):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / f"{name}_key"))
    upper = d / "overlay-tree" / "upper"
    (d / "overlay-tree" / "work").mkdir(parents=True)
    etc = upper / "etc"
    (etc / "stoker").mkdir(parents=True)
    (etc / "ssh").mkdir()
    (etc / "hostname").write_text("bench\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{GUEST_IP}\tbench\n")
    (etc / "resolv.conf").write_text(f"nameserver {GATEWAY}\n")
    (etc / "stoker" / "network.env").write_text(
        f"STOKER_IP={GUEST_IP}\nSTOKER_PREFIX=24\nSTOKER_GATEWAY={GATEWAY}\n"
        f'STOKER_MAC={GUEST_MAC}\nSTOKER_DNS="{GATEWAY}"\nSTOKER_HOSTNAME=bench\n'
    )
    shutil.copyfile(d / "host_key", etc / "ssh" / "ssh_host_ed25519_key")
    shutil.copyfile(d / "host_key.pub", etc / "ssh" / "ssh_host_ed25519_key.pub")
    os.chmod(etc / "ssh" / "ssh_host_ed25519_key", 0o600)
    for p in (upper, etc, etc / "stoker", etc / "ssh"):
        os.chmod(p, 0o755)
    await ext4.build_from_dir(r, d / "overlay-tree", d / "overlay.ext4", 1024 * MIB)
    await ext4.clone_grow(r, img.dir / golden.WORK_SEED, d / "work.ext4", 2048 * MIB)
    await ext4.set_mode(r, d / "work.ext4", "/", 0o755, 0, 0)
    await ext4.mkdir_p(r, d / "work.ext4", "/.ssh", 0o700)
    await ext4.write_file(
        r, d / "work.ext4", "/.ssh/authorized_keys", (d / "user_key.pub").read_bytes(), 0o600
    )
    (d / "known_hosts").write_text(
        f"{GUEST_IP} {' '.join((d / 'host_key.pub').read_text().split()[:2])}\n"
    )


def argv_for(img: Image, d: Path, cmdline: str) -> list[str]:
    kernel = img.dir / golden.KERNEL_DIR / "vmlinuz"
    if not img.legacy and img.pvh and img.vmlinux and qemu.pvh_bootable(img.vmlinux):
        kernel = img.vmlinux
    if img.args:
        cmdline = f"{cmdline} {img.args}"
    cfg = MachineConfig(
        vm_id="bench",
        name="bench",
        vm_dir=d,
        kernel=kernel,
        initrd=img.dir / golden.KERNEL_DIR / "initrd.img",
        cmdline=cmdline,
        vcpu=1,
        memory_mib=1024,
        disks=[
            Disk(path=img.dir / golden.ROOTFS, read_only=True, id="rootfs"),
            Disk(path=d / "overlay.ext4", read_only=False, id="overlay"),
            Disk(path=d / "work.ext4", read_only=False, id="work"),
        ],
        tap=TAP,
        mac=GUEST_MAC,
        serial_log=d / "serial.log",
        agent_socket=d / "agent.sock",
    )
    argv = qemu.qemu_argv(
        cfg, "qemu-system-x86_64", "tcg", d / "qmp.sock", d / "qemu.pid", qemu.host_tsc_khz()
    )
    if img.legacy:
        # The VMM settings before the lean boot: plain -cpu max, no virtio-rng, and the
        # old command line (plus tsc_early_khz, which the driver added then too).
        argv[argv.index("-cpu") + 1] = "max"
        i = argv.index("-append") + 1
        khz = qemu.host_tsc_khz()
        argv[i] = f"{LEGACY_CMDLINE} tsc_early_khz={khz}" if khz else LEGACY_CMDLINE
        while "virtio-rng-device" in " ".join(argv):
            j = next(k for k, a in enumerate(argv) if "virtio-rng-device" in a or "rng-" in a)
            del argv[j - 1 : j + 1]
    return argv


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used: under TCG, the guest's progress."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return -1.0


async def poll_agent(sock: Path, t0: float, deadline: float) -> float | None:
    c = AgentClient(SerialTransport(str(sock)), name="bench")
    try:
        while time.monotonic() < deadline:
            if sock.exists() and await c.alive(timeout=0.5):
                return time.monotonic() - t0
            await asyncio.sleep(0.05)
    finally:
        await c.close()
    return None


async def poll_login(d: Path, t0: float, deadline: float) -> float | None:
    """Seconds until an SSH login runs `true`, polled as stoker's readiness check does: one
    attempt at a time, 0.1 s apart. (Probing for sshd's banner instead made the guest
    re-exec sshd for every probe, which under TCG slowed the very boot it measured.)"""
    # First until the guest's kernel answers at all (a refused connection to a closed port
    # costs the guest nothing), so that ssh's connect timeout never cuts a slow handshake.
    while time.monotonic() < deadline and not await asyncio.to_thread(net_up):
        await asyncio.sleep(0.05)
    while time.monotonic() < deadline:
        r = await asyncio.to_thread(
            sh, *ssh_argv(d, "true", connect_timeout=60), check=False, timeout=90
        )
        if r.returncode == 0:
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    return None


def net_up() -> bool:
    try:
        with socket.create_connection((GUEST_IP, 9), timeout=0.3):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def ssh_argv(d: Path, cmd: str, connect_timeout: int = 30) -> list[str]:
    return [
        "ssh", "-F", "/dev/null", "-i", str(d / "user_key"), "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}", "-o", "LogLevel=ERROR",
        "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
        f"root@{GUEST_IP}", cmd,
    ]  # fmt: skip


def timeline(journal: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in journal.splitlines():
        m = re.match(r"\[\s*(\d+\.\d+)\]\s+\S+\s+(.*)", line)
        if not m:
            continue
        for label, pat in MILESTONES:
            if label not in out and re.search(pat, m.group(2)):
                out[label] = float(m.group(1))
    return out


async def boot_once(
    img: Image, verbose: bool, timeout: float, keep: Path | None = None, cmd: str = ""
) -> dict[str, float]:
    d = Path(tempfile.mkdtemp(prefix="stk-bboot-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        await make_disks(img, d)
        argv = argv_for(img, d, BOOT_CMDLINE)
        if verbose:
            print("  " + " ".join(argv))
        log = (d / "qemu.log").open("wb")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        deadline = t0 + timeout
        row: dict[str, float] = {}
        qpid = proc.pid

        async def agent() -> None:
            got = await poll_agent(d / "agent.sock", t0, deadline)
            row["agent"], row["agent_cpu"] = got or -1.0, cpu_s(qpid) if got else -1.0

        async def login() -> float | None:
            got = await poll_login(d, t0, deadline)
            row["ssh"], row["ssh_cpu"] = got or -1.0, cpu_s(qpid) if got else -1.0
            return got

        _, ssh_s = await asyncio.gather(agent(), login())
        if ssh_s is None:
            print(f"  no SSH login within {timeout:.0f}s; serial log tail:")
            print((d / "serial.log").read_text(errors="replace")[-3000:])
            return row
        t1 = time.monotonic()
        r = await asyncio.to_thread(sh, *ssh_argv(d, "true"), check=False)
        if r.returncode == 0:
            row["login2"] = time.monotonic() - t1
        j = await asyncio.to_thread(
            sh,
            *ssh_argv(d, "journalctl -b -o short-monotonic --no-pager -q; cat /proc/uptime"),
            check=False,
        )
        try:
            uptime = float(j.stdout.strip().splitlines()[-1].split()[0])
        except (IndexError, ValueError):
            print(f"  could not read the guest journal: {j.stderr.strip()}")
            return row
        # Kernel clock zero in spawn time: the guest's uptime, read now, against the host's.
        row["kernel_zero"] = (time.monotonic() - t0) - uptime
        for k, v in timeline(j.stdout).items():
            row["t:" + k] = v
        if cmd:
            out = await asyncio.to_thread(sh, *ssh_argv(d, cmd), check=False, timeout=120)
            print(out.stdout + out.stderr)
        if verbose:
            extra = await asyncio.to_thread(
                sh,
                *ssh_argv(
                    d,
                    "systemd-analyze blame --no-pager | head -25; "
                    "systemd-analyze critical-chain --no-pager ssh.service stoker-agent.service",
                ),
                check=False,
            )
            print(extra.stdout)
        return row
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if keep is not None and (d / "serial.log").exists():
            keep.mkdir(parents=True, exist_ok=True)
            n = len(img.runs) + 1
            shutil.copyfile(d / "serial.log", keep / f"{img.label}-{n}.serial.log")
            if "j" in locals():
                (keep / f"{img.label}-{n}.journal").write_text(j.stdout)
        shutil.rmtree(d, ignore_errors=True)


def fmt(v: float | None) -> str:
    return f"{v:6.2f}" if v is not None and v >= 0 else "     -"


def report(images: list[Image]) -> None:
    keys = ["agent", "ssh", "agent_cpu", "ssh_cpu", "login2", "kernel_zero"]
    keys += ["t:" + m for m, _ in MILESTONES]
    names = {
        "agent": "spawn -> agent-ready (s)",
        "ssh": "spawn -> SSH-ready (login ran)",
        "agent_cpu": "QEMU CPU s at agent-ready",
        "ssh_cpu": "QEMU CPU s at SSH-ready",
        "login2": "next SSH `true` (booted)",
        "kernel_zero": "kernel clock 0 after spawn",
    }
    print()
    print(f"{'':34}" + "".join(f"{img.label:>24}" for img in images))
    print(f"{'(median of boots; min-max)':34}")
    for k in keys:
        cells = []
        for img in images:
            vals = [r[k] for r in img.runs if k in r and r[k] >= 0]
            if not vals:
                cells.append(f"{'-':>24}")
                continue
            cells.append(
                f"{statistics.median(vals):8.2f} ({min(vals):5.2f}-{max(vals):5.2f})".rjust(24)
            )
        label = names.get(k) or ("  guest " + k[2:])
        print(f"{label:34}" + "".join(cells))


async def build(out: Path) -> Path:
    t0 = time.monotonic()
    res = await golden.build_golden(Runner(), out, cache_dir=CACHE / "apt")
    print(
        f"golden image {'reused' if res.reused else 'built'} in {time.monotonic() - t0:.1f}s: "
        f"{out} (rootfs {res.rootfs.stat().st_blocks * 512 // MIB} MiB used, "
        f"initrd {res.initrd.stat().st_size // 1024} KiB)"
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--build", type=Path, help="build/reuse this tree's golden image here")
    ap.add_argument(
        "--image",
        action="append",
        default=[],
        help="DIR[=LABEL][;nopvh][;args=KERNEL ARGS] to boot (nopvh: the bzImage)",
    )
    ap.add_argument("--baseline", type=Path, help="a golden dir booted with pre-lean settings")
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--cmd", default="", help="run this in each guest after boot, print it")
    ap.add_argument("--keep", type=Path, help="copy each boot's serial log and journal here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespace, tap)", file=sys.stderr)
        return 2
    images: list[Image] = []
    if args.baseline:
        images.append(Image("baseline", args.baseline, legacy=True))
    for spec in args.image:
        head, *opts = spec.split(";")
        path, _, label = head.partition("=")
        img = Image(label or Path(path).name, Path(path))
        for o in opts:
            if o == "nopvh":
                img.pvh = False
            elif o.startswith("args="):
                img.args = o[5:]
            else:
                ap.error(f"unknown image option {o!r} (nopvh, args=...)")
        images.append(img)
    if args.build:
        asyncio.run(build(args.build))
        images.append(Image("lean", args.build))
    if not images:
        ap.error("nothing to boot: give --build, --image or --baseline")
    vmlinux_dir = Path(tempfile.mkdtemp(prefix="stk-bboot-vmlinux-"))
    ns = make_netns()
    try:
        for i, img in enumerate(images):
            img.vmlinux = vmlinux_dir / f"{i}.vmlinux"
            km.extract_vmlinux(img.dir / golden.KERNEL_DIR / "vmlinuz", img.vmlinux)
        enter_netns(ns)
        for n in range(args.boots):
            for img in images:
                row = asyncio.run(boot_once(img, args.verbose, args.timeout, args.keep, args.cmd))
                img.runs.append(row)
                tl = " ".join(
                    f"{k[2:]}={v:.1f}"
                    for k, v in sorted(row.items(), key=lambda kv: kv[1])
                    if k.startswith("t:")
                )
                print(
                    f"boot {n + 1} {img.label}: agent {fmt(row.get('agent'))}s "
                    f"ssh {fmt(row.get('ssh'))}s next {fmt(row.get('login2'))}s "
                    f"(QEMU CPU {fmt(row.get('agent_cpu'))}s/{fmt(row.get('ssh_cpu'))}s, "
                    f"load {os.getloadavg()[0]:.1f}) | {tl}",
                    flush=True,
                )
        report(images)
    finally:
        remove_netns(ns)
        shutil.rmtree(vmlinux_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
