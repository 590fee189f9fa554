"""`stoker system install` below a test root (no systemd here): the units it writes are
run as they say (stoker-helper as root, stokerd as the new system user, inside a test
namespace); a member of the install's group uses the CLI without root; a user outside
the group is refused with a message naming the group; `uninstall` removes what install
made (users, group, files)."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _netns_helpers import Namespaces, ns_links, wait_for
from _nonroot import make_user, nonroot_python

from stoker.cli.system import parse_unit

pytestmark = pytest.mark.integration

BRIDGE = "br-tsi"
CIDR = "172.31.9.0/24"


def _stoker(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stoker.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STOKER_ROOT": str(root)},
    )


def _unit_argv(unit: Path) -> tuple[list[str], dict[str, str], str | None, str | None]:
    u = parse_unit(unit.read_text())
    env = dict(v.split("=", 1) for v in u.get("Environment", []))
    return shlex.split(u["ExecStart"][0]), env, u.get("User", [None])[0], u.get("Group", [None])[0]


def _cli_as(
    user: pwd.struct_passwd, groups: list[int], root: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    exe, env = nonroot_python()
    env["STOKER_ROOT"] = str(root)
    env["HOME"] = "/nonexistent"
    g = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return subprocess.run(
        [
            "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", *g, "--",
            exe, "-m", "stoker.cli.main", "--system", *args,
        ],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_system_install_daemon_as_system_user_cli_as_group_member(
    namespaces: Namespaces,
) -> None:
    ns = namespaces.new()
    root = Path(tempfile.mkdtemp(prefix="stk-sysroot-"))
    os.chmod(root, 0o755)
    group = f"stkg-{secrets.token_hex(3)}"
    user = f"stkd-{secrets.token_hex(3)}"
    procs: list[subprocess.Popen[str]] = []
    exe, pyenv = nonroot_python()
    try:
        (root / "etc/stoker").mkdir(parents=True)
        (root / "etc/stoker/config.toml").write_text(
            f'bridge_name = "{BRIDGE}"\nbridge_cidr = "{CIDR}"\ndns_listen = "127.0.0.1:5397"\n'
        )
        r = _stoker(
            root, "system", "install", "--root", str(root), "--group", group, "--user", user,
            "--no-systemd", "--python", exe, "--pythonpath", pyenv["PYTHONPATH"],
            "--netns", ns,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"members of group {group} may use stoker without sudo" in r.stdout
        pw = pwd.getpwnam(user)
        assert pw.pw_uid != 0
        units = root / "etc/systemd/system"
        cfg = (root / "etc/stoker/config.toml").read_text()
        assert f'socket_group = "{group}"' in cfg and BRIDGE in cfg
        # A sub-id range for mmdebstrap's unshare mode (golden builds as this user).
        for f in ("/etc/subuid", "/etc/subgid"):
            mine = [ln for ln in Path(f).read_text().splitlines() if ln.startswith(user + ":")]
            assert len(mine) == 1 and mine[0].endswith(":65536"), (f, mine)
            assert int(mine[0].split(":")[1]) >= 100000

        # A second install is refused and changes nothing.
        again = _stoker(root, "system", "install", "--root", str(root), "--no-systemd")
        assert again.returncode != 0 and "already installed" in again.stderr

        # Run what the units say: the helper as root, stokerd as User=/Group= in the test ns.
        argv, env, u, g = _unit_argv(units / "stoker-helper.service")
        assert u is None and argv[:3] == [exe, "-m", "stoker.helper"]
        log = (root / "helper.log").open("w")
        procs.append(
            subprocess.Popen(argv, env={**pyenv, **env}, stdout=log, stderr=log, text=True)
        )
        argv, env, u, g = _unit_argv(units / "stokerd.service")
        assert (u, g) == (user, group) and argv[-1] == "--system"
        dlog = (root / "stokerd.log").open("w")
        procs.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "setpriv",
                    f"--reuid={user}",
                    f"--regid={group}",
                    "--init-groups",
                    "--",
                    *argv,
                ],
                env={**pyenv, **env},
                stdout=dlog,
                stderr=dlog,
                text=True,
            )
        )
        sock = root / "run/stoker/stokerd.sock"
        assert wait_for(sock.exists, 30), (root / "stokerd.log").read_text()
        st = os.stat(sock)
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == pwd.getpwnam(user).pw_gid
        daemon_pid = procs[1].pid
        assert wait_for(lambda: any(Path(f"/proc/{c}/status").exists() for c in [daemon_pid]), 5)

        with make_user() as member, make_user() as outsider:
            import grp

            gid = grp.getgrnam(group).gr_gid
            m = pwd.getpwnam(member.name)
            r = _cli_as(m, [gid], root, "daemon", "status", "--json")
            assert r.returncode == 0, r.stderr
            status = json.loads(r.stdout)
            assert status["running"] and status["state_dir"] == str(root / "var/lib/stoker")
            assert status["network"]["helper"]["error"] is None, status["network"]["helper"]
            uid_line = next(
                ln
                for ln in Path(f"/proc/{status['pid']}/status").read_text().splitlines()
                if ln.startswith("Uid:")
            )
            assert uid_line.split()[1:] == [str(pw.pw_uid)] * 4, "stokerd is not its user"
            r = _cli_as(m, [gid], root, "vm", "list", "--json")
            assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr

            o = pwd.getpwnam(outsider.name)
            r = _cli_as(o, [], root, "vm", "list")
            assert r.returncode != 0
            assert f"user {outsider.name} is not in group {group}" in r.stderr, r.stderr
            assert f"usermod -aG {group} {outsider.name}" in r.stderr
        _stop(procs)
        un = _stoker(root, "system", "uninstall", "--root", str(root), "--purge", "--no-systemd")
        assert un.returncode == 0, un.stderr
        import grp

        with pytest.raises(KeyError):
            pwd.getpwnam(user)
        for f in ("/etc/subuid", "/etc/subgid"):
            assert not any(ln.startswith(user + ":") for ln in Path(f).read_text().splitlines())
        with pytest.raises(KeyError):
            grp.getgrnam(group)
        assert not (units / "stokerd.service").exists()
        assert not (units / "stoker-helper.service").exists()
        assert not (root / "etc/stoker/install.json").exists()
        assert not (root / "var/lib/stoker").exists()
        # The config the admin wrote stays, without the keys install added.
        cfg = (root / "etc/stoker/config.toml").read_text()
        assert "socket_group" not in cfg and BRIDGE in cfg
    finally:
        _stop(procs)
        if (root / "etc/stoker/install.json").exists():
            _stoker(root, "system", "uninstall", "--root", str(root), "--purge", "--no-systemd")
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        subprocess.run(["rm", "-rf", str(root)], check=False)
        for f in ("/etc/subuid", "/etc/subgid"):
            lines = Path(f).read_text().splitlines(keepends=True)
            if any(ln.startswith(user + ":") for ln in lines):
                Path(f).write_text("".join(ln for ln in lines if not ln.startswith(user + ":")))
    assert BRIDGE not in ns_links(ns)


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
