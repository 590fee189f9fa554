"""The one injection step every image route shares (golden build, OCI pull, bundles).

`inject_guest_files(root)` writes stoker's guest side into an unpacked root tree before
its ext4 is made: the overlay-init that builds the copy-on-write root, the network
bootstrap and its unit, the sshd drop-in, tmpfiles for /run/sshd, the /root fstab line.
The files themselves are package data under `stoker/guest/files/`, laid out as they land
in the guest. See docs/guest-boot.md for what each piece must do.

Trees from OCI registries are untrusted: their symlinks are resolved *inside* `root`
(as the guest would see them), never on the host, so nothing is written outside it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from stoker.errors import InvalidArgument

InitKind = Literal["systemd", "stoker-init"]

OVERLAY_INIT = "/usr/lib/stoker/overlay-init"
STOKER_INIT = "/usr/lib/stoker/stoker-init"
INIT_CONF = "/usr/lib/stoker/init.conf"
NET_UNIT = "stoker-net.service"
NET_UNIT_PATH = "/usr/lib/systemd/system/" + NET_UNIT
NET_UNIT_WANTS = "/etc/systemd/system/multi-user.target.wants/" + NET_UNIT
SSHD_DROPIN_DIR = "/etc/ssh/sshd_config.d"
FSTAB_WORK_LINE = "/dev/vdc  /root  ext4  defaults,nofail,x-systemd.device-timeout=30s  0  2"

_HOST_KEY = re.compile(r"^ssh_host_.*_key(\.pub)?$")
_MAX_LINKS = 40


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


def _mkdirs(root: Path, guest_dir: str) -> Path:
    """Create a guest directory (0755 root-owned parents), resolving links in the root."""
    parts = [p for p in guest_dir.split("/") if p]
    for i in range(1, len(parts) + 1):
        host = resolve_in_root(root, "/" + "/".join(parts[:i]), follow_last=True)
        if host.is_symlink() or (host.exists() and not host.is_dir()):
            # A dangling link or a file where a directory must be: replace it.
            host.unlink()
        if not host.exists():
            # The path is resolved, but a link may have pointed at directories that do
            # not exist yet: create each missing one, all inside the root.
            missing = [host, *(p for p in host.parents if p != root and root in p.parents)]
            for d in reversed(missing):
                if not d.exists():
                    d.mkdir(mode=0o755)
                    os.chmod(d, 0o755)
                    _chown_root(d)
    return resolve_in_root(root, guest_dir, follow_last=True)


def _chown_root(path: Path) -> None:
    # Building as an unprivileged user (unit tests) cannot chown; the daemon runs as root.
    if os.geteuid() == 0:
        os.lchown(path, 0, 0)


def _write(root: Path, guest_path: str, data: bytes, mode: int) -> None:
    parent = posixpath.dirname(guest_path)
    _mkdirs(root, parent)
    host = resolve_in_root(root, guest_path)
    if host.is_symlink() or (host.exists() and not host.is_dir()):
        host.unlink()
    elif host.is_dir():
        raise InvalidArgument(f"{guest_path} is a directory in {root}: cannot inject a file")
    tmp = host.with_name(f".{host.name}.stoker-tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    _chown_root(tmp)
    os.replace(tmp, host)


def _symlink(root: Path, guest_path: str, target: str) -> None:
    _mkdirs(root, posixpath.dirname(guest_path))
    host = resolve_in_root(root, guest_path)
    if host.is_symlink() or host.is_file():
        host.unlink()
    host.symlink_to(target)
    if os.geteuid() == 0:
        os.lchown(host, 0, 0)


def _read(root: Path, guest_path: str) -> bytes | None:
    host = resolve_in_root(root, guest_path, follow_last=True)
    if host.is_file() and not host.is_symlink():
        return host.read_bytes()
    return None


def _fstab(existing: bytes | None) -> bytes:
    """Keep fstab's other entries; drop any that mount / or /root, add the work disk."""
    out: list[str] = []
    for line in (existing or b"").decode(errors="replace").splitlines():
        fields = line.split()
        if fields == FSTAB_WORK_LINE.split():
            continue  # ours, from an earlier injection: re-added below
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1] in ("/", "/root"):
            # A read-only "/" entry makes systemd remount the overlay root read-only.
            out.append(f"# disabled by stoker: {line}")
            continue
        out.append(line)
    out.append(FSTAB_WORK_LINE)
    return ("\n".join(out) + "\n").encode()


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
    /sbin/init, for images that have no systemd. Both get the same files, the fstab line
    for the work disk on /root, a 0755 root:root /root, and no SSH host keys (each VM
    gets its own from the host).
    """
    if init not in ("systemd", "stoker-init"):
        raise InvalidArgument(f"unknown init {init!r}: use 'systemd' or 'stoker-init'")
    if not root.is_dir():
        raise InvalidArgument(f"cannot inject guest files into {root}: not a directory")

    for rel, data in sorted(guest_files().items()):
        # Scripts (anything with a shebang) are executable; units and configs are not.
        _write(root, "/" + rel, data, 0o755 if data.startswith(b"#!") else 0o644)

    if init == "systemd":
        _symlink(root, NET_UNIT_WANTS, NET_UNIT_PATH)
        conf = resolve_in_root(root, INIT_CONF)
        if conf.is_file() or conf.is_symlink():
            conf.unlink()
    else:
        _write(root, INIT_CONF, f"STOKER_INIT={STOKER_INIT}\n".encode(), 0o644)

    _write(root, "/etc/fstab", _fstab(_read(root, "/etc/fstab")), 0o644)

    sshd_config = _read(root, "/etc/ssh/sshd_config")
    if sshd_config is not None:
        new = _sshd_config(sshd_config)
        if new is not None:
            _write(root, "/etc/ssh/sshd_config", new, 0o644)

    ssh_dir = resolve_in_root(root, "/etc/ssh", follow_last=True)
    if ssh_dir.is_dir():
        for entry in ssh_dir.iterdir():
            if _HOST_KEY.match(entry.name) and (entry.is_file() or entry.is_symlink()):
                entry.unlink()

    home = _mkdirs(root, "/root")
    os.chmod(home, 0o755)
    _chown_root(home)


def is_injected(root: Path) -> bool:
    """True when `root` already carries stoker's overlay-init (executable)."""
    host = resolve_in_root(root, OVERLAY_INIT, follow_last=True)
    try:
        st = host.stat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)
