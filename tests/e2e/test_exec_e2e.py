"""Commands through the guest agent on real guests (QEMU/TCG): `vm exec`, `vm run -- CMD`,
`vm ssh -- CMD`, the command-line rule, exit codes, signals, timeout, stdin, options; and
ports on localhost (`vm port-forward`, `vm run -p`), reached by curl on the loopback of the
test namespace.

One VM (`x1`) is shared by the module's tests (the last one, port forwarding, ends by
stopping it); `vm run --rm -p` boots one more of its own.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from stokerenv import StokerEnv

from stoker.rpc.client import Client

pytestmark = pytest.mark.e2e

VM = "x1"


@pytest.fixture(scope="module")
def vm(env: StokerEnv) -> Iterator[str]:
    try:
        env.run("vm", "create", "--name", VM, timeout=600)
    except AssertionError as e:
        logs = env.run("vm", "logs", VM, check=False).stdout[-4000:]
        raise AssertionError(f"{e}\nserial console tail:\n{logs}") from None
    try:
        yield VM
    finally:
        env.run("vm", "delete", VM, check=False)


def sh(env: StokerEnv, *args: str, timeout: float = 120, **kw: object) -> subprocess.Popen[str]:
    e = dict(env.env)
    e.pop("TERM", None)
    e.update(kw.pop("extra_env", {}))  # type: ignore[arg-type]
    return subprocess.Popen(
        env.argv(*args),
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def run(
    env: StokerEnv, *args: str, input: str | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    e = dict(env.env)
    e.pop("TERM", None)
    e.update(extra_env or {})
    return subprocess.run(
        env.argv(*args),
        env=e,
        capture_output=True,
        text=True,
        timeout=180,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def curl(env: StokerEnv, url: str) -> subprocess.CompletedProcess[str]:
    """curl on the loopback of the test namespace (where the CLI, the user, runs)."""
    return env.in_ns("curl", "-sS", "--max-time", "10", url, check=False, timeout=30)


# Serves one GET of /tmp/www in the guest, then exits (bounded: never blocks the command).
ONE_SHOT_SERVER = (
    "mkdir -p /tmp/www && echo published-by-run > /tmp/www/p.txt && cd /tmp/www && "
    "timeout 120 python3 -c 'import http.server as h; "
    'h.HTTPServer(("", 8000), h.SimpleHTTPRequestHandler).handle_request()\' '
    ">/dev/null 2>&1"
)


def test_run_rm_command_does_not_wait_for_sshd_and_publishes_ports(env: StokerEnv) -> None:
    """`vm run --rm -p`: the forward is up while the command runs, gone with the VM."""
    t0 = time.monotonic()
    p = sh(
        env,
        "vm",
        "run",
        "--rm",
        "--name",
        "r1",
        "-p",
        "127.0.0.1:18081:8000",
        "--",
        f"{ONE_SHOT_SERVER}; echo a > /tmp/x; cat /tmp/x; exit 3",
        stdin=subprocess.DEVNULL,
    )
    got = None
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        c = curl(env, "http://127.0.0.1:18081/p.txt")
        if c.returncode == 0:
            got = c.stdout
            break
        time.sleep(1)
    out, err = p.communicate(timeout=180)
    took = time.monotonic() - t0
    assert got == "published-by-run\n", (got, err)
    assert p.returncode == 3, err
    assert out == "a\n"
    assert "forwarding 127.0.0.1:18081 -> r1:8000" in err, err
    assert "SSH not waited for" in err, err
    assert "running over SSH" not in err
    assert "deleted r1" in err
    # The VM is gone, and its forward with it: nothing listens on the host port.
    c = curl(env, "http://127.0.0.1:18081/p.txt")
    assert c.returncode == 7, (c.returncode, c.stderr)  # curl: could not connect
    print(f"vm run --rm -p -- CMD took {took:.1f}s")


def test_exit_codes_and_the_one_argument_rule(env: StokerEnv, vm: str) -> None:
    assert run(env, "vm", "exec", vm, "--", "exit 7").returncode == 7
    r = run(env, "vm", "ssh", vm, "--", "echo hi > /root/f")
    assert r.returncode == 0, r.stderr
    assert run(env, "vm", "exec", vm, "--", "cat", "/root/f").stdout == "hi\n"
    # Several arguments are words: the space in "my file" is kept.
    assert run(env, "vm", "exec", vm, "--", "touch", "/root/my file").returncode == 0
    r = run(env, "vm", "exec", vm, "--", "ls", "/root/my file")
    assert (r.returncode, r.stdout) == (0, "/root/my file\n")
    r = run(env, "vm", "ssh", vm, "--", "ls", "/root/my file")
    assert (r.returncode, r.stdout) == (0, "/root/my file\n")


def test_stdout_stderr_separate_and_signals_and_missing_commands(env: StokerEnv, vm: str) -> None:
    r = run(env, "vm", "exec", vm, "--", "echo out; echo err >&2")
    assert (r.returncode, r.stdout, r.stderr) == (0, "out\n", "err\n")
    r = run(env, "vm", "exec", vm, "--", "kill -TERM $$")
    assert r.returncode == 128 + 15 and "signal 15" in r.stderr
    r = run(env, "vm", "exec", vm, "--", "no-such-program-xyz")
    assert r.returncode == 127 and "not found" in r.stderr
    r = run(env, "vm", "exec", vm, "--", "no-such-program-xyz", "arg")
    assert r.returncode == 127 and "not found" in r.stderr


def test_environment_stdin_and_options(env: StokerEnv, vm: str) -> None:
    r = run(env, "vm", "exec", vm, "--", "echo $LANG $TERM $HOME $USER; echo $PATH")
    lines = r.stdout.splitlines()
    assert lines[0] == "C.UTF-8 dumb /root root" and "/usr/bin" in lines[1]
    r = run(env, "vm", "exec", vm, "--", "echo $TERM", extra_env={"TERM": "xterm-256color"})
    assert r.stdout == "xterm-256color\n"
    r = run(env, "vm", "exec", vm, "--", "wc -c", input="hello")
    assert r.stdout.strip() == "5"
    r = run(
        env,
        "vm",
        "exec",
        "-e",
        "A=1 2",
        "--workdir",
        "/tmp",
        "--user",
        "nobody",
        vm,
        "--",
        'echo "$A|$PWD|$(id -un)|$HOME"',
    )
    assert r.stdout == "1 2|/tmp|nobody|/nonexistent\n", r.stderr
    r = run(env, "vm", "exec", "--workdir", "/no/such/dir", vm, "--", "true")
    assert r.returncode == 125 and "/no/such/dir does not exist" in r.stderr
    r = run(env, "vm", "exec", "--timeout", "soon", vm, "--", "true")
    assert r.returncode == 125 and "not a duration" in r.stderr


def test_timeout_kills_the_group_and_exits_124(env: StokerEnv, vm: str) -> None:
    t0 = time.monotonic()
    r = run(env, "vm", "exec", "--timeout", "2s", vm, "--", "sleep 100 & sleep 100; wait")
    assert r.returncode == 124 and "timed out" in r.stderr
    assert time.monotonic() - t0 < 30
    r = run(env, "vm", "exec", vm, "--", "pgrep -c -x sleep || true")
    assert r.stdout.strip() == "0"


def test_ctrl_c_is_forwarded_to_the_guest_process(env: StokerEnv, vm: str) -> None:
    p = sh(
        env,
        "vm",
        "exec",
        vm,
        "--",
        "trap 'echo got-int; exit 5' INT; echo ready; sleep 100 & wait",
        stdin=subprocess.DEVNULL,
    )
    assert p.stdout is not None
    assert p.stdout.readline() == "ready\n"
    _signal_cli(p, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 5 and "got-int" in out, err


def _signal_cli(p: subprocess.Popen[str], sig: int) -> None:
    """Signal the CLI itself (the child of `ip netns exec`), as a terminal's Ctrl-C would."""
    kids = subprocess.run(
        ["pgrep", "-P", str(p.pid)], capture_output=True, text=True
    ).stdout.split()
    for pid in [int(k) for k in kids] or [p.pid]:
        os.kill(pid, sig)


