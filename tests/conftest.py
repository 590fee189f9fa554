"""Shared test plumbing: tier markers are applied per module (pytestmark).

Missing prerequisites go through `prereq.require(cond, reason)` (tests/prereq.py): a skip
locally, a failure under CI (`CI=true`). Test modules cannot import a conftest, hence the
separate module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from stoker.daemon.daemon import Daemon


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test must belong to exactly one tier, so `-m unit` etc. select the whole suite.
    tiers = {"unit", "integration", "e2e"}
    for item in items:
        marks = {m.name for m in item.iter_markers()} & tiers
        if not marks:
            raise pytest.UsageError(
                f"{item.nodeid} has no tier marker (unit / integration / e2e): add pytestmark"
            )


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (netlink, nftables, loop devices)")


_VMM_USER_BEFORE: list[bool] = []


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def closed_ancestor(path: Path) -> Path | None:
    """The first directory from / down to `path` that other users cannot enter (no o+x),
    or None. Tests that run stoker as a plain user (setpriv, a system install's daemon)
    import it from this checkout, so it must be reachable by them."""
    for d in [*reversed(path.parents), path]:
        try:
            if not d.stat().st_mode & 0o001:
                return d
        except OSError:
            return d
    return None


def pytest_report_header(config: pytest.Config) -> str | None:
    closed = closed_ancestor(Path(__file__).resolve().parent.parent)
    if closed is None:
        return None
    return (
        f"WARNING: {closed} is not enterable by other users (mode "
        f"{closed.stat().st_mode & 0o777:o}): tests that run stoker as a plain user will "
        "fail with Permission denied; clone somewhere other users can reach (chmod o+x)"
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    _VMM_USER_BEFORE.append(_user_exists("stoker-vmm"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A root daemon creates its QEMU user at the first start; tests use names of their own,
    # but if any path made the default one during this run, it goes too (nothing is left).
    if _VMM_USER_BEFORE == [False] and os.geteuid() == 0 and _user_exists("stoker-vmm"):
        import subprocess

        subprocess.run(["userdel", "stoker-vmm"], capture_output=True, check=False)
        subprocess.run(["groupdel", "stoker-vmm"], capture_output=True, check=False)


# --- fixtures both the unit and the integration tier use ---------------------------------


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh dir directly under /tmp: unix socket paths must stay under ~100 bytes."""
    d = Path(tempfile.mkdtemp(prefix="stk", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


DaemonFactory = Callable[..., "Daemon"]


@pytest.fixture
def daemon_factory(short_tmp: Path) -> Iterator[DaemonFactory]:
    """Build Daemons by hand, the way the seed says tests do.

    `factory(cls=Daemon, **preset)`: `preset` (stub services, a runner...) goes to
    `Daemon(...)`, which builds everything else around it.
    """
    from stoker.config import parse_config
    from stoker.daemon.daemon import Daemon
    from stoker.layout import Layout
    from stoker.store import Store

    made: list[Daemon] = []

    def factory(cls: type[Daemon] = Daemon, **preset: Any) -> Daemon:
        root = short_tmp / f"d{len(made)}"
        layout = Layout(
            config_dir=root / "c",
            state_dir=root / "s",
            cache_dir=root / "k",
            runtime_dir=root / "r",
        )
        layout.ensure()
        d = cls(layout=layout, config=parse_config({}), store=Store(layout.db_path), **preset)
        made.append(d)
        return d

    yield factory
    for d in made:
        if d.store is not None:
            d.store.close()
