"""Workload roots: OCI images that run on a system image (docs/guest-boot.md).

An image that carries no SSH server (nothing stoker can boot into and reach) is not
booted: the VM boots a system image (the default golden image) and the OCI image becomes
its *workload root* on a fourth disk. `vm exec`, `vm run -- CMD` and `vm ssh` sessions run
inside it with the process settings of the image's config. This module is the host side's
one description of those settings:

- `role_for(has_sshd)`: which role a pulled image gets;
- `from_oci(...)`: the image config's Env, WorkingDir and User, checked and resolved on
  the host against the unpacked tree (a hostile tree: its /etc/passwd and /etc/group are
  read through `SafeTree`, bounded, never followed out of the root), kept in the image's
  `meta["workload"]`;
- `guest_files(cfg)`: the per-VM files that tell the guest's ssh sessions how to enter it;
- `exec_defaults(...)`: the environment, directory and user of an exec.

A config without PATH gets `DEFAULT_PATH` (the one Docker and the OCI runtimes use) and a
note the pull prints; nothing else is invented.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.daemon.imagemgr.safetree import SafeTree
from stoker.errors import InvalidArgument

ROLE_SYSTEM = "system"
ROLE_WORKLOAD = "workload"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The guest device the workload root is attached as (after rootfs, overlay, work disk),
# and the kernel command-line word that tells the guest about it.
WORKLOAD_DEVICE = "/dev/vdd"
CMDLINE_ARG = f"stoker.workload={WORKLOAD_DEVICE}"
# What the system image must carry for a workload root (guest files of this version).
GUEST_SETUP = "/usr/lib/stoker/stoker-workload"
ENTER = "/usr/lib/stoker/stoker-enter"
SSHD_DROPIN = "etc/ssh/sshd_config.d/stoker-workload.conf"
CONF_FILE = "etc/stoker/workload.conf"
ENV_FILE = "etc/stoker/workload.env"
MAX_ACCOUNTS_READ = 1 << 20
MAX_ENV = 1024


class BadWorkloadConfig(InvalidArgument):
    """The image's config asks for something a workload root cannot do."""


def role_for(has_sshd: bool) -> str:
    """Images with an SSH server boot directly (as before); the rest are workload roots."""
    return ROLE_SYSTEM if has_sshd else ROLE_WORKLOAD


