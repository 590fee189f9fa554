"""The VM lifecycle with the CLI run as a non-root member of a system install's group:
`stoker system install` below a test root, stoker-helper (root) and stokerd (its system
user, inside a test namespace) run as the written units say; create, exec,
workspace (a repo the member owns), QEMU killed by its seccomp sandbox (explained in
`vm show`/`vm logs`, host fine), start, stop, delete.
The image is built first by a root daemon on the same state (a non-root one refuses
golden builds), which `system install` hands to the daemon's user."""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shlex
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
from stokerenv import CACHE, ns_pids

from stoker.cli.system import parse_unit

pytestmark = pytest.mark.e2e


# Ask a QEMU for an `exec:` migration over QMP: it must fork a shell, which its seccomp
# sandbox (spawn=deny) answers by killing it.
_QMP_EXEC = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
for cmd in ({"execute": "qmp_capabilities"},
            {"execute": "migrate", "arguments": {"uri": "exec:true"}}):
    f.write(json.dumps(cmd) + "\\n"); f.flush(); print(f.readline())
"""


def _wait(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return bool(pred())


def _unit(path: Path) -> tuple[list[str], dict[str, str], str | None, str | None]:
    u = parse_unit(path.read_text())
    env = dict(v.split("=", 1) for v in u.get("Environment", []))
    return shlex.split(u["ExecStart"][0]), env, u.get("User", [None])[0], u.get("Group", [None])[0]


def test_lifecycle_as_group_member_against_system_install() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (users, namespaces, taps)")
    exe = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    site = sysconfig.get_paths()["purelib"]
    src = str(Path(__file__).resolve().parents[2] / "src")
    pyenv = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": f"{src}:{site}",
        "LC_ALL": "C.UTF-8",
    }
    tok = secrets.token_hex(3)
    ns, group, user, member = f"stoker-sys-{tok}", f"stkg-{tok}", f"stkd-{tok}", f"stkm-{tok}"
    vmm_user = f"stkvm-{tok}"  # a root daemon would create it: ours, removed below
    root = Path(tempfile.mkdtemp(prefix="stk-e2e-sys-"))
    os.chmod(root, 0o755)
    procs: list[subprocess.Popen[str]] = []
    renv = {**os.environ, "STOKER_ROOT": str(root)}
    transcript: list[str] = []

    def cli_member(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        m = pwd.getpwnam(member)
        gid = grp.getgrnam(group).gr_gid
        r = subprocess.run(
            ["setpriv", f"--reuid={m.pw_uid}", f"--regid={m.pw_gid}", f"--groups={gid}", "--",
             exe, "-m", "stoker.cli.main", "--system", *args],
            capture_output=True, text=True, timeout=timeout,
            env={**pyenv, "STOKER_ROOT": str(root), "HOME": "/nonexistent"},
        )  # fmt: skip
        transcript.append(f"$ stoker {' '.join(args)} -> {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def log_tail() -> str:
        out = []
        for f in ("stokerd.log", "helper.log", "rootd.log"):
            with_p = root / f
            if with_p.exists():
                out.append(f"--- {f}\n" + "\n".join(with_p.read_text().splitlines()[-30:]))
        return "\n".join(transcript[-6:] + out)

    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        (root / "etc/stoker").mkdir(parents=True)
        (root / "etc/stoker/config.toml").write_text(
            'vmm = "qemu"\ntap_pool_size = 1\ndns_listen = "127.0.0.1:5396"\n'
            f'vmm_user = "{vmm_user}"\n'
            f'golden_cache_dir = "{CACHE / "apt"}"\n'
            '\n[vm_defaults]\nvcpu = 1\nmemory_mib = 1024\ndisk_size = "2G"\noverlay_size = "2G"\n'
        )
        # 1. The image, built by a root daemon on this state (host namespace: the mirror).
        with (root / "rootd.log").open("w") as lg:
            rootd = subprocess.Popen(
                [sys.executable, "-m", "stoker.daemon.main", "--system"],
                env=renv, stdout=lg, stderr=lg, text=True,
            )  # fmt: skip
        procs.append(rootd)
        assert _wait((root / "run/stoker/stokerd.sock").exists, 30), log_tail()
        r = subprocess.run(
            [sys.executable, "-m", "stoker.cli.main", "--system", "image", "build",
             "debian-bookworm"],
            env=renv, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr + log_tail()
        rootd.terminate()
        rootd.wait(30)
        # 2. The install (this host has no systemd: the units are run below as written).
        r = subprocess.run(
            [sys.executable, "-m", "stoker.cli.main", "system", "install", "--root", str(root),
             "--group", group, "--user", user, "--no-systemd", "--python", exe,
             "--pythonpath", pyenv["PYTHONPATH"], "--netns", ns],
            env=renv, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        subprocess.run(["useradd", "--system", "--no-create-home", "-G", group, member], check=True)
        units = root / "etc/systemd/system"
        argv, env, _, _ = _unit(units / "stoker-helper.service")
        with (root / "helper.log").open("w") as lg:
            procs.append(
                subprocess.Popen(argv, env={**pyenv, **env}, stdout=lg, stderr=lg, text=True)
            )
        argv, env, u, g = _unit(units / "stokerd.service")
        with (root / "stokerd.log").open("w") as lg:
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "setpriv",
                        f"--reuid={u}",
                        f"--regid={g}",
                        "--init-groups",
                        "--",
                        *argv,
                    ],
                    env={**pyenv, **env},
                    stdout=lg,
                    stderr=lg,
                    text=True,
                )
            )
        assert _wait((root / "run/stoker/stokerd.sock").exists, 30), log_tail()
        # 3. The lifecycle, as the member.
        r = cli_member("vm", "create", "--name", "t1")
        assert r.returncode == 0, log_tail()
        info = json.loads(cli_member("vm", "show", "t1", "--json").stdout)
        assert info["state"] == "running", info
        d = pwd.getpwnam(user)
        pid = int((Path(info["vm_dir"]) / "vmm.pid").read_text())
        st = Path(f"/proc/{pid}/status").read_text()
        assert st.split("Uid:")[1].split()[0] == str(d.pw_uid), "QEMU is not the daemon's user"
        assert st.split("Seccomp:")[1].split()[0] == "2"
        # Its own mount namespace (a user namespace: stokerd is not root): the state dir
        # (every VM's disks, the daemon's key) and /tmp are empty there.
        daemon_pid = procs[-1].pid
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink(f"/proc/{daemon_pid}/ns/mnt")
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        qroot = Path(f"/proc/{pid}/root")
        assert os.listdir(qroot / "tmp") == []  # (this test's root is below /tmp, too)
        for p in (root / "var/lib/stoker", Path(info["vm_dir"])):
            seen = qroot / str(p).lstrip("/")
            assert not seen.exists() or os.listdir(seen) == [], f"QEMU sees {p}"
        assert (Path(info["vm_dir"]) / "serial.log").exists()
        # exec as the member: the command goes through the daemon (the guest agent).
        r = cli_member("vm", "exec", "t1", "--", "cat", "/etc/hostname")
        assert r.returncode == 0 and r.stdout.strip() == "t1", log_tail()
        # workspace: a repository the member owns (stokerd reads it for that member).
        m = pwd.getpwnam(member)
        repo = root / "member-repo"
        repo.mkdir()
        os.chown(repo, m.pw_uid, m.pw_gid)
        as_m = ["setpriv", f"--reuid={m.pw_uid}", f"--regid={m.pw_gid}", "--clear-groups", "--"]
        genv = {**pyenv, "HOME": str(repo), "GIT_AUTHOR_NAME": "m", "GIT_AUTHOR_EMAIL": "m@e",
                "GIT_COMMITTER_NAME": "m", "GIT_COMMITTER_EMAIL": "m@e"}  # fmt: skip
        for cmd in (["git", "init", "-q", "-b", "main", str(repo)],):
            subprocess.run([*as_m, *cmd], check=True, env=genv)
        subprocess.run(
            [*as_m, "sh", "-c", f"cd {repo} && echo one > a.txt && git add a.txt && "
             "git commit -q -m one"], check=True, env=genv,
        )  # fmt: skip
        assert repo.stat().st_uid == m.pw_uid != d.pw_uid
        r = cli_member("vm", "workspace", "prepare", "t1", str(repo))
        assert r.returncode == 0, log_tail()
        r = cli_member("vm", "exec", "t1", "--", "sh", "-c",
                       "cat /root/repo/a.txt && echo two >> /root/repo/a.txt")  # fmt: skip
        assert r.returncode == 0 and r.stdout.strip() == "one", log_tail()
        r = cli_member("vm", "workspace", "export", "t1")
        assert r.returncode == 0 and "+two" in r.stdout and "a.txt" in r.stdout, log_tail()
        # 4. QEMU tries a forbidden syscall class (`migrate exec:` forks: spawn=deny). The
        # VM fails, the host (daemon, helper, other state) is fine, `vm logs` says why.
        qmp = Path(info["vm_dir"]) / "qmp.sock"
        subprocess.run(
            [sys.executable, "-c", _QMP_EXEC, str(qmp)], capture_output=True, timeout=60
        )  # fmt: skip
        assert _wait(lambda: not Path(f"/proc/{pid}").exists(), 30), "QEMU did not die"

        def stopped() -> bool:
            out = cli_member("vm", "show", "t1", "--json").stdout
            return bool(out) and json.loads(out)["state"] == "stopped"

        assert _wait(stopped, 30), log_tail()
        shown = json.loads(cli_member("vm", "show", "t1", "--json").stdout)
        why = shown.get("last_error") or ""
        assert f"QEMU (pid {pid}) was killed by its seccomp sandbox (SIGSYS)" in why, shown
        logs = cli_member("vm", "logs", "t1")
        assert logs.returncode == 0, log_tail()
        last = logs.stdout.rstrip().splitlines()[-1]
        assert last.startswith("[stoker] ") and "seccomp sandbox (SIGSYS)" in last, last
        assert all(p.poll() is None for p in procs[1:]), "the helper or stokerd died"
        assert cli_member("vm", "list", "--json").returncode == 0
        # 5. Start again, stop, delete.
        r = cli_member("vm", "start", "t1")
        assert r.returncode == 0, log_tail()
        r = cli_member("vm", "exec", "t1", "--", "true")
        assert r.returncode == 0, log_tail()
        r = cli_member("vm", "stop", "t1")
        assert r.returncode == 0, log_tail()
        r = cli_member("vm", "delete", "t1")
        assert r.returncode == 0, log_tail()
        assert json.loads(cli_member("vm", "list", "--json").stdout) == []
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for _ in range(3):
            for pid in ns_pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        subprocess.run(
            [sys.executable, "-m", "stoker.cli.main", "system", "uninstall", "--root", str(root),
             "--purge", "--no-systemd"],
            env=renv, capture_output=True, timeout=120,
        )  # fmt: skip
        for name in (member, user, vmm_user):
            subprocess.run(["userdel", name], capture_output=True)
        for name in (group, vmm_user):
            subprocess.run(["groupdel", name], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)
