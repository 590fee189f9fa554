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

Push compresses each file to a temporary blob (hashing it), skips blobs the registry has
(HEAD), uploads the rest in chunks (POST, PATCH with Content-Range, PUT ?digest=: the
registry verifies the digest), checks the stored digest, then PUTs the manifest and checks
the digest the registry answers with. Pull (`pull_artifact`) recognises the config media
type, downloads each blob verifying size and digest, and writes each file back from its
sparse stream into a directory ready to publish: no conversion, no mkfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
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
    CONNECT_TIMEOUT,
    MANIFEST_TIMEOUT,
    READ_TIMEOUT,
    RegistryClient,
    TruncatedTransfer,
    open_client,
)
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
    path: Path  # the compressed temporary file
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


def _compress(src: Path, dst: Path, role: str) -> _Blob:
    """zstd the sparse stream of `src` into `dst`, hashing both sides (runs in a thread)."""
    raw_h, out_h = hashlib.sha256(), hashlib.sha256()
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1, write_checksum=True)
    comp = cctx.compressobj()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fd = fin.fileno()
        file_size = os.fstat(fd).st_size
        extents = data_extents(fd, file_size)
        header = json.dumps({"size": file_size, "extents": extents}).encode()

        def put(b: bytes) -> None:
            nonlocal size
            raw_h.update(b)
            out = comp.compress(b)
            if out:
                out_h.update(out)
                size += len(out)
                fout.write(out)

        put(SPARSE_MAGIC + len(header).to_bytes(8, "big") + header)
        for off, length in extents:
            left = length
            while left > 0:
                chunk = os.pread(fd, min(left, IO_CHUNK), off + length - left)
                if not chunk:
                    raise StokerError(f"{src} shrank while it was being pushed: retry")
                left -= len(chunk)
                put(chunk)
        tail = comp.flush()
        out_h.update(tail)
        size += len(tail)
        fout.write(tail)
    return _Blob(
        role=role,
        path=dst,
        digest="sha256:" + out_h.hexdigest(),
        size=size,
        raw_size=file_size,
        raw_sha256=raw_h.hexdigest(),
    )


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


