"""Any Linux OCI image runs: a workload root on a real guest (QEMU/TCG, test namespace).

The test builds an OCI image with no sshd, no systemd and no python3 (a busybox-static
tree, a shell script and an /etc/os-release), pushes it to a docker-registry it runs on
the host's loopback, and pulls it with a daemon in the host namespace (like the golden
build: a pull makes no bridge or tap). VMs on it then boot the golden system image in
the test's namespace with the image as their workload root (docs/guest-boot.md).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from stokerenv import StokerEnv, destroy_env, make_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "oci"))
from ocitestlib import Entry, Layer, Pusher, RegistryProcess, make_layer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

BUSYBOX = Path("/bin/busybox")
OS_RELEASE = 'PRETTY_NAME="stoker tiny busybox"\nID=tinybox\n'
HELLO = '#!/bin/sh\necho "hello from $FOO in $(pwd)"\n'


def tiny_layer() -> Layer:
    """A busybox-static root: no sshd, no systemd, no python3."""
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    entries = [
        Entry("bin", "dir"),
        Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755),
        *(Entry(f"bin/{a}", "symlink", linkname="busybox") for a in applets if a != "busybox"),
        Entry("etc", "dir"),
        Entry("etc/os-release", data=OS_RELEASE.encode()),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry("etc/group", data=b"root:x:0:\n"),
        Entry("usr", "dir"),
        Entry("usr/local", "dir"),
        Entry("usr/local/bin", "dir"),
        Entry("usr/local/bin/hello", data=HELLO.encode(), mode=0o755),
        Entry("work", "dir"),
        Entry("root", "dir", mode=0o700),
        Entry("tmp", "dir", mode=0o1777),
    ]
    names = {e.name for e in entries}
    assert not names & {"usr/sbin/sshd", "sbin/sshd", "lib/systemd/systemd", "usr/bin/python3"}
    return make_layer(entries)


def tiny_config(layer: Layer) -> bytes:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/bin", "FOO=from-image"],
            "WorkingDir": "/work",
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
    }
    return json.dumps(doc).encode()


async def push_tiny(host: str) -> None:
    layer = tiny_layer()
    async with aiohttp.ClientSession() as session:
        await Pusher(session, host).image("tiny/busybox", "1", [layer], config=tiny_config(layer))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StokerEnv]:
    """The golden image, and the tiny OCI image pulled as `tiny`, both by a daemon in the
    host namespace (stopped again before the namespace's own daemon starts)."""
    if not BUSYBOX.exists():
        pytest.skip("needs /bin/busybox (apt-get install busybox-static)")
    e = make_env("wl", 'boot_timeout = "8m"\n')
    reg = RegistryProcess(tmp_path_factory.mktemp("registry")).start()
    try:
        e.build_image(1800)
        asyncio.run(push_tiny(reg.host))
        r = subprocess.run(
            e.argv("image", "pull", f"{reg.host}/tiny/busybox:1", "--name", "tiny", host=True),
            env=e.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        subprocess.run(
            e.argv("daemon", "stop", host=True), env=e.env, capture_output=True, timeout=60
        )
        assert r.returncode == 0, r.stdout + r.stderr + e.daemon_log_tail()
        assert "workload root" in r.stdout + r.stderr
        yield e
    finally:
        reg.stop()
        destroy_env(e)


def git_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "README.md").write_text("workload repo\n")
    (path / "main.sh").write_text("echo main\n")
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=path, check=True)
    return path


def test_image_is_a_workload_root(env: StokerEnv) -> None:
    im = json.loads(env.run("image", "show", "tiny", "--json").stdout)
    assert im["role"] == "workload" and not im["has_sshd"]
    assert im["meta"]["workload"]["env"] == ["PATH=/usr/local/bin:/bin", "FOO=from-image"]
    assert im["meta"]["workload"]["working_dir"] == "/work"


def test_vm_exec_and_ssh_see_the_image_config(env: StokerEnv) -> None:
    """No workspace: `vm exec` runs in the image's WorkingDir with its Env; `vm ssh`
    sessions are forced into the workload root too."""
    env.run("vm", "create", "--name", "wl0", "--image", "tiny", timeout=900)
    try:
        r = env.run("vm", "exec", "wl0", "--", "hello; echo PATH=$PATH; id -u; ls /usr/bin | wc -l")
        lines = r.stdout.splitlines()
        assert lines[0] == "hello from from-image in /work", r.stdout
        assert lines[1] == "PATH=/usr/local/bin:/bin" and lines[2] == "0"
        assert int(lines[3]) == 0, "the system root's /usr/bin is visible in the workload root"
        r = env.run("vm", "exec", "wl0", "--", "cat", "/etc/os-release")
        assert r.stdout == OS_RELEASE
        r = env.run("vm", "exec", "wl0", "--", "python3", "-V", check=False)
        assert r.returncode == 127
        # ssh: sshd's ForceCommand enters the workload root (its WorkingDir, its Env).
        r = env.run("vm", "ssh", "wl0", "--", "pwd; echo $FOO; cat /etc/os-release")
        assert r.stdout.splitlines()[:2] == ["/work", "from-image"], r.stdout
        assert OS_RELEASE.splitlines()[0] in r.stdout
    finally:
        env.run("vm", "delete", "wl0", check=False, timeout=300)


def test_vm_run_with_a_repo(env: StokerEnv) -> None:
    """The acceptance line: the repo at /root/repo inside the workload root, and the
    image's os-release."""
    repo = git_repo(env.root / "repo")
    r = env.run(
        "vm",
        "run",
        "--rm",
        "--image",
        "tiny",
        str(repo),
        "--",
        "sh",
        "-c",
        "ls /root/repo && cat /etc/os-release && pwd",
        timeout=900,
    )
    out = r.stdout.splitlines()
    assert "README.md" in out and "main.sh" in out, r.stdout + r.stderr
    assert 'PRETTY_NAME="stoker tiny busybox"' in out and "ID=tinybox" in out
    assert out[-1] == "/root/repo"  # a prepared workspace is the default directory
