"""Errors of the catalog and of bundle downloads; all are `StokerError`s.

Each message names the catalog entry or bundle URL and the cause, and says what to do
next. Codes are stable: they cross RPC unchanged.
"""

from __future__ import annotations

from stoker.errors import StokerError, Unavailable


class CatalogError(StokerError):
    """The catalog file is missing, not JSON, or an entry in it is malformed."""

    code = "catalog_invalid"


class BundleError(StokerError):
    """Base of the failures that only a catalog bundle download can produce."""

    code = "bundle_error"


class BundleDigestMismatch(BundleError):
    """The downloaded bytes do not hash to (or are longer than) what the catalog says."""

    code = "bundle_digest_mismatch"


class BundleTruncated(BundleError):
    """The download ended before the size the catalog (or the server) promised."""

    code = "bundle_truncated"


class CorruptBundle(BundleError):
    """The bundle is not a readable zstd-compressed tar."""

    code = "bundle_corrupt"


class InvalidBundle(BundleError):
    """The bundle is readable but does not hold exactly the expected, valid files."""

    code = "bundle_invalid"


class UnsafeBundle(BundleError):
    """An entry would write outside the bundle or create something not allowed."""

    code = "bundle_unsafe"


class BundleNoSpace(Unavailable):
    """The disk holding the destination ran out of space (ENOSPC) while unpacking."""
