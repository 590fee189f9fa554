"""`publish_dir`: the atomic publish golden builds and kernel imports share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stoker.daemon.imagemgr import publish
from stoker.daemon.imagemgr.publish import publish_dir

pytestmark = pytest.mark.unit


def _tree(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "sub").mkdir()
    (path / "sub" / "file").write_text(content)
    return path


def test_publishes_into_an_empty_place(tmp_path: Path) -> None:
    staging = _tree(tmp_path / ".img.build-1", "new")
    publish_dir(staging, tmp_path / "img")
    assert (tmp_path / "img" / "sub" / "file").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["img"]


def test_replaces_an_existing_directory_and_removes_the_old_one(tmp_path: Path) -> None:
    _tree(tmp_path / "img", "old")
    staging = _tree(tmp_path / ".img.build-1", "new")
    publish_dir(staging, tmp_path / "img")
    assert (tmp_path / "img" / "sub" / "file").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["img"]  # no .img.old-* left behind


def test_a_failed_swap_leaves_the_old_directory_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path / "img", "old")
    staging = _tree(tmp_path / ".img.build-1", "new")
    real_rename = os.rename

    def failing_rename(src: str | Path, dst: str | Path) -> None:
        if Path(src) == staging:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(publish.os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space"):
        publish_dir(staging, tmp_path / "img")
    assert (tmp_path / "img" / "sub" / "file").read_text() == "old"
    # Nothing but the old directory and the caller's staging: no half-published sibling.
    assert sorted(os.listdir(tmp_path)) == [".img.build-1", "img"]


def test_a_failed_publish_into_an_empty_place_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = _tree(tmp_path / ".img.build-1", "new")

    def failing_rename(src: str | Path, dst: str | Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(publish.os, "rename", failing_rename)
    with pytest.raises(OSError):
        publish_dir(staging, tmp_path / "img")
    assert not (tmp_path / "img").exists()
    assert sorted(os.listdir(tmp_path)) == [".img.build-1"]
