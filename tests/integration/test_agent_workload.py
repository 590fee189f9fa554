"""Exec inside a workload root through the real guest agent (a local process, as root).

The workload root is a busybox-static tree the test lays out where stoker-workload would
(`--workload-dir`); the agent enters it with util-linux `unshare --mount --root --wd`
and the ids asked for, exactly as in a guest (docs/guest-boot.md "Workload roots").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from agentrig import stop as _stop
from agentrig import wait_for as _wait_for

from stoker.daemon.agent import AgentClient, ExecRefused, ExecSpec, ExitStatus, UnixTransport
from stoker.guest.agent import agent_script
from stoker.guest.agent.stoker_agent import in_root

pytestmark = pytest.mark.integration

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "id", "pwd", "env", "echo", "readlink", "true")


def busybox_root(root: Path) -> None:
    for d in ("bin", "etc", "srv/app", "home/app", "proc", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for a in APPLETS:
        (root / "bin" / a).symlink_to("busybox")
    (root / "etc/os-release").write_text('PRETTY_NAME="tiny workload"\n')
    (root / "etc/passwd").write_text(
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\napp:x:1001:\nstaff:x:50:\n")
    # An absolute link: it must resolve inside the workload root, not on the host.
    (root / "app").symlink_to("/srv/app")
    os.chmod(root, 0o755)


@pytest.fixture
def wl() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("entering a workload root (unshare --mount --root) needs root")
    if not BUSYBOX.exists() or shutil.which("unshare") is None:
        pytest.skip("needs /bin/busybox (busybox-static) and util-linux unshare")
    d = Path(tempfile.mkdtemp(prefix="stkwl", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        busybox_root(d / "root")
        (d / "ready").touch()
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def agent(wl: Path) -> AsyncIterator[AgentClient]:
    sock = wl / "agent.sock"
    log = open(wl / "agent.log", "wb")  # noqa: SIM115
    argv = [sys.executable, "-I", "-S", str(agent_script()), "--no-vsock", "--no-serial"]
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once, before any await)
        [*argv, "--listen-unix", str(sock), "--workload-dir", str(wl)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    log.close()
    client = AgentClient(UnixTransport(sock), name="wl")
    try:
        await _wait_for(sock)
        h = await client.healthz(10)
        assert "workload" in h.features
        yield client
    finally:
        await client.close()
        _stop(proc)


async def run(client: AgentClient, spec: ExecSpec) -> tuple[bytes, bytes, ExitStatus]:
    s = await client.exec(spec, 10)
    out = {1: bytearray(), 2: bytearray()}
    async for fd, data in s.output():
        out[fd] += data
    assert s.status is not None
    return bytes(out[1]), bytes(out[2]), s.status


async def test_exec_runs_in_the_workload_root_with_its_settings(agent: AgentClient) -> None:
    line = 'id -u; id -g; pwd; echo "$FOO|$PATH|$HOME|$USER"; cat /etc/os-release; ls /'
    out, err, st = await run(
        agent,
        ExecSpec(
            shell=line,
            env={"PATH": "/bin", "FOO": "bar"},
            cwd="/srv",
            user="1000:50",
            root="workload",
        ),
    )
    assert st.exit_code == 0, err
    lines = out.decode().splitlines()
    assert lines[:4] == ["1000", "50", "/srv", "bar|/bin|/home/app|app"]
    assert lines[4] == 'PRETTY_NAME="tiny workload"'
    assert sorted(lines[5:]) == sorted(["app", "bin", "etc", "home", "proc", "srv", "tmp"])


async def test_a_user_name_is_looked_up_in_the_workload_root(agent: AgentClient) -> None:
    out, _, st = await run(
        agent, ExecSpec(argv=["sh", "-c", "id -u; id -g; echo $HOME"], user="app", root="workload")
    )
    assert st.exit_code == 0 and out.decode().split() == ["1000", "1001", "/home/app"]
    out, _, _ = await run(agent, ExecSpec(argv=["id", "-g"], user="app:staff", root="workload"))
    assert out == b"50\n"
    with pytest.raises(ExecRefused, match="no user 'nobody' in the workload root"):
        await run(agent, ExecSpec(argv=["true"], user="nobody", root="workload"))


async def test_working_directory_is_resolved_inside_the_root(agent: AgentClient) -> None:
    # /app -> /srv/app (absolute): the root's own /srv/app, where the process really is.
    out, _, st = await run(agent, ExecSpec(argv=["pwd"], cwd="/app", root="workload"))
    assert st.exit_code == 0 and out == b"/srv/app\n"
    with pytest.raises(ExecRefused, match="/nope does not exist in the workload root"):
        await run(agent, ExecSpec(argv=["true"], cwd="/nope", root="workload"))


async def test_missing_program_is_127(agent: AgentClient) -> None:
    _, err, st = await run(
        agent, ExecSpec(argv=["python3", "-V"], env={"PATH": "/bin"}, root="workload")
    )
    assert st.exit_code == 127 and b"python3" in err


async def test_without_root_the_exec_stays_in_the_system_root(agent: AgentClient) -> None:
    out, _, st = await run(agent, ExecSpec(argv=["cat", "/etc/os-release"]))
    assert st.exit_code == 0 and b"tiny workload" not in out


def test_in_root_never_climbs_out(tmp_path: Path) -> None:
    root = tmp_path / "r"
    busybox_root(root) if BUSYBOX.exists() else (root / "srv/app").mkdir(parents=True)
    if not (root / "app").is_symlink():
        (root / "app").symlink_to("/srv/app")
    (root / "up").symlink_to("../../../../..")
    (root / "loop").symlink_to("loop")
    assert in_root(str(root), "/app") and in_root(str(root), "/srv/app/../app")
    assert in_root(str(root), "/up/srv")  # `..` stops at the root
    assert not in_root(str(root), "/up/" + str(tmp_path).lstrip("/"))
    assert not in_root(str(root), "/loop") and not in_root(str(root), "/missing")
