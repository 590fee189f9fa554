"""`stoker ssh-config --install/--uninstall` edits only its own marked block."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoker.cli.main import main

pytestmark = pytest.mark.unit


def test_install_uninstall_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    cfg = home / ".ssh" / "config"
    original = "Host work\n    HostName work.example.invalid\n    User me\n"
    cfg.write_text(original)
    cfg.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert main(["ssh-config", "--install"]) == 0
    assert main(["ssh-config", "--install"]) == 0  # idempotent: still one block
    text = cfg.read_text()
    assert text.count("Include ") == 1 and text.startswith("# >>> stoker")
    assert text.endswith(original)
    inc = home / ".config" / "stoker" / "ssh_config"
    body = inc.read_text()
    assert "Host *.vm" in body and "__connect %h %p" in body and "known_hosts" in body
    assert (cfg.stat().st_mode & 0o777) == 0o600
    assert main(["ssh-config", "--uninstall"]) == 0
    assert cfg.read_text() == original
    assert not inc.exists()


def test_never_writes_without_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["ssh-config", "--uninstall"]) == 0
    assert not (tmp_path / ".ssh" / "config").exists()
