"""Pull an OCI / Docker image from a registry into a merged root filesystem tree.

`pull_image` resolves the reference (index -> linux/amd64 manifest), downloads the config
and layers into the shared blob cache (verified, deduplicated across concurrent pulls),
and replays the layers into a fresh directory under `staging_dir` while later layers are
still downloading. The caller injects its own files into `PulledImage.rootfs`, builds the
ext4 with `build_ext4`, publishes it, then calls `PulledImage.discard()`.

A failed or cancelled pull removes its staging directory before raising; the cache only
ever holds complete, verified blobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp

from stoker.daemon.imagemgr.owners import OwnerLedger
from stoker.daemon.imagemgr.safetree import rmtree
from stoker.daemon.oci.auth import Credential
from stoker.daemon.oci.cache import BlobCache
from stoker.daemon.oci.errors import NoSpace, TruncatedBlob, UnsupportedImage
from stoker.daemon.oci.layers import LayerApplier, detect, tree_usage
from stoker.daemon.oci.manifest import (
    LAYER_TYPES,
    MAX_CONFIG_BYTES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    parse_config,
    parse_manifest,
    select_platform,
)
from stoker.daemon.oci.reference import parse_reference
from stoker.daemon.oci.registry import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    RegistryClient,
    open_client,
)
from stoker.daemon.opstate.meter import DownloadMeter
from stoker.errors import StokerError, Timeout, Unavailable
from stoker.runner import Runner

T = TypeVar("T")

MAX_PARALLEL_DOWNLOADS = 3
DOWNLOAD_ATTEMPTS = 3
TARGET_OS = "linux"
TARGET_ARCH = "amd64"


class Progress(Protocol):
    """Where a pull reports what it is doing (matches `RequestContext.progress`)."""

    def __call__(self, stage: str, message: str = "", **fields: Any) -> None: ...


SessionFactory = Callable[[], aiohttp.ClientSession]


@dataclass
class PulledImage:
    """A pulled image: its merged tree in staging, its config and identity."""

    ref: str
    canonical_ref: str
    digest: str
    manifest_digest: str
    rootfs: Path
    workdir: Path
    config: ImageConfig
    content_size: int
    download_size: int
    layers: int
    has_systemd: bool
    has_sshd: bool
    # Set when unpacked by a user that is not root: the real owners, for `build_ext4`.
    ledger: OwnerLedger | None = None

    def discard(self) -> None:
        """Remove the staging directory (after the ext4 is built, or to abandon the pull)."""
        rmtree(self.workdir, ignore_errors=True)


async def _in_thread(fn: Callable[[], T], cancel: threading.Event) -> T:
    """Run blocking `fn` in a thread; on cancellation, stop it and wait until it has."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        # The caller deletes the tree next: the worker must have stopped writing to it.
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()
        raise


def _check_layers(manifest: Manifest, ref: str) -> None:
    for d in manifest.layers:
        # An empty media type happens with hand-made images; the magic bytes decide.
        if d.media_type and d.media_type not in LAYER_TYPES:
            raise UnsupportedImage(
                f"pulling {ref}: layer {d.digest} has media type {d.media_type!r}, which is "
                "not a filesystem layer stoker can unpack"
            )


def _check_space(cache: BlobCache, descs: list[Descriptor], ref: str) -> int:
    missing = sum(d.size for d in descs if not cache.contains(d.digest, d.size))
    vfs = os.statvfs(cache.root)
    free = vfs.f_bavail * vfs.f_frsize
    if missing > free:
        raise NoSpace(
            f"pulling {ref}: the download needs {missing // (1 << 20)} MiB but only "
            f"{free // (1 << 20)} MiB are free in the image cache {cache.root}: free disk "
            "space or run `stoker image cache prune`"
        )
    return missing


