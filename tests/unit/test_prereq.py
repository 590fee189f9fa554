"""tests/prereq.py: a missing prerequisite skips locally and fails under CI."""

from __future__ import annotations

import pytest

from prereq import require, require_tools, under_ci

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("value", ["true", "1", "TRUE", "yes"])
def test_a_missing_prerequisite_fails_under_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert under_ci()
    with pytest.raises(pytest.fail.Exception, match=r"CI is meant to have.*the mirror"):
        require(False, "the mirror is unreachable")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-xyz not installed"):
        require_tools("sh", "no-such-tool-xyz")
    require(True, "present: no effect")
    require_tools("sh")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_a_missing_prerequisite_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not under_ci()
    with pytest.raises(pytest.skip.Exception, match="the mirror is unreachable"):
        require(False, "the mirror is unreachable")
    require(True, "present: no effect")
