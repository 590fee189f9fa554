"""SafeTree: every operation on a guest path stays inside the tree, whatever its links."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stoker.daemon.imagemgr.safetree import SafeTree, TooLarge, rmtree, walk_lstat
from stoker.errors import InvalidArgument

pytestmark = pytest.mark.unit


@pytest.fixture
def host(tmp_path: Path) -> Path:
    h = tmp_path / "host"
    h.mkdir()
    (h / "victim").write_text("host\n")
    os.chmod(h / "victim", 0o600)
    return h


def test_links_in_parents_resolve_inside_the_root(tmp_path: Path, host: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "abs").symlink_to(str(host))  # absolute: restarts at the root
    (root / "up").symlink_to("../../../..")  # climbs: clamped at the root
    (root / "proc").mkdir()
    (root / "r").symlink_to(f"/proc/self/root{host}")
    with SafeTree(root, chown_root=False) as t:
        t.write("/abs/victim", b"guest\n", 0o644)
        t.write("/up/host/victim", b"guest\n", 0o644)
        t.write("/r/victim", b"guest\n", 0o644)
        t.symlink("/abs/link", "/etc/passwd")
        assert t.read("/abs/victim", 100) == b"guest\n"
        assert t.read("/abs/link", 100) is None  # resolves to /etc/passwd *inside* the root
    assert (host / "victim").read_text() == "host\n" and stat.S_IMODE(
        (host / "victim").stat().st_mode
    ) == 0o600
    assert sorted(os.listdir(host)) == ["victim"]
    assert (root / str(host).lstrip("/") / "victim").read_text() == "guest\n"
    assert (root / "host" / "victim").read_text() == "guest\n"
    assert (root / f"proc/self/root{host}" / "victim").read_text() == "guest\n"


def test_final_symlink_is_replaced_not_followed(tmp_path: Path, host: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").symlink_to(host / "victim")
    with SafeTree(root, chown_root=False) as t:
        t.write("/f", b"new", 0o640)
        assert t.unlink("/nothing") is False
    assert not (root / "f").is_symlink() and (root / "f").read_bytes() == b"new"
    assert stat.S_IMODE((root / "f").stat().st_mode) == 0o640
    assert (host / "victim").read_text() == "host\n"
    assert [n for n in os.listdir(root) if "stoker-tmp" in n] == []


def test_refusals(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "loop").symlink_to("loop")
    (root / "big").write_bytes(b"x" * 101)
    with SafeTree(root, chown_root=False) as t:
        with pytest.raises(InvalidArgument, match="is a directory"):
            t.write("/d", b"", 0o644)
        with pytest.raises(InvalidArgument, match="too many symlinks"):
            t.write("/loop/x", b"", 0o644)
        with pytest.raises(TooLarge, match="over the 100 bytes"):
            t.read("/big", 100)
    (tmp_path / "link-root").symlink_to(root)
    with pytest.raises(InvalidArgument, match="not a symlink"):
        SafeTree(tmp_path / "link-root")


def test_walk_and_rmtree_never_follow_links(tmp_path: Path, host: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"12345")
    (tree / "a" / "to-host").symlink_to(host)
    kinds = sorted(stat.S_IFMT(st.st_mode) for st in walk_lstat(tree))
    assert kinds.count(stat.S_IFDIR) == 3 and kinds.count(stat.S_IFLNK) == 1
    assert len(kinds) == 5  # tree, a, b, f, the link: the host dir is not entered
    rmtree(tree)
    assert not tree.exists()
    assert (host / "victim").read_text() == "host\n"
    rmtree(tree)  # missing is fine