@dataclass
class WorkloadConfig:
    """The process settings of a workload root, resolved at pull time."""

    env: list[tuple[str, str]] = field(default_factory=lambda: [("PATH", DEFAULT_PATH)])
    working_dir: str = "/"
    user: str = ""  # as the config wrote it ("" = root)
    uid: int = 0
    gid: int = 0
    home: str = "/root"

    def to_meta(self) -> dict[str, Any]:
        return {
            "env": [f"{k}={v}" for k, v in self.env],
            "working_dir": self.working_dir,
            "user": self.user,
            "uid": self.uid,
            "gid": self.gid,
            "home": self.home,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> WorkloadConfig:
        """The config kept in an image's meta; an image pulled before workload roots has
        none (the defaults: root, /, DEFAULT_PATH)."""
        raw = meta.get("workload")
        if not isinstance(raw, dict):
            return cls()
        env: list[tuple[str, str]] = []
        for e in raw.get("env") or []:
            if isinstance(e, str) and "=" in e:
                k, v = e.split("=", 1)
                env.append((k, v))
        if not any(k == "PATH" for k, _ in env):
            env.insert(0, ("PATH", DEFAULT_PATH))
        return cls(
            env=env,
            working_dir=str(raw.get("working_dir") or "/"),
            user=str(raw.get("user") or ""),
            uid=int(raw.get("uid") or 0),
            gid=int(raw.get("gid") or 0),
            home=str(raw.get("home") or "/"),
        )


def _env(entries: list[str], ref: str, notes: list[str]) -> list[tuple[str, str]]:
    out: dict[str, str] = {}
    if len(entries) > MAX_ENV:
        raise BadWorkloadConfig(
            f"image {ref}: its config sets {len(entries)} environment variables, over the "
            f"{MAX_ENV} stoker accepts: the image is broken or hostile"
        )
    for i, e in enumerate(entries):
        name, sep, value = e.partition("=")
        bad = not sep or not name or any(c in e for c in "\0\n\r")
        if bad:
            raise BadWorkloadConfig(
                f"image {ref}: Env entry {i + 1} of its config ({e[:60]!r}) is not NAME=VALUE "
                "on one line: fix the image's ENV"
            )
        out[name] = value
    if "PATH" not in out:
        notes.append(
            f"{ref}: the image's config sets no PATH; commands in it get the default "
            f"PATH={DEFAULT_PATH}"
        )
        out = {"PATH": DEFAULT_PATH, **out}
    return list(out.items())


def _accounts(tree: SafeTree, path: str) -> list[list[str]]:
    data = tree.read(path, MAX_ACCOUNTS_READ)
    if data is None:
        return []
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _resolve_user(user: str, root: Path, ref: str) -> tuple[int, int, str]:
    """(uid, gid, home) of the config's User ("name", "uid", "name:group", "uid:gid"...),
    looked up in the tree's own /etc/passwd and /etc/group like a container runtime."""
    if not user:
        return 0, 0, "/root"
    name, _, group = user.partition(":")
    with SafeTree(root, chown_root=False) as tree:
        passwd = [r for r in _accounts(tree, "/etc/passwd") if len(r) >= 7]
        groups = [r for r in _accounts(tree, "/etc/group") if len(r) >= 3]
    entry = None
    if name.isdigit():
        uid = int(name)
        entry = next((r for r in passwd if r[2] == name), None)
    else:
        entry = next((r for r in passwd if r[0] == name), None)
        if entry is None:
            raise BadWorkloadConfig(
                f"image {ref}: its config runs as user {name!r}, which the image's "
                "/etc/passwd does not have: fix the image's USER"
            )
        uid = int(entry[2]) if entry[2].isdigit() else -1
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    if entry is not None and entry[5].startswith("/"):
        home = entry[5]
    else:
        home = "/root" if uid == 0 else "/"
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((r for r in groups if r[0] == group), None)
            if g is None or not g[2].isdigit():
                raise BadWorkloadConfig(
                    f"image {ref}: its config runs as group {group!r}, which the image's "
                    "/etc/group does not have: fix the image's USER"
                )
            gid = int(g[2])
    if not 0 <= uid < 2**32 - 1 or not 0 <= gid < 2**32 - 1:
        raise BadWorkloadConfig(f"image {ref}: user {user!r} has no valid uid/gid")
    return uid, gid, home


def from_oci(
    env: list[str], working_dir: str, user: str, root: Path, ref: str
) -> tuple[WorkloadConfig, list[str]]:
    """The workload settings of a pulled image (its config's Env, WorkingDir, User, checked
    against its unpacked tree `root`) and the notes the pull should print."""
    notes: list[str] = []
    pairs = _env(env, ref, notes)
    wd = working_dir or "/"
    if not wd.startswith("/") or any(c in wd for c in "\0\n\r"):
        raise BadWorkloadConfig(
            f"image {ref}: its config's WorkingDir {wd[:80]!r} is not an absolute path: fix "
            "the image's WORKDIR"
        )
    if user and any(c in user for c in "\0\n\r/ "):
        raise BadWorkloadConfig(f"image {ref}: its config's User {user[:60]!r} is malformed")
    uid, gid, home = _resolve_user(user, root, ref)
    return WorkloadConfig(pairs, wd, user, uid, gid, home), notes


def guest_files(cfg: WorkloadConfig) -> dict[str, bytes]:
    """Per-VM files (paths relative to the guest's /) for a VM on a workload root:
    the sshd drop-in that sends every session through stoker-enter (stoker's own SSH
    sends STOKER_ROOT=system and stays in the system root), the enter settings as
    shell words, and the image's environment one NAME=VALUE per line."""
    conf = "".join(
        f"{k}={shlex.quote(v)}\n"
        for k, v in (
            ("WORKLOAD_UID", str(cfg.uid)),
            ("WORKLOAD_GID", str(cfg.gid)),
            ("WORKLOAD_CWD", cfg.working_dir),
            ("WORKLOAD_HOME", cfg.home),
        )
    )
    env = "".join(f"{k}={v}\n" for k, v in cfg.env)
    return {
        SSHD_DROPIN: f"AcceptEnv STOKER_ROOT\nForceCommand {ENTER}\n".encode(),
        CONF_FILE: conf.encode(),
        ENV_FILE: env.encode(),
    }


def exec_defaults(
    cfg: WorkloadConfig,
    env: dict[str, str],
    cwd: str | None,
    user: str | None,
    workspace: str | None,
) -> tuple[dict[str, str], str, str]:
    """(env, cwd, user) of an exec in a workload root: the image's environment under the
    caller's, the caller's directory else the workspace (when one is prepared) else the
    image's WorkingDir, the caller's user else the image's."""
    merged = dict(cfg.env)
    merged.update(env)
    where = cwd or workspace or cfg.working_dir
    who = user if user is not None else f"{cfg.uid}:{cfg.gid}"
    return merged, where, who
