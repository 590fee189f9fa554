"""netdns.resolved: resolvectl command construction, checked with a recording runner."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from stoker.daemon.netdns.resolved import ResolvedWiring, dns_server_arg
from stoker.errors import CommandFailed
from stoker.runner import Result, Runner

pytestmark = pytest.mark.unit

LOG = logging.getLogger("test.resolved")


class FakeRunner(Runner):
    """Records argv lists and pretends they ran; `fail` maps argv[:3] to an exit code."""

    def __init__(self, fail: Mapping[tuple[str, ...], int] | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, ...]] = []
        self.fail = dict(fail or {})

    async def run(self, argv: Sequence[str], *, check: bool = True, **kw: object) -> Result:  # type: ignore[override]
        a = tuple(argv)
        self.calls.append(a)
        rc = self.fail.get(a[:3], 0)
        if check and rc:
            raise CommandFailed(f"{' '.join(a)} failed (exit {rc})")
        return Result(a, rc, b"", b"", 0.0)


def wiring(runner: Runner, tmp_path: Path, present: bool = True) -> ResolvedWiring:
    return ResolvedWiring(
        runner,
        LOG,
        which=lambda name: f"/usr/bin/{name}" if present else None,
        run_dir=tmp_path,
    )


def test_server_argument_syntax() -> None:
    assert dns_server_arg("127.0.0.1", 5353) == "127.0.0.1:5353"
    assert dns_server_arg("127.0.0.1", 53) == "127.0.0.1"
    assert dns_server_arg("::1", 5353) == "[::1]:5353"


async def test_apply_then_revert_runs_resolvectl(tmp_path: Path) -> None:
    r = FakeRunner()
    w = wiring(r, tmp_path)
    assert await w.apply("br-stoker", "127.0.0.1", 5353)
    assert r.calls == [
        ("systemctl", "is-active", "--quiet", "systemd-resolved"),
        ("resolvectl", "dns", "br-stoker", "127.0.0.1:5353"),
        ("resolvectl", "domain", "br-stoker", "~vm"),
    ]
    assert w.state == "applied on br-stoker"
    r.calls.clear()
    await w.revert()
    assert r.calls == [("resolvectl", "revert", "br-stoker")]
    r.calls.clear()
    await w.revert()
    assert r.calls == []


async def test_no_resolvectl_is_a_logged_noop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = FakeRunner()
    w = wiring(r, tmp_path, present=False)
    with caplog.at_level(logging.INFO, logger="test.resolved"):
        assert not await w.apply("br-stoker", "127.0.0.1", 5353)
    assert r.calls == []
    assert "resolvectl is not installed" in w.state
    assert "resolvectl is not installed" in caplog.text
    await w.revert()
    assert r.calls == []


async def test_resolved_not_running_is_a_noop(tmp_path: Path) -> None:
    r = FakeRunner()
    w = wiring(r, tmp_path / "missing")
    assert not await w.apply("br-stoker", "127.0.0.1", 5353)
    assert r.calls == []
    assert "not running" in w.state

    r2 = FakeRunner(fail={("systemctl", "is-active", "--quiet"): 3})
    w2 = wiring(r2, tmp_path)
    assert not await w2.apply("br-stoker", "127.0.0.1", 5353)
    assert r2.calls == [("systemctl", "is-active", "--quiet", "systemd-resolved")]
    assert "not active" in w2.state


async def test_failed_apply_reverts_what_it_did(tmp_path: Path) -> None:
    r = FakeRunner(fail={("resolvectl", "domain", "br-stoker"): 1})
    w = wiring(r, tmp_path)
    assert not await w.apply("br-stoker", "127.0.0.1", 5353)
    assert r.calls[-1] == ("resolvectl", "revert", "br-stoker")
    assert w.state.startswith("failed:")
    assert w.applied_link is None