async def _resolve(client: RegistryClient, ref: str) -> tuple[str, Manifest]:
    """(digest the reference resolved to, the linux/amd64 manifest)."""
    fetched = await client.get_manifest(client.ref.manifest_ref)
    doc = parse_manifest(fetched.body, fetched.media_type, fetched.digest, ref)
    top = fetched.digest
    if isinstance(doc, Index):
        desc = select_platform(doc, ref, TARGET_OS, TARGET_ARCH)
        fetched = await client.get_manifest(desc.digest)
        doc = parse_manifest(fetched.body, fetched.media_type, fetched.digest, ref)
        if isinstance(doc, Index):
            raise UnsupportedImage(
                f"pulling {ref}: the {TARGET_OS}/{TARGET_ARCH} entry of index {top} is itself "
                "an index; stoker does not follow nested indexes"
            )
    return top, doc


async def pull_image(
    ref: str,
    *,
    cache_dir: Path,
    staging_dir: Path,
    progress: Progress | None,
    runner: Runner,
    session_factory: SessionFactory | None = None,
    insecure_registries: set[str] | None = None,
    allow_devices: bool | None = None,
    max_parallel: int = MAX_PARALLEL_DOWNLOADS,
    max_layer_size: int | None = None,
    credential: Credential | None = None,
    mirrors: list[str] | None = None,
) -> PulledImage:
    """Pull `ref` (linux/amd64) and unpack it into a new directory under `staging_dir`.

    Registries on localhost / 127.0.0.1 / ::1 are spoken to over plain HTTP, those named
    in `insecure_registries` over unverified TLS or plain HTTP, every other one over HTTPS.
    `session_factory` makes the aiohttp session (owned and closed by this call).
    `allow_devices` defaults to true (a daemon that is not root records device nodes in
    `PulledImage.ledger` and `build_ext4` makes them in the image). `runner` is the daemon's command
    runner; the native pull path does not need external commands (`build_ext4` takes it
    for mkfs). `max_layer_size` bounds what one layer may decompress to (`LayerTooLarge`
    past it). `credential` authenticates to the reference's registry only; `mirrors`
    (host[:port]) are tried first, anonymously.
    """
    del runner  # accepted so callers wire pulls like every other step; nothing to run here
    reference = parse_reference(ref)
    cache = BlobCache(cache_dir)
    try:
        cache.ensure_dirs()
        staging_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(ref, e, "preparing the cache and staging directories") from None
    if session_factory is not None:
        session = session_factory()
    else:
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
            ),
            auto_decompress=False,
        )
    try:
        client = await open_client(
            session,
            reference,
            display=ref,
            insecure_registries=insecure_registries,
            credential=credential,
            mirrors=mirrors,
        )
        if progress is not None:
            progress("resolve", f"resolving {ref}")
        top_digest, manifest = await _resolve(client, ref)
        _check_layers(manifest, ref)
        descs = [manifest.config, *manifest.layers]
        async with cache.pinned([d.digest for d in descs], ref):
            missing = _check_space(cache, descs, ref)
            meter = DownloadMeter(progress, missing)
            config = await _config(cache, client, manifest.config, ref, meter)
            workdir = Path(tempfile.mkdtemp(prefix="oci-", dir=staging_dir))
            try:
                return await _unpack(
                    cache,
                    client,
                    manifest,
                    config,
                    workdir,
                    ref=ref,
                    canonical=str(reference),
                    top_digest=top_digest,
                    progress=progress,
                    meter=meter,
                    allow_devices=allow_devices,
                    max_parallel=max_parallel,
                    max_layer_size=max_layer_size,
                )
            except BaseException:
                # Synchronous on purpose: must complete even while being cancelled.
                rmtree(workdir, ignore_errors=True)
                raise
    except OSError as e:
        raise _os_error(ref, e, "pulling") from None
    finally:
        await session.close()


