"""`stoker --debug` passes its log level to the daemon it autostarts, over the config's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_")}
    env.update(
        HOME=str(root / "h"),
        XDG_CONFIG_HOME=str(root / "c"),
        XDG_STATE_HOME=str(root / "s"),
        XDG_CACHE_HOME=str(root / "k"),
        XDG_RUNTIME_DIR=str(root / "r"),
    )
    return env


def _stoker(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stoker.cli.main", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("debug", [True, False])
def test_debug_reaches_the_autostarted_daemon(stk: Any, debug: bool) -> None:
    short_tmp: Path = stk.root  # the stk fixture kills any stokerd left in this layout
    env = _env(short_tmp)
    (short_tmp / "c" / "stoker").mkdir(parents=True)
    (short_tmp / "c" / "stoker" / "config.toml").write_text('log_level = "warning"\n')
    try:
        r = _stoker(env, *(["--debug"] if debug else []), "vm", "list")
        assert r.returncode == 0, r.stderr
    finally:
        _stoker(env, "daemon", "stop")
    log = next((short_tmp / "s" / "stoker").glob("*.log")).read_text()
    # "serving" is logged at INFO after the config was read: the config's `warning` hides it
    # unless --debug's level won.
    assert ("serving" in log) is debug, log
    assert (" DEBUG " in log) is debug
