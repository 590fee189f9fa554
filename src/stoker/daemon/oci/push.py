"""Stoker images as OCI artifacts: `image push NAME REF` and the artifact side of `pull`.

An artifact is one OCI image manifest (`artifactType` ARTIFACT_TYPE) whose config blob
(CONFIG_TYPE) is stoker's own JSON description of the image and its kernel, and whose
layers are the image's files, each a zstd-compressed *sparse stream* with its own media
type:

    rootfs.ext4     application/vnd.stoker.image.rootfs.v1.sparse+zstd     (required)
    work-seed.ext4  application/vnd.stoker.image.work-seed.v1.sparse+zstd
    vmlinux         application/vnd.stoker.kernel.vmlinux.v1.sparse+zstd   (this or bzImage)
    bzImage         application/vnd.stoker.kernel.bzimage.v1.sparse+zstd
    initrd.img      application/vnd.stoker.kernel.initrd.v1.sparse+zstd

A sparse stream is SPARSE_MAGIC, an 8-byte big-endian header length, a JSON header
`{"size": N, "extents": [[offset, length], ...]}` (the file's data extents, from
SEEK_DATA/SEEK_HOLE: holes are neither read, hashed, compressed nor sent), then the
extents' bytes in order. Each layer carries `dev.stoker.size` (the file's size) and
`dev.stoker.sha256` (of the uncompressed stream) annotations, checked on pull, where the
extents are written back at their offsets (holes stay holes). File names come from the
media type, never from the registry, so a hostile artifact cannot name a path.

Push streams each file through zstd (a worker thread reading and hashing it) straight into
a chunked upload (POST, PATCH with Content-Range, PUT ?digest=: the registry verifies the
digest), so compressing and uploading overlap and nothing is staged on disk; it checks the
stored digest, then PUTs the manifest and checks the digest the registry answers with. The
blobs a file made before are remembered (`digest_cache`, keyed by the file's identity and
change time): a blob the registry already has (HEAD) is then skipped without reading the
file. Pull (`pull_artifact`) recognises the config media type and streams each blob into a
worker thread that decompresses it and writes the file back from its sparse stream, while
the download goes on; the blob's size and digest are checked when it ends, before anything
is published (a failure removes the directory): no conversion, no mkfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin

import aiohttp
import zstandard

from stoker.daemon.oci.auth import Credential
from stoker.daemon.oci.errors import DigestMismatch, TruncatedBlob, UnsupportedImage
from stoker.daemon.oci.manifest import MAX_CONFIG_BYTES, OCI_MANIFEST
from stoker.daemon.oci.reference import Reference, parse_reference
from stoker.daemon.oci.registry import (
    BLOB_CHUNK,
    CONNECT_TIMEOUT,
    MANIFEST_TIMEOUT,
    READ_TIMEOUT,
    RegistryClient,
    TruncatedTransfer,
    open_client,
)
from stoker.daemon.opstate.meter import DownloadMeter
from stoker.daemon.opstate.pipe import ThreadPipe, ThreadToLoop, settle, worker_error
from stoker.errors import InvalidArgument, StokerError, Unavailable

ARTIFACT_TYPE = "application/vnd.stoker.image.v1"
CONFIG_TYPE = "application/vnd.stoker.image.config.v1+json"
# role -> (media type, file name)
ROLES: dict[str, tuple[str, str]] = {
    "rootfs": ("application/vnd.stoker.image.rootfs.v1.sparse+zstd", "rootfs.ext4"),
    "work_seed": ("application/vnd.stoker.image.work-seed.v1.sparse+zstd", "work-seed.ext4"),
    "vmlinux": ("application/vnd.stoker.kernel.vmlinux.v1.sparse+zstd", "vmlinux"),
    "bzimage": ("application/vnd.stoker.kernel.bzimage.v1.sparse+zstd", "bzImage"),
    "initrd": ("application/vnd.stoker.kernel.initrd.v1.sparse+zstd", "initrd.img"),
}
_ROLE_OF_TYPE = {mt: role for role, (mt, _) in ROLES.items()}
KERNEL_ROLES = ("vmlinux", "bzimage", "initrd")
SIZE_ANN = "dev.stoker.size"
SHA_ANN = "dev.stoker.sha256"
TITLE_ANN = "org.opencontainers.image.title"
UPLOAD_CHUNK = 16 << 20
IO_CHUNK = 1 << 20
ZSTD_LEVEL = 1  # fast: a LAN registry is quicker than a better ratio (3 saves ~12%)
SPARSE_MAGIC = b"STOKER-SPARSE-1\n"
MAX_SPARSE_HEADER = 16 << 20
MAX_FILE_SIZE = 1 << 40

Progress = Callable[..., None]


@dataclass(frozen=True)
class ArtifactFile:
    """One file to push, by role."""

    role: str
    path: Path


@dataclass
class _Blob:
    role: str
    digest: str
    size: int
    raw_size: int
    raw_sha256: str


@dataclass
class PushResult:
    ref: str
    digest: str
    size: int
    uploaded: int
    skipped: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PulledArtifact:
    """An artifact's files, decompressed into `dir` (file names from ROLES)."""

    ref: str
    digest: str
    dir: Path
    config: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    download_size: int = 0

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
        ),
        auto_decompress=False,
    )