def _os_error(ref: str, e: OSError, doing: str) -> StokerError:
    if e.errno == errno.ENOSPC:
        return NoSpace(
            f"pulling {ref}: no space left on device ({e.filename or 'staging'}) while "
            f"{doing}: free disk space or run `stoker image cache prune`"
        )
    return StokerError(f"pulling {ref}: {doing} failed: {e}")


async def _fetch(
    cache: BlobCache, client: RegistryClient, d: Descriptor, ref: str, meter: DownloadMeter
) -> Path:
    """Fetch one blob into the cache, retrying transient transport failures."""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return await cache.fetch(
                d.digest, d.size, lambda: client.blob(d.digest), label=ref, on_bytes=meter.add
            )
        except (TruncatedBlob, Unavailable, Timeout):
            if attempt == DOWNLOAD_ATTEMPTS:
                raise
            await asyncio.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


async def _config(
    cache: BlobCache, client: RegistryClient, d: Descriptor, ref: str, meter: DownloadMeter
) -> ImageConfig:
    if d.size > MAX_CONFIG_BYTES:
        raise UnsupportedImage(f"pulling {ref}: config blob {d.digest} is unreasonably large")
    path = await _fetch(cache, client, d, ref, meter)
    config = parse_config(path.read_bytes(), d.digest, ref)
    if (config.os and config.os != TARGET_OS) or (
        config.architecture and config.architecture != TARGET_ARCH
    ):
        raise UnsupportedImage(
            f"pulling {ref}: the image is {config.os}/{config.architecture}; stoker VMs run "
            f"{TARGET_OS}/{TARGET_ARCH} images"
        )
    return config


async def _unpack(
    cache: BlobCache,
    client: RegistryClient,
    manifest: Manifest,
    config: ImageConfig,
    workdir: Path,
    *,
    ref: str,
    canonical: str,
    top_digest: str,
    progress: Progress | None,
    meter: DownloadMeter,
    allow_devices: bool | None,
    max_parallel: int,
    max_layer_size: int | None,
) -> PulledImage:
    if config.diff_ids and len(config.diff_ids) != len(manifest.layers):
        raise UnsupportedImage(
            f"pulling {ref}: the config lists {len(config.diff_ids)} layers but the manifest "
            f"{len(manifest.layers)}: the image is inconsistent"
        )
    rootfs = workdir / "rootfs"
    cancel = threading.Event()
    applier = LayerApplier(
        rootfs,
        label=ref,
        allow_devices=allow_devices,
        cancel=cancel,
        max_layer_size=max_layer_size,
    )
    sem = asyncio.Semaphore(max(1, max_parallel))

    async def download(d: Descriptor) -> Path:
        async with sem:
            return await _fetch(cache, client, d, ref, meter)

    # Start every download now; unpack strictly in order as each one lands.
    tasks = [asyncio.create_task(download(d)) for d in manifest.layers]
    try:
        n = len(manifest.layers)
        for i, (d, task) in enumerate(zip(manifest.layers, tasks, strict=True), 1):
            blob = await task
            if progress is not None:
                progress("unpack", f"layer {i}/{n} {d.digest[:19]}", layer=i, layers=n)
            await _in_thread(functools.partial(applier.apply, blob, digest=d.digest), cancel)
        await _in_thread(applier.finish, cancel)
        content, _ = await _in_thread(lambda: tree_usage(rootfs), cancel)
        has_systemd, has_sshd = await _in_thread(lambda: detect(rootfs), cancel)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if progress is not None:
        progress("unpacked", f"{ref}: {content // (1 << 20)} MiB in {n} layers")
    return PulledImage(
        ref=ref,
        canonical_ref=canonical,
        digest=top_digest,
        manifest_digest=manifest.digest,
        rootfs=rootfs,
        workdir=workdir,
        config=config,
        content_size=content,
        download_size=sum(d.size for d in manifest.layers) + manifest.config.size,
        layers=len(manifest.layers),
        has_systemd=has_systemd,
        has_sshd=has_sshd,
        ledger=applier.ledger,
    )
