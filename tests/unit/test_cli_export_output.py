"""`stoker vm workspace export --output F`: a safe temp file beside F, atomic rename."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from stoker.cli import workspace as ws_cli
from stoker.cli.main import main

pytestmark = pytest.mark.unit

PATCH = b"diff --git a/x b/x\n+hello\n"


class FakeClient:
    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *a: object) -> None:
        pass

    def call(
        self, method: str, params: dict[str, Any] | None = None, progress: Any = None, **kw: Any
    ) -> Any:
        assert method == "vm.workspace.export"
        return {"patch_b64": base64.b64encode(PATCH).decode(), "files": ["x"], "base": "a" * 40}


@pytest.fixture(autouse=True)
def fake_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws_cli, "client", lambda args: FakeClient())


def test_planted_tmp_symlink_is_not_followed(tmp_path: Path) -> None:
    """Old behaviour (issue 9 item 10): `open(F + ".tmp", "wb")` followed a symlink planted
    at F.tmp, so the (root) CLI overwrote whatever it pointed to."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    out = tmp_path / "patch.diff"
    (tmp_path / "patch.diff.tmp").symlink_to(victim)
    assert main(["vm", "workspace", "export", "t1", "--output", str(out)]) == 0
    assert victim.read_bytes() == b"precious\n"
    assert out.read_bytes() == PATCH
    assert not out.is_symlink()
    # no temp file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "patch.diff",
        "patch.diff.tmp",
        "victim",
    ]


def test_symlink_at_the_output_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    out = tmp_path / "patch.diff"
    out.symlink_to(victim)
    assert main(["vm", "workspace", "export", "t1", "-o", str(out)]) == 0
    assert victim.read_bytes() == b"precious\n"
    assert not out.is_symlink() and out.read_bytes() == PATCH


def test_output_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert main(["vm", "workspace", "export", "t1", "-o", str(tmp_path / "p")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o640


def test_unwritable_directory_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "p"
    assert main(["vm", "workspace", "export", "t1", "-o", str(missing)]) == 1
    e = capsys.readouterr().err
    assert "cannot write" in e and str(missing) in e and "Traceback" not in e
