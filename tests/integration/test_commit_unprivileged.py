"""`vm commit`'s image building by a daemon that is not root: rdump cannot chown, so the
owners and modes from the source images' listings are set in the new image by debugfs.

The same base, overlay and work disk are committed as root and as a throwaway user;
every inode of the results is compared (type, mode with set-id/sticky bits, uid, gid).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from stoker.daemon.imagemgr import ext4
from stoker.runner import Runner

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "net"))
sys.path.insert(0, str(HERE / "oci"))
from _nonroot import make_user, nonroot_python  # noqa: E402
from test_commit_tree import _base_tree, _upper_tree  # noqa: E402
from test_unprivileged_unpack import tree  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the comparison, the test user)"),
    pytest.mark.skipif(shutil.which("debugfs") is None, reason="e2fsprogs missing"),
]


def _images(top: Path) -> tuple[Path, Path, Path]:
    runner = Runner()
    base_src, ov_src, home = top / "base", top / "ov", top / "home"
    _base_tree(base_src)
    _upper_tree(ov_src)
    (base_src / "etc" / "shadow").write_text("root:*:1::::::\n")
    os.chown(base_src / "etc" / "shadow", 0, 42)
    os.chmod(base_src / "etc" / "shadow", 0o640)
    (base_src / "etc" / "locked").write_text("nobody may read this\n")
    os.chmod(base_src / "etc" / "locked", 0o000)
    (base_src / "srv" / "ro").mkdir(parents=True)
    (base_src / "srv" / "ro" / "old").write_text("o\n")
    os.chown(base_src / "srv" / "ro", 33, 33)
    os.chmod(base_src / "srv" / "ro", 0o555)
    os.symlink("old", base_src / "srv" / "ro" / "link")
    os.lchown(base_src / "srv" / "ro" / "link", 33, 33)
    up = ov_src / "upper"
    (up / "srv" / "ro").mkdir(parents=True)
    os.chown(up / "srv" / "ro", 33, 33)
    os.chmod(up / "srv" / "ro", 0o555)
    (up / "srv" / "ro" / "new").write_text("written in the VM\n")
    os.chown(up / "srv" / "ro" / "new", 33, 34)
    (up / "var" / "mail").mkdir(parents=True)
    os.chown(up / "var" / "mail", 0, 8)
    os.chmod(up / "var" / "mail", 0o2775)
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("cfg\n")
    os.chmod(home / ".ssh", 0o700)
    (home / "mine").write_text("m\n")
    os.chown(home / "mine", 1000, 1000)
    base, overlay, work = top / "rootfs.ext4", top / "overlay.ext4", top / "work.ext4"
    asyncio.run(ext4.build_from_dir(runner, base_src, base, 64 * 1024**2, journal=False))
    asyncio.run(ext4.build_from_dir(runner, ov_src, overlay, 64 * 1024**2))
    asyncio.run(ext4.build_from_dir(runner, home, work, 64 * 1024**2))
    for p in (base, overlay, work):
        os.chmod(p, 0o644)
    return base, overlay, work


def test_an_unprivileged_commit_matches_the_root_one() -> None:
    exe, env = nonroot_python()
    top = Path(tempfile.mkdtemp(prefix="stoker-commit-unpriv-"))
    os.chmod(top, 0o755)
    try:
        base, overlay, work = _images(top / "src")
        os.chmod(top / "src", 0o755)
        with make_user("stkcom") as user:
            results = {}
            for who in ("root", "user"):
                d = top / who
                (d / "staging").mkdir(parents=True)
                if who == "user":
                    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(d)], check=True)
                argv = [exe, str(HERE / "_commit_as.py"), str(base), str(overlay), str(work),
                        str(d / "out"), str(d / "staging")]  # fmt: skip
                if who == "user":
                    argv = [*user.setpriv(), *argv]
                p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
                assert p.returncode == 0, f"{who}: {p.stderr}"
                results[who] = d / "out"
            for image in ("rootfs.ext4", "work-seed.ext4"):
                want = tree(results["root"] / image)
                got = tree(results["user"] / image)
                assert sorted(got) == sorted(want), image
                # A root commit's rdump leaves symlinks root's (it does not lchown them);
                # the unprivileged one sets the listed owner: compare their modes only.
                diff = {
                    p: (got[p][1:], want[p][1:])
                    for p in want
                    if got[p][1:] != want[p][1:]
                    and not (want[p][1] & 0o170000 == 0o120000 and got[p][1] == want[p][1])
                }
                assert diff == {}, f"{image}: (unprivileged, root) differ: {diff}"
                assert all(v[2] != user.uid and v[3] != user.gid for v in got.values())
            t = tree(results["user"] / "rootfs.ext4")
            assert t["/usr/bin/suid"][1:] == (0o104755, 0, 0)
            assert t["/usr/bin/newsuid"][1:] == (0o102755, 0, 0)
            assert t["/tmp"][1:] == (0o041777, 0, 0)
            assert t["/etc/shadow"][1:] == (0o100640, 0, 42)
            assert t["/etc/locked"][1:] == (0o100000, 0, 0)
            assert t["/srv/ro"][1:] == (0o040555, 33, 33)
            assert t["/srv/ro/new"][1:] == (0o100644, 33, 34)
            assert t["/srv/ro/link"][1:] == (0o120777, 33, 33)  # the base image's owner
            assert t["/var/mail"][1:] == (0o042775, 0, 8)
            assert t["/root-owned-by-1000"][2:] == (1000, 1000)
            assert "/etc/gone" not in t and "/gonedir" not in t
            seed = tree(results["user"] / "work-seed.ext4")
            assert seed["/mine"][1:] == (0o100644, 1000, 1000)
            assert seed["/.ssh"][1:] == (0o040700, 0, 0)
    finally:
        shutil.rmtree(top, ignore_errors=True)