# --- push ------------------------------------------------------------------------------


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data regions of an open file (one extent if no holes)."""
    out: list[tuple[int, int]] = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: only a hole is left
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            out.append((start, end - start))
        off = end
    return out


def _compress_into(src: Path, role: str, emit: Callable[[bytes], object]) -> _Blob:
    """zstd the sparse stream of `src`, handing each compressed piece to `emit` and hashing
    both sides (runs in a worker thread)."""
    raw_h, out_h = hashlib.sha256(), hashlib.sha256()
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1, write_checksum=True)
    comp = cctx.compressobj()
    size = 0

    def out(b: bytes) -> None:
        nonlocal size
        if b:
            out_h.update(b)
            size += len(b)
            emit(b)

    with open(src, "rb") as fin:
        fd = fin.fileno()
        file_size = os.fstat(fd).st_size
        extents = data_extents(fd, file_size)
        header = json.dumps({"size": file_size, "extents": extents}).encode()
        head = SPARSE_MAGIC + len(header).to_bytes(8, "big") + header
        raw_h.update(head)
        out(comp.compress(head))
        for off, length in extents:
            left = length
            while left > 0:
                chunk = os.pread(fd, min(left, IO_CHUNK), off + length - left)
                if not chunk:
                    raise StokerError(f"{src} shrank while it was being pushed: retry")
                left -= len(chunk)
                raw_h.update(chunk)
                out(comp.compress(chunk))
        out(comp.flush())
    return _Blob(
        role=role,
        digest="sha256:" + out_h.hexdigest(),
        size=size,
        raw_size=file_size,
        raw_sha256=raw_h.hexdigest(),
    )


def _compress(src: Path, dst: Path, role: str) -> _Blob:
    """The blob of `src` written to the file `dst` (tests make hostile artifacts with it)."""
    with open(dst, "wb") as f:
        return _compress_into(src, role, f.write)


class DigestCache:
    """The blob each pushed file made, keyed by the file's path and identity (device,
    inode, size, mtime and ctime), so a re-push can ask the registry for the blob without
    reading the file again. Images are immutable once published; any change to a file
    changes its ctime and misses. A missing or unreadable cache is an empty one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(path.read_bytes())
                if isinstance(doc, dict):
                    self.entries = {k: v for k, v in doc.items() if isinstance(v, dict)}

    @staticmethod
    def _key(p: Path) -> str:
        st = os.stat(p)
        return (
            f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:"
            f"zstd{ZSTD_LEVEL}"
        )

    def get(self, p: Path, role: str) -> _Blob | None:
        ent = self.entries.get(str(p))
        try:
            if ent is None or ent.get("key") != self._key(p):
                return None
            blob = _Blob(
                role=role,
                digest=str(ent["digest"]),
                size=int(ent["size"]),
                raw_size=int(ent["raw_size"]),
                raw_sha256=str(ent["raw_sha256"]),
            )
        except (OSError, KeyError, TypeError, ValueError):
            return None
        ok = blob.digest.startswith("sha256:") and len(blob.digest) == 71 and blob.size >= 0
        return blob if ok and len(blob.raw_sha256) == 64 else None

    def put(self, p: Path, key: str, blob: _Blob) -> None:
        self.entries[str(p)] = {
            "key": key,
            "digest": blob.digest,
            "size": blob.size,
            "raw_size": blob.raw_size,
            "raw_sha256": blob.raw_sha256,
        }

    def save(self) -> None:
        if self.path is None:
            return
        live = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(live, sort_keys=True))
            os.replace(tmp, self.path)


