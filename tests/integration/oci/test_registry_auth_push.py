"""Registries with credentials, `image push` and the pull of a pushed stoker artifact,
against real `docker-registry` processes on loopback:

- a registry with htpasswd (Basic) auth and one with token auth whose token server checks
  user/password (GET with Basic) and identity tokens (OAuth2 refresh_token POST);
- push from one state dir, pull by a second one (no kernel there: the artifact brings it),
  files byte-identical and sparse again, no conversion;
- no credentials / wrong credentials: the message names the registry and the login command;
- a registry that refuses stoker's media types; a plain-HTTP registry on a non-loopback-name
  address used only when listed in `insecure_registries`; `registry_mirrors`;
- a blob redirect to another host never carries the Authorization header;
- the CLI: `image login` (verified, 0600 docker config), a pull through the daemon with the
  credential the CLI resolved, `image logout`.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from aiohttp import web
from ocitestlib import RegistryProcess, TokenServer, free_port

from stoker.config import parse_config
from stoker.daemon.daemon import Daemon
from stoker.daemon.oci import push as artifact
from stoker.daemon.oci.auth import Credential
from stoker.errors import PermissionDenied, StokerError, Unavailable
from stoker.layout import Layout
from stoker.model.records import Kernel
from stoker.runner import Runner
from stoker.store import Store
from stoker.store.db import now

pytestmark = pytest.mark.integration

USER, PASSWORD = "alice", "correct horse"
IDENTITY_TOKEN = "refresh-" + "r" * 20


def _noop(*a: Any, **k: Any) -> None:
    pass


def _repo(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("registry tests need root (like the other OCI tests)")
    for tool in ("docker-registry", "mkfs.ext4", "openssl"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.skip(f"{tool} is not installed")


def _bcrypt(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))


class CredTokenServer(TokenServer):
    """The test token server, but a token needs USER/PASSWORD or IDENTITY_TOKEN."""

    async def _handle(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        if request.method == "POST":
            q.update({k: str(v) for k, v in (await request.post()).items()})
            ok = q.get("grant_type") == "refresh_token" and q.get("refresh_token") == IDENTITY_TOKEN
        else:
            want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            ok = request.headers.get("Authorization") == want
        q["method"] = request.method
        self.requests.append(q)
        if q.get("service") != self.service:
            return web.json_response({"details": "wrong service"}, status=400)
        if not ok:
            return web.json_response({"details": "bad credentials"}, status=401)
        return web.json_response({"token": self._token(q.get("scope", "")), "expires_in": 300})

    async def _main(self) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/token", self._handle)
        app.router.add_post("/token", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()


@dataclass
class Registries:
    token: RegistryProcess
    tokens: CredTokenServer
    basic: RegistryProcess
    plain_far: RegistryProcess  # plain HTTP on 127.0.0.2: not "loopback" by name


@pytest.fixture(scope="module")
def regs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    _require()
    work = tmp_path_factory.mktemp("auth-registries")
    tokens = CredTokenServer(work / "tokens").start()
    htpasswd = work / "htpasswd"
    htpasswd.write_text(f"{USER}:{_bcrypt(PASSWORD)}\n")
    started: list[RegistryProcess] = []
    try:
        token = RegistryProcess(work / "token", auth=tokens.auth_config()).start()
        started.append(token)
        basic = RegistryProcess(
            work / "basic", auth={"htpasswd": {"realm": "stoker-basic", "path": str(htpasswd)}}
        ).start()
        started.append(basic)
        far = RegistryProcess(work / "far")
        far.host = f"127.0.0.2:{far.port}"
        far.start()
        started.append(far)
        yield Registries(token, tokens, basic, far)
    finally:
        for r in started:
            r.stop()
        tokens.stop()


def _daemon(root: Path, config: dict[str, Any] | None = None) -> Daemon:
    layout = Layout(root / "c", root / "s", root / "k", root / "s")
    layout.ensure()
    d = Daemon(
        layout=layout,
        config=parse_config(config or {}),
        store=Store(layout.db_path),
        logger=logging.getLogger("stoker.test"),
    )
    return d


async def _make_image(d: Daemon, root: Path, name: str = "team-env") -> None:
    """A registered image: a sparse 64 MiB ext4 rootfs, a work seed, a kernel + initrd."""
    assert d.store is not None and d.images is not None
    tree = root / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=pushed\n")
    (tree / "big").write_bytes(os.urandom(1 << 20))
    for fname, size, src in (("rootfs.ext4", 64, tree), ("seed.ext4", 16, None)):
        with open(root / fname, "wb") as f:
            f.truncate(size << 20)
        argv = ["mkfs.ext4", "-q", "-F", *(["-d", str(src)] if src else []), str(root / fname)]
        await Runner().run(argv)
    kdir = root / "kernel"
    kdir.mkdir()
    (kdir / "vmlinux").write_bytes(b"\x7fELF" + os.urandom(4096))
    (kdir / "initrd.img").write_bytes(os.urandom(8192))
    d.store.upsert_kernel(
        Kernel(
            name="k-push",
            version="6.1.0-test",
            arch="x86_64",
            dir=str(kdir),
            vmlinux=str(kdir / "vmlinux"),
            bzimage=None,
            initrd=str(kdir / "initrd.img"),
            modules_dir=None,
            source="test",
            created_at=now(),
        )
    )
    await d.images.register_image(
        name, str(root / "rootfs.ext4"), "k-push", str(root / "seed.ext4"), has_sshd=True
    )


@pytest.fixture
async def pusher_daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = _daemon(tmp_path / "a")
    await _make_image(d, tmp_path / "a")
    yield d
    await d.close()


def _for(host: str, **kw: str) -> Credential:
    base = {"username": USER, "password": PASSWORD, "source": "the test"}
    base.update(kw)
    return Credential(host, **base)


def _same(a: str, b: str) -> bool:
    return Path(a).read_bytes() == Path(b).read_bytes()


async def _push_then_pull_by_another(
    pusher_daemon: Daemon, tmp_path: Path, ref: str, cred: Credential | None, cfg: Any = None
) -> Daemon:
    src = pusher_daemon.images
    assert src is not None
    res = await src.push("team-env", ref, _noop, cred)
    assert res.digest.startswith("sha256:") and res.uploaded >= 4
    again = await src.push("team-env", ref, _noop, cred)  # every blob is there already
    assert again.uploaded == 0 and again.digest == res.digest
    d2 = _daemon(tmp_path / "b", cfg)
    assert d2.images is not None and d2.store is not None
    assert d2.store.list_kernels() == []  # the artifact brings its kernel
    im = await d2.images.pull(ref, None, _noop, cred)
    orig = await src.get_image("team-env")
    assert im.source == f"oci:{ref}" and im.digest == res.digest and im.meta["artifact"]
    assert _same(im.rootfs, orig.rootfs) and im.work_seed and orig.work_seed
    assert _same(im.work_seed, orig.work_seed)
    st = os.stat(im.rootfs)
    assert st.st_blocks * 512 < st.st_size // 2, "the pulled rootfs is not sparse"
    k = await d2.images.get_kernel(im.kernel)
    ok = await src.get_kernel("k-push")
    assert k.name == "k-push" and k.version == "6.1.0-test"
    assert k.vmlinux and ok.vmlinux and _same(k.vmlinux, ok.vmlinux)
    assert k.initrd and ok.initrd and _same(k.initrd, ok.initrd)
    assert d2.layout is not None and list(d2.layout.staging_dir.iterdir()) == []
    return d2


async def test_token_registry_push_and_pull_with_credentials(
    regs: Registries, pusher_daemon: Daemon, tmp_path: Path
) -> None:
    host = regs.token.host
    ref = f"{host}/{_repo('env')}:1"
    # Without credentials the push is refused, naming the registry and the login command.
    assert pusher_daemon.images is not None
    with pytest.raises(PermissionDenied) as ei:
        await pusher_daemon.images.push("team-env", ref, _noop, None)
    assert host in str(ei.value) and f"stoker image login {host}" in str(ei.value)
    d2 = await _push_then_pull_by_another(pusher_daemon, tmp_path, ref, _for(host))
    # The token server was asked with Basic credentials for push scope.
    gets = [r for r in regs.tokens.requests if r["method"] == "GET"]
    assert any(r.get("scope", "").endswith(":pull,push") for r in gets)
    # Wrong password: named registry, the login command; nothing is published.
    assert d2.images is not None
    with pytest.raises(PermissionDenied) as ei:
        await d2.images.pull(ref, "other", _noop, _for(host, password="wrong"))
    msg = str(ei.value)
    assert "rejected the credentials" in msg and f"stoker image login {host}" in msg
    assert await d2.images.list_images() != [] and d2.store is not None
    assert d2.store.get_image("other") is None
    # An identity token (OAuth2 refresh token, as `docker login` stores for some registries).
    before = len(regs.tokens.requests)
    ident = Credential(host, identity_token=IDENTITY_TOKEN, source="the test")
    im = await d2.images.pull(ref, "via-token", _noop, ident)
    assert im.kernel == "k-push"  # the identical kernel is reused, not duplicated
    assert any(r["method"] == "POST" for r in regs.tokens.requests[before:])
    await d2.close()


async def test_basic_registry_push_pull_and_bad_credentials(
    regs: Registries, pusher_daemon: Daemon, tmp_path: Path
) -> None:
    host = regs.basic.host
    ref = f"{host}/{_repo('basic')}:v2"
    d2 = await _push_then_pull_by_another(pusher_daemon, tmp_path, ref, _for(host))
    assert d2.images is not None
    with pytest.raises(PermissionDenied) as ei:
        await d2.images.pull(ref, "anon", _noop, None)
    assert "requires credentials" in str(ei.value) and f"stoker image login {host}" in str(ei.value)
    with pytest.raises(PermissionDenied, match=f"rejected the credentials.*login {host}"):
        await d2.images.pull(ref, "bad", _noop, _for(host, password="nope"))
    await d2.close()


async def test_credentials_for_another_registry_are_not_used(
    regs: Registries, pusher_daemon: Daemon
) -> None:
    ref = f"{regs.basic.host}/{_repo('x')}:1"
    assert pusher_daemon.images is not None
    with pytest.raises(PermissionDenied, match="requires credentials"):
        await pusher_daemon.images.push("team-env", ref, _noop, _for("elsewhere.lan:5000"))


async def test_insecure_registry_only_when_listed(
    regs: Registries, pusher_daemon: Daemon, tmp_path: Path
) -> None:
    host = regs.plain_far.host  # plain HTTP, and not a loopback *name*
    ref = f"{host}/{_repo('far')}:1"
    assert pusher_daemon.images is not None
    with pytest.raises(Unavailable) as ei:
        await pusher_daemon.images.push("team-env", ref, _noop, None)
    assert f'add "{host}" to insecure_registries' in str(ei.value)
    listed = {"insecure_registries": [host]}
    pusher_daemon.images.config = parse_config(listed)
    d2 = await _push_then_pull_by_another(pusher_daemon, tmp_path, ref, None, listed)
    await d2.close()
    d3 = _daemon(tmp_path / "c")  # not listed: the pull is refused the same way
    assert d3.images is not None
    with pytest.raises(Unavailable, match="insecure_registries"):
        await d3.images.pull(ref, None, _noop, None)
    await d3.close()


async def test_registry_mirror_serves_the_pull(
    regs: Registries, pusher_daemon: Daemon, tmp_path: Path
) -> None:
    repo = _repo("mirrored")
    assert pusher_daemon.images is not None
    plain = RegistryProcess(tmp_path / "mirror").start()
    try:
        await pusher_daemon.images.push("team-env", f"{plain.host}/{repo}:1", _noop, None)
        # registry.invalid never resolves (RFC 2606): only the mirror can serve it.
        cfg = {"registry_mirrors": {"registry.invalid": [plain.host]}}
        d2 = _daemon(tmp_path / "m", cfg)
        assert d2.images is not None
        cred = Credential("registry.invalid", USER, "secret-for-upstream", source="the test")
        im = await d2.images.pull(f"registry.invalid/{repo}:1", None, _noop, cred)
        assert im.meta["artifact"] and im.kernel == "k-push"
        assert "Authorization" not in plain.log_path.read_text()  # never sent to the mirror
        await d2.close()
    finally:
        plain.stop()


# --- a registry that refuses the media type, redirects, a corrupt artifact ---------------


class FakeRegistry:
    """Enough of the v2 API for push/pull; behaviour switched per test."""

    def __init__(
        self,
        *,
        refuse_manifest: bool = False,
        redirect_to: str | None = None,
        fail_patch: bool = False,
    ) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.refuse_manifest = refuse_manifest
        self.fail_patch = fail_patch
        self.redirect_to = redirect_to
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.headers_seen: list[dict[str, str]] = []
        self._uploads: dict[str, bytearray] = {}
        self._runner: web.AppRunner | None = None

    async def start(self) -> FakeRegistry:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, req: web.Request) -> web.StreamResponse:
        self.headers_seen.append(dict(req.headers))
        path = req.path
        if path == "/v2/":
            return web.Response(status=200)
        parts = path.split("/")
        if "/blobs/uploads/" in path:
            uid = parts[-1] or uuid.uuid4().hex
            if req.method == "POST":
                self._uploads[uid] = bytearray()
                return web.Response(status=202, headers={"Location": f"{path}{uid}"})
            if req.method == "PATCH":
                if self.fail_patch:
                    return web.json_response({"errors": [{"code": "UNKNOWN"}]}, status=500)
                self._uploads[uid] += await req.read()
                return web.Response(status=202, headers={"Location": path})
            if req.method == "PUT":
                data = bytes(self._uploads.pop(uid))
                self.blobs[req.query["digest"]] = data
                return web.Response(
                    status=201, headers={"Docker-Content-Digest": req.query["digest"]}
                )
        if "/blobs/" in path:
            digest = parts[-1]
            if digest not in self.blobs:
                return web.Response(status=404)
            if req.method == "HEAD":
                return web.Response(
                    status=200, headers={"Content-Length": str(len(self.blobs[digest]))}
                )
            if self.redirect_to and "redirected" not in req.query:
                return web.Response(
                    status=307,
                    headers={"Location": f"http://{self.redirect_to}{path}?redirected=1"},
                )
            return web.Response(body=self.blobs[digest])
        if "/manifests/" in path:
            ref = parts[-1]
            if req.method == "PUT":
                if self.refuse_manifest:
                    return web.json_response(
                        {"errors": [{"code": "MANIFEST_INVALID", "message": "manifest invalid",
                                     "detail": "unknown media type"}]},
                        status=400,
                    )  # fmt: skip
                body = await req.read()
                self.manifests[ref] = body
                d = "sha256:" + hashlib.sha256(body).hexdigest()
                return web.Response(status=201, headers={"Docker-Content-Digest": d})
            if ref not in self.manifests:
                return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
            return web.Response(
                body=self.manifests[ref],
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            )
        return web.Response(status=404)


class BasicFront(FakeRegistry):
    """Wants Basic USER/PASSWORD on every /v2 request except redirected blob GETs."""

    async def _handle(self, req: web.Request) -> web.StreamResponse:
        want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if "redirected" not in req.query and req.headers.get("Authorization") != want:
            self.headers_seen.append(dict(req.headers))
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="x"'})
        return await super()._handle(req)


async def test_push_to_a_registry_refusing_the_media_type(pusher_daemon: Daemon) -> None:
    fake = await FakeRegistry(refuse_manifest=True).start()
    try:
        assert pusher_daemon.images is not None and pusher_daemon.layout is not None
        with pytest.raises(StokerError) as ei:
            await pusher_daemon.images.push("team-env", f"{fake.host}/team/env:1", _noop, None)
        msg = str(ei.value)
        assert fake.host in msg and "MANIFEST_INVALID" in msg and "media types" in msg
        assert list(pusher_daemon.layout.staging_dir.iterdir()) == []  # temp blobs removed
    finally:
        await fake.close()


async def test_repush_asks_for_remembered_blobs_without_reading_the_files(
    pusher_daemon: Daemon,
) -> None:
    """The blob each file made is remembered (keyed by the file's identity): a re-push
    HEADs it and uploads nothing; a changed file, or a lost cache, is streamed again."""
    fake = await FakeRegistry().start()
    try:
        src, layout = pusher_daemon.images, pusher_daemon.layout
        assert src is not None and layout is not None
        ref = f"{fake.host}/team/env:1"
        first = await src.push("team-env", ref, _noop, None)
        assert (first.uploaded, first.skipped) == (4, 0)
        cache = layout.cache_dir / "push-digests.json"
        assert len(json.loads(cache.read_text())) == 4
        again = await src.push("team-env", ref, _noop, None)
        assert (again.uploaded, again.skipped, again.digest) == (0, 4, first.digest)
        # A file whose ctime moved is read again (same bytes: same blob, same manifest).
        im = await src.get_image("team-env")
        os.utime(im.rootfs)
        third = await src.push("team-env", ref, _noop, None)
        assert (third.uploaded, third.skipped, third.digest) == (1, 3, first.digest)
        # A garbage cache is an empty one.
        cache.write_text("not json")
        fourth = await src.push("team-env", ref, _noop, None)
        assert (fourth.uploaded, fourth.digest) == (4, first.digest)
        # A remembered blob the registry lost is uploaded again.
        fake.blobs.clear()
        fifth = await src.push("team-env", ref, _noop, None)
        assert (fifth.uploaded, fifth.digest) == (4, first.digest)
    finally:
        await fake.close()


async def test_upload_failing_mid_stream_stops_the_compressor(pusher_daemon: Daemon) -> None:
    fake = await FakeRegistry(fail_patch=True).start()
    try:
        assert pusher_daemon.images is not None
        with pytest.raises(Unavailable, match=r"HTTP 500 while uploading the rootfs\.ext4 blob"):
            await asyncio.wait_for(
                pusher_daemon.images.push("team-env", f"{fake.host}/team/env:1", _noop, None),
                60,
            )
        assert fake.manifests == {}
    finally:
        await fake.close()


async def test_pull_failing_to_write_stops_and_leaves_nothing(
    pusher_daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write error (a full disk) in the unpacking thread ends the pull with that error,
    not with a digest or size complaint, and leaves no staging directory or image."""
    fake = await FakeRegistry().start()
    try:
        assert pusher_daemon.images is not None
        ref = f"{fake.host}/team/env:1"
        await pusher_daemon.images.push("team-env", ref, _noop, None)
        d2 = _daemon(tmp_path / "full")
        assert d2.images is not None and d2.layout is not None and d2.store is not None

        def full(fd: int, data: Any, off: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(artifact.os, "pwrite", full)
        with pytest.raises(OSError) as ei:
            await d2.images.pull(ref, None, _noop, None)
        monkeypatch.undo()
        assert ei.value.errno == errno.ENOSPC
        assert d2.store.list_images() == [] and list(d2.layout.staging_dir.iterdir()) == []
        await d2.close()
    finally:
        await fake.close()


async def test_blob_redirect_to_another_host_carries_no_authorization(
    pusher_daemon: Daemon, tmp_path: Path
) -> None:
    storage = await FakeRegistry().start()  # "blob storage" on another host:port
    front = await BasicFront(redirect_to=storage.host).start()
    try:
        assert pusher_daemon.images is not None
        ref = f"{front.host}/team/env:1"
        await pusher_daemon.images.push("team-env", ref, _noop, _for(front.host))
        storage.blobs.update(front.blobs)
        d2 = _daemon(tmp_path / "r")
        assert d2.images is not None
        im = await d2.images.pull(ref, None, _noop, _for(front.host))
        assert im.meta["artifact"]
        assert storage.headers_seen, "the redirect was not followed"
        assert all("Authorization" not in h for h in storage.headers_seen)
        await d2.close()
    finally:
        await front.close()
        await storage.close()


async def test_corrupt_artifact_layer_is_refused_and_nothing_published(
    pusher_daemon: Daemon, tmp_path: Path
) -> None:
    fake = await FakeRegistry().start()
    try:
        assert pusher_daemon.images is not None
        ref = f"{fake.host}/team/env:1"
        await pusher_daemon.images.push("team-env", ref, _noop, None)
        man = json.loads(fake.manifests["1"])
        rootfs = next(
            x
            for x in man["layers"]
            if x["annotations"]["org.opencontainers.image.title"] == "rootfs.ext4"
        )
        size = int(rootfs["annotations"]["dev.stoker.size"])
        d2 = _daemon(tmp_path / "x")
        assert d2.images is not None and d2.layout is not None and d2.store is not None

        def repoint(blob: bytes) -> None:
            d = "sha256:" + hashlib.sha256(blob).hexdigest()
            fake.blobs[d] = blob
            rootfs["digest"], rootfs["size"] = d, len(blob)
            fake.manifests["1"] = json.dumps(man).encode()

        # 0. Bytes changed on the way (the manifest's digest no longer matches): the
        # digest check speaks, not the decompressor the bad bytes were streamed into;
        # the same for a blob cut short.
        good = fake.blobs[rootfs["digest"]]
        fake.blobs[rootfs["digest"]] = good[:1000] + bytes([good[1000] ^ 1]) + good[1001:]
        with pytest.raises(artifact.DigestMismatch, match="blob content hashes to"):
            await d2.images.pull(ref, None, _noop, None)
        fake.blobs[rootfs["digest"]] = good[: len(good) // 2]
        with pytest.raises(artifact.TruncatedBlob, match="shorter than the"):
            await d2.images.pull(ref, None, _noop, None)
        fake.blobs[rootfs["digest"]] = good
        assert d2.store.list_images() == [] and list(d2.layout.staging_dir.iterdir()) == []
        # 1. Valid zstd, the blob's digest right, but not a sparse stream: refused.
        repoint(zstandard.ZstdCompressor().compress(b"\0" * size))
        with pytest.raises(artifact.UnsupportedImage, match="not a valid stoker sparse stream"):
            await d2.images.pull(ref, None, _noop, None)
        # 2. A valid sparse stream of other content: the annotation's sha256 catches it.
        other = tmp_path / "other.img"
        with open(other, "wb") as f:
            f.truncate(size)
            f.write(b"not the pushed rootfs")
        blob = artifact._compress(other, tmp_path / "other.zst", "rootfs")
        repoint((tmp_path / "other.zst").read_bytes())
        assert blob.raw_size == size
        with pytest.raises(artifact.DigestMismatch, match=r"rootfs\.ext4 decompressed"):
            await d2.images.pull(ref, None, _noop, None)
        # 3. A header whose extents leave the file: refused before anything is written.
        hdr = json.dumps({"size": size, "extents": [[size - 1, 2]]}).encode()
        stream = artifact.SPARSE_MAGIC + len(hdr).to_bytes(8, "big") + hdr + b"xx"
        repoint(zstandard.ZstdCompressor().compress(stream))
        with pytest.raises(artifact.UnsupportedImage, match="outside the file"):
            await d2.images.pull(ref, None, _noop, None)
        assert d2.store.list_images() == [] and list(d2.layout.staging_dir.iterdir()) == []
        await d2.close()
    finally:
        await fake.close()


# --- the CLI: login / pull through the daemon / logout -----------------------------------


def _cli(stk: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "stoker"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "stoker.cli.main"]
    return subprocess.run(
        [*argv, *args], env=stk.env, input=stdin, capture_output=True, text=True, timeout=120
    )


async def test_cli_login_pull_logout(regs: Registries, pusher_daemon: Daemon, stk: Any) -> None:
    host = regs.token.host
    ref = f"{host}/{_repo('cli')}:1"
    assert pusher_daemon.images is not None
    await pusher_daemon.images.push("team-env", ref, _noop, _for(host))
    config = Path(stk.env["HOME"]) / ".docker" / "config.json"

    r = _cli(stk, "image", "pull", ref)
    assert r.returncode != 0 and host in r.stderr and f"stoker image login {host}" in r.stderr

    r = _cli(stk, "image", "login", host, "-u", USER, "--password-stdin", stdin="wrong\n")
    assert r.returncode != 0 and host in r.stderr and "stoker image login" in r.stderr
    assert not config.exists(), "a failed login saved something"

    r = _cli(stk, "image", "login", host, "-u", USER, "--password-stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert host in json.loads(config.read_text())["auths"]

    r = _cli(stk, "image", "pull", ref, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == f"oci:{ref}"

    r = _cli(stk, "image", "logout", host)
    assert r.returncode == 0 and "logged out" in r.stdout
    assert host not in json.loads(config.read_text())["auths"]


async def test_catalog_entry_naming_a_registry_ref(
    regs: Registries, pusher_daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = f"{regs.basic.host}/{_repo('cat')}:1"
    assert pusher_daemon.images is not None
    await pusher_daemon.images.push("team-env", ref, _noop, _for(regs.basic.host))
    catalog = tmp_path / "catalog.json"
    entry = {"name": "team-env", "version": "1", "arch": "x86_64", "ref": ref, "description": "t"}
    catalog.write_text(json.dumps({"images": [entry], "kernels": []}))
    monkeypatch.setenv("STOKER_CATALOG", str(catalog))
    d2 = _daemon(tmp_path / "cat")
    assert d2.images is not None
    im = await d2.images.pull("team-env", None, _noop, _for(regs.basic.host))
    assert im.name == "team-env" and im.source == f"oci:{ref}" and im.meta["artifact"]
    # ensure_image (what `vm create --image team-env` uses) finds it there too.
    assert (await d2.images.ensure_image("team-env", _noop)).digest == im.digest
    await d2.close()
    bad = dict(entry, ref="not a ref")
    catalog.write_text(json.dumps({"images": [bad], "kernels": []}))
    from stoker.daemon.catalog import load_catalog

    with pytest.raises(StokerError, match='"ref" must be a registry reference'):
        load_catalog()
