"""OCI / Docker v2 manifests, indexes and image configs: media types and parsing.

Only what a pull needs is modelled. Parsing is strict about structure (a malformed
manifest is an error naming the ref) and lenient about extra fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from stoker.daemon.oci.errors import UnsupportedImage

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
# Order matters for content negotiation only in spirit: registries pick from the set.
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 16 << 20


@dataclass(frozen=True)
class Platform:
    """Where an image in an index runs."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s


@dataclass(frozen=True)
class Descriptor:
    """A content-addressed pointer: media type, digest and size."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Index:
    """A manifest list / OCI index: one manifest per platform."""

    media_type: str
    digest: str
    manifests: list[Descriptor]


@dataclass(frozen=True)
class Manifest:
    """A single-platform image manifest: a config blob and ordered layers."""

    media_type: str
    digest: str
    config: Descriptor
    layers: list[Descriptor]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of the image config a VM can use (the process spec and the platform)."""

    os: str
    architecture: str
    entrypoint: list[str]
    cmd: list[str]
    env: list[str]
    working_dir: str
    user: str
    labels: dict[str, str]
    diff_ids: list[str]


def _descriptor(raw: Any, where: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not an object")
    mt, dg, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(dg, str) or ":" not in dg:
        raise ValueError(f"{where} has no valid digest")
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"{where} has no valid size")
    plat = None
    p = raw.get("platform")
    if isinstance(p, dict):
        plat = Platform(
            os=str(p.get("os", "")),
            architecture=str(p.get("architecture", "")),
            variant=str(p["variant"]) if p.get("variant") else None,
        )
    ann = raw.get("annotations")
    return Descriptor(
        media_type=str(mt or ""),
        digest=dg,
        size=size,
        platform=plat,
        annotations={str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {},
    )


def parse_manifest(body: bytes, content_type: str, digest: str, ref: str) -> Index | Manifest:
    """Parse a manifest or index body; the body's own mediaType wins over the header."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise UnsupportedImage(f"image {ref}: manifest {digest} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise UnsupportedImage(f"image {ref}: manifest {digest} is not a JSON object")
    media = str(doc.get("mediaType") or content_type.split(";")[0].strip())
    if doc.get("schemaVersion") == 1 or media in (DOCKER_V1, DOCKER_V1_SIGNED):
        raise UnsupportedImage(
            f"image {ref} uses the deprecated Docker schema 1 manifest format: "
            "re-push it with a current Docker or skopeo"
        )
    try:
        if media in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            raw = doc.get("manifests")
            if not isinstance(raw, list):
                raise ValueError("index has no manifests list")
            items = [_descriptor(m, f"manifests[{i}]") for i, m in enumerate(raw)]
            return Index(media_type=media or OCI_INDEX, digest=digest, manifests=items)
        if media in MANIFEST_TYPES or "layers" in doc:
            layers_raw = doc.get("layers")
            if not isinstance(layers_raw, list):
                raise ValueError("manifest has no layers list")
            config = _descriptor(doc.get("config"), "config")
            layers = [_descriptor(x, f"layers[{i}]") for i, x in enumerate(layers_raw)]
            return Manifest(
                media_type=media or OCI_MANIFEST, digest=digest, config=config, layers=layers
            )
    except ValueError as e:
        raise UnsupportedImage(f"image {ref}: malformed manifest {digest}: {e}") from None
    raise UnsupportedImage(
        f"image {ref}: unsupported manifest media type {media!r}; "
        "stoker reads OCI and Docker v2 images"
    )


def select_platform(index: Index, ref: str, os: str = "linux", arch: str = "amd64") -> Descriptor:
    """Pick the manifest for os/arch from an index, or fail listing what is there."""
    candidates = [
        d
        for d in index.manifests
        if d.platform is not None
        and d.platform.os == os
        and d.platform.architecture == arch
        and d.annotations.get("vnd.docker.reference.type") != "attestation-manifest"
    ]
    # amd64 has no meaningful variant in practice; prefer the plain entry when several exist.
    candidates.sort(key=lambda d: (d.platform.variant or "") if d.platform else "")
    if candidates:
        return candidates[0]
    have = sorted(
        {
            str(d.platform)
            for d in index.manifests
            if d.platform is not None and d.platform.os not in ("", "unknown")
        }
    )
    raise UnsupportedImage(
        f"image {ref} has no {os}/{arch} variant (it has: {', '.join(have) or 'none'}): "
        "stoker VMs run linux/amd64 images"
    )


def _str_list(v: Any) -> list[str]:
    if isinstance(v, list):
        return [str(x) for x in v]
    return []


def parse_config(body: bytes, digest: str, ref: str) -> ImageConfig:
    """Parse an image config blob (OCI or Docker; both share the fields used here)."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise UnsupportedImage(f"image {ref}: config {digest} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise UnsupportedImage(f"image {ref}: config {digest} is not a JSON object")
    c = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    assert isinstance(c, dict)
    rootfs = doc.get("rootfs") if isinstance(doc.get("rootfs"), dict) else {}
    assert isinstance(rootfs, dict)
    labels = c.get("Labels")
    return ImageConfig(
        os=str(doc.get("os", "")),
        architecture=str(doc.get("architecture", "")),
        entrypoint=_str_list(c.get("Entrypoint")),
        cmd=_str_list(c.get("Cmd")),
        env=_str_list(c.get("Env")),
        working_dir=str(c.get("WorkingDir") or ""),
        user=str(c.get("User") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        diff_ids=_str_list(rootfs.get("diff_ids")),
    )
