"""Fixtures for OCI pull tests: real docker-registry processes on loopback, a token server,
a counting proxy, and per-test cache/staging directories.

Every registry is started on 127.0.0.1 with a free port and a storage dir under pytest's
tmp dir, and stopped when the module's tests are done.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from ocitestlib import (
    PullDirs,
    Pusher,
    RegistryProcess,
    RegistryProxy,
    TokenRegistry,
    TokenServer,
)


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("OCI pull tests need root (owners, device nodes, tmpfs mounts)")
    for tool in ("docker-registry", "mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install docker-registry e2fsprogs)")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A plain (anonymous) docker-registry."""
    _require()
    reg = RegistryProcess(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A docker-registry that demands Basic credentials (no token flow)."""
    _require()
    work = tmp_path_factory.mktemp("basic-registry")
    reg = RegistryProcess(
        work, auth={"htpasswd": {"realm": "stoker-basic", "path": str(work / "htpasswd")}}
    ).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    """A docker-registry with `auth: token`, trusting a local token server."""
    _require()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the token server's certificate")
    work = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(work / "tokens").start()
    try:
        reg = RegistryProcess(work / "registry", auth=tokens.auth_config()).start()
        try:
            yield TokenRegistry(reg, tokens)
        finally:
            reg.stop()
    finally:
        tokens.stop()


@pytest.fixture
def dirs(tmp_path: Path) -> PullDirs:
    """A fresh cache and staging dir for one test."""
    return PullDirs(cache=tmp_path / "cache", staging=tmp_path / "staging")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def pusher(registry: RegistryProcess, session: aiohttp.ClientSession) -> Pusher:
    return Pusher(session, registry.host)


@pytest.fixture
async def proxy(registry: RegistryProcess) -> AsyncIterator[RegistryProxy]:
    """A counting / fault-injecting proxy in front of `registry`."""
    p = await RegistryProxy(registry.host).start()
    try:
        yield p
    finally:
        await p.close()
