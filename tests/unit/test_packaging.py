"""The systemd unit (package data, printed by `stoker daemon unit`): settings the daemon's
security relies on."""

from __future__ import annotations

import configparser
from importlib.resources import files

import pytest

pytestmark = pytest.mark.unit


def test_system_unit_makes_state_dir_private() -> None:
    """Old behaviour (issue 9 item 14): `StateDirectory=` alone makes /var/lib/stoker 0755."""
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(files("stoker").joinpath("data/stokerd.service").read_text())
    svc = cp["Service"]
    assert svc["StateDirectory"] == "stoker"
    assert svc["StateDirectoryMode"] == "0700"
    assert svc["KillMode"] == "process"  # VMMs outlive a daemon restart
