"""The built wheel, not the checkout: build it, install it into a fresh venv, run both
commands from there and check every guest file and the systemd unit were shipped.

The build uses pip's isolated build (setuptools from the package index or pip's cache);
the fresh venv gets no index at all: the wheel is installed with --no-index --no-deps and
the already-installed dependencies are reached through a .pth file naming this
interpreter's site-packages (only the directory: its .pth files, such as the editable
install of the checkout, are not processed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stoker

pytestmark = pytest.mark.integration

ROOT = Path(stoker.__file__).resolve().parents[2]
PKG = ROOT / "src" / "stoker"


def _source_tree(dst: Path) -> None:
    """The files a release is built from (git's view when there is one)."""
    try:
        names = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.split(b"\0")
        files = [ROOT / n.decode() for n in names if n]
    except (OSError, subprocess.CalledProcessError):
        files = [
            p
            for p in ROOT.rglob("*")
            if p.is_file() and not {".git", ".venv", "__pycache__", "build"} & set(p.parts)
        ]
    for f in files:
        if not f.is_file():
            continue  # deleted in the work tree but still in the index
        out = dst / f.relative_to(ROOT)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, env_dir = tmp / "src", tmp / "dist", tmp / "venv"
    _source_tree(src)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"wheel build failed:\n{r.stdout}\n{r.stderr}"
    (wheel,) = dist.glob("stoker-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "_deps_from_host.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    yield env_dir


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "STOKER_"))}
    env.update(
        HOME=str(tmp / "h"),
        XDG_CONFIG_HOME=str(tmp / "c"),
        XDG_STATE_HOME=str(tmp / "s"),
        XDG_CACHE_HOME=str(tmp / "k"),
        XDG_RUNTIME_DIR=str(tmp / "r"),
    )
    return env


def _run(venv: Path, tmp: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        env=_env(tmp),
        cwd=tmp,
        timeout=120,
    )


def test_both_commands_run_from_the_wheel(venv: Path, short_tmp: Path) -> None:
    r = _run(venv, short_tmp, "stoker", "--version")
    assert r.returncode == 0 and r.stdout == f"stoker {stoker.__version__}\n", r.stderr
    r = _run(venv, short_tmp, "stokerd", "--help")
    assert r.returncode == 0 and "--system" in r.stdout, r.stderr
    r = _run(venv, short_tmp, "stokerd", "--version")
    assert r.stdout.strip() == f"stokerd {stoker.__version__}"
    # the package really is the installed one, with one version source
    code = (
        "import stoker, importlib.metadata as m; print(stoker.__file__); "
        "print(m.version('stoker')); print(m.metadata('stoker')['License-Expression'])"
    )
    r = _run(venv, short_tmp, "python", "-c", code)
    where, version, lic = r.stdout.split("\n")[:3]
    assert where.startswith(str(venv)), where
    assert version == stoker.__version__ and lic == "Apache-2.0"


def test_guest_files_unit_and_license_are_installed(venv: Path, short_tmp: Path) -> None:
    r = _run(venv, short_tmp, "python", "-c", "import stoker; print(stoker.__file__)")
    installed = Path(r.stdout.strip()).parent
    want = sorted(
        p.relative_to(PKG)
        for p in (PKG / "guest" / "files").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert want, "no guest files in the checkout?"
    for rel in want:
        got = installed / rel
        assert got.is_file(), f"{rel} missing from the wheel"
        assert got.read_bytes() == (PKG / rel).read_bytes()
        assert (got.stat().st_mode & 0o111 != 0) == ((PKG / rel).stat().st_mode & 0o111 != 0), (
            f"{rel}: executable bit not kept"
        )
    assert (installed / "data" / "catalog.json").is_file()
    assert (installed / "py.typed").is_file()
    lic = list(venv.glob("lib/python*/site-packages/stoker-*.dist-info/licenses/LICENSE"))
    assert lic and lic[0].read_text() == (ROOT / "LICENSE").read_text()
    # the unit names this venv's stokerd
    r = _run(venv, short_tmp, "stoker", "daemon", "unit")
    assert r.returncode == 0, r.stderr
    assert f"ExecStart={venv}/bin/stokerd --system" in r.stdout


def test_the_installed_cli_starts_the_installed_daemon(venv: Path, stk: Any) -> None:
    short_tmp = stk.root  # the stk fixture kills any stokerd left in this layout
    try:
        r = _run(venv, short_tmp, "stoker", "vm", "list")
        assert r.returncode == 0, r.stderr
        assert "no VMs" in r.stdout
        r = _run(venv, short_tmp, "stoker", "daemon", "status", "--json")
        assert r.returncode == 0 and '"running": true' in r.stdout, r.stderr
    finally:
        _run(venv, short_tmp, "stoker", "daemon", "stop")