async def _upload(
    client: RegistryClient,
    blob_path: Path,
    digest: str,
    size: int,
    what: str,
    on_bytes: Callable[[int], None],
) -> None:
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
    )
    action = f"uploading the {what}"
    resp = await client.request(
        "POST",
        f"{client.base}/v2/{client.ref.repository}/blobs/uploads/",
        {"Content-Length": "0"},
        timeout,
        action,
        data=b"",
    )
    try:
        if resp.status != 202 or "Location" not in resp.headers:
            raise _refusal(client, resp.status, await _read_body(resp), what)
        location = urljoin(client.base + "/", resp.headers["Location"])
    finally:
        resp.release()
    offset = 0
    with open(blob_path, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, UPLOAD_CHUNK):
            end = offset + len(chunk) - 1
            resp = await client.request(
                "PATCH",
                location,
                {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{end}",
                    "Content-Length": str(len(chunk)),
                },
                timeout,
                action,
                data=chunk,
            )
            try:
                if resp.status != 202 or "Location" not in resp.headers:
                    raise _refusal(client, resp.status, await _read_body(resp), what)
                location = urljoin(location, resp.headers["Location"])
            finally:
                resp.release()
            offset += len(chunk)
            on_bytes(len(chunk))
    sep = "&" if "?" in location else "?"
    resp = await client.request(
        "PUT",
        location + sep + urlencode({"digest": digest}),
        {"Content-Length": "0", "Content-Type": "application/octet-stream"},
        timeout,
        action,
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
    if offset != size:
        raise TruncatedBlob(f"pushing {client.display}: the {what} changed while uploading")


async def push_artifact(
    ref: str,
    files: list[ArtifactFile],
    config: dict[str, Any],
    *,
    staging_dir: Path,
    progress: Progress | None = None,
    credential: Credential | None = None,
    insecure_registries: set[str] | None = None,
    session_factory: Callable[[], aiohttp.ClientSession] | None = None,
) -> PushResult:
    """Publish `files` + `config` as a stoker artifact at `ref` (a tag)."""
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
    staging_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="push-", dir=staging_dir))
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
        blobs: list[_Blob] = []
        for f in files:
            if progress is not None:
                progress("compress", f"compressing {ROLES[f.role][1]}")
            blobs.append(await asyncio.to_thread(_compress, f.path, work / f.role, f.role))
        total = sum(b.size for b in blobs)
        done = 0
        last = 0.0

        def on_bytes(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if progress is not None and now - last >= 0.5:
                last = now
                progress("upload", f"{done >> 20}/{total >> 20} MiB", done=done, total=total)

        uploaded = skipped = 0
        for b in blobs:
            what = f"{ROLES[b.role][1]} blob {b.digest[:19]}"
            if await _blob_exists(client, b.digest, b.size):
                skipped += 1
                on_bytes(b.size)
                continue
            await _upload(client, b.path, b.digest, b.size, what, on_bytes)
            uploaded += 1
        cfg_bytes = json.dumps(config, sort_keys=True).encode()
        cfg_digest = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
        cfg_path = work / "config.json"
        cfg_path.write_bytes(cfg_bytes)
        if not await _blob_exists(client, cfg_digest, len(cfg_bytes)):
            await _upload(
                client, cfg_path, cfg_digest, len(cfg_bytes), "config blob", lambda n: None
            )
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
        shutil.rmtree(work, ignore_errors=True)


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


class _Reader:
    """Exact reads from a zstd stream, hashing everything read."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.h = hashlib.sha256()

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = self.reader.read(min(n - len(out), IO_CHUNK))
            if not b:
                break
            out += b
        self.h.update(out)
        return bytes(out)


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


def _decompress_sparse(src: Path, dst: Path, layer: _Layer, label: str) -> None:
    """Write `dst` back from the zstd sparse stream in `src`; check header and hash."""
    name = ROLES[layer.role][1]
    bad = f"pulling {label}: {name} is not a valid stoker sparse stream"
    dctx = zstandard.ZstdDecompressor()
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            r = _Reader(dctx.stream_reader(fin))
            head = r.read(len(SPARSE_MAGIC) + 8)
            if len(head) != len(SPARSE_MAGIC) + 8 or not head.startswith(SPARSE_MAGIC):
                raise UnsupportedImage(f"{bad} (no header): re-push the image")
            hlen = int.from_bytes(head[len(SPARSE_MAGIC) :], "big")
            if hlen > MAX_SPARSE_HEADER:
                raise UnsupportedImage(f"{bad} (a {hlen}-byte header): refusing it")
            try:
                extents = _parse_extents(r.read(hlen), layer.raw_size)
            except ValueError as e:
                raise UnsupportedImage(f"{bad} ({e}): re-push the image") from None
            fd = fout.fileno()
            for off, length in extents:
                done = 0
                while done < length:
                    chunk = r.read(min(length - done, IO_CHUNK))
                    if not chunk:
                        raise UnsupportedImage(f"{bad} (it ends inside an extent)")
                    os.pwrite(fd, chunk, off + done)
                    done += len(chunk)
            if r.reader.read(1):
                raise UnsupportedImage(f"{bad} (bytes after its last extent): refusing it")
            os.ftruncate(fd, layer.raw_size)
    except zstandard.ZstdError as e:
        raise UnsupportedImage(
            f"pulling {label}: {name} is not valid zstd ({e}): re-push"
        ) from None
    if r.h.hexdigest() != layer.raw_sha256:
        raise DigestMismatch(
            f"pulling {label}: {name} decompressed to content hashing to sha256:"
            f"{r.h.hexdigest()}, not the sha256:{layer.raw_sha256} the artifact promises: "
            "re-push the image"
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
            done = 0
            last = 0.0

            def on_bytes(k: int) -> None:
                nonlocal done, last
                done += k
                now = time.monotonic()
                if progress is not None and now - last >= 0.5:
                    last = now
                    progress("download", f"{done >> 20}/{total >> 20} MiB", done=done, total=total)

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
                    progress("download", f"fetching {name}")
                tmp = work / f".{layer.role}.zst"
                await _download(client, layer.digest, layer.size, tmp, on_bytes)
                if progress is not None:
                    progress("unpack", f"decompressing {name}")
                await asyncio.to_thread(_decompress_sparse, tmp, work / name, layer, ref)
                tmp.unlink()
                out.files[layer.role] = work / name
            out.download_size = total
            return out
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        with contextlib.suppress(Exception):
            await session.close()
