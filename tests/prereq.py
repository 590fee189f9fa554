"""`require(cond, reason)`: a missing prerequisite skips a test locally but fails it in CI.

CI (`CI=true`, as `.ci/run` is run) is meant to have everything the suite needs: the Debian
mirror, the cloud kernel package, the Firecracker binary, the `../shared` specs, the tools
`scripts/setup --deps-only` installs (zsh, fish, socat, lz4, busybox-static, ...). There a
skip for a missing one would let the run go green without testing anything, so it is a
failure. Only the documented skips (no KVM boots here, heavy opt-in tests) stay skips:
those use `pytest.skip`/`skipif` directly, never this helper.

Importable from every tier: `tests/` is on sys.path through tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil

import pytest

_TRUE = {"1", "true", "yes", "on"}


def under_ci() -> bool:
    """True when running under CI (`CI=true`, `CI=1`)."""
    return os.environ.get("CI", "").strip().lower() in _TRUE


def require(cond: object, reason: str) -> None:
    """Skip with `reason` unless `cond` holds; under CI, fail instead."""
    __tracebackhide__ = True  # report the caller's line
    if cond:
        return
    if under_ci():
        pytest.fail(f"CI is meant to have this prerequisite: {reason}", pytrace=False)
    pytest.skip(reason)


def require_tools(*tools: str, hint: str = "run scripts/setup --deps-only") -> None:
    """Every tool is on PATH (else skip, or fail under CI)."""
    __tracebackhide__ = True
    missing = [t for t in tools if shutil.which(t) is None]
    require(not missing, f"{', '.join(missing)} not installed ({hint})")
