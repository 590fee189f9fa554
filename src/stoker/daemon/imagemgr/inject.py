"""The one injection step every image route shares (golden build, OCI pull, bundles).

`inject_guest_files(root)` writes stoker's guest side into an unpacked root tree before
its ext4 is made: the overlay-init that builds the copy-on-write root, the network
bootstrap and its unit, the sshd drop-in, tmpfiles for /run/sshd; fstab loses any / or
/root entry (overlay-init mounts both).
The files themselves are package data under `stoker/guest/files/`, laid out as they land
in the guest. See docs/guest-boot.md for what each piece must do.

Trees from OCI registries are untrusted: their symlinks are resolved *inside* `root`
(as the guest would see them), never on the host, so nothing is written outside it
(see `safetree`).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from stoker.daemon.imagemgr.safetree import SafeTree
from stoker.errors import InvalidArgument

InitKind = Literal["systemd", "stoker-init"]

OVERLAY_INIT = "/usr/lib/stoker/overlay-init"
STOKER_INIT = "/usr/lib/stoker/stoker-init"
INIT_CONF = "/usr/lib/stoker/init.conf"
NET_UNIT = "stoker-net.service"
NET_UNIT_PATH = "/usr/lib/systemd/system/" + NET_UNIT
NET_UNIT_WANTS = "/etc/systemd/system/multi-user.target.wants/" + NET_UNIT
SSHD_DROPIN_DIR = "/etc/ssh/sshd_config.d"
# What earlier versions added to fstab for the work disk; overlay-init mounts it now.
FSTAB_WORK_LINE = "/dev/vdc  /root  ext4  defaults,nofail,x-systemd.device-timeout=30s  0  2"

_HOST_KEY = re.compile(r"^ssh_host_.*_key(\.pub)?$")
_MAX_LINKS = 40
# fstab and sshd_config are a few KiB; an image with more is broken or hostile.
MAX_CONFIG_READ = 1 << 20


def _guest_files_root() -> Traversable:
    return resources.files("stoker").joinpath("guest", "files")


def guest_files() -> dict[str, bytes]:
    """Every packaged guest file: guest path relative to / -> content."""
    out: dict[str, bytes] = {}

    def walk(node: Traversable, rel: str) -> None:
        for child in node.iterdir():
            sub = f"{rel}/{child.name}" if rel else child.name
            if child.is_dir():
                if child.name != "__pycache__":
                    walk(child, sub)
            elif child.is_file() and not child.name.endswith((".pyc", "~")):
                out[sub] = child.read_bytes()

    root = _guest_files_root()
    if not root.is_dir():
        raise FileNotFoundError(
            "stoker's guest files are missing from the installation (stoker/guest/files): "
            "reinstall stoker"
        )
    walk(root, "")
    return out


def guest_files_digest() -> str:
    """sha256 over the packaged guest files, so image specs change when they do."""
    h = hashlib.sha256()
    for rel, data in sorted(guest_files().items()):
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def resolve_in_root(root: Path, guest_path: str, *, follow_last: bool = False) -> Path:
    """Host path for `guest_path`, resolving symlinks as the guest would (chroot-like).

    Absolute link targets restart at `root`, `..` stops at `root`, so the result is always
    inside `root`. The last component is followed only with `follow_last`.
    """
    parts = [p for p in guest_path.split("/") if p and p != "."]
    resolved: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, name)
        if (parts or follow_last) and candidate.is_symlink():
            hops += 1
            if hops > _MAX_LINKS:
                raise InvalidArgument(f"too many symlinks resolving {guest_path} in {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(name)
    return root.joinpath(*resolved)


def _fstab(existing: bytes | None) -> bytes:
    """Keep fstab's other entries; drop any that mount / or /root (overlay-init mounts the
    overlay root and the work disk on /root before systemd starts)."""
    out: list[str] = []
    for line in (existing or b"").decode(errors="replace").splitlines():
        fields = line.split()
        if fields == FSTAB_WORK_LINE.split():
            continue  # ours, from an earlier injection
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1] in ("/", "/root"):
            # A read-only "/" entry makes systemd remount the overlay root read-only.
            out.append(f"# disabled by stoker: {line}")
            continue
        out.append(line)
    return ("\n".join(out) + "\n").encode() if out else b""


def _sshd_config(existing: bytes) -> bytes | None:
    """Make sshd_config include sshd_config.d (old or minimal configs do not)."""
    text = existing.decode(errors="replace")
    for line in text.splitlines():
        fields = line.split()
        if fields == FSTAB_WORK_LINE.split():
            continue  # ours, from an earlier injection: re-added below
        if len(fields) >= 2 and fields[0].lower() == "include" and "sshd_config.d" in fields[1]:
            return None
    # First match wins in sshd_config, so the include goes on top.
    return f"Include {SSHD_DROPIN_DIR}/*.conf\n{text}".encode()


def inject_guest_files(root: Path, *, init: InitKind = "systemd") -> None:
    """Install stoker's guest side into the unpacked root tree `root`. Idempotent.

    `init="systemd"` enables stoker-net.service through a wants symlink (no systemctl);
    `init="stoker-init"` makes overlay-init hand over to stoker's small init instead of
    /sbin/init, for images that have no systemd. Both get the same files, an fstab without
    / or /root entries (overlay-init mounts both), a 0755 root:root /root (a symlinked
    /root is replaced by a real directory: the work seed is built from it on the host), and
    no SSH host keys (each VM gets its own from the host).

    Blocking: run it in a thread. Every write goes through `SafeTree` (symlinks resolved
    inside `root`, temporaries created O_EXCL|O_NOFOLLOW); files read from the image
    (fstab, sshd_config) over `MAX_CONFIG_READ` bytes are refused (`TooLarge`).
    """
    if init not in ("systemd", "stoker-init"):
        raise InvalidArgument(f"unknown init {init!r}: use 'systemd' or 'stoker-init'")
    if not root.is_dir():
        raise InvalidArgument(f"cannot inject guest files into {root}: not a directory")

    with SafeTree(root) as tree:
        for rel, data in sorted(guest_files().items()):
            # Scripts (anything with a shebang) are executable; units and configs are not.
            tree.write("/" + rel, data, 0o755 if data.startswith(b"#!") else 0o644)

        if init == "systemd":
            tree.symlink(NET_UNIT_WANTS, NET_UNIT_PATH)
            tree.unlink(INIT_CONF)
        else:
            tree.write(INIT_CONF, f"STOKER_INIT={STOKER_INIT}\n".encode(), 0o644)

        tree.write("/etc/fstab", _fstab(tree.read("/etc/fstab", MAX_CONFIG_READ)), 0o644)

        sshd_config = tree.read("/etc/ssh/sshd_config", MAX_CONFIG_READ)
        if sshd_config is not None:
            new = _sshd_config(sshd_config)
            if new is not None:
                tree.write("/etc/ssh/sshd_config", new, 0o644)

        tree.remove_matching("/etc/ssh", lambda n: _HOST_KEY.match(n) is not None)
        tree.real_dir("/root", 0o755)


def real_root_dir(root: Path) -> None:
    """Make the tree's /root a real 0755 root:root directory (a symlinked one is replaced)
    without installing anything else: a workload root gets no guest files, but its work
    seed is built from /root like every image's."""
    with SafeTree(root) as tree:
        tree.real_dir("/root", 0o755)


def work_seed_source(root: Path) -> Path:
    """The host path of the image's /root for the work-seed build: a real directory
    that passes through no symlink below `root` (`inject_guest_files` made it one)."""
    with SafeTree(root) as tree:
        st = tree.lstat("/root")
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(
                f"{root}/root is not a real directory: inject the guest files first"
            )
        return tree.real_dir("/root", stat.S_IMODE(st.st_mode))


def is_injected(root: Path) -> bool:
    """True when `root` already carries stoker's overlay-init (executable)."""
    with SafeTree(root, chown_root=False) as tree:
        got = tree.resolve(OVERLAY_INIT, follow_last=True)
        if got is None:
            return False
        fd, _, name = got
        try:
            if name is None:
                return False
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
        finally:
            os.close(fd)
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)