def _refusal(client: RegistryClient, status: int, body: bytes, what: str) -> StokerError:
    from stoker.daemon.oci.registry import _error_summary

    summary = _error_summary(body) or "no detail"
    if status in (400, 415) and (
        status == 415 or "MANIFEST_INVALID" in summary or "media" in summary.lower()
    ):
        return UnsupportedImage(
            f"pushing {client.display}: registry {client.host} refused the {what} "
            f"(HTTP {status}: {summary}): it does not accept OCI artifacts with stoker's "
            f"media types ({ARTIFACT_TYPE}); push to a registry that stores OCI artifacts "
            "(distribution 2.7+, Harbor, ghcr.io, zot, ...)"
        )
    if status == 403:
        return StokerError(
            f"pushing {client.display}: registry {client.host} denied the push of the {what} "
            f"(HTTP 403: {summary}): check that your login may push to "
            f"{client.ref.repository}"
        )
    return Unavailable(
        f"pushing {client.display}: registry {client.host} answered HTTP {status} while "
        f"uploading the {what}: {summary}"
    )


async def _read_body(resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await resp.content.read(64 << 10)
    except (aiohttp.ClientError, TimeoutError):
        return b""


async def _blob_exists(client: RegistryClient, digest: str, size: int) -> bool:
    resp = await client.request(
        "HEAD",
        client._url("blobs", digest),
        {},
        aiohttp.ClientTimeout(total=MANIFEST_TIMEOUT),
        f"checking blob {digest}",
    )
    try:
        if resp.status == 200:
            length = resp.headers.get("Content-Length")
            return length is None or int(length) == size
        return False
    finally:
        resp.release()


def _upload_timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)


async def _start_upload(client: RegistryClient, what: str) -> str:
    """POST an upload session; its Location."""
    resp = await client.request(
        "POST",
        f"{client.base}/v2/{client.ref.repository}/blobs/uploads/",
        {"Content-Length": "0"},
        _upload_timeout(),
        f"uploading the {what}",
        data=b"",
    )
    try:
        if resp.status != 202 or "Location" not in resp.headers:
            raise _refusal(client, resp.status, await _read_body(resp), what)
        return urljoin(client.base + "/", resp.headers["Location"])
    finally:
        resp.release()


async def _patch(
    client: RegistryClient, location: str, offset: int, chunk: bytes | bytearray, what: str
) -> str:
    """PATCH one chunk at `offset`; the next Location."""
    resp = await client.request(
        "PATCH",
        location,
        {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            "Content-Length": str(len(chunk)),
        },
        _upload_timeout(),
        f"uploading the {what}",
        data=chunk,
    )
    try:
        if resp.status != 202 or "Location" not in resp.headers:
            raise _refusal(client, resp.status, await _read_body(resp), what)
        return urljoin(location, resp.headers["Location"])
    finally:
        resp.release()