def test_client_killed_mid_exec_ends_the_guest_process(env: StokerEnv, vm: str) -> None:
    p = sh(env, "vm", "exec", vm, "--", "echo $$ > /tmp/victim; echo ready; exec sleep 300")
    assert p.stdout is not None
    assert p.stdout.readline() == "ready\n"
    _signal_cli(p, signal.SIGKILL)
    p.wait(30)
    deadline = time.monotonic() + 30
    while True:
        r = run(env, "vm", "exec", vm, "--", "kill -0 $(cat /tmp/victim) 2>/dev/null && echo alive")
        if r.stdout.strip() != "alive":
            break
        assert time.monotonic() < deadline, "the guest process outlived its killed client"
        time.sleep(0.5)


def test_100_concurrent_execs(env: StokerEnv, vm: str) -> None:
    sock = env.state_dir / "stokerd.sock"

    def one(i: int) -> tuple[int, str]:
        out: list[str] = []

        def on(ev: dict[str, object]) -> None:
            if ev.get("stage") == "exec.output":
                import base64

                out.append(base64.b64decode(str(ev["data"])).decode())

        with Client(sock) as c:
            r = c.call("vm.exec", {"ref": vm, "argv": ["echo", str(i)]}, on)
        return int(r["exit_code"]), "".join(out)

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    assert results == [(0, f"{i}\n") for i in range(100)]


