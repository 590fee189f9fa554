"""The real `stoker vm exec` CLI process -> an in-process daemon -> the real guest agent.

No VM: the "VM" is a store record whose VMM pid is the agent process (alive, so the VM
counts as running) and whose agent socket is the agent's `--listen-unix` socket. Exit
codes, stdout/stderr separation, stdin, signal forwarding, a killed client and the
stoker-side failures are exercised through the whole stack in a second or two each.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stoker.config import parse_config
from stoker.daemon.daemon import Daemon
from stoker.guest.agent import agent_script
from stoker.layout import Layout
from stoker.model.records import Image, Teardown, VMRecord, VMSpec, VMState, Workspace
from stoker.rpc.server import RPCServer
from stoker.store import Store
from stoker.store.db import now

pytestmark = pytest.mark.integration


@dataclass
class Rig:
    env: dict[str, str]
    daemon: Daemon
    agent: subprocess.Popen[bytes]
    vm_dir: Path

    async def cli(
        self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        p = await self.spawn(*args, stdin=subprocess.PIPE if input is not None else None, env=env)
        out, err = await asyncio.wait_for(p.communicate(input), 60)
        assert p.returncode is not None
        return p.returncode, out.decode(), err.decode()

    async def spawn(
        self, *args: str, stdin: int | None = None, env: dict[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "stoker.cli.main",
            *args,
            env={**self.env, **(env or {})},
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


def add_vm(store: Store, name: str, vm_dir: Path, state: VMState, pid: int | None) -> None:
    if store.get_image("img") is None:
        store.upsert_image(Image("img", True, "/r", None, None, "test", 5 << 30, now()))
    store.insert_vm(
        VMRecord(
            id=f"{name}0123456789abcdef",
            name=name,
            state=state,
            image="img",
            spec=VMSpec(1, 512, 1 << 30, 1 << 30),
            guest_ip=f"172.30.0.{len(store.list_vms()) + 9}",
            dns_name=f"{name}.vm",
            vm_dir=str(vm_dir),
            created_at=now(),
            updated_at=now(),
            teardown=Teardown(vmm="qemu", vmm_pid=pid),
        )
    )


def start_agent(sock: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                *(sys.executable, "-I", "-S", str(agent_script())),
                *("--no-vsock", "--no-serial", "--listen-unix", str(sock)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


@pytest.fixture
async def rig(short_tmp: Path) -> AsyncIterator[Rig]:
    env = dict(os.environ)
    env.update(
        HOME=str(short_tmp / "h"),
        XDG_CONFIG_HOME=str(short_tmp / "c"),
        XDG_STATE_HOME=str(short_tmp / "s"),
        XDG_CACHE_HOME=str(short_tmp / "k"),
        XDG_RUNTIME_DIR=str(short_tmp / "r"),
    )
    for k in ("STOKER_CONFIG", "STOKER_SYSTEM", "TERM"):
        env.pop(k, None)
    layout = Layout.resolve(env=env)
    layout.ensure()
    store = Store(layout.db_path)
    d = Daemon(layout=layout, config=parse_config({}), store=store)
    server = RPCServer(layout.socket_path, d.dispatch)
    await server.start()
    vm_dir = short_tmp / "vm"
    vm_dir.mkdir()
    agent = start_agent(vm_dir / "agent.sock", short_tmp / "agent.log")
    deadline = time.monotonic() + 10
    while not (vm_dir / "agent.sock").exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    add_vm(store, "t1", vm_dir, VMState.RUNNING, agent.pid)
    try:
        yield Rig(env, d, agent, vm_dir)
    finally:
        await server.close()
        assert d.vm is not None
        for c in list(d.vm.agents.values()):
            await c.close()
        agent.terminate()
        agent.wait(5)
        store.close()


async def test_exit_code_output_separation_and_the_command_line_rule(rig: Rig) -> None:
    assert (await rig.cli("vm", "exec", "t1", "--", "exit 7"))[0] == 7
    rc, out, err = await rig.cli("vm", "exec", "t1", "--", "echo out; echo err >&2")
    assert (rc, out, err) == (0, "out\n", "err\n")
    target = rig.vm_dir / "my file"
    target.write_text("x")
    rc, out, _ = await rig.cli("vm", "exec", "t1", "--", "ls", str(target))
    assert (rc, out) == (0, f"{target}\n")
    rc, _, err = await rig.cli("vm", "exec", "t1", "--", "no-such-program-xyz")
    assert rc == 127 and "not found" in err
    rc, _, err = await rig.cli("vm", "exec", "t1", "--", "kill -KILL $$")
    assert rc == 137 and "signal 9" in err


async def test_options_environment_and_stdin(rig: Rig) -> None:
    rc, out, _ = await rig.cli(
        "vm", "exec", "-e", "A=1 2", "-w", "/tmp", "t1", "--", 'echo "$A|$PWD|$LANG|$TERM"'
    )
    assert (rc, out) == (0, "1 2|/tmp|C.UTF-8|dumb\n")
    _, out, _ = await rig.cli("vm", "exec", "t1", "--", "echo $TERM", env={"TERM": "xterm"})
    assert out == "xterm\n"
    data = os.urandom(300_000)
    rc, out, _ = await rig.cli("vm", "exec", "t1", "--", "sha256sum", input=data)
    import hashlib

    assert rc == 0 and out.split()[0] == hashlib.sha256(data).hexdigest()
    rc, out, _ = await rig.cli("vm", "exec", "-n", "t1", "--", "wc -c", input=b"ignored")
    assert out.strip() == "0"


async def test_default_workdir_is_the_workspace(rig: Rig) -> None:
    assert rig.daemon.store is not None
    ws = Workspace(host_path="/nowhere", guest_path=str(rig.vm_dir), head="0" * 40)
    rig.daemon.store.set_vm_workspace("t10123456789abcdef", ws)
    rc, out, _ = await rig.cli("vm", "exec", "t1", "--", "pwd")
    assert (rc, out) == (0, f"{rig.vm_dir}\n")


async def test_timeout_exits_124(rig: Rig) -> None:
    t0 = time.monotonic()
    rc, _, err = await rig.cli("vm", "exec", "--timeout", "0.5", "t1", "--", "sleep 30")
    assert rc == 124 and "timed out" in err and time.monotonic() - t0 < 10


async def test_sigint_to_the_cli_reaches_the_process(rig: Rig) -> None:
    p = await rig.spawn(
        "vm", "exec", "t1", "--", "trap 'echo got-int; exit 5' INT; echo ready; sleep 30 & wait"
    )
    assert p.stdout is not None
    assert await asyncio.wait_for(p.stdout.readline(), 30) == b"ready\n"
    p.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(p.communicate(), 30)
    assert p.returncode == 5 and b"got-int" in out


async def test_killed_client_ends_the_guest_process(rig: Rig) -> None:
    marker = rig.vm_dir / "victim"
    p = await rig.spawn("vm", "exec", "t1", "--", f"echo $$ > {marker}; echo ready; exec sleep 300")
    assert p.stdout is not None
    assert await asyncio.wait_for(p.stdout.readline(), 30) == b"ready\n"
    victim = int(marker.read_text())
    p.kill()
    await p.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{victim}").exists() and _state(victim) != "Z":
        assert time.monotonic() < deadline, "the process outlived its killed client"
        await asyncio.sleep(0.05)
    assert rig.daemon.vm is not None and not rig.daemon.vm.execs


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


async def test_stoker_failures_exit_125(rig: Rig) -> None:
    assert rig.daemon.store is not None
    add_vm(rig.daemon.store, "off", rig.vm_dir, VMState.STOPPED, None)
    rc, _, err = await rig.cli("vm", "exec", "off", "--", "true")
    assert rc == 125 and "start it with `stoker vm start off`" in err
    rc, _, err = await rig.cli("vm", "exec", "nope", "--", "true")
    assert rc == 125 and "not found" in err
    rc, _, err = await rig.cli("vm", "exec", "-w", "/no/such", "t1", "--", "true")
    assert rc == 125 and "/no/such does not exist" in err
    rc, _, err = await rig.cli("vm", "exec", "-e", "NOEQUALS", "t1", "--", "true")
    assert rc == 125 and "not K=V" in err
    rc, _, err = await rig.cli("vm", "exec", "--timeout", "-3", "t1", "--", "true")
    assert rc == 125 and "not a duration" in err
    rc, _, err = await rig.cli("vm", "exec", "-u", "no-such-user", "t1", "--", "true")
    assert rc == 125 and "no user 'no-such-user'" in err


async def test_a_dead_vmm_is_reported_not_run(rig: Rig) -> None:
    assert rig.daemon.store is not None
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()
    add_vm(rig.daemon.store, "gone", rig.vm_dir, VMState.RUNNING, dead.pid)
    rc, _, err = await rig.cli("vm", "exec", "gone", "--", "true")
    assert rc == 125 and "not running" in err


# --- vm cp --------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "secret").write_text("s")
    (root / "secret").chmod(0o600)
    (root / "shared").write_text("w")
    (root / "shared").chmod(0o666)
    (root / "sub" / "deep" / "f").write_bytes(os.urandom(1000))
    (root / "link").symlink_to("sub/deep/f")
    (root / "dangling").symlink_to("/nonexistent/target")
    with open(root / "big", "wb") as f:
        for _ in range(int(os.environ.get("STOKER_TEST_CP_MB", "20"))):
            f.write(os.urandom(1 << 20))


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    import hashlib

    out: dict[str, tuple[int, str]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            what = "->" + os.readlink(p)
        elif p.is_file():
            what = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            what = "dir"
        out[str(p.relative_to(root))] = (st.st_mode, what)
    return out


async def test_cp_round_trip_keeps_modes_symlinks_and_bytes(rig: Rig, short_tmp: Path) -> None:
    src = short_tmp / "tree"
    src.mkdir()
    make_tree(src)
    guest_dir = rig.vm_dir / "g"
    guest_dir.mkdir()
    rc, _, err = await rig.cli("vm", "cp", str(src), f"t1:{guest_dir}")
    assert rc == 0, err
    assert snapshot(guest_dir / "tree") == snapshot(src)
    back = short_tmp / "back"
    back.mkdir()
    rc, _, err = await rig.cli("vm", "cp", f"t1:{guest_dir}/tree", str(back / "copy"))
    assert rc == 0, err
    assert snapshot(back / "copy") == snapshot(src)
    # A single file, renamed on the way, and over an existing file.
    rc, _, err = await rig.cli("vm", "cp", str(src / "run.sh"), f"t1:{guest_dir}/renamed")
    assert rc == 0 and (guest_dir / "renamed").read_text() == "#!/bin/sh\necho hi\n"
    assert (guest_dir / "renamed").stat().st_mode & 0o777 == 0o755
    rc, _, _ = await rig.cli("vm", "cp", str(src / "secret"), f"t1:{guest_dir}/renamed")
    assert rc == 0 and (guest_dir / "renamed").read_text() == "s"
    assert not list(guest_dir.glob(".stoker-cp*")) and not list(back.glob(".stoker-cp*"))


async def test_cp_bad_paths_change_nothing(rig: Rig, short_tmp: Path) -> None:
    f = short_tmp / "f"
    f.write_text("x")
    g = rig.vm_dir / "g2"
    (g / "existing").mkdir(parents=True)
    rc, _, err = await rig.cli("vm", "cp", str(f), f"t1:{g}/missing/parent/f")
    assert rc == 1 and "no such directory in the guest" in err
    rc, _, err = await rig.cli("vm", "cp", f"t1:{g}/nope", str(short_tmp / "out"))
    assert rc == 1 and "no such file or directory in the guest" in err
    rc, _, err = await rig.cli("vm", "cp", f"t1:{g}/existing", str(short_tmp / "no" / "dir"))
    assert rc == 1 and "no such directory on the host" in err
    # A directory where a directory of that name already is: refused, not merged.
    (g / "existing" / "d").mkdir()
    d = short_tmp / "d"
    d.mkdir()
    rc, _, err = await rig.cli("vm", "cp", str(d), f"t1:{g}/existing")
    assert rc == 1 and "already exists and is a directory" in err
    # Special files are refused before anything is sent.
    os.mkfifo(short_tmp / "fifo")
    rc, _, err = await rig.cli("vm", "cp", str(short_tmp / "fifo"), f"t1:{g}")
    assert rc == 1 and "special file" in err
    # `..` in the guest path is the guest's business: resolved there.
    rc, _, err = await rig.cli("vm", "cp", str(f), f"t1:{g}/existing/../dotdot")
    assert rc == 0 and (g / "dotdot").read_text() == "x"
    rc, _, err = await rig.cli("vm", "cp", str(f), str(short_tmp / "g"))
    assert rc == 125 and "NAME:/path" in err
    assert not list(g.rglob(".stoker-cp*")) and not list(short_tmp.glob(".stoker-cp*"))


async def test_cp_out_refuses_a_hostile_tar_stream(
    rig: Rig, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse
    import io
    import tarfile

    from stoker.cli import cp

    evil = short_tmp / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        for name, kind in (("x/ok", tarfile.REGTYPE), ("x/../../escaped", tarfile.REGTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.size = 2
            tf.addfile(ti, io.BytesIO(b"hi"))
    through = short_tmp / "through.tar"
    outside = short_tmp / "outside"
    outside.mkdir()
    with tarfile.open(through, "w") as tf:
        ln = tarfile.TarInfo("x/ln")
        ln.type = tarfile.SYMTYPE
        ln.linkname = str(outside)
        tf.addfile(ln)
        ti = tarfile.TarInfo("x/ln/planted")
        ti.size = 2
        tf.addfile(ti, io.BytesIO(b"hi"))
    for k, v in rig.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(cp, "PACK", f"cat {evil}")
    dest = short_tmp / "dest"
    dest.mkdir()
    args = argparse.Namespace(system=False)
    with pytest.raises(cp.CopyError, match="refused what the guest sent"):
        await asyncio.to_thread(cp.copy_out, args, "t1", "/whatever", dest)
    assert list(dest.iterdir()) == [] and not (short_tmp / "escaped").exists()
    monkeypatch.setattr(cp, "PACK", f"cat {through}")
    with pytest.raises(cp.CopyError, match="refused what the guest sent"):
        await asyncio.to_thread(cp.copy_out, args, "t1", "/whatever", dest)
    assert list(dest.iterdir()) == [] and list(outside.iterdir()) == []


# --- the Python API (stoker.sdk) on the same rig ----------------------------------------------


async def test_python_api_exec_stream_cp_and_typed_errors(rig: Rig, short_tmp: Path) -> None:
    import stoker
    from stoker.errors import CommandFailed, Conflict, NotFound

    assert rig.daemon.layout is not None
    client = stoker.Client(socket_path=rig.daemon.layout.socket_path)

    def scenario() -> None:
        vm = client.get("t1")
        r = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, b"out\n", b"err\n", False)
        r = vm.exec("cat; echo $X", env={"X": "y"}, stdin=b"in\n", cwd="/")
        assert r.stdout == b"in\ny\n" and r.ok
        assert vm.exec("sleep 30", timeout=0.5).timed_out
        with pytest.raises(CommandFailed, match="exited 4"):
            vm.exec("exit 4", check=True)
        gen = vm.stream("for i in 1 2 3; do echo $i; done; exit 2")
        chunks = []
        while True:
            try:
                chunks.append(next(gen))
            except StopIteration as done:
                result = done.value
                break
        assert b"".join(d for fd, d in chunks if fd == 1) == b"1\n2\n3\n"
        assert result.exit_code == 2
        src = short_tmp / "payload"
        src.mkdir()
        (src / "f").write_text("data")
        dest = rig.vm_dir / "copied"
        dest.mkdir()
        vm.cp_in(src, str(dest))
        assert (dest / "payload" / "f").read_text() == "data"
        vm.cp_out(str(dest / "payload"), short_tmp / "back")
        assert (short_tmp / "back" / "f").read_text() == "data"
        with pytest.raises(CommandFailed, match="no such file"):
            vm.cp_out("/no/such/thing", short_tmp / "x")
        with pytest.raises(NotFound):
            client.get("missing")
        assert rig.daemon.store is not None
        add_vm(rig.daemon.store, "idle", rig.vm_dir, VMState.STOPPED, None)
        with pytest.raises(Conflict, match="start it with"):
            client.get("idle").exec("true")

    await asyncio.to_thread(scenario)


async def test_an_agent_without_exec_means_the_ssh_fallback(rig: Rig, short_tmp: Path) -> None:
    """An image whose agent predates exec: vm.exec runs nothing and says to use SSH."""
    import json as jsonmod

    from stoker.rpc.client import Client

    old_dir = short_tmp / "old"
    old_dir.mkdir()

    async def old_agent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            rid = None
            while (line := await r.readline()) not in (b"\r\n", b"\n", b""):
                if line.lower().startswith(b"x-stoker-id:"):
                    rid = line.split(b":", 1)[1].strip().decode()
                if line.startswith(b"{"):
                    break  # an exec frame: an old agent answers it with 400, no id
            if not line:
                return
            if rid is None:
                continue
            body = jsonmod.dumps({"ok": True, "uptime_s": 5, "agent_version": "1.0"}).encode()
            w.write(
                f"HTTP/1.1 200 OK\r\nContent-Length: {len(body) + 1}\r\nX-Stoker-Id: {rid}"
                "\r\n\r\n".encode()
                + body
                + b"\n"
            )
            await w.drain()

    server = await asyncio.start_unix_server(old_agent, str(old_dir / "agent.sock"))
    try:
        assert rig.daemon.store is not None and rig.daemon.layout is not None
        add_vm(rig.daemon.store, "old", old_dir, VMState.RUNNING, rig.agent.pid)
        sock = rig.daemon.layout.socket_path

        def call() -> dict[str, object]:
            with Client(sock) as c:
                r: dict[str, object] = c.call("vm.exec", {"ref": "old", "shell": "true"})
                return r

        r = await asyncio.to_thread(call)
        assert r["transport"] is None and r["fallback"] == "ssh"
        assert "cannot run commands" in str(r["reason"])
    finally:
        server.close()
