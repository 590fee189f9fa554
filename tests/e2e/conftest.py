"""End-to-end fixtures (helpers live in stokerenv.py beside this file)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from stokerenv import StokerEnv, destroy_env, make_env


@pytest.fixture(scope="session")
def stoker_env() -> Iterator[StokerEnv]:
    """One daemon + golden image for the e2e session (building the image is the slow part)."""
    e = make_env("e2e")
    try:
        yield e
    finally:
        destroy_env(e)