def test_exec_on_a_stopped_vm_is_a_clear_error(env: StokerEnv) -> None:
    env.run("vm", "create", "--no-start", "--name", "s1")
    try:
        r = run(env, "vm", "exec", "s1", "--", "true")
        assert r.returncode == 125 and "start it with `stoker vm start s1`" in r.stderr
    finally:
        env.run("vm", "delete", "s1", check=False)


def test_bench_exec_prints_agent_vs_ssh(env: StokerEnv, vm: str) -> None:
    """Not a check: runs bench/bench_exec.py on the shared VM so a run records the figures."""
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench" / "bench_exec.py"
    r = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            env.netns,
            sys.executable,
            str(bench),
            vm,
            "-n",
            "10",
            "--run-rm",
            "--cp-mb",
            "50",
        ],
        env=env.env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr


def _tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "secret").write_text("s")
    (root / "secret").chmod(0o600)
    (root / "sub" / "link").symlink_to("../run.sh")
    (root / "abs-link").symlink_to("/etc/hostname")
    with open(root / "big", "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    import hashlib

    out: dict[str, tuple[int, str]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            what = "->" + os.readlink(p)
        elif p.is_file():
            what = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            what = "dir"
        out[str(p.relative_to(root))] = (p.lstat().st_mode, what)
    return out


def test_cp_round_trip_of_a_tree_with_a_100mb_file(env: StokerEnv, vm: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "tree"
        _tree(src)
        t0 = time.monotonic()
        r = run(env, "vm", "cp", str(src), f"{vm}:/root/")
        t_in = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        r = run(
            env, "vm", "exec", vm, "--", "sha256sum /root/tree/big; stat -c %a /root/tree/run.sh"
        )
        assert r.stdout.split()[2] == "755"
        t0 = time.monotonic()
        r = run(env, "vm", "cp", f"{vm}:/root/tree", str(Path(d) / "back"))
        t_out = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert _snapshot(Path(d) / "back") == _snapshot(src)
        print(f"vm cp 100 MB tree: in {t_in:.1f}s ({100 / t_in:.1f} MB/s), out {t_out:.1f}s")
        r = run(env, "vm", "cp", str(src / "run.sh"), f"{vm}:/no/such/dir/x")
        assert r.returncode == 1 and "no such directory in the guest" in r.stderr
        r = run(env, "vm", "cp", str(src / "run.sh"), f"{vm}:/root/tree/sub/../renamed.sh")
        assert r.returncode == 0
        r = run(env, "vm", "exec", vm, "--", "cat /root/tree/renamed.sh")
        assert r.stdout == "#!/bin/sh\necho hi\n"
        run(env, "vm", "exec", vm, "--", "rm -rf /root/tree")


def test_ttl_expiry_deletes_the_vm_across_a_daemon_restart(env: StokerEnv) -> None:
    env.run("vm", "create", "--no-start", "--name", "ttl1", "--ttl", "6s")
    listed = json.loads(env.run("vm", "list", "--json").stdout)
    assert any(v["name"] == "ttl1" and v["expires_at"] for v in listed)
    assert "TTL" in env.run("vm", "list").stdout.splitlines()[0]
    env.run("daemon", "stop")
    time.sleep(7)
    deadline = time.monotonic() + 30
    while True:
        names = [v["name"] for v in json.loads(env.run("vm", "list", "--json").stdout)]
        if "ttl1" not in names:
            break
        assert time.monotonic() < deadline, "the expired VM was not deleted after the restart"
        time.sleep(1)
    r = run(env, "vm", "create", "--no-start", "--name", "ttl2", "--ttl", "soon")
    assert r.returncode == 2 and "not a duration" in r.stderr


def test_the_sdk_example_runs_a_repos_tests(env: StokerEnv, tmp_path: Path) -> None:
    """examples/run_tests.py: a throwaway VM with the repo, its tests, the verdict."""
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "run-tests.sh").write_text("#!/bin/sh\necho running-tests; test -f marker && echo ok\n")
    (repo / "run-tests.sh").chmod(0o755)
    (repo / "marker").write_text("")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@x"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    example = Path(__file__).resolve().parents[2] / "examples" / "run_tests.py"
    r = subprocess.run(
        ["ip", "netns", "exec", env.netns, sys.executable, str(example), str(repo)],
        env=env.env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    assert "running-tests\nok\n" in r.stdout and "PASSED (exit 0)" in r.stdout
    left = [v["name"] for v in json.loads(env.run("vm", "list", "--json").stdout)]
    assert all(not n.startswith("sdk") for n in left) and len(left) <= 1  # only x1, if any


def test_port_forward_to_a_guest_http_server_then_stop(env: StokerEnv, vm: str) -> None:
    """`vm port-forward`: curl on the namespace's loopback reaches a server in the guest.

    Last test on the shared VM: it ends by stopping it (forwards go with a stop).
    """
    r = run(
        env,
        "vm",
        "ssh",
        vm,
        "--",
        "mkdir -p /tmp/www && echo hello-through-the-forward > /tmp/www/index.html; "
        "setsid nohup python3 -m http.server 8000 -d /tmp/www >/dev/null 2>&1 < /dev/null &",
    )
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 60
    while not any(
        p["port"] == 8000 for p in json.loads(env.run("vm", "ports", vm, "--json").stdout)
    ):
        assert time.monotonic() < deadline, "the guest's server on 8000 never listened"
        time.sleep(1)
    assert curl(env, "http://127.0.0.1:18080/").returncode == 7  # nothing forwarded yet

    fwd = json.loads(env.run("vm", "port-forward", vm, "127.0.0.1:18080:8000", "--json").stdout)
    assert [(f["listen"], f["guest_port"], f["namespace"]) for f in fwd] == [
        ("127.0.0.1:18080", 8000, "daemon")
    ]
    for _ in range(3):  # more than one connection through the same forward
        c = curl(env, "http://127.0.0.1:18080/index.html")
        assert (c.returncode, c.stdout) == (0, "hello-through-the-forward\n"), c.stderr
    # A bigger body (4 MiB, guest -> host) arrives whole.
    r = run(
        env,
        "vm",
        "exec",
        vm,
        "--",
        "head -c 4194304 /dev/urandom > /tmp/www/big; sha256sum /tmp/www/big",
    )
    want = r.stdout.split()[0]
    c = env.in_ns(
        "sh",
        "-c",
        "curl -sS --max-time 60 http://127.0.0.1:18080/big | sha256sum",
        check=False,
        timeout=90,
    )
    assert c.stdout.split()[:1] == [want], c.stderr
    # Listed by `vm port-forward --list`, `vm ports` (on the guest port) and `vm show`.
    listed = json.loads(env.run("vm", "port-forward", vm, "--list", "--json").stdout)
    assert [f["host_port"] for f in listed] == [18080] and listed[0]["connections"] >= 4
    ports = json.loads(env.run("vm", "ports", vm, "--json").stdout)
    assert [p["forwarded_from"] for p in ports if p["port"] == 8000] == [["127.0.0.1:18080"]]
    assert "<- 127.0.0.1:18080" in env.run("vm", "ports", vm).stdout
    shown = json.loads(env.run("vm", "show", vm, "--json").stdout)
    assert [f["listen"] for f in shown["port_forwards"]] == ["127.0.0.1:18080"]
    assert "forward:    127.0.0.1:18080 -> 8000" in env.run("vm", "show", vm).stdout

    # A host port already bound is refused: by stoker's own forward, by another program.
    r = run(env, "vm", "port-forward", vm, "127.0.0.1:18080:8000")
    assert r.returncode == 1 and "already in use (by stoker's forward to x1:8000)" in r.stderr
    holder = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            env.netns,
            sys.executable,
            "-c",
            "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 18082)); "
            "s.listen(); print('bound', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "bound\n"
        r = run(env, "vm", "port-forward", vm, "127.0.0.1:18082:8000")
        assert r.returncode == 1 and "already in use (by another program)" in r.stderr, r.stderr
    finally:
        holder.kill()
        holder.wait()
    assert [
        f["host_port"]
        for f in json.loads(env.run("vm", "port-forward", vm, "--list", "--json").stdout)
    ] == [18080]

    # Removing one forward frees its port; stopping the VM removes the rest.
    env.run("vm", "port-forward", vm, "127.0.0.1:18083:8000")
    assert curl(env, "http://127.0.0.1:18083/index.html").returncode == 0
    r = env.run("vm", "port-forward", vm, "--remove", "18083")
    assert "removed 127.0.0.1:18083" in r.stdout
    assert curl(env, "http://127.0.0.1:18083/").returncode == 7
    env.run("vm", "stop", vm)
    assert curl(env, "http://127.0.0.1:18080/").returncode == 7
    assert json.loads(env.run("vm", "show", vm, "--json").stdout)["port_forwards"] == []
    r = run(env, "vm", "port-forward", vm, "127.0.0.1:18080:8000")
    assert r.returncode == 1 and "x1 is stopped: ports forward only to a running VM" in r.stderr
