"""OCI image pull: registry v2 client, verified blob cache, layer replay, ext4 build.

A leaf: imports only `stoker.runner`, `stoker.errors`, `stoker.model`, the standard
library and third-party packages. `ImageService` drives it:

    pulled = await pull_image(ref, cache_dir=..., staging_dir=..., progress=..., runner=...)
    try:
        ...inject guest files into pulled.rootfs...
        await build_ext4(pulled.rootfs, dest, runner=runner, what=ref)
    finally:
        pulled.discard()
"""

from stoker.daemon.oci.cache import BlobCache, PruneResult
from stoker.daemon.oci.errors import (
    DigestMismatch,
    NoSpace,
    OCIError,
    TruncatedBlob,
    UnsafeLayer,
    UnsupportedImage,
)
from stoker.daemon.oci.ext4 import Ext4Image, build_ext4, ext4_size
from stoker.daemon.oci.layers import LayerApplier, detect
from stoker.daemon.oci.manifest import ImageConfig
from stoker.daemon.oci.pull import Progress, PulledImage, SessionFactory, pull_image
from stoker.daemon.oci.reference import Reference, parse_reference

__all__ = [
    "BlobCache",
    "DigestMismatch",
    "Ext4Image",
    "ImageConfig",
    "LayerApplier",
    "NoSpace",
    "OCIError",
    "Progress",
    "PruneResult",
    "PulledImage",
    "Reference",
    "SessionFactory",
    "TruncatedBlob",
    "UnsafeLayer",
    "UnsupportedImage",
    "build_ext4",
    "detect",
    "ext4_size",
    "parse_reference",
    "pull_image",
]