async def _finish_upload(
    client: RegistryClient, location: str, digest: str, size: int, sent: int, what: str
) -> None:
    """PUT ?digest=: the registry checks the digest; then check what it says it stored."""
    if sent != size:
        raise TruncatedBlob(f"pushing {client.display}: the {what} changed while uploading")
    sep = "&" if "?" in location else "?"
    resp = await client.request(
        "PUT",
        location + sep + urlencode({"digest": digest}),
        {"Content-Length": "0", "Content-Type": "application/octet-stream"},
        _upload_timeout(),
        f"uploading the {what}",
        data=b"",
    )
    try:
        if resp.status == 400:
            body = await _read_body(resp)
            if b"DIGEST_INVALID" in body:
                raise DigestMismatch(
                    f"pushing {client.display}: registry {client.host} says the uploaded "
                    f"{what} does not hash to {digest}: the upload was corrupted; retry"
                )
            raise _refusal(client, resp.status, body, what)
        if resp.status != 201:
            raise _refusal(client, resp.status, await _read_body(resp), what)
        served = resp.headers.get("Docker-Content-Digest")
    finally:
        resp.release()
    if served and served != digest:
        raise DigestMismatch(
            f"pushing {client.display}: registry {client.host} stored the {what} as {served}, "
            f"not {digest}: retry the push"
        )


async def _upload(
    client: RegistryClient,
    data: bytes,
    digest: str,
    what: str,
) -> None:
    """A small blob (the config) in one chunk."""
    location = await _start_upload(client, what)
    location = await _patch(client, location, 0, data, what)
    await _finish_upload(client, location, digest, len(data), len(data), what)


async def _upload_file(
    client: RegistryClient, f: ArtifactFile, on_bytes: Callable[[int], None]
) -> _Blob:
    """Compress `f` in a worker thread while its blob is uploaded in UPLOAD_CHUNK pieces;
    the digest (known at the end) is what the final PUT asks the registry to verify."""
    what = f"{ROLES[f.role][1]} blob"
    location = await _start_upload(client, what)
    # The worker cuts the compressed stream into the PATCH bodies itself: one hand-over
    # per UPLOAD_CHUNK, no copy on the loop's side; two in flight at most.
    pipe = ThreadToLoop(asyncio.get_running_loop(), limit=2)

    def work() -> _Blob:
        body = bytearray()

        def emit(b: bytes) -> None:
            nonlocal body
            body += b
            if len(body) >= UPLOAD_CHUNK:
                pipe.put(body)
                body = bytearray()

        try:
            blob = _compress_into(f.path, f.role, emit)
            if body:
                pipe.put(body)
            return blob
        finally:
            pipe.end()

    worker: asyncio.Future[_Blob] = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        sent = 0
        while (chunk := await pipe.get()) is not None:
            location = await _patch(client, location, sent, chunk, what)
            sent += len(chunk)
            on_bytes(len(chunk))
        blob = await asyncio.shield(worker)  # never cancelled under a running thread
        await _finish_upload(client, location, blob.digest, blob.size, sent, what)
        return blob
    except BaseException as exc:
        pipe.abandon()
        if await settle(worker) and not isinstance(exc, asyncio.CancelledError):
            raise asyncio.CancelledError() from exc
        raise


