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
    tmp = path.with_name(f".{path.name}.stoker-tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def ssh_config(args: argparse.Namespace) -> int:
    layout = layout_for(args)
    cfg = _user_ssh_config()
    existing = cfg.read_text() if cfg.exists() else ""
    mode = cfg.stat().st_mode & 0o777 if cfg.exists() else 0o600
    if args.uninstall:
        stripped = _strip(existing)
        if stripped == existing:
            print(f"{cfg} has no stoker block: nothing to remove")
            return 0
        _write_atomic(cfg, stripped, mode)
        (layout.config_dir / "ssh_config").unlink(missing_ok=True)
        print(f"removed stoker's Include from {cfg}")
        return 0
    include = layout.config_dir / "ssh_config"
    layout.config_dir.mkdir(parents=True, exist_ok=True)
    stoker = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "stoker" else "stoker"
    include.write_text(
        "# Written by `stoker ssh-config --install`; removed by --uninstall.\n"
        "Host *.vm\n"
        "    User root\n"
        f"    IdentityFile {layout.ssh_key}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {layout.known_hosts}\n"
        "    StrictHostKeyChecking yes\n"
        f"    ProxyCommand {stoker} __connect %h %p\n"
    )
    cfg.parent.mkdir(mode=0o700, exist_ok=True)
    block = f"{BEGIN}\nInclude {include}\n{END}\n"
    _write_atomic(cfg, block + _strip(existing), mode)
    print(f"added an Include of {include} to the top of {cfg}: `ssh NAME.vm` now works")
    return 0


def connect(args: argparse.Namespace) -> int:
    """Resolve NAME.vm through the daemon and relay stdin/stdout to its SSH port."""
    import selectors
    import socket

    from stoker.cli.connect import client

    name = args.host.removesuffix(".vm")
    with client(args) as c:
        info = c.call("vm.ssh_info", {"ref": name})
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
