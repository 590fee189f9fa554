"""Errors specific to OCI pulls; all are `StokerError`s so they cross RPC as messages.

Each message names the image reference and the cause, and says what to do next.
"""

from __future__ import annotations

from stoker.errors import StokerError, Unavailable


class OCIError(StokerError):
    """Base of the failures that only an OCI pull can produce."""

    code = "oci_error"


class DigestMismatch(OCIError):
    """A blob or manifest's content does not hash to the digest that names it."""

    code = "oci_digest_mismatch"


class TruncatedBlob(OCIError):
    """A download ended before the size the manifest promised."""

    code = "oci_truncated"


class UnsafeLayer(OCIError):
    """A layer entry would write outside the root or create something not allowed."""

    code = "oci_unsafe_layer"


class UnsupportedImage(OCIError):
    """The image uses a format, platform or media type stoker cannot turn into a rootfs."""

    code = "oci_unsupported"


class LayerTooLarge(UnsupportedImage):
    """A layer decompresses to more than the configured `max_layer_size`."""

    code = "oci_layer_too_large"


class NoSpace(Unavailable):
    """The disk holding the cache, the staging tree or the ext4 ran out of space (ENOSPC)."""


class CredentialError(OCIError):
    """A credential source is broken (helper missing, failing or talking nonsense)."""

    code = "credential_error"
