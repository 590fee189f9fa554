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
