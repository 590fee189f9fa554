"""Workspace leaf with a 100 MB binary file: prepare (pack and tar paths), change it in the
"guest" (a local directory), export, `git apply` on the host side, compare bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from stoker.daemon.workspace import (
    build_payload,
    check_import_result,
    guest_export_script,
    guest_import_script,
    guest_state_script,
    inspect_repo,
    list_files,
    parse_export_output,
    parse_guest_state,
    plan_transfer,
)
from stoker.runner import Runner

pytestmark = pytest.mark.integration

SIZE = 100 * 1024 * 1024


@pytest.fixture(autouse=True)
def git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    yield


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


async def run_guest(
    script: str, payload: AsyncIterator[bytes] | None = None
) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin = proc.stdin

    async def feed() -> None:
        if payload is not None:
            async for chunk in payload:
                stdin.write(chunk)
                await stdin.drain()
        stdin.close()

    out, err, _ = await asyncio.wait_for(
        asyncio.gather(proc.stdout.read(), proc.stderr.read(), feed()), 120
    )
    return await proc.wait(), out, err


def digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def patch_file(p: Path, offset: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(data)


async def test_100mb_binary_round_trip(tmp_path: Path) -> None:
    t0 = time.monotonic()
    host = tmp_path / "host"
    host.mkdir()
    git(host, "init", "-q", "-b", "main")
    git(host, "config", "user.name", "H")
    git(host, "config", "user.email", "h@example.org")
    big = host / "big.bin"
    with open(big, "wb") as f:
        for _ in range(SIZE // (1 << 20)):
            f.write(os.urandom(1 << 20))
    (host / "small.txt").write_text("s\n")
    git(host, "-c", "core.loosecompression=0", "add", "-A")  # fast setup
    git(host, "commit", "-q", "-m", "big")
    # an uncommitted edit of the big file: the tar carries the whole file too
    patch_file(big, 5 * 1024 * 1024, b"host edit" * 100)
    runner = Runner()
    info = await inspect_repo(runner, host)
    files = await list_files(runner, host, False)
    guest = tmp_path / "guest" / "repo"
    state = parse_guest_state(*(await run_guest(guest_state_script(str(guest)))))
    plan = await plan_transfer(runner, info, files, state)
    assert [i.path for i in plan.ship] == ["big.bin"]
    res = await run_guest(guest_import_script(str(guest), plan), build_payload(runner, plan))
    target = check_import_result(*res)
    assert target == info.head
    assert digest(guest / "big.bin") == digest(big)
    # the guest changes the big file and exports
    patch_file(guest / "big.bin", 60 * 1024 * 1024, b"guest edit" * 1000)
    with open(guest / "big.bin", "ab") as f:
        f.write(os.urandom(4096))
    out = parse_export_output(*(await run_guest(guest_export_script(str(guest), target))))
    assert out.files == [("M", "big.bin")]
    copy = tmp_path / "copy"
    git(tmp_path, "clone", "-q", str(host), str(copy))
    r = subprocess.run(["git", "apply", "-"], cwd=copy, input=out.patch, capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    assert digest(copy / "big.bin") == digest(guest / "big.bin")
    assert time.monotonic() - t0 < 60
