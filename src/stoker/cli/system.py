"""`stoker system install | uninstall`: stokerd as a system user, stoker-helper as root.

install (as root):
- the group whose members may use the CLI without sudo (`--group`, default `stoker`),
  made when missing; or `--owner USER`: the daemon runs as USER and only USER (and root)
  may use it;
- the daemon's system user (`--user`, default `stoker`; not with `--owner`), in that
  group and in `kvm` when the host has it, with a range of 65536 ids in /etc/subuid and
  /etc/subgid unless it has one (a golden build as that user runs mmdebstrap's unshare
  mode, which maps the image's users there);
- the units `stokerd.service` (User=, Group=, ExecStart= naming this interpreter) and
  `stoker-helper.service` (root), the helper's config (the daemon's uid owns the bridge,
  `tap-stk-*` taps and the `stoker` tables) and `socket_group` / `helper_socket` in the
  daemon's config, the state, cache and runtime directories owned by the daemon's user;
- a manifest (`/etc/stoker/install.json`) of what it made, which `uninstall` removes.
With systemd as PID 1 it reloads and enables both units; otherwise (or `--no-systemd`)
it says so and leaves starting them to you (tests run what the units say).
Everything is checked before anything is made; a failure part-way undoes what was made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from stoker.errors import StokerError

UNITS = ("stoker-helper.service", "stokerd.service")
DEFAULT_GROUP = "stoker"
DEFAULT_USER = "stoker"
SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("system", help="install or remove the system-wide stokerd and its helper")
    ssub = p.add_subparsers(dest="system_cmd", required=True, metavar="COMMAND")
    i = ssub.add_parser(
        "install", help="install stokerd (as a system user) and stoker-helper (root) as units"
    )
    who = i.add_mutually_exclusive_group()
    who.add_argument(
        "--group",
        metavar="GROUP",
        help=f"members of GROUP may use stoker without sudo (default {DEFAULT_GROUP}; made "
        "if missing)",
    )
    who.add_argument(
        "--owner", metavar="USER", help="run stokerd as USER; only USER (and root) may use it"
    )
    i.add_argument(
        "--user",
        default=DEFAULT_USER,
        help=f"system user stokerd runs as (default {DEFAULT_USER}; made if missing)",
    )
    i.add_argument("--root", default="/", help="install below this directory (default /)")
    i.add_argument(
        "--no-systemd", action="store_true", help="write the units but do not run systemctl"
    )
    i.add_argument(
        "--python", help="interpreter the units run (default: the one running this command)"
    )
    i.add_argument(
        "--pythonpath", help="PYTHONPATH for the units (a source checkout; default none)"
    )
    i.add_argument(
        "--netns",
        help="the bridge lives in this network namespace (stokerd must be run inside it)",
    )
    i.set_defaults(func=system_install)
    u = ssub.add_parser("uninstall", help="remove what `stoker system install` made")
    u.add_argument("--root", default="/", help="the --root the install used (default /)")
    u.add_argument(
        "--purge", action="store_true", help="also delete the state and cache directories"
    )
    u.add_argument("--no-systemd", action="store_true", help="do not run systemctl")
    u.set_defaults(func=system_uninstall)


# --- small host helpers ----------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(argv[0], path=SBIN) or argv[0]
    return subprocess.run(
        [exe, *argv[1:]], capture_output=True, text=True, timeout=60, env={"PATH": SBIN}
    )


def _must(*argv: str) -> None:
    r = _run(*argv)
    if r.returncode != 0:
        raise StokerError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def _user(name: str) -> Any:
    import pwd

    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _group(name: str) -> Any:
    import grp

    try:
        return grp.getgrnam(name)
    except KeyError:
        return None


def _check_name(what: str, name: str) -> str:
    import re

    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", name) or name == "root":
        raise StokerError(
            f"{what} {name!r} is not a usable name: 1-32 of [a-z0-9_-], starting with a "
            "letter or '_', not root"
        )
    return name


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


# --- unit text ---------------------------------------------------------------------------


def _exec(python: str, module: str, *args: str) -> str:
    return " ".join([python, "-m", module, *args])


def daemon_unit(template: str, python: str, user: str, group: str, env: dict[str, str]) -> str:
    """The packaged stokerd unit, run as `user`:`group` with this interpreter."""
    import re

    text = re.sub(
        r"^ExecStart=.*$",
        "ExecStart=" + _exec(python, "stoker.daemon.main", "--system"),
        template,
        flags=re.M,
    )
    extra = [f"User={user}", f"Group={group}", "RuntimeDirectoryMode=0750", "UMask=0077"]
    extra += [f"Environment={k}={v}" for k, v in sorted(env.items())]
    extra += ["After=stoker-helper.service", "Wants=stoker-helper.service"]
    service = [e for e in extra if not e.startswith(("After=", "Wants="))]
    unit = [e for e in extra if e.startswith(("After=", "Wants="))]
    text = text.replace("[Service]\n", "[Service]\n" + "\n".join(service) + "\n", 1)
    return text.replace("[Unit]\n", "[Unit]\n" + "\n".join(unit) + "\n", 1)


def helper_unit(python: str, config: Path, env: dict[str, str]) -> str:
    envs = "".join(f"Environment={k}={v}\n" for k, v in sorted(env.items()))
    return (
        "# stoker-helper: the few host operations stokerd (not root) may not do itself\n"
        "# (bridge, taps, tap descriptors, nft rules in stoker's tables, the guest DNS\n"
        "# port), for the callers its config names. See docs/ARCHITECTURE.md.\n"
        "[Unit]\n"
        "Description=stoker root helper (bridge, taps, nft rules for stokerd)\n"
        "Before=stokerd.service\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={_exec(python, 'stoker.helper', '--config', str(config))}\n"
        f"{envs}"
        "Restart=always\n"
        "RestartSec=1\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def parse_unit(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit (every section), each key's values in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        k, _, v = line.partition("=")
        out.setdefault(k.strip(), []).append(v.strip())
    return out


# --- install -----------------------------------------------------------------------------


class _Undo:
    """What this install made, in order: undone in reverse when a later step fails, and
    written as the manifest `uninstall` reads."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.groups: list[str] = []
        self.files: list[str] = []
        self.dirs: list[str] = []
        self.config_keys: list[str] = []
        self.subids: list[Any] = []  # [user, first, count] added to /etc/subuid, subgid

    def manifest(self, **kw: Any) -> dict[str, Any]:
        return {
            "users": self.users,
            "groups": self.groups,
            "files": self.files,
            "dirs": self.dirs,
            "config_keys": self.config_keys,
            "subids": self.subids,
            **kw,
        }

    def rollback(self) -> None:
        _del_subids(self.subids)
        for f in reversed(self.files):
            Path(f).unlink(missing_ok=True)
        for d in reversed(self.dirs):
            shutil.rmtree(d, ignore_errors=True)
        for u in reversed(self.users):
            _run("userdel", u)
        for g in reversed(self.groups):
            _run("groupdel", g)


