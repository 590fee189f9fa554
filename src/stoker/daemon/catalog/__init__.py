"""The catalog: named image and kernel bundles, and their verified download.

A leaf: it imports only `stoker.errors`, `stoker.model`, the standard library and its
own dependencies (aiohttp, zstandard), never a service or another leaf. `ImageService`
drives it:

    catalog = load_catalog()              # $STOKER_CATALOG, else the embedded file
    entry = catalog.find_image(ref)       # None: not a catalog name, pull it as OCI
    files = await fetch_catalog_entry(entry, dest, progress=progress)
    # dest now holds rootfs.ext4 (+ work-seed.ext4) + manifest.json, verified

`fetch_bundle` is the same for any URL + sha256. `dest` must not exist; the bundle is
staged in `.<dest name>.bundle-*` beside it and renamed into place only when complete.
"""

from stoker.daemon.catalog.bundle import (
    BundleFiles,
    BundleManifest,
    Progress,
    SessionFactory,
    fetch_bundle,
    fetch_catalog_entry,
)
from stoker.daemon.catalog.catalog import (
    CATALOG_ENV,
    Catalog,
    CatalogImage,
    CatalogKernel,
    load_catalog,
    parse_catalog,
)
from stoker.daemon.catalog.errors import (
    BundleDigestMismatch,
    BundleError,
    BundleNoSpace,
    BundleTruncated,
    CatalogError,
    CorruptBundle,
    InvalidBundle,
    UnsafeBundle,
)

__all__ = [
    "CATALOG_ENV",
    "BundleDigestMismatch",
    "BundleError",
    "BundleFiles",
    "BundleManifest",
    "BundleNoSpace",
    "BundleTruncated",
    "Catalog",
    "CatalogError",
    "CatalogImage",
    "CatalogKernel",
    "CorruptBundle",
    "InvalidBundle",
    "Progress",
    "SessionFactory",
    "UnsafeBundle",
    "fetch_bundle",
    "fetch_catalog_entry",
    "load_catalog",
    "parse_catalog",
]
