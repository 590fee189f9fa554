"""The real `stoker` and `stokerd` processes in an isolated layout.

Auto-start in its own session, restart after kill -9, one daemon per socket, clean
SIGTERM, status/stop, config and state errors as one CLI line, doctor, completion.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stoker import __version__

pytestmark = pytest.mark.integration

STATUSES = {"PASS", "WARN", "FAIL"}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("stoker: "), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def start(stk: Any) -> int:
    """Start the daemon through the CLI and return its pid."""
    r = stk.run("vm", "list", "--json")
    assert r.returncode == 0, r.stderr
    return int(stk.daemon_pid())


def no_daemon_left(stk: Any) -> None:
    for f in (stk.layout.pid_path, stk.layout.lock_path):
        try:
            pid = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        assert not stk.is_stokerd(pid), f"stokerd {pid} still running"


# --- start, restart, one per socket --------------------------------------------------


def test_vm_list_autostarts_a_detached_daemon(stk: Any) -> None:
    assert not stk.layout.socket_path.exists()
    r = stk.run("vm", "list", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    pid = stk.daemon_pid()
    assert stk.is_stokerd(pid)
    # its own session (and so its own process group): it outlives the CLI and terminal
    assert os.getsid(pid) == pid != os.getsid(0)
    assert os.getpgid(pid) == pid
    # the socket is private, the log is in the state dir
    assert stat.S_IMODE(os.stat(stk.layout.socket_path).st_mode) == 0o600
    assert "serving" in stk.layout.log_path.read_text()
    # the next command reuses it
    r = stk.run("ps", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    assert stk.daemon_pid() == pid


def test_kill_9_then_vm_list_starts_a_new_daemon(stk: Any) -> None:
    pid = start(stk)
    os.kill(pid, signal.SIGKILL)
    assert stk.wait_gone(pid)
    assert stk.layout.socket_path.exists()  # stale: nobody listens on it
    with pytest.raises(ConnectionRefusedError):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(stk.layout.socket_path))
        finally:
            s.close()
    r = stk.run("vm", "list", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    new = stk.daemon_pid()
    assert new != pid and stk.is_stokerd(new)


def test_wait_gone_waits_for_the_last_thread_not_the_leader(stk: Any) -> None:
    """The kill -9 test above relies on this: a killed stokerd (asyncio worker threads) can
    show a zombie leader while another thread still holds the listening socket."""
    code = (
        "import ctypes, sys, threading\n"
        "threading.Thread(target=sys.stdin.read).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"  # the leader exits, the reader lives on
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        task_dir = Path(f"/proc/{proc.pid}/task")
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the leader thread did not exit"
            time.sleep(0.02)
        assert len(os.listdir(task_dir)) == 2  # a zombie leader and the live reader
        assert stk.alive(proc.pid)
        assert not stk.wait_gone(proc.pid, timeout=0.3)
        assert proc.stdin is not None
        proc.stdin.close()  # the reader sees EOF and the last thread exits
        assert stk.wait_gone(proc.pid)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_second_stokerd_on_the_same_layout_is_refused(stk: Any) -> None:
    pid = start(stk)
    r = stk.run_stokerd(timeout=20)
    assert r.returncode == 1
    assert "already serving" in r.stderr
    assert str(pid) in r.stderr
    assert r.stderr.count("\n") == 1
    # the first one is untouched and still answers
    assert stk.is_stokerd(pid)
    r = stk.run("vm", "list", "--json")
    assert r.returncode == 0 and stk.daemon_pid() == pid


def test_sigterm_closes_the_daemon_cleanly(stk: Any) -> None:
    log = open(stk.root / "stokerd.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        stk.stokerd_argv(),
        env=stk.env,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not stk.layout.pid_path.exists():
            assert proc.poll() is None, (stk.root / "stokerd.out").read_text()
            assert time.monotonic() < deadline, "stokerd did not come up"
            time.sleep(0.02)
        assert stk.layout.socket_path.exists()
        assert stk.daemon_pid() == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()
    assert not stk.layout.socket_path.exists()
    assert not stk.layout.pid_path.exists()
    assert "stokerd stopped" in (stk.root / "stokerd.out").read_text()
    # the lock was released: a new daemon starts fine
    assert start(stk) != proc.pid


def test_daemon_status_and_stop(stk: Any) -> None:
    r = stk.run("daemon", "status", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["running"] is False
    assert not stk.layout.socket_path.exists()  # status never starts it

    pid = start(stk)
    r = stk.run("daemon", "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["running"] is True
    assert st["pid"] == pid
    assert st["version"] == __version__
    assert st["socket"] == str(stk.layout.socket_path)
    assert st["state_dir"] == str(stk.layout.state_dir)

    r = stk.run("version", "--json")
    assert json.loads(r.stdout) == {"cli": __version__, "daemon": __version__}

    r = stk.run("daemon", "stop")
    assert r.returncode == 0, r.stderr
    assert "stopped" in r.stdout
    assert not stk.alive(pid)
    assert not stk.layout.socket_path.exists()
    r = stk.run("daemon", "status", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["running"] is False


# --- bad config and bad state are reported, not papered over -------------------------


def test_invalid_config_names_the_key(stk: Any) -> None:
    cfg = stk.write_config('[vm_defaults]\nvcpu = "many"\n')
    err = one_error_line(stk.run("vm", "list"))
    assert "'vm_defaults.vcpu'" in err
    assert str(cfg) in err
    no_daemon_left(stk)
    err = one_error_line(stk.run("doctor"))
    assert "'vm_defaults.vcpu'" in err


def test_explicit_missing_config_is_an_error(stk: Any) -> None:
    err = one_error_line(stk.run("--config", str(stk.root / "nope.toml"), "vm", "list"))
    assert "nope.toml does not exist" in err
    no_daemon_left(stk)
    stk.env["STOKER_CONFIG"] = str(stk.root / "env-nope.toml")
    err = one_error_line(stk.run("vm", "list"))
    assert "env-nope.toml does not exist" in err
    no_daemon_left(stk)


def test_config_file_is_used_by_the_daemon(stk: Any) -> None:
    cfg = stk.write_config('bridge_name = "br-stk-test"\n[vm_defaults]\nvcpu = 3\n')
    start(stk)
    st = json.loads(stk.run("daemon", "status", "--json").stdout)
    assert st["config"] == str(cfg)
    assert st["network"]["bridge"] == "br-stk-test"
    checks = {c["name"]: c for c in json.loads(stk.run("doctor", "--json").stdout)}
    assert "vcpu=3 (config)" in checks["vm-defaults"]["message"]


def test_corrupt_state_db_refuses_to_start_and_is_untouched(stk: Any) -> None:
    db = stk.layout.db_path
    db.parent.mkdir(parents=True)
    db.write_bytes(os.urandom(32 * 1024))
    before = sha(db)
    err = one_error_line(stk.run("vm", "list"))
    # the CLI reports the daemon log's last line
    assert "stokerd exited with status 1" in err
    assert "not a readable SQLite database" in err
    assert str(db) in err
    assert sha(db) == before
    no_daemon_left(stk)
    # doctor says the same thing about the store
    checks = {c["name"]: c for c in json.loads(stk.run("doctor", "--json").stdout)}
    assert checks["state-store"]["status"] == "FAIL"
    assert sha(db) == before


def test_too_new_state_db_refuses_to_start_and_is_untouched(stk: Any) -> None:
    from stoker.store import Store

    db = stk.layout.db_path
    s = Store(db)
    s._conn.execute("INSERT INTO schema_migrations(version, applied_at) VALUES (999, 'x')")
    s.close()
    before = sha(db)
    err = one_error_line(stk.run("vm", "list"))
    assert "schema version 999" in err and "upgrade stoker" in err
    assert sha(db) == before
    no_daemon_left(stk)
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] == 999
    finally:
        con.close()


# --- doctor, completion, lists, errors -------------------------------------------------


def test_doctor_json(stk: Any) -> None:
    r = stk.run("doctor", "--json", timeout=60)
    checks = json.loads(r.stdout)
    assert len(checks) >= 12
    names = [c["name"] for c in checks]
    assert len(set(names)) == len(names)
    for want in (
        "kvm",
        "vsock",
        "firecracker",
        "jailer",
        "qemu",
        "host-tools",
        "nftables",
        "bridge",
        "dns",
        "default-image",
        "default-kernel",
        "state-store",
        "disk-space",
        "vm-defaults",
    ):
        assert want in names, want
    for c in checks:
        assert c["status"] in STATUSES
        assert c["message"]
        assert isinstance(c["fix"], str)
    failed = any(c["status"] == "FAIL" for c in checks)
    assert r.returncode == (1 if failed else 0), r.stderr
    vmd = next(c for c in checks if c["name"] == "vm-defaults")["message"]
    assert "(host heuristic)" in vmd or "(built-in)" in vmd
    # doctor does not need (or start) a daemon
    assert next(c for c in checks if c["name"] == "daemon")["status"] == "WARN"
    assert not stk.layout.socket_path.exists()

    # the human form agrees with the JSON
    h = stk.run("doctor", timeout=60)
    assert h.returncode == r.returncode
    n = {s: sum(1 for c in checks if c["status"] == s) for s in STATUSES}
    assert h.stdout.rstrip().splitlines()[-1] == (
        f"PASS {n['PASS']} · WARN {n['WARN']} · FAIL {n['FAIL']}"
    )


def test_doctor_with_a_running_daemon(stk: Any) -> None:
    pid = start(stk)
    checks = {c["name"]: c for c in json.loads(stk.run("doctor", "--json", timeout=60).stdout)}
    assert checks["daemon"]["status"] == "PASS"
    assert f"pid {pid}" in checks["daemon"]["message"]
    assert checks["state-store"]["status"] == "PASS"


def test_completion_scripts(stk: Any) -> None:
    r = stk.run("completion", "bash")
    assert r.returncode == 0 and "_stoker" in r.stdout
    chk = subprocess.run(["bash", "-n"], input=r.stdout, text=True, capture_output=True)
    assert chk.returncode == 0, chk.stderr
    for shell, marker in (("zsh", "#compdef stoker"), ("fish", "complete -c stoker")):
        r = stk.run("completion", shell)
        assert r.returncode == 0 and marker in r.stdout
    assert not stk.layout.socket_path.exists()  # completion scripts need no daemon


def test_completion_names_with_daemon_up_and_down(stk: Any) -> None:
    r = stk.run("__names", "vm")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert not stk.layout.socket_path.exists()  # never starts the daemon
    start(stk)
    r = stk.run("__names", "image")
    assert (r.returncode, r.stdout.strip()) == (0, "")


def test_image_and_kernel_lists_are_empty(stk: Any) -> None:
    for group in ("image", "kernel"):
        r = stk.run(group, "list", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == []


def test_errors_are_one_line_with_exit_1(stk: Any) -> None:
    start(stk)
    r = stk.run("vm", "show", "nope")
    err = one_error_line(r)
    assert "'nope' not found" in err
    assert r.stdout == ""


def test_second_stokerd_on_the_same_state_dir_is_refused(stk: Any) -> None:
    """Old behaviour (issue 9 item 13): the only lock lived in the runtime dir, so a second
    daemon with another XDG_RUNTIME_DIR but the same state dir ran too, and both adopted
    the same VMs."""
    pid = start(stk)
    env = dict(stk.env, XDG_RUNTIME_DIR=str(stk.root / "r2"))
    r = subprocess.run(stk.stokerd_argv(), env=env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 1, r.stderr
    assert "already uses the state directory" in r.stderr
    assert str(pid) in r.stderr and str(stk.layout.socket_path) in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    # It took nothing: no socket of its own, and the first daemon still answers.
    assert not (stk.root / "r2" / "stoker" / "stokerd.sock").exists()
    assert stk.is_stokerd(pid)
    r = stk.run("vm", "list", "--json")
    assert r.returncode == 0 and stk.daemon_pid() == pid


def test_state_dir_made_by_someone_else_ends_up_private(stk: Any) -> None:
    """Old behaviour (issue 9 item 14): a state dir created 0755 beforehand (systemd's
    `StateDirectory=`) stayed 0755, and state.db came out 0644 under a 022 umask."""
    stk.layout.state_dir.mkdir(parents=True, mode=0o755)
    os.chmod(stk.layout.state_dir, 0o755)
    old = os.umask(0o022)
    try:
        start(stk)
    finally:
        os.umask(old)
    assert stat.S_IMODE(stk.layout.state_dir.stat().st_mode) == 0o700
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        p = stk.layout.state_dir / name
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, name
    assert stat.S_IMODE(stk.layout.db_path.stat().st_mode) == 0o600


def test_a_burst_of_clients_all_get_answers(stk: Any) -> None:
    """Old behaviour (issue 9 item 8): in a burst, a full accept queue made connect()
    EAGAIN and the CLI died with a raw BlockingIOError traceback (14 of 500).

    Now connect() retries with backoff and the server's queue is deeper; a client over the
    connection cap is refused before anything is read and resends. Every one succeeds."""
    import threading

    from stoker.rpc.client import Client

    start(stk)
    n = 400
    barrier = threading.Barrier(n)
    failures: list[str] = []
    ok = [0]
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        try:
            with Client(stk.layout.socket_path, timeout=60.0) as c:
                c.call("daemon.status")
            with lock:
                ok[0] += 1
        except Exception as e:
            with lock:
                failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, (len(failures), failures[:3])
    assert ok[0] == n