SUBID_COUNT = 65536
SUBID_FLOOR = 100000


def _subid_lines(etc: Path = Path("/etc")) -> dict[str, list[tuple[str, int, int]]]:
    out: dict[str, list[tuple[str, int, int]]] = {}
    for name in ("subuid", "subgid"):
        rows: list[tuple[str, int, int]] = []
        try:
            text = (etc / name).read_text()
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            f = line.strip().split(":")
            if len(f) == 3 and f[1].isdigit() and f[2].isdigit():
                rows.append((f[0], int(f[1]), int(f[2])))
        out[name] = rows
    return out


def _free_subids(user: str, uid: int) -> int | None:
    """First id of a free range of SUBID_COUNT in both files, or None when `user` already
    has one (mmdebstrap's unshare mode, the golden build of a daemon that is not root)."""
    files = _subid_lines()
    if all(
        any(u in (user, str(uid)) and n >= SUBID_COUNT for u, _, n in rows)
        for rows in files.values()
    ):
        return None
    taken = sorted((a, a + n) for rows in files.values() for _, a, n in rows)
    first = SUBID_FLOOR
    for a, b in taken:
        if a < first + SUBID_COUNT and b > first:
            first = b
    return first


def _del_subids(subids: list[Any]) -> None:
    if len(subids) == 3:
        user, first, count = subids
        span = f"{first}-{first + count - 1}"
        _run("usermod", "--del-subuids", span, "--del-subgids", span, str(user))


