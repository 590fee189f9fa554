"""`image build --copy`: the copy step of EnvService runs its real shell command in a
busybox root (through `unshare --root`, as root) standing in for the builder VM's SSH."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from stoker.daemon.env_service import EnvService
from stoker.daemon.guestssh.client import ExecResult
from stoker.daemon.imagemgr.derived import host_copy
from stoker.errors import Conflict

pytestmark = pytest.mark.integration

BUSYBOX = Path("/bin/busybox")


class ChrootSSH:
    """`ssh.run` that runs the command with `sh -c` inside `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.commands: list[str] = []

    async def run(
        self, target: object, command: str, *, input: bytes, timeout: float
    ) -> ExecResult:
        self.commands.append(command)
        r = await asyncio.to_thread(
            subprocess.run,
            ["unshare", "--mount", f"--root={self.root}", "--", "/bin/sh", "-c", command],
            input=input,
            capture_output=True,
            env={"PATH": "/bin"},
        )
        return ExecResult(r.returncode, r.stdout, r.stderr)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    if os.geteuid() != 0 or not BUSYBOX.exists():
        pytest.skip("needs root and /bin/busybox")
    r = tmp_path / "guest"
    (r / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, r / "bin/busybox")
    for a in ("sh", "mkdir", "cat", "chmod", "mv"):
        (r / "bin" / a).symlink_to("busybox")
    return r


def env_with(ssh: ChrootSSH) -> EnvService:
    vm = SimpleNamespace(ssh=ssh, ssh_target=lambda rec: None)
    return EnvService(SimpleNamespace(), vm, None)  # type: ignore[arg-type]


async def test_copy_lands_with_its_mode_and_odd_names(root: Path, tmp_path: Path) -> None:
    src = tmp_path / "my tool.sh"
    src.write_bytes(b"#!/bin/sh\necho 'it works'\n" + bytes(range(256)))
    src.chmod(0o755)
    ssh = ChrootSSH(root)
    env = env_with(ssh)
    events: list[str] = []
    guest = "/opt/my dir/$(touch pwned)/tool"
    c = host_copy(str(src), guest)
    await env._copy_in(None, c, lambda st, msg="", **k: events.append(msg))  # type: ignore[arg-type]
    out = root / guest.lstrip("/")
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_mode & 0o777 == 0o755
    assert not (root / "pwned").exists() and not list(root.rglob("*.stoker-copy"))
    assert any("->" in e and guest in e for e in events)
    # A second copy replaces the file whole.
    src.write_text("two\n")
    src.chmod(0o644)
    await env._copy_in(None, host_copy(str(src), guest), lambda *a, **k: None)  # type: ignore[arg-type]
    assert out.read_text() == "two\n" and out.stat().st_mode & 0o777 == 0o644


async def test_a_file_changed_after_hashing_is_refused(root: Path, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("one\n")
    c = host_copy(str(src), "/etc/f")
    src.write_text("changed\n")
    ssh = ChrootSSH(root)
    with pytest.raises(Conflict, match="changed after the build was asked for"):
        await env_with(ssh)._copy_in(None, c, lambda *a, **k: None)  # type: ignore[arg-type]
    assert ssh.commands == [] and not (root / "etc").exists()
