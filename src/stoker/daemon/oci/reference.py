"""Docker-style image references: `debian`, `user/app:1.2`, `ghcr.io/o/r@sha256:...`.

Normalisation follows the Docker CLI: a first path component is a registry only when it
contains a `.` or a `:` or is `localhost` (or has upper-case letters); otherwise the image
lives on Docker Hub, and a single-component Hub name gets the `library/` prefix. With
neither tag nor digest the tag is `latest`; with both, the digest wins for fetching.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stoker.errors import InvalidArgument

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_DOMAIN = re.compile(
    r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference."""

    domain: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def registry_host(self) -> str:
        """host[:port] that serves the v2 API (Docker Hub's API lives on its own host)."""
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    @property
    def hostname(self) -> str:
        """The domain without its port and IPv6 brackets."""
        d = self.domain
        if d.startswith("["):
            return d[1 : d.index("]")]
        return d.rsplit(":", 1)[0] if ":" in d else d

    @property
    def manifest_ref(self) -> str:
        """What goes after `/manifests/`: the digest when pinned, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to `digest` (keeps the tag for display)."""
        return Reference(self.domain, self.repository, self.tag, digest)

    def __str__(self) -> str:
        s = f"{self.domain}/{self.repository}"
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def _looks_like_domain(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost" or first.lower() != first


def parse_reference(ref: str) -> Reference:
    """Parse and normalise `ref`, or raise InvalidArgument saying what is wrong with it."""
    raw = ref.strip()
    if not raw:
        raise InvalidArgument("empty image reference: give one like debian:bookworm")
    if "://" in raw:
        raise InvalidArgument(
            f"invalid image reference {ref!r}: drop the scheme, e.g. registry.example.com/app:1"
        )
    name, digest = raw, None
    if "@" in raw:
        name, digest = raw.rsplit("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidArgument(
                f"invalid image reference {ref!r}: digest {digest!r} is not ALGORITHM:HEX"
            )
    tag = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidArgument(
                f"invalid image reference {ref!r}: tag {tag!r} must be 1-128 of [A-Za-z0-9_.-]"
                " and not start with . or -"
            )
    first, sep, rest = name.partition("/")
    if sep and _looks_like_domain(first):
        domain, path = first, rest
        if not _DOMAIN.match(domain):
            raise InvalidArgument(f"invalid image reference {ref!r}: bad registry {domain!r}")
    else:
        domain, path = DOCKER_HUB, name
    if domain.lower() in _HUB_ALIASES:
        domain = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    if not path or len(path) > _MAX_NAME:
        raise InvalidArgument(f"invalid image reference {ref!r}: repository name is empty or long")
    for comp in path.split("/"):
        if not _COMPONENT.match(comp):
            raise InvalidArgument(
                f"invalid image reference {ref!r}: {comp!r} must be lower-case letters, digits"
                " and single separators (. _ __ -)"
            )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(domain=domain, repository=path, tag=tag, digest=digest)
