"""Test helpers for OCI pulls against a real `docker-registry`.

- `RegistryProcess`: runs `docker-registry serve CONFIG` on 127.0.0.1:<free port>.
- `TokenServer`: a tiny distribution token server (ES256 JWTs with an x5c header) that a
  registry configured with `auth: token` trusts.
- Image building: tar layers made with `tarfile` (whiteouts, opaque dirs, setuid files,
  symlinks, hardlinks, device nodes, xattrs), gzip / zstd / plain, pushed with plain
  registry v2 calls (blob upload POST + PUT, manifest PUT), single images and indexes.
- `RegistryProxy`: an HTTP reverse proxy in front of the real registry that counts
  requests and can cut or stall chosen blob downloads.
- debugfs readers for checking an ext4 image without mounting it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import zstandard
from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

LAYER_MEDIA = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- registry process --------------------------------------------------------------------


class RegistryProcess:
    """A real docker-registry on loopback with its storage in `workdir`."""

    def __init__(self, workdir: Path, auth: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = workdir / "storage"
        self.log_path = workdir / "registry.log"
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RegistryProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
        ]
        cfg = "\n".join(lines) + "\n"
        if self.auth is not None:
            cfg += "auth:\n" + _yaml(self.auth, 1)
        config = self.workdir / "config.yml"
        config.write_text(cfg)
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # 401 from an auth-enabled registry: it is up
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not start within 15s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def blob_data_path(self, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"

    def access_count(self, method: str, path_part: str) -> int:
        """How many access-log lines show `method` on a URI containing `path_part`."""
        text = self.log_path.read_text(errors="replace")
        rx = re.compile(r'"' + method + r" (\S+) HTTP/1\.1\" (\d+)")
        return sum(1 for m in rx.finditer(text) if path_part in m.group(1))


def _yaml(obj: dict[str, Any], indent: int) -> str:
    out = ""
    for k, v in obj.items():
        if isinstance(v, dict):
            out += "  " * indent + f"{k}:\n" + _yaml(v, indent + 1)
        else:
            out += "  " * indent + f"{k}: {v}\n"
    return out


@dataclass
class PullDirs:
    """Where one test's pulls keep their cache and staging trees."""

    cache: Path
    staging: Path


