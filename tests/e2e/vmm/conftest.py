"""Fixtures for the VMM driver end-to-end tests (helpers live in _vmm_e2e.py)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _vmm_e2e import (
    CACHE,
    GET_FIRECRACKER,
    GuestKernel,
    NetNS,
    build_test_initrd,
    fetch_debian_kernel,
    netns_with_tap,
    short_tmpdir,
)

from prereq import require


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    """The Debian cloud kernel, downloaded once into the test cache."""
    require(
        shutil.which("lz4") and shutil.which("apt-get"),
        "needs apt-get and lz4 (apt-get install -y lz4) to fetch the guest kernel",
    )
    try:
        return fetch_debian_kernel(CACHE)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        require(False, f"cannot fetch the Debian cloud kernel: {e}")
        raise  # not reached: require(False) skips or fails


@pytest.fixture(scope="session")
def test_initrd(guest_kernel: GuestKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test initramfs for `guest_kernel` (built per session: it is small)."""
    out = tmp_path_factory.mktemp("initrd") / "initrd.gz"
    build_test_initrd(guest_kernel, out)
    return out


@pytest.fixture(scope="session")
def firecracker_dir() -> Path:
    """The real Firecracker v1.12.1 + jailer from shared/tools/get-firecracker."""
    require(
        GET_FIRECRACKER.exists(), f"{GET_FIRECRACKER} is missing: cannot get the Firecracker binary"
    )
    r = subprocess.run(
        [str(GET_FIRECRACKER), str(CACHE / "firecracker")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    require(r.returncode == 0, f"get-firecracker failed: {r.stderr.strip()[-500:]}")
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def netns_tap() -> Iterator[NetNS]:
    """A fresh `stoker-vmm-XXXX` namespace with a tap in it, removed afterwards."""
    with netns_with_tap() as ns:
        yield ns


@pytest.fixture(scope="module")
def module_netns_tap() -> Iterator[NetNS]:
    """The same, shared by the tests of one module (one booted guest)."""
    with netns_with_tap() as ns:
        yield ns


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A VM directory with a short path (unix socket paths are limited to 107 bytes)."""
    with short_tmpdir() as d:
        yield d
