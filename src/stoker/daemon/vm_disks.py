"""Per-VM disk preparation for VMService (overlay disk, work disk, per-VM files).

Nothing here mounts anything: disks are built with `mkfs.ext4 -d` from a staging tree and
edited with debugfs through the imagemgr ext4 helpers.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import stoker.daemon.imagemgr.ext4 as ext4
from stoker.runner import Runner


@dataclass(frozen=True)
class GuestNet:
    """A VM's network identity as the guest sees it."""

    hostname: str
    ip: str
    prefix: int
    gateway: str
    mac: str
    dns: tuple[str, ...]


def mac_for(ip: str) -> str:
    """Deterministic locally-administered MAC from the guest IPv4."""
    b = ipaddress.IPv4Address(ip).packed
    return "06:53:" + ":".join(f"{x:02x}" for x in b)


def hosts_file(hostname: str, ip: str) -> str:
    """The guest's /etc/hosts: its own name on 127.0.1.1 and on its address as NAME.vm."""
    return (
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n{ip}\t{hostname}.vm {hostname}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    )


def overlay_tree(
    staging: Path, net: GuestNet, host_key: Path, extra: dict[str, bytes] | None = None
) -> None:
    """Lay out the overlay disk's content: upper/ with per-VM files, and work/. `extra`:
    more per-VM files (guest path relative to / -> content, mode 0644), e.g. a workload
    root's enter settings."""
    upper = staging / "upper"
    (staging / "work").mkdir(parents=True, exist_ok=True)
    etc = upper / "etc"
    (etc / "stoker").mkdir(parents=True, exist_ok=True)
    (etc / "ssh").mkdir(parents=True, exist_ok=True)
    (etc / "hostname").write_text(net.hostname + "\n")
    (etc / "hosts").write_text(hosts_file(net.hostname, net.ip))
    (etc / "resolv.conf").write_text("".join(f"nameserver {d}\n" for d in net.dns))
    (etc / "stoker" / "network.env").write_text(
        f"STOKER_IP={net.ip}\nSTOKER_PREFIX={net.prefix}\nSTOKER_GATEWAY={net.gateway}\n"
        f'STOKER_MAC={net.mac}\nSTOKER_DNS="{" ".join(net.dns)}"\n'
        f"STOKER_HOSTNAME={net.hostname}\n"
    )
    key = etc / "ssh" / "ssh_host_ed25519_key"
    shutil.copyfile(host_key, key)
    os.chmod(key, 0o600)
    shutil.copyfile(host_key.with_name(host_key.name + ".pub"), key.with_name(key.name + ".pub"))
    os.chmod(key.with_name(key.name + ".pub"), 0o644)
    for d in (upper, etc, etc / "stoker", etc / "ssh"):
        os.chmod(d, 0o755)
    for rel, data in sorted((extra or {}).items()):
        dest = upper / rel
        if dest.parent != upper:
            dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        dest.write_bytes(data)
        os.chmod(dest, 0o644)


async def make_overlay_disk(
    runner: Runner,
    out: Path,
    size: int,
    net: GuestNet,
    host_key: Path,
    extra: dict[str, bytes] | None = None,
) -> None:
    """Build the per-VM copy-on-write disk (sparse ext4) with its per-VM files."""
    with tempfile.TemporaryDirectory(prefix="overlay-", dir=out.parent) as tmp:
        staging = Path(tmp) / "tree"
        staging.mkdir()
        overlay_tree(staging, net, host_key, extra)
        await ext4.build_from_dir(runner, staging, out, size, label="stoker-rw")


async def make_work_disk(runner: Runner, out: Path, size: int, seed: Path | None) -> None:
    """Clone the image's work-seed (or make an empty ext4) and grow it to `size`."""
    if seed is not None and seed.exists():
        await ext4.clone_grow(runner, seed, out, size)
    else:
        with tempfile.TemporaryDirectory(prefix="work-", dir=out.parent) as tmp:
            root = Path(tmp)
            os.chmod(root, 0o755)
            await ext4.build_from_dir(runner, root, out, size, label="stoker-work")


async def grow_work_disk(runner: Runner, disk: Path, size: int) -> None:
    """Grow the work disk to `size` if it is smaller (disks only grow)."""
    if disk.stat().st_size < size:
        await ext4.grow(runner, disk, size)


async def sync_work_disk(
    runner: Runner,
    disk: Path,
    authorized_key: str,
    gitconfig: str | None,
    files: list[tuple[str, bytes, int]],
) -> None:
    """Write authorized_keys, git identity and file_sync entries onto the work disk.

    Paths are guest paths under /root; the disk's root directory is /root.
    """
    await ext4.set_mode(runner, disk, "/", 0o755, 0, 0)
    await ext4.mkdir_p(runner, disk, "/.ssh", 0o700)
    await ext4.write_file(
        runner, disk, "/.ssh/authorized_keys", (authorized_key + "\n").encode(), 0o600
    )
    if gitconfig is not None:
        await ext4.write_file(runner, disk, "/.gitconfig", gitconfig.encode(), 0o644)
    for guest, data, mode in files:
        rel = "/" + os.path.relpath(guest, "/root")
        parent = os.path.dirname(rel)
        if parent not in ("", "/"):
            await ext4.mkdir_p(runner, disk, parent, 0o755)
        await ext4.write_file(runner, disk, rel, data, mode)
