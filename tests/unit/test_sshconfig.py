"""`stoker ssh-config --install/--uninstall` edits only its own marked block."""

from __future__ import annotations

import os
import shutil
import subprocess
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


# --- issue 9 item 11 ------------------------------------------------------------------------

needs_ssh = pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client installed")


def _env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)


def _ssh_g(cfg: Path) -> dict[str, str]:
    out = subprocess.run(
        ["ssh", "-G", "-F", str(cfg), "t1.vm"], capture_output=True, text=True, check=True
    ).stdout
    return {k: v for k, _, v in (ln.partition(" ") for ln in out.splitlines())}


def test_symlinked_config_is_edited_at_its_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old behaviour: the symlink was replaced by a regular file (breaking dotfile
    managers, and leaving the real file without the block)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    real = dotfiles / "ssh_config"
    original = "Host work\n    User me\n"
    real.write_text(original)
    real.chmod(0o640)
    link = home / ".ssh" / "config"
    link.symlink_to(real)
    _env(monkeypatch, home)
    assert main(["ssh-config", "--install"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text().startswith("# >>> stoker") and real.read_text().endswith(original)
    assert (real.stat().st_mode & 0o777) == 0o640
    assert main(["ssh-config", "--uninstall"]) == 0
    assert link.is_symlink() and real.read_text() == original
    assert sorted(p.name for p in dotfiles.iterdir()) == ["ssh_config"]  # no temp left


@needs_ssh
def test_home_with_a_space_still_takes_effect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old behaviour: `Include /x/my home/...` unquoted split into two paths and ssh
    silently ignored the block, while the command said `ssh NAME.vm` now works."""
    home = tmp_path / "my home 100%"
    home.mkdir()
    _env(monkeypatch, home)
    assert main(["ssh-config", "--install"]) == 0
    got = _ssh_g(home / ".ssh" / "config")
    state = home / ".local" / "state" / "stoker" / "ssh"
    assert got["user"] == "root"
    # ssh -G shows IdentityFile before %-expansion (`%%` is a literal %), and
    # UserKnownHostsFile after it.
    assert got["identityfile"] == str(state / "id_ed25519").replace("%", "%%")
    assert got["userknownhostsfile"] == str(state / "known_hosts")
    assert got["proxycommand"].endswith("__connect %h %p")


@needs_ssh
def test_block_that_would_not_take_effect_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ssh rejects this config (a bad option): the install says so and puts it back."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    cfg = home / ".ssh" / "config"
    original = "Host work\n    NoSuchOption yes\n"
    cfg.write_text(original)
    _env(monkeypatch, home)
    assert main(["ssh-config", "--install"]) == 1
    assert "would not take effect" in capsys.readouterr().err
    assert cfg.read_text() == original
    assert not (home / ".config" / "stoker" / "ssh_config").exists()


def test_unquotable_path_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / 'ho"me'
    home.mkdir()
    _env(monkeypatch, home)
    assert main(["ssh-config", "--install"]) == 1
    assert "quote" in capsys.readouterr().err
    assert not (home / ".ssh").exists()