def _write(path: Path, text: str, undo: _Undo, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    tmp = path.with_name(f".{path.name}.stoker-tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chown(tmp, 0, 0)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    if not existed:
        undo.files.append(str(path))


def _daemon_config(path: Path, group: str, helper_socket: Path) -> tuple[str, list[str]]:
    """The daemon's config with socket_group and helper_socket set (top-level keys go
    before any table). Refuses to change a value the admin set differently."""
    import tomllib

    text = path.read_text() if path.exists() else ""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StokerError(f"{path} is not valid TOML ({e}): fix it first") from None
    want = {"socket_group": group, "helper_socket": str(helper_socket)}
    add = []
    for k, v in want.items():
        if k in doc and doc[k] != v:
            raise StokerError(
                f"{path} sets {k} = {doc[k]!r}, but this install needs {v!r}: change or "
                "remove that line, then run install again"
            )
        if k not in doc:
            add.append(k)
    head = "".join(f'{k} = "{want[k]}"\n' for k in add)
    return (head + text) if add else text, add


def _grant(path: Path) -> tuple[str, str]:
    """bridge_name and bridge_cidr of the daemon's config (defaults when unset)."""
    from stoker.config import load_config

    c = load_config(path if path.exists() else None)
    return c.bridge_name, str(c.bridge_network)


def _check_python(python: str, uid: int, gid: int, env: dict[str, str]) -> None:
    r = subprocess.run(
        [
            shutil.which("setpriv", path=SBIN) or "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            python,
            "-c",
            "import stoker.daemon.main, stoker.helper.server",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": SBIN, **env},
    )
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise StokerError(
            f"the daemon's user (uid {uid}) cannot run {python} with stoker ({tail}): "
            "install stoker where other users can read it (a venv under /opt, or pipx "
            "--global), or pass --python / --pythonpath"
        )


def system_install(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise StokerError("stoker system install must run as root (sudo stoker system install)")
    root = Path(args.root).resolve()
    python = args.python or sys.executable
    if not os.path.isabs(python) or not os.access(python, os.X_OK):
        raise StokerError(f"--python {python!r} is not an executable absolute path")
    env = {"STOKER_ROOT": str(root)} if root != Path("/") else {}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    group = _check_name("group", args.group or DEFAULT_GROUP) if not args.owner else ""
    if args.owner:
        owner = _user(_check_name("user", args.owner))
        if owner is None:
            raise StokerError(f"--owner {args.owner}: no such user")
        if owner.pw_uid == 0:
            raise StokerError("--owner root: the point is a daemon that is not root")
        user = args.owner
    else:
        user = _check_name("user", args.user)
    etc = _under(root, "/etc/stoker")
    manifest = etc / "install.json"
    if manifest.exists():
        raise StokerError(
            f"stoker is already installed here ({manifest}): `stoker system uninstall` first"
        )
    units_dir = _under(root, "/etc/systemd/system")
    helper_cfg = etc / "helper.toml"
    helper_sock = _under(root, "/run/stoker-helper.sock")
    config = etc / "config.toml"
    new_config, added = _daemon_config(config, group, helper_sock)
    bridge, cidr = _grant(config)
    from importlib.resources import files

    template = files("stoker").joinpath("data/stokerd.service").read_text()

    undo = _Undo()
    try:
        if group and _group(group) is None:
            _must("groupadd", "--system", group)
            undo.groups.append(group)
        if _user(user) is None:
            primary = ["--gid", group] if group else ["--user-group"]
            _must(
                "useradd", "--system", *primary, "--no-create-home",
                "--home-dir", str(_under(root, "/var/lib/stoker")),
                "--shell", "/usr/sbin/nologin", "--comment", "stoker daemon", user,
            )  # fmt: skip
            undo.users.append(user)
        pw = _user(user)
        assert pw is not None
        if _group("kvm") is not None:
            _run("usermod", "-aG", "kvm", user)
        first = _free_subids(user, pw.pw_uid)
        if first is not None:
            span = f"{first}-{first + SUBID_COUNT - 1}"
            _must("usermod", "--add-subuids", span, "--add-subgids", span, user)
            undo.subids = [user, first, SUBID_COUNT]
        daemon_group = group or _group_name(pw.pw_gid)
        _check_python(python, pw.pw_uid, pw.pw_gid, env)
        from stoker.helper.config import render

        caller: dict[str, Any] = {
            "uid": pw.pw_uid,
            "bridge": bridge,
            "cidr": cidr,
            "tap_prefix": "tap-stk-",
            "table": "stoker",
        }
        if args.netns:
            caller["netns"] = args.netns
        _write(helper_cfg, render([caller], helper_sock), undo)
        _write(config, new_config, undo)
        undo.config_keys = added
        _write(units_dir / "stoker-helper.service", helper_unit(python, helper_cfg, env), undo)
        _write(
            units_dir / "stokerd.service",
            daemon_unit(template, python, user, daemon_group, env),
            undo,
        )
        gid = _group(daemon_group).gr_gid
        for d, mode, g in (
            ("/var/lib/stoker", 0o700, pw.pw_gid),
            ("/var/cache/stoker", 0o700, pw.pw_gid),
            ("/run/stoker", 0o750, gid),
        ):
            p = _under(root, d)
            if not p.exists():
                p.mkdir(parents=True, mode=mode)
                undo.dirs.append(str(p))
            else:
                # A root daemon's state (images it built, VMs, its lock files): the
                # daemon's user owns it now.
                _chown_tree(p, pw.pw_uid, pw.pw_gid)
            os.chown(p, pw.pw_uid, g)
            os.chmod(p, mode)
        info = undo.manifest(user=user, group=group, root=str(root), python=python)
        _write(manifest, json.dumps(info, indent=2) + "\n", undo)
        started = False
        if not args.no_systemd and root == Path("/") and _systemd_running():
            _must("systemctl", "daemon-reload")
            _must("systemctl", "enable", "--now", *UNITS)
            started = True
    except BaseException:
        undo.rollback()
        raise
    who = f"members of group {group}" if group else f"user {user}"
    print(f"installed: stokerd runs as {user}; {who} may use stoker without sudo")
    print(f"units: {units_dir / 'stokerd.service'}, {units_dir / 'stoker-helper.service'}")
    if group:
        print(f"add a user: usermod -aG {group} USER (then log in again)")
    if not started:
        why = "--no-systemd" if args.no_systemd else "systemd is not PID 1 here"
        if root != Path("/"):
            why = f"installed below {root}"
        print(f"not started ({why}): run what the units' ExecStart= lines say")
    return 0


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    """lchown everything below `top` (links are not followed)."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for n in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, n), uid, gid)


def _group_name(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


def system_uninstall(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise StokerError("stoker system uninstall must run as root")
    root = Path(args.root).resolve()
    etc = _under(root, "/etc/stoker")
    manifest = etc / "install.json"
    try:
        info = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise StokerError(f"nothing to uninstall: {manifest} does not exist") from None
    except ValueError as e:
        raise StokerError(f"{manifest} is unreadable ({e}): remove the units by hand") from None
    if not args.no_systemd and root == Path("/") and _systemd_running():
        _run("systemctl", "disable", "--now", *reversed(UNITS))
        _run("systemctl", "daemon-reload")
    config = etc / "config.toml"
    for f in reversed(info.get("files", [])):
        if Path(f) != config:
            Path(f).unlink(missing_ok=True)
    keys = info.get("config_keys", [])
    if config.exists() and str(config) not in info.get("files", []) and keys:
        lines = config.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.split("=")[0].strip() not in keys]
        config.write_text("".join(kept))
    elif str(config) in info.get("files", []):
        config.unlink(missing_ok=True)
    _del_subids(info.get("subids", []))
    for d in reversed(info.get("dirs", [])):
        p = Path(d)
        if args.purge or (p.name == "stoker" and p.parent.name == "run"):
            shutil.rmtree(p, ignore_errors=True)
    for u in reversed(info.get("users", [])):
        _run("userdel", u)
    for g in reversed(info.get("groups", [])):
        _run("groupdel", g)
    manifest.unlink(missing_ok=True)
    with_state = "" if args.purge else " (state and cache kept: --purge deletes them)"
    print(f"uninstalled stokerd and stoker-helper{with_state}")
    return 0
