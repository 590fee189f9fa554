"""Committing an overlay upper onto a base image with real e2fsprogs (no mounts)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stoker.daemon.imagemgr import commit, ext4
from stoker.runner import Runner

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (device nodes, trusted xattrs)"),
    pytest.mark.skipif(shutil.which("debugfs") is None, reason="e2fsprogs missing"),
]


def _base_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("stoker\n")
    (root / "etc" / "keep").write_text("base\n")
    (root / "etc" / "gone").write_text("delete me\n")
    (root / "opt" / "old").mkdir(parents=True)
    (root / "opt" / "old" / "a").write_text("old a\n")
    (root / "opt" / "old" / "b").write_text("old b\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "suid").write_text("#!/bin/sh\n")
    os.chmod(root / "usr" / "bin" / "suid", 0o4755)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    os.symlink("usr/bin", root / "bin")
    (root / "gonedir" / "sub").mkdir(parents=True)
    (root / "gonedir" / "sub" / "x").write_text("x\n")


def _upper_tree(root: Path) -> None:
    up = root / "upper"
    (up / "etc").mkdir(parents=True)
    (root / "work").mkdir()
    (up / "etc" / "keep").write_text("changed\n")
    (up / "etc" / "new").write_text("new\n")
    (up / "etc" / "hostname").write_text("per-vm-name\n")  # per-VM: not committed
    os.mknod(up / "etc" / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(up / "gonedir", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (up / "opt" / "old").mkdir(parents=True)
    os.setxattr(up / "opt" / "old", "trusted.overlay.opaque", b"y")
    (up / "opt" / "old" / "c").write_text("only c\n")
    (up / "root-owned-by-1000").write_text("u\n")
    os.chown(up / "root-owned-by-1000", 1000, 1000)
    (up / "usr" / "bin").mkdir(parents=True)
    (up / "usr" / "bin" / "newsuid").write_text("#!/bin/sh\n")
    os.chmod(up / "usr" / "bin" / "newsuid", 0o2755)


def _read(tmp: Path, image: Path) -> Path:
    out = tmp / f"read-{image.name}"
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {out}", str(image)], check=True, capture_output=True)
    return out


def test_commit_applies_upper_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    runner = Runner()
    base_src, ov_src = tmp_path / "base", tmp_path / "ov"
    _base_tree(base_src)
    _upper_tree(ov_src)
    base = tmp_path / "rootfs.ext4"
    overlay = tmp_path / "overlay.ext4"
    asyncio.run(ext4.build_from_dir(runner, base_src, base, 64 * 1024**2, journal=False))
    asyncio.run(ext4.build_from_dir(runner, ov_src, overlay, 64 * 1024**2))
    before = overlay.read_bytes()
    staging = tmp_path / "staging"
    staging.mkdir()
    out = tmp_path / "out"
    res = asyncio.run(commit.commit_root(runner, base, overlay, out, staging))
    assert overlay.read_bytes() == before  # the source VM's disk is never written
    got = _read(tmp_path, res.rootfs)
    assert (got / "etc" / "keep").read_text() == "changed\n"
    assert (got / "etc" / "new").read_text() == "new\n"
    assert (got / "etc" / "hostname").read_text() == "stoker\n"
    assert not (got / "etc" / "gone").exists()
    assert not (got / "gonedir").exists()
    assert sorted(os.listdir(got / "opt" / "old")) == ["c"]
    assert os.lstat(got / "root-owned-by-1000").st_uid == 1000
    assert os.readlink(got / "bin") == "usr/bin"
    # rdump drops set-id and sticky bits: the commit puts them back.
    meta = subprocess.run(
        ["debugfs", "-R", "stat /usr/bin/suid", str(res.rootfs)], capture_output=True, text=True
    ).stdout
    assert "Mode:  04755" in meta
    meta = subprocess.run(
        ["debugfs", "-R", "stat /usr/bin/newsuid", str(res.rootfs)], capture_output=True, text=True
    ).stdout
    assert "Mode:  02755" in meta
    meta = subprocess.run(
        ["debugfs", "-R", "stat /tmp", str(res.rootfs)], capture_output=True, text=True
    ).stdout
    assert "Mode:  01777" in meta
    assert res.changes >= 5


def test_commit_work_disk_drops_excludes(tmp_path: Path) -> None:
    runner = Runner()
    src = tmp_path / "home"
    (src / ".ssh").mkdir(parents=True)
    (src / ".ssh" / "authorized_keys").write_text("key\n")
    (src / ".ssh" / "config").write_text("cfg\n")
    (src / "repo").mkdir()
    (src / "repo" / "f").write_text("f\n")
    (src / ".local").mkdir()
    (src / ".local" / "tool").write_text("t\n")
    disk = tmp_path / "work.ext4"
    asyncio.run(ext4.build_from_dir(runner, src, disk, 64 * 1024**2))
    staging = tmp_path / "st"
    staging.mkdir()
    out = tmp_path / "seed.ext4"
    asyncio.run(
        commit.commit_work_disk(
            runner, disk, out, staging, excludes=("repo", ".ssh/authorized_keys")
        )
    )
    got = _read(tmp_path, out)
    assert (got / ".local" / "tool").read_text() == "t\n"
    assert (got / ".ssh" / "config").exists()
    assert not (got / ".ssh" / "authorized_keys").exists()
    assert not (got / "repo").exists()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
def test_commit_disk_full_leaves_no_image(tmp_path: Path) -> None:
    """The staging area fills up (a 40 MiB tmpfs in a private mount namespace): the commit
    fails and nothing appears in the output directory."""
    runner = Runner()
    base_src = tmp_path / "base"
    (base_src / "big").mkdir(parents=True)
    for i in range(6):
        (base_src / "big" / f"f{i}").write_bytes(os.urandom(8 * 1024**2))
    base = tmp_path / "rootfs.ext4"
    asyncio.run(ext4.build_from_dir(runner, base_src, base, 128 * 1024**2, journal=False))
    ov_src = tmp_path / "ov"
    (ov_src / "upper").mkdir(parents=True)
    (ov_src / "work").mkdir()
    overlay = tmp_path / "overlay.ext4"
    asyncio.run(ext4.build_from_dir(runner, ov_src, overlay, 32 * 1024**2))
    small = tmp_path / "small"
    small.mkdir()
    out = small / "out"
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from stoker.daemon.imagemgr import commit
        from stoker.errors import StokerError
        from stoker.runner import Runner
        st = Path({str(small)!r}) / "staging"
        st.mkdir()
        try:
            asyncio.run(commit.commit_root(Runner(), Path({str(base)!r}),
                        Path({str(overlay)!r}), Path({str(out)!r}), st))
        except (StokerError, OSError) as e:
            o = Path({str(out)!r})
            print("FAILED:", e)
            print("LEFT:", sorted(p.name for p in o.iterdir()) if o.exists() else [])
            sys.exit(3)
        """
    )
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=40m tmpfs "{small}" && exec "$0" -c "$1"',
            sys.executable,
            code,
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=300,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "FAILED" in r.stdout
    assert "LEFT: []" in r.stdout  # no partial rootfs.ext4 (nor its temp file)
