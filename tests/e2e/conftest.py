"""End-to-end fixtures (helpers live in stokerenv.py beside this file)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from stokerenv import StokerEnv, destroy_env, make_env

BUILD_TIMEOUT = 1800


@pytest.fixture(scope="session")
def env() -> Iterator[StokerEnv]:
    """One namespace, daemon and golden image for the whole e2e session: building the image
    is the slow part (~1 min with a warm apt cache), each boot ~30 s more."""
    e = make_env("e2e")
    try:
        e.build_image(BUILD_TIMEOUT)
        yield e
    finally:
        destroy_env(e)