async def push_artifact(
    ref: str,
    files: list[ArtifactFile],
    config: dict[str, Any],
    *,
    progress: Progress | None = None,
    credential: Credential | None = None,
    insecure_registries: set[str] | None = None,
    session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    digest_cache: Path | None = None,
) -> PushResult:
    """Publish `files` + `config` as a stoker artifact at `ref` (a tag).

    `digest_cache` is a file remembering the blob each file made (see DigestCache)."""
    started = time.monotonic()
    reference = parse_reference(ref)
    if reference.digest is not None:
        raise InvalidArgument(
            f"cannot push to {ref}: a digest names existing content; push to a tag "
            "(REGISTRY/REPO:TAG)"
        )
    roles = [f.role for f in files]
    if "rootfs" not in roles or not ({"vmlinux", "bzimage"} & set(roles)):
        raise InvalidArgument(f"pushing {ref}: an artifact needs a rootfs and a kernel")
    session = session_factory() if session_factory is not None else _session()
    try:
        client = await open_client(
            session,
            reference,
            display=ref,
            insecure_registries=insecure_registries,
            credential=credential,
            actions="pull,push",
            verb="pushing",
        )
        cache = DigestCache(digest_cache)
        on_bytes = DownloadMeter(progress, None, stage="upload").add  # compressed: no total
        blobs: list[_Blob] = []
        uploaded = skipped = 0
        for f in files:
            known = cache.get(f.path, f.role)
            if known is not None and await _blob_exists(client, known.digest, known.size):
                blobs.append(known)
                skipped += 1
                on_bytes(known.size)
                continue
            if progress is not None:
                progress("upload", f"compressing and uploading {ROLES[f.role][1]}")
            key = DigestCache._key(f.path)
            blob = await _upload_file(client, f, on_bytes)
            if DigestCache._key(f.path) == key:
                cache.put(f.path, key, blob)
            blobs.append(blob)
            uploaded += 1
        cache.save()
        total = sum(b.size for b in blobs)
        cfg_bytes = json.dumps(config, sort_keys=True).encode()
        cfg_digest = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
        if not await _blob_exists(client, cfg_digest, len(cfg_bytes)):
            await _upload(client, cfg_bytes, cfg_digest, "config blob")
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": cfg_digest, "size": len(cfg_bytes)},
            "layers": [
                {
                    "mediaType": ROLES[b.role][0],
                    "digest": b.digest,
                    "size": b.size,
                    "annotations": {
                        TITLE_ANN: ROLES[b.role][1],
                        SIZE_ANN: str(b.raw_size),
                        SHA_ANN: b.raw_sha256,
                    },
                }
                for b in blobs
            ],
            "annotations": {"org.opencontainers.image.created": config.get("created", "")},
        }
        body = json.dumps(manifest, sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        tag = reference.tag or "latest"
        if progress is not None:
            progress("manifest", f"publishing {ref}")
        resp = await client.request(
            "PUT",
            client._url("manifests", tag),
            {"Content-Type": OCI_MANIFEST},
            aiohttp.ClientTimeout(total=MANIFEST_TIMEOUT),
            "uploading the manifest",
            data=body,
        )
        try:
            if resp.status != 201:
                raise _refusal(client, resp.status, await _read_body(resp), "artifact manifest")
            served = resp.headers.get("Docker-Content-Digest")
        finally:
            resp.release()
        if served and served != digest:
            raise DigestMismatch(
                f"pushing {ref}: registry {client.host} stored the manifest as {served}, not "
                f"{digest}: it rewrote it; retry or use another registry"
            )
        return PushResult(
            ref=ref,
            digest=digest,
            size=total + len(cfg_bytes),
            uploaded=uploaded,
            skipped=skipped,
            seconds=round(time.monotonic() - started, 3),
        )
    finally:
        await session.close()


# --- pull ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    role: str
    digest: str
    size: int
    raw_size: int
    raw_sha256: str


def _parse_artifact(body: bytes, ref: str) -> tuple[str, int, list[_Layer]] | None:
    """(config digest, config size, layers) when `body` is a stoker artifact, else None."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    cfg = doc.get("config")
    if not isinstance(cfg, dict) or cfg.get("mediaType") != CONFIG_TYPE:
        return None
    bad = f"pulling {ref}: the stoker artifact's manifest is malformed"
    cdigest, csize = cfg.get("digest"), cfg.get("size")
    if not isinstance(cdigest, str) or not cdigest.startswith("sha256:"):
        raise UnsupportedImage(f"{bad}: config has no sha256 digest")
    if not isinstance(csize, int) or not 0 < csize <= MAX_CONFIG_BYTES:
        raise UnsupportedImage(f"{bad}: config size is missing or unreasonable")
    layers: list[_Layer] = []
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise UnsupportedImage(f"{bad}: no layer list")
    seen: set[str] = set()
    for i, ent in enumerate(raw_layers):
        if not isinstance(ent, dict):
            raise UnsupportedImage(f"{bad}: layer {i} is not an object")
        role = _ROLE_OF_TYPE.get(str(ent.get("mediaType")))
        if role is None:
            raise UnsupportedImage(
                f"pulling {ref}: layer {i} has media type {ent.get('mediaType')!r}, which this "
                "stoker does not know: upgrade stoker"
            )
        if role in seen:
            raise UnsupportedImage(f"{bad}: two {role} layers")
        seen.add(role)
        raw_ann = ent.get("annotations")
        ann: dict[str, Any] = raw_ann if isinstance(raw_ann, dict) else {}
        d, size = ent.get("digest"), ent.get("size")
        try:
            raw_size = int(ann.get(SIZE_ANN, ""))
        except ValueError:
            raise UnsupportedImage(f"{bad}: layer {i} has no {SIZE_ANN} annotation") from None
        sha = str(ann.get(SHA_ANN, ""))
        if not isinstance(d, str) or not d.startswith("sha256:") or len(d) != 71:
            raise UnsupportedImage(f"{bad}: layer {i} has no sha256 digest")
        if not isinstance(size, int) or size < 0 or not 0 <= raw_size <= MAX_FILE_SIZE:
            raise UnsupportedImage(f"{bad}: layer {i} has an invalid size")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise UnsupportedImage(f"{bad}: layer {i} has no {SHA_ANN} annotation")
        layers.append(_Layer(role, d, size, raw_size, sha))
    if "rootfs" not in seen or not ({"vmlinux", "bzimage"} & seen):
        raise UnsupportedImage(f"{bad}: it has no rootfs or no kernel")
    return cdigest, csize, layers


async def _download(
    client: RegistryClient, digest: str, size: int, dest: Path, on_bytes: Callable[[int], None]
) -> None:
    """Stream a blob to `dest`, verifying its size and sha256."""
    h = hashlib.sha256()
    n = 0
    try:
        async with client.blob(digest) as chunks:
            with open(dest, "wb") as f:
                async for chunk in chunks:
                    n += len(chunk)
                    if n > size:
                        break
                    h.update(chunk)
                    await asyncio.to_thread(f.write, chunk)
                    on_bytes(len(chunk))
    except TruncatedTransfer as e:
        raise TruncatedBlob(
            f"pulling {client.display}: blob {digest} ended early: {e}; retry"
        ) from None
    _check_blob(client, digest, size, n, h)


async def _download_sparse(
    client: RegistryClient,
    layer: _Layer,
    dst: Path,
    label: str,
    on_bytes: Callable[[int], None],
) -> None:
    """Stream a layer's blob into a worker thread that writes `dst` back from it while the
    download goes on. The blob's size and sha256 are checked when it ends, before the
    worker's verdict is taken (a corrupted transfer is reported as such, not as the bad
    stream it makes); the caller publishes nothing from a failed call."""
    pipe = ThreadPipe(asyncio.get_running_loop())

    def work() -> None:
        try:
            _write_sparse(pipe, dst, layer, label)
        finally:
            pipe.wake_producer()

    worker: asyncio.Future[None] = asyncio.ensure_future(asyncio.to_thread(work))
    h = hashlib.sha256()
    n = 0
    try:
        try:
            async with client.blob(layer.digest) as chunks:
                async for chunk in chunks:
                    n += len(chunk)
                    if n > layer.size:
                        break
                    h.update(chunk)
                    on_bytes(len(chunk))
                    err = worker_error(worker)
                    if err is None:
                        await pipe.put(chunk, worker)
                    elif not isinstance(err, UnsupportedImage | DigestMismatch):
                        break  # no space, an I/O error: the rest of the blob is no use
                    # else a bad stream: keep hashing, a corrupted transfer is the better
                    # explanation when the digest does not match either
        except TruncatedTransfer as e:
            raise TruncatedBlob(
                f"pulling {client.display}: blob {layer.digest} ended early: {e}; retry"
            ) from None
        err = worker_error(worker)
        if err is not None and not isinstance(err, UnsupportedImage | DigestMismatch):
            raise err
        _check_blob(client, layer.digest, layer.size, n, h)
        pipe.close()
        await asyncio.shield(worker)  # never cancelled under a running thread
    except BaseException as exc:
        pipe.abort()
        if await settle(worker) and not isinstance(exc, asyncio.CancelledError):
            raise asyncio.CancelledError() from exc
        raise


def _check_blob(client: RegistryClient, digest: str, size: int, n: int, h: Any) -> None:
    if n != size:
        raise TruncatedBlob(
            f"pulling {client.display}: blob {digest} is {'longer' if n > size else 'shorter'} "
            f"than the {size} bytes the manifest says: retry or re-push the image"
        )
    got = "sha256:" + h.hexdigest()
    if got != digest:
        raise DigestMismatch(
            f"pulling {client.display}: blob content hashes to {got}, not {digest}: the "
            "registry or something in between corrupted it; retry"
        )


def _read_exact(reader: Any, n: int) -> bytes:
    """Up to `n` bytes from a zstd stream reader: fewer only at its end."""
    b: bytes = reader.read(n)
    if 0 < len(b) < n:
        parts = [b]
        got = len(b)
        while got < n:
            more = reader.read(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        b = b"".join(parts)
    return b


class _HashWriter(threading.Thread):
    """Hashes the decompressed stream in order and writes its extents at their offsets,
    on a thread of its own: decompressing and hashing + writing then use two cores.

    `put(None, b)` hashes bytes that are not file data (the header). After a failure it
    drains the queue until `finish()`, so the producer never blocks on it."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="artifact-writer", daemon=True)
        self.fd = fd
        self.h = hashlib.sha256()
        self.q: queue.Queue[tuple[int | None, bytes] | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while (item := self.q.get()) is not None:
                off, b = item
                self.h.update(b)
                if off is not None:
                    view = memoryview(b)
                    while view:
                        n = os.pwrite(self.fd, view, off)
                        view, off = view[n:], off + n
        except BaseException as e:
            self.error = e
            while self.q.get() is not None:
                pass

    def put(self, off: int | None, b: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((off, b))

    def finish(self) -> None:
        """End the stream and wait for the thread; raises what it failed with."""
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _parse_extents(header: bytes, size: int) -> list[tuple[int, int]]:
    doc = json.loads(header)
    if not isinstance(doc, dict) or doc.get("size") != size:
        raise ValueError("the header's size does not match the annotation")
    raw = doc.get("extents")
    if not isinstance(raw, list):
        raise ValueError("no extent list")
    out: list[tuple[int, int]] = []
    end = 0
    for e in raw:
        if (
            not isinstance(e, list)
            or len(e) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in e)
        ):
            raise ValueError("an extent is not [offset, length]")
        off, length = e
        if off < end or length <= 0 or off + length > size:
            raise ValueError("extents overlap, are out of order or outside the file")
        out.append((off, length))
        end = off + length
    return out


def _write_sparse(src: Any, dst: Path, layer: _Layer, label: str) -> None:
    """Write `dst` back from the zstd sparse stream read from `src` (anything with
    `read(n)`); check header and hash. Runs in a worker thread."""
    name = ROLES[layer.role][1]
    bad = f"pulling {label}: {name} is not a valid stoker sparse stream"
    dctx = zstandard.ZstdDecompressor()
    with open(dst, "wb") as fout:
        writer = _HashWriter(fout.fileno())
        writer.start()
        try:
            try:
                r = dctx.stream_reader(src, read_size=BLOB_CHUNK)
                head = _read_exact(r, len(SPARSE_MAGIC) + 8)
                if len(head) != len(SPARSE_MAGIC) + 8 or not head.startswith(SPARSE_MAGIC):
                    raise UnsupportedImage(f"{bad} (no header): re-push the image")
                hlen = int.from_bytes(head[len(SPARSE_MAGIC) :], "big")
                if hlen > MAX_SPARSE_HEADER:
                    raise UnsupportedImage(f"{bad} (a {hlen}-byte header): refusing it")
                header = _read_exact(r, hlen)
                writer.put(None, head + header)
                try:
                    extents = _parse_extents(header, layer.raw_size)
                except ValueError as e:
                    raise UnsupportedImage(f"{bad} ({e}): re-push the image") from None
                for off, length in extents:
                    done = 0
                    while done < length:
                        chunk = _read_exact(r, min(length - done, IO_CHUNK))
                        if not chunk:
                            raise UnsupportedImage(f"{bad} (it ends inside an extent)")
                        writer.put(off + done, chunk)
                        done += len(chunk)
                if r.read(1):
                    raise UnsupportedImage(f"{bad} (bytes after its last extent): refusing it")
            except zstandard.ZstdError as e:
                raise UnsupportedImage(
                    f"pulling {label}: {name} is not valid zstd ({e}): re-push"
                ) from None
        except BaseException:
            with contextlib.suppress(BaseException):
                writer.finish()  # its own error, if any, is secondary
            raise
        writer.finish()
        os.ftruncate(fout.fileno(), layer.raw_size)
        os.fsync(fout.fileno())  # published next: on disk first, as bundles and blobs are
    got = writer.h.hexdigest()
    if got != layer.raw_sha256:
        raise DigestMismatch(
            f"pulling {label}: {name} decompressed to content hashing to sha256:{got}, not "
            f"the sha256:{layer.raw_sha256} the artifact promises: re-push the image"
        )


async def pull_artifact(
    ref: str,
    *,
    staging_dir: Path,
    progress: Progress | None = None,
    credential: Credential | None = None,
    insecure_registries: set[str] | None = None,
    mirrors: list[str] | None = None,
    session_factory: Callable[[], aiohttp.ClientSession] | None = None,
) -> PulledArtifact | None:
    """Fetch `ref` when it is a stoker artifact (None when it is anything else).

    The files land in a new directory under `staging_dir`; the caller publishes them and
    calls `discard()`. A failure removes everything it wrote.
    """
    reference: Reference = parse_reference(ref)
    staging_dir.mkdir(parents=True, exist_ok=True)
    session = session_factory() if session_factory is not None else _session()
    try:
        client = await open_client(
            session,
            reference,
            display=ref,
            insecure_registries=insecure_registries,
            credential=credential,
            mirrors=mirrors,
        )
        fetched = await client.get_manifest(reference.manifest_ref)
        parsed = _parse_artifact(fetched.body, ref)
        if parsed is None:
            return None
        cdigest, csize, layers = parsed
        work = Path(tempfile.mkdtemp(prefix="artifact-", dir=staging_dir))
        try:
            total = csize + sum(x.size for x in layers)
            on_bytes = DownloadMeter(progress, total).add
            cfg_path = work / ".config.json"
            await _download(client, cdigest, csize, cfg_path, on_bytes)
            try:
                config = json.loads(cfg_path.read_bytes())
                if not isinstance(config, dict):
                    raise ValueError
            except ValueError:
                raise UnsupportedImage(
                    f"pulling {ref}: the stoker artifact's config is not a JSON object"
                ) from None
            cfg_path.unlink()
            out = PulledArtifact(ref=ref, digest=fetched.digest, dir=work, config=config)
            for layer in layers:
                name = ROLES[layer.role][1]
                if progress is not None:
                    progress("download", f"fetching and unpacking {name}")
                await _download_sparse(client, layer, work / name, ref, on_bytes)
                out.files[layer.role] = work / name
            out.download_size = total
            return out
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        with contextlib.suppress(Exception):
            await session.close()
