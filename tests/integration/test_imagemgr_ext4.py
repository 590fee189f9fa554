"""ext4 helpers against the real e2fsprogs: build from a tree, edit with debugfs, grow, clone.

Nothing is mounted: every check reads the image back with debugfs, and e2fsck -fn must
find each image clean.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from prereq import require_tools
from stoker.daemon.imagemgr import ext4
from stoker.errors import CommandFailed, InvalidArgument, NotFound
from stoker.runner import Runner

pytestmark = pytest.mark.integration

MIB = 1024**2


@pytest.fixture(autouse=True)
def _tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (file owners and device nodes in the source tree)")
    require_tools("mkfs.ext4", "debugfs", "e2fsck", "resize2fs", hint="apt-get install e2fsprogs")


def fsck_clean(image: Path) -> None:
    r = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def ls_l(image: Path, path: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", f'ls -l "{path}"', str(image)], capture_output=True, text=True
    ).stdout


def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "usr" / "bin").mkdir(parents=True)
    su = root / "usr" / "bin" / "su"
    su.write_bytes(b"\x7fELF fake su")
    os.chmod(su, 0o4755)
    os.link(su, root / "usr" / "bin" / "su-hardlink")
    (root / "bin").symlink_to("usr/bin")
    home = root / "home" / "dev"
    home.mkdir(parents=True)
    (home / "notes").write_text("mine\n")
    os.chown(home, 1000, 1000)
    os.chown(home / "notes", 1000, 1000)
    os.chmod(home, 0o700)
    (root / "dev").mkdir()
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "sparse").write_bytes(b"")
    os.truncate(root / "sparse", 10 * MIB)
    return root


async def test_build_from_dir_keeps_metadata(tmp_path: Path) -> None:
    r = Runner()
    src = make_tree(tmp_path / "tree")
    img = tmp_path / "out" / "root.ext4"
    await ext4.build_from_dir(r, src, img, 128 * MIB, label="stoker-test")
    assert img.stat().st_size == 128 * MIB
    assert img.stat().st_blocks * 512 < 32 * MIB, "image is not sparse"
    fsck_clean(img)
    su = await ext4.stat_path(r, img, "/usr/bin/su")
    assert su is not None and su.is_file and su.mode == 0o4755 and su.uid == 0
    home = await ext4.stat_path(r, img, "/home/dev")
    assert (
        home is not None and home.is_dir and (home.mode, home.uid, home.gid) == (0o700, 1000, 1000)
    )
    link = await ext4.stat_path(r, img, "/bin")
    assert link is not None and link.kind == "symlink"
    null = await ext4.stat_path(r, img, "/dev/null")
    assert null is not None and null.kind == "character special"
    # The hardlink shares the inode.
    inode = ls_l(img, "/usr/bin").split("\n")
    su_inodes = {
        line.split()[0] for line in inode if line.split()[-1:] in (["su"], ["su-hardlink"])
    }
    assert len(su_inodes) == 1
    root = await ext4.stat_path(r, img, "/")
    assert root is not None and (root.mode, root.uid, root.gid) == (0o755, 0, 0)
    assert await ext4.read_file(r, img, "/etc/passwd") == b"root:x:0:0::/root:/bin/sh\n"
    label = subprocess.run(["e2label", str(img)], capture_output=True, text=True).stdout.strip()
    assert label == "stoker-test"
    assert sorted(p.name for p in img.parent.iterdir()) == ["root.ext4"]


async def test_auto_size_and_too_small(tmp_path: Path) -> None:
    r = Runner()
    src = tmp_path / "tree"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(40 * MIB))
    img = tmp_path / "auto.ext4"
    await ext4.build_from_dir(r, src, img, journal=False)
    assert img.stat().st_size == 1024 * MIB  # content x 1.5 is below the 1 GiB floor
    fsck_clean(img)
    with pytest.raises(InvalidArgument, match="too much"):
        await ext4.build_from_dir(r, src, tmp_path / "small.ext4", 32 * MIB)
    assert not (tmp_path / "small.ext4").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.ext4", "tree"]
    with pytest.raises(NotFound):
        await ext4.build_from_dir(r, tmp_path / "nope", tmp_path / "x.ext4", 64 * MIB)


async def test_debugfs_editing(tmp_path: Path) -> None:
    r = Runner()
    src = tmp_path / "tree"
    src.mkdir()
    (src / "etc").mkdir()
    (src / "etc" / "hostname").write_text("old\n")
    img = tmp_path / "disk.ext4"
    await ext4.build_from_dir(r, src, img, 64 * MIB)

    await ext4.mkdir_p(r, img, "/.ssh", 0o700)
    await ext4.write_file(r, img, "/.ssh/authorized_keys", b"ssh-ed25519 AAAA test\n", 0o600)
    d = await ext4.stat_path(r, img, "/.ssh")
    assert d is not None and d.is_dir and d.mode == 0o700
    f = await ext4.stat_path(r, img, "/.ssh/authorized_keys")
    assert f is not None and (f.mode, f.uid, f.gid, f.size) == (0o600, 0, 0, 22)

    # Overwrite, deep parents, odd names, binary content, other owners.
    await ext4.write_file(r, img, "/etc/hostname", b"new\n")
    assert await ext4.read_file(r, img, "/etc/hostname") == b"new\n"
    blob = bytes(range(256)) * 1000
    await ext4.write_files(
        r,
        img,
        [
            ext4.FileEntry("/a/b/c/with space.bin", blob, 0o640, 1000, 1001),
            ext4.FileEntry("/a/b/other", b"", 0o755),
        ],
    )
    assert await ext4.read_file(r, img, "/a/b/c/with space.bin") == blob
    st = await ext4.stat_path(r, img, "/a/b/c/with space.bin")
    assert st is not None and (st.mode, st.uid, st.gid) == (0o640, 1000, 1001)
    parent = await ext4.stat_path(r, img, "/a/b")
    assert parent is not None and (parent.mode, parent.uid) == (0o755, 0)
    assert await ext4.read_file(r, img, "/a/b/other") == b""

    await ext4.set_mode(r, img, "/", 0o755, 0, 0)
    await ext4.mkdir_p(r, img, "/.ssh", 0o750)  # existing: mode updated
    d = await ext4.stat_path(r, img, "/.ssh")
    assert d is not None and d.mode == 0o750

    await ext4.remove(r, img, "/a/b/other")
    assert not await ext4.exists(r, img, "/a/b/other")
    await ext4.remove(r, img, "/a/b/other")  # missing_ok
    with pytest.raises(NotFound):
        await ext4.remove(r, img, "/a/b/other", missing_ok=False)
    with pytest.raises(CommandFailed, match="not empty"):
        await ext4.remove(r, img, "/a")
    fsck_clean(img)


async def test_debugfs_errors(tmp_path: Path) -> None:
    r = Runner()
    src = tmp_path / "tree"
    (src / "dir").mkdir(parents=True)
    (src / "file").write_text("x")
    img = tmp_path / "disk.ext4"
    await ext4.build_from_dir(r, src, img, 32 * MIB)
    with pytest.raises(NotFound):
        await ext4.read_file(r, img, "/missing")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        await ext4.read_file(r, img, "/dir")
    with pytest.raises(CommandFailed, match="a directory is there"):
        await ext4.write_file(r, img, "/dir", b"over a directory")
    with pytest.raises(CommandFailed, match="it is a regular"):
        await ext4.write_file(r, img, "/file/below", b"under a file")
    with pytest.raises(CommandFailed, match="in the way"):
        await ext4.mkdir_p(r, img, "/file", 0o755)
    for bad in ("relative", '/quo"te', "/new\nline", "/a/../etc"):
        with pytest.raises(InvalidArgument):
            await ext4.write_file(r, img, bad, b"x")
    with pytest.raises(NotFound):
        await ext4.write_file(r, tmp_path / "no.ext4", "/x", b"x")
    # No space left: debugfs exits 0 but says so; it must surface as an error.
    with pytest.raises(CommandFailed):
        await ext4.write_file(r, img, "/huge", os.urandom(40 * MIB))
    fsck_clean(img)


async def test_grow_and_clone(tmp_path: Path) -> None:
    r = Runner()
    src = tmp_path / "tree"
    src.mkdir()
    (src / ".profile").write_text("# profile\n")
    seed = tmp_path / "seed.ext4"
    await ext4.build_from_dir(r, src, seed, 64 * MIB, label="stoker-work")
    seed_bytes = seed.read_bytes()

    work = tmp_path / "vm" / "work.ext4"
    await ext4.clone_grow(r, seed, work, 2048 * MIB)
    assert seed.read_bytes() == seed_bytes
    assert work.stat().st_size == 2048 * MIB
    assert work.stat().st_blocks * 512 < 128 * MIB, "clone is not sparse"
    fsck_clean(work)
    assert await ext4.read_file(r, work, "/.profile") == b"# profile\n"
    out = subprocess.run(["dumpe2fs", "-h", str(work)], capture_output=True, text=True).stdout
    block_count = int(
        next(ln for ln in out.splitlines() if ln.startswith("Block count:")).split()[-1]
    )
    assert block_count * 4096 == 2048 * MIB

    # Grow again after writing; never shrink.
    await ext4.write_file(r, work, "/data", b"d" * 1000)
    await ext4.grow(r, work, 3072 * MIB)
    assert work.stat().st_size == 3072 * MIB
    await ext4.grow(r, work, 1024 * MIB)
    assert work.stat().st_size == 3072 * MIB
    assert await ext4.read_file(r, work, "/data") == b"d" * 1000
    fsck_clean(work)

    with pytest.raises(NotFound):
        await ext4.clone_grow(r, tmp_path / "missing.ext4", tmp_path / "x.ext4", 64 * MIB)
    assert sorted(p.name for p in work.parent.iterdir()) == ["work.ext4"]