# --- token server ------------------------------------------------------------------------


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class TokenServer:
    """A distribution-spec token server on its own thread; denies repos under `deny/`."""

    service = "stoker-test-registry"
    issuer = "stoker-test-issuer"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self.cert_path = workdir / "token.crt"
        self.key_path = workdir / "token.key"
        self.requests: list[dict[str, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def auth_config(self) -> dict[str, Any]:
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.cert_path),
            }
        }

    def start(self) -> TokenServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(self.key_path), "-out", str(self.cert_path),
                "-days", "2", "-subj", "/CN=stoker-test-token",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        self._thread.start()
        assert self._ready.wait(10), "token server did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def _token(self, scope: str) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, utils

        key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        access = []
        if scope:
            typ, name, actions = scope.split(":")
            access = [{"type": typ, "name": name, "actions": actions.split(",")}]
        header = {
            "alg": "ES256",
            "typ": "JWT",
            "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": "",
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = utils.decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    async def _handle(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.requests.append(q)
        scope = q.get("scope", "")
        if q.get("service") != self.service:
            return web.json_response({"details": "wrong service"}, status=400)
        if ":deny/" in scope:
            return web.json_response({"details": "access denied"}, status=401)
        return web.json_response({"token": self._token(scope), "expires_in": 300})

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/token", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()


@dataclass
class TokenRegistry:
    """A registry with `auth: token` and the token server it trusts."""

    registry: RegistryProcess
    tokens: TokenServer


# --- building images ---------------------------------------------------------------------


@dataclass
class Entry:
    """One tar member to put in a layer."""

    name: str
    kind: str = "file"  # file dir symlink hardlink char block fifo
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    major: int = 0
    minor: int = 0
    mtime: int = 1_600_000_000
    xattrs: dict[str, str] = field(default_factory=dict)


_KIND = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_tar(entries: Sequence[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _KIND[e.kind]
            ti.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            ti.uid, ti.gid = e.uid, e.gid
            ti.mtime = e.mtime
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.major, e.minor
            if e.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


@dataclass
class Layer:
    """A layer blob ready to push."""

    blob: bytes
    diff_id: str
    media_type: str

    @property
    def digest(self) -> str:
        return sha256(self.blob)

    @property
    def size(self) -> int:
        return len(self.blob)


def make_layer(
    entries: Sequence[Entry] | bytes, compression: str = "gzip", flavour: str = "oci"
) -> Layer:
    tar = entries if isinstance(entries, bytes) else make_tar(entries)
    if compression == "gzip":
        blob = gzip.compress(tar, compresslevel=1, mtime=0)
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor(level=3).compress(tar)
    else:
        blob = tar
    return Layer(blob=blob, diff_id=sha256(tar), media_type=LAYER_MEDIA[(flavour, compression)])


def make_config(
    layers: Sequence[Layer],
    *,
    arch: str = "amd64",
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
) -> bytes:
    doc = {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Cmd": cmd or ["/bin/sh"],
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
        "history": [],
    }
    return json.dumps(doc).encode()


@dataclass
class Pushed:
    """What a push left on the registry."""

    repo: str
    manifest_digest: str
    manifest_size: int
    media_type: str
    config_digest: str
    layer_digests: list[str]


class Pusher:
    """Pushes blobs and manifests with plain registry v2 calls (handles bearer auth)."""

    def __init__(self, session: aiohttp.ClientSession, host: str) -> None:
        self.session = session
        self.base = f"http://{host}"
        self._tokens: dict[str, str] = {}

    async def _call(
        self, method: str, url: str, repo: str, **kw: Any
    ) -> tuple[int, dict[str, str], bytes]:
        for _ in range(2):
            headers = dict(kw.pop("headers", {}) or {})
            if repo in self._tokens:
                headers["Authorization"] = f"Bearer {self._tokens[repo]}"
            async with self.session.request(method, url, headers=headers, **kw) as r:
                body = await r.read()
                if r.status == 401 and "Bearer" in r.headers.get("WWW-Authenticate", ""):
                    params = dict(re.findall(r'(\w+)="([^"]*)"', r.headers["WWW-Authenticate"]))
                    q = {"service": params["service"], "scope": f"repository:{repo}:push,pull"}
                    async with self.session.get(params["realm"], params=q) as t:
                        self._tokens[repo] = (await t.json())["token"]
                    kw["headers"] = headers
                    continue
                return r.status, dict(r.headers), body
        raise AssertionError(f"{method} {url}: still unauthorized")

    async def blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        status, headers, body = await self._call(
            "POST", f"{self.base}/v2/{repo}/blobs/uploads/", repo
        )
        assert status == 202, (status, body)
        loc = headers["Location"]
        if loc.startswith("/"):
            loc = self.base + loc
        sep = "&" if "?" in loc else "?"
        status, _, body = await self._call(
            "PUT",
            f"{loc}{sep}digest={digest}",
            repo,
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert status == 201, (status, body)
        return digest

    async def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        status, _, resp = await self._call(
            "PUT",
            f"{self.base}/v2/{repo}/manifests/{ref}",
            repo,
            data=body,
            headers={"Content-Type": media_type},
        )
        assert status == 201, (status, resp)
        return sha256(body)

    async def image(
        self,
        repo: str,
        tag: str | None,
        layers: Sequence[Layer],
        *,
        flavour: str = "oci",
        arch: str = "amd64",
        config: bytes | None = None,
        **config_kw: Any,
    ) -> Pushed:
        cfg = config if config is not None else make_config(layers, arch=arch, **config_kw)
        cfg_digest = await self.blob(repo, cfg)
        for la in layers:
            await self.blob(repo, la.blob)
        mt = OCI_MANIFEST if flavour == "oci" else DOCKER_MANIFEST
        doc = {
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {
                "mediaType": OCI_CONFIG if flavour == "oci" else DOCKER_CONFIG,
                "digest": cfg_digest,
                "size": len(cfg),
            },
            "layers": [
                {"mediaType": la.media_type, "digest": la.digest, "size": la.size} for la in layers
            ],
        }
        body = json.dumps(doc).encode()
        digest = await self.manifest(repo, tag or sha256(body), body, mt)
        return Pushed(repo, digest, len(body), mt, cfg_digest, [la.digest for la in layers])

    async def index(
        self, repo: str, tag: str, entries: Sequence[tuple[Pushed, str]], *, flavour: str = "oci"
    ) -> str:
        mt = OCI_INDEX if flavour == "oci" else DOCKER_LIST
        doc = {
            "schemaVersion": 2,
            "mediaType": mt,
            "manifests": [
                {
                    "mediaType": p.media_type,
                    "digest": p.manifest_digest,
                    "size": p.manifest_size,
                    "platform": {"os": "linux", "architecture": arch},
                }
                for p, arch in entries
            ],
        }
        return await self.manifest(repo, tag, json.dumps(doc).encode(), mt)


# --- proxy -------------------------------------------------------------------------------


class RegistryProxy:
    """Reverse proxy to a real registry: counts requests, cuts or stalls chosen blobs."""

    def __init__(self, upstream: str) -> None:
        self.upstream = f"http://{upstream}"
        self.counts: Counter[str] = Counter()
        self.truncate: set[str] = set()
        self.stall: dict[str, asyncio.Event] = {}
        self.stalled: dict[str, asyncio.Event] = {}
        self.host = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> RegistryProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.host = f"127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        for ev in self.stall.values():
            ev.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def blob_gets(self, digest: str) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith("GET ") and digest in k)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        self.counts[f"{request.method} {request.path}"] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as up:
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in ("transfer-encoding", "connection", "content-encoding"):
                    resp.headers[k] = v
            await resp.prepare(request)
            digest = request.path.rsplit("/", 1)[-1] if "/blobs/" in request.path else ""
            data = await up.read()
            if digest in self.truncate and request.method == "GET":
                await resp.write(data[: len(data) // 2])
                # Abort mid-body: the client must notice the short read.
                assert request.transport is not None
                request.transport.abort()
                return resp
            if digest in self.stall and request.method == "GET":
                await resp.write(data[: len(data) // 2])
                self.stalled.setdefault(digest, asyncio.Event()).set()
                await self.stall[digest].wait()
                try:
                    await resp.write(data[len(data) // 2 :])
                except ConnectionResetError:
                    return resp  # the client went away (a cancelled pull)
            else:
                await resp.write(data)
            await resp.write_eof()
            return resp


# --- debugfs -----------------------------------------------------------------------------


@dataclass
class Stat:
    """An inode as debugfs reports it."""

    inode: int
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    mtime: int
    link_target: str | None
    device: tuple[int, int] | None


def debugfs(image: Path, request: str) -> str:
    r = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return r.stdout + r.stderr


def dstat(image: Path, path: str) -> Stat | None:
    out = debugfs(image, f'stat "{path}"')
    if "File not found" in out:
        return None
    m = re.search(r"Inode: (\d+)\s+Type: ([\w ]+?)\s+Mode:\s+(\d+)", out)
    assert m, out
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    s = re.search(r"Size: (\d+)", out)
    lk = re.search(r"Links: (\d+)", out)
    mt = re.search(r"mtime: 0x([0-9a-f]+)", out)
    ln = re.search(r'Fast link dest: "(.*)"', out)
    dev = re.search(r"Device major/minor number: (\d+):(\d+)", out)
    assert u and s and lk and mt, out
    return Stat(
        inode=int(m.group(1)),
        type=m.group(2).strip(),
        mode=int(m.group(3), 8),
        uid=int(u.group(1)),
        gid=int(u.group(2)),
        size=int(s.group(1)),
        links=int(lk.group(1)),
        mtime=int(mt.group(1), 16),
        link_target=ln.group(1) if ln else None,
        device=(int(dev.group(1)), int(dev.group(2))) if dev else None,
    )


def dls(image: Path, path: str) -> list[str]:
    out = debugfs(image, f'ls -p "{path}"')
    names = []
    for line in out.splitlines():
        parts = line.split("/")
        if len(parts) >= 7 and parts[0] == "":
            names.append(parts[5])
    return sorted(n for n in names if n not in (".", ".."))


def dcat(image: Path, path: str) -> bytes:
    r = subprocess.run(["debugfs", "-R", f'cat "{path}"', str(image)], capture_output=True)
    return r.stdout


def tree_files(root: Path) -> list[str]:
    """Every path under `root`, relative, sorted (for comparing trees)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Any:
    """A small tmpfs mounted at `path`, always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
