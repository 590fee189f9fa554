"""The catalog: named image and kernel bundles, and the verified bundle download.

A leaf: it imports only `stoker.errors`, `stoker.model`, the standard library and its
own dependencies (aiohttp, zstandard), never a service. `ImageService` drives it:

    catalog = load_catalog()                  # embedded, or $STOKER_CATALOG
    entry = catalog.find_image(ref)           # None -> not a catalog name: OCI pull
    files = await fetch_catalog_entry(entry, staging_dir / "x", progress=progress)
    ...register files.rootfs / files.work_seed, then publish by rename...
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
