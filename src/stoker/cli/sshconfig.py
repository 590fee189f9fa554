"""`stoker ssh-config --install|--uninstall`: opt-in `ssh NAME.vm` for the system ssh.

Only with --install is `~/.ssh/config` touched: one marked `Include` block is added at its
top (an Include inside a Host block would be scoped to it), and --uninstall removes exactly
that block. The included file lives in stoker's config dir and names stoker's own key and
known_hosts; NAME.vm is resolved through the daemon by `stoker __connect` (a ProxyCommand),
so it works without any resolver wiring.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from stoker.cli.connect import layout_for
from stoker.cli.render import err
from stoker.errors import InvalidArgument, StokerError

BEGIN = "# >>> stoker (managed by `stoker ssh-config`) >>>"
END = "# <<< stoker <<<"


def register(sub: Any) -> None:
    p = sub.add_parser("ssh-config", help="opt in/out of plain `ssh NAME.vm`")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--install", action="store_true", help="add stoker's Include to ~/.ssh/config")
    g.add_argument("--uninstall", action="store_true", help="remove it again")
    p.set_defaults(func=ssh_config)
    c = sub.add_parser("__connect")  # ProxyCommand helper
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.set_defaults(func=connect)


def _user_ssh_config() -> Path:
    return Path(os.path.expanduser("~")) / ".ssh" / "config"


def _strip(text: str) -> str:
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() == BEGIN:
            skipping = True
            continue
        if skipping and line.strip() == END:
            skipping = False
            continue
        if not skipping:
            out.append(line)
    return "".join(out)


def _write_atomic(path: Path, text: str, mode: int) -> None:
    from stoker.cli.fsutil import write_atomic

    write_atomic(path, text.encode(), mode)


def _target(cfg: Path) -> Path:
    """The file to edit: a symlinked ~/.ssh/config (dotfile managers) is edited at its
    target, so the link stays a link."""
    if cfg.is_symlink():
        return Path(os.path.realpath(cfg))
    return cfg


def _arg(value: object) -> str:
    """One ssh_config argument: double-quoted, with `%` escaped (ssh expands %-tokens in
    IdentityFile and UserKnownHostsFile). ssh_config has no escape for a `"` inside."""
    text = str(value)
    if any(c in text for c in '"\\\n\r') or any(ord(c) < 0x20 for c in text):
        raise InvalidArgument(
            f"cannot write {text!r} into an ssh config: it contains a quote, backslash or "
            "control character; move stoker's directories to a plainer path"
        )
    return '"' + text.replace("%", "%%") + '"'


def _include_arg(value: Path) -> str:
    """An Include argument: ssh globs it, and expands no %-tokens."""
    text = str(value)
    if any(c in text for c in "*?[") or any(c in text for c in '"\\\n\r'):
        raise InvalidArgument(
            f"cannot Include {text!r} from an ssh config: it contains a wildcard, quote or "
            "backslash; move stoker's config dir (XDG_CONFIG_HOME) to a plainer path"
        )
    return f'"{text}"'


def _proxy_command(stoker: str) -> str:
    """ProxyCommand is run by the shell: quote for it, then escape `%` for ssh."""
    import shlex

    return shlex.quote(stoker).replace("%", "%%") + " __connect %h %p"


def _verify(cfg: Path, layout: Any, stoker: str) -> str | None:
    """Ask ssh itself (`ssh -G`) what it would use for a NAME.vm host given `cfg`.

    None when the block takes effect (or ssh is not installed: nothing to ask), else why
    not."""
    import shutil
    import subprocess

    ssh = shutil.which("ssh")
    if ssh is None:
        return None
    try:
        r = subprocess.run(
            [ssh, "-G", "-F", str(cfg), "stoker-probe.vm"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ssh -G` could not run: {e}"
    if r.returncode != 0:
        return f"`ssh -G -F {cfg} stoker-probe.vm` failed: {r.stderr.strip()[:300]}"
    seen: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        key, _, value = line.partition(" ")
        seen.setdefault(key, []).append(value)
    # `ssh -G` prints IdentityFile before %-token expansion (so with our `%%` escapes)
    # and UserKnownHostsFile after it: accept either form of each.
    want = {
        "user": "root",
        "identityfile": str(layout.ssh_key),
        "userknownhostsfile": str(layout.known_hosts),
    }
    for key, value in want.items():
        got = seen.get(key, [])
        vals = {v for g in got for v in (g, *g.split(" "))}
        if value not in vals and value.replace("%", "%%") not in vals:
            return f"ssh would use {key} {' '.join(got) or '(none)'!r}, not {value!r}"
    proxy = " ".join(seen.get("proxycommand", []))
    if "__connect %h %p" not in proxy:
        return f"ssh would use proxycommand {proxy or '(none)'!r}, not stoker's"
    return None


def ssh_config(args: argparse.Namespace) -> int:
    layout = layout_for(args)
    link = _user_ssh_config()
    cfg = _target(link)
    had_cfg = cfg.exists()
    existing = cfg.read_text() if had_cfg else ""
    mode = cfg.stat().st_mode & 0o777 if had_cfg else 0o600
    if args.uninstall:
        stripped = _strip(existing)
        if stripped == existing:
            print(f"{link} has no stoker block: nothing to remove")
            return 0
        _write_atomic(cfg, stripped, mode)
        (layout.config_dir / "ssh_config").unlink(missing_ok=True)
        print(f"removed stoker's Include from {link}")
        return 0
    include = layout.config_dir / "ssh_config"
    stoker = str(Path(sys.argv[0]).resolve()) if Path(sys.argv[0]).name == "stoker" else "stoker"
    body = (
        "# Written by `stoker ssh-config --install`; removed by --uninstall.\n"
        "Host *.vm\n"
        "    User root\n"
        f"    IdentityFile {_arg(layout.ssh_key)}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {_arg(layout.known_hosts)}\n"
        "    StrictHostKeyChecking yes\n"
        f"    ProxyCommand {_proxy_command(stoker)}\n"
    )
    block = f"{BEGIN}\nInclude {_include_arg(include)}\n{END}\n"
    old_include = include.read_bytes() if include.exists() else None
    layout.config_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(include, body, 0o644)
    cfg.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_atomic(cfg, block + _strip(existing), mode)
    why = _verify(cfg, layout, stoker)
    if why is not None:
        # Put back exactly what was there: a block ssh ignores is worse than none.
        if had_cfg:
            _write_atomic(cfg, existing, mode)
        else:
            cfg.unlink(missing_ok=True)
        if old_include is None:
            include.unlink(missing_ok=True)
        else:
            _write_atomic(include, old_include.decode(), 0o644)
        raise StokerError(
            f"stoker's block in {link} would not take effect ({why}): nothing was changed"
        )
    where = f"{link} (-> {cfg})" if cfg != link else str(link)
    print(f"added an Include of {include} to the top of {where}: `ssh NAME.vm` now works")
    _warn_if_ssh_reads_another_file(link)
    return 0


def _warn_if_ssh_reads_another_file(link: Path) -> None:
    """ssh finds ~/.ssh/config through the passwd entry, not $HOME: say so if they differ."""
    import pwd

    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return
    theirs = Path(home) / ".ssh" / "config"
    if os.path.realpath(theirs) != os.path.realpath(link):
        err(
            f"note: ssh reads {theirs} for this user (your passwd home), not {link}: "
            f"plain `ssh NAME.vm` uses that file unless you pass -F {link}"
        )


def connect(args: argparse.Namespace) -> int:
    """Resolve NAME.vm through the daemon and relay stdin/stdout to its SSH port."""
    import selectors
    import socket

    from stoker.cli.connect import client
    from stoker.rpc.facade import TypedClient

    name = args.host.removesuffix(".vm")
    with client(args) as c:
        info = TypedClient(c).vm.ssh_info(name)
    if info["state"] != "running":
        err(f"VM {info['name']} is {info['state']}: `stoker vm start {info['name']}`")
        return 1
    s = socket.create_connection((info["host"], args.port), timeout=10)
    s.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "in")
    sel.register(s, selectors.EVENT_READ, "sock")
    while True:
        for key, _ in sel.select():
            if key.data == "in":
                data = os.read(sys.stdin.fileno(), 65536)
                if not data:
                    s.shutdown(socket.SHUT_WR)
                    sel.unregister(sys.stdin.fileno())
                    continue
                s.sendall(data)
            else:
                data = s.recv(65536)
                if not data:
                    return 0
                os.write(sys.stdout.fileno(), data)
