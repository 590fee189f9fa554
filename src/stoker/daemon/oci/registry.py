"""An async registry v2 client: manifests and blobs, anonymous or bearer-token auth.

Auth follows the distribution token spec: a request answered with `401` and
`WWW-Authenticate: Bearer realm=...,service=...,scope=...` is retried once with a token
fetched anonymously from the realm. A `401` with any other challenge (Basic, none) means
the registry wants credentials stoker does not have, and is reported as such.

Redirects are followed by hand so the bearer token never travels to another host (blob
CDNs reject, or worse log, foreign Authorization headers).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from stoker.daemon.oci.errors import DigestMismatch, UnsupportedImage
from stoker.daemon.oci.manifest import ACCEPT, MAX_MANIFEST_BYTES
from stoker.daemon.oci.reference import Reference
from stoker.errors import NotFound, PermissionDenied, StokerError, Timeout, Unavailable

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
MANIFEST_TIMEOUT = 60.0
TOKEN_TIMEOUT = 60.0
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0
MAX_REDIRECTS = 5
BLOB_CHUNK = 1 << 20

_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def registry_scheme(ref: Reference, insecure_registries: set[str] | None = None) -> str:
    """`http` for loopback registries and those the user marked insecure, else `https`."""
    insecure = insecure_registries or set()
    if ref.hostname in LOCAL_HOSTS or ref.domain in insecure or ref.hostname in insecure:
        return "http"
    return "https"


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split `Bearer realm="x",service="y"` into ("bearer", {"realm": "x", ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3) or "")
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest body as served, with the digest computed over exactly those bytes."""

    media_type: str
    digest: str
    body: bytes


def _error_summary(body: bytes) -> str:
    try:
        doc = json.loads(body)
        errs = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errs, list) and errs:
            return "; ".join(
                f"{e.get('code', '?')}: {e.get('message', '')}".strip()
                for e in errs
                if isinstance(e, dict)
            )
    except ValueError:
        pass
    return body[:200].decode(errors="replace").strip()


def _error_codes(body: bytes) -> set[str]:
    try:
        doc = json.loads(body)
        errs = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errs, list):
            return {str(e.get("code")) for e in errs if isinstance(e, dict)}
    except ValueError:
        pass
    return set()


class RegistryClient:
    """Talks to one repository on one registry on behalf of one pull.

    `display` is the reference as the user typed it; every error message names it.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        ref: Reference,
        *,
        scheme: str = "https",
        display: str | None = None,
    ) -> None:
        self.session = session
        self.ref = ref
        self.display = display or str(ref)
        self.base = f"{scheme}://{ref.registry_host}"
        self._token: str | None = None
        self._token_lock = asyncio.Lock()

    def _url(self, kind: str, what: str) -> str:
        return f"{self.base}/v2/{self.ref.repository}/{kind}/{what}"

    def _transport_error(self, e: BaseException, action: str) -> StokerError:
        host = self.ref.registry_host
        if isinstance(e, TimeoutError):
            return Timeout(
                f"pulling {self.display}: registry {host} did not answer in time while "
                f"{action}: check the network or retry"
            )
        hint = ""
        if isinstance(e, aiohttp.ClientSSLError | aiohttp.ClientConnectorCertificateError):
            hint = " (TLS failed: if this registry speaks plain HTTP, list it as insecure)"
        return Unavailable(
            f"pulling {self.display}: cannot reach registry {host} while {action}: "
            f"{e or type(e).__name__}{hint}"
        )

    async def _fetch_token(self, params: dict[str, str]) -> None:
        realm = params.get("realm")
        if not realm:
            raise PermissionDenied(
                f"pulling {self.display}: registry {self.ref.registry_host} sent a Bearer "
                "challenge without a realm: it cannot be used anonymously"
            )
        query = {"service": params.get("service", "")} if params.get("service") else {}
        query["scope"] = params.get("scope") or f"repository:{self.ref.repository}:pull"
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=TOKEN_TIMEOUT)
            ) as resp:
                body = await resp.content.read(MAX_MANIFEST_BYTES)
                if resp.status in (401, 403):
                    raise PermissionDenied(
                        f"pulling {self.display}: the token server {urlsplit(realm).netloc} "
                        f"refused an anonymous token (HTTP {resp.status}): the image is "
                        "private or does not exist"
                    )
                if resp.status != 200:
                    raise Unavailable(
                        f"pulling {self.display}: token server {urlsplit(realm).netloc} "
                        f"answered HTTP {resp.status}: {_error_summary(body)}"
                    )
        except aiohttp.ClientError as e:
            raise self._transport_error(e, "fetching a registry token") from None
        except TimeoutError as e:
            raise self._transport_error(e, "fetching a registry token") from None
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise Unavailable(
                f"pulling {self.display}: token server {urlsplit(realm).netloc} returned no token"
            )
        self._token = token

    async def _authenticate(self, challenge: str, stale: str | None) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme != "bearer":
            what = f"a {scheme.capitalize()} challenge" if scheme else "no challenge"
            raise PermissionDenied(
                f"pulling {self.display}: registry {self.ref.registry_host} requires "
                f"credentials (HTTP 401 with {what}); stoker pulls anonymously and supports "
                "only bearer-token registries: make the image public or use another registry"
            )
        async with self._token_lock:
            # Another request may have refreshed the token while this one waited.
            if self._token is not None and self._token != stale:
                return
            await self._fetch_token(params)

    async def _get(
        self, url: str, headers: dict[str, str], timeout: aiohttp.ClientTimeout, action: str
    ) -> aiohttp.ClientResponse:
        """GET with auth retry and manual redirects; the caller must release the response."""
        authed_once = False
        while True:
            sent_token = self._token
            resp = await self._get_following(url, headers, timeout, action)
            if resp.status != 401:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.release()
            if authed_once:
                raise PermissionDenied(
                    f"pulling {self.display}: registry {self.ref.registry_host} refused the "
                    "anonymous token (HTTP 401): the image is private or does not exist"
                )
            authed_once = True
            await self._authenticate(challenge, sent_token)

    async def _get_following(
        self, url: str, headers: dict[str, str], timeout: aiohttp.ClientTimeout, action: str
    ) -> aiohttp.ClientResponse:
        origin = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if self._token is not None and urlsplit(url).netloc == origin:
                h["Authorization"] = f"Bearer {self._token}"
            try:
                resp = await self.session.get(
                    url,
                    headers=h,
                    timeout=timeout,
                    allow_redirects=False,
                    auto_decompress=False,
                    read_bufsize=BLOB_CHUNK,
                )
            except aiohttp.ClientError as e:
                raise self._transport_error(e, action) from None
            except TimeoutError as e:
                raise self._transport_error(e, action) from None
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                resp.release()
                continue
            return resp
        raise Unavailable(f"pulling {self.display}: too many redirects while {action}")

    async def _status_error(self, resp: aiohttp.ClientResponse, action: str) -> StokerError:
        try:
            body = await resp.content.read(64 << 10)
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        summary = _error_summary(body)
        if resp.status == 403:
            return PermissionDenied(
                f"pulling {self.display}: registry {self.ref.registry_host} denied access "
                f"while {action} (HTTP 403: {summary})"
            )
        if resp.status == 429:
            return Unavailable(
                f"pulling {self.display}: registry {self.ref.registry_host} is rate-limiting "
                "pulls (HTTP 429): wait a while and retry"
            )
        return Unavailable(
            f"pulling {self.display}: registry {self.ref.registry_host} answered HTTP "
            f"{resp.status} while {action}: {summary or 'no detail'}"
        )

    async def _not_found(self, reference: str, body: bytes) -> NotFound:
        """Tell 'no such repository' from 'no such tag', which the manifest 404 conflates."""
        repo, host = self.ref.repository, self.ref.registry_host
        codes = _error_codes(body)
        repo_missing = "NAME_UNKNOWN" in codes
        tags: list[str] | None = None
        if not repo_missing:
            try:
                resp = await self._get(
                    self._url("tags", "list"),
                    {"Accept": "application/json"},
                    aiohttp.ClientTimeout(total=MANIFEST_TIMEOUT),
                    "listing tags",
                )
                try:
                    tbody = await resp.content.read(MAX_MANIFEST_BYTES)
                    if resp.status == 404:
                        repo_missing = True
                    elif resp.status == 200:
                        raw = json.loads(tbody).get("tags") or []
                        tags = [str(t) for t in raw]
                        repo_missing = not tags
                finally:
                    resp.release()
            except (StokerError, ValueError, AttributeError, aiohttp.ClientError, TimeoutError):
                tags = None
        if repo_missing:
            return NotFound(
                f"image {self.display} not found: repository {repo} does not exist on "
                f"{host}: check the name"
            )
        hint = ""
        if tags:
            shown = ", ".join(sorted(tags)[:10]) + (", ..." if len(tags) > 10 else "")
            hint = f" (available tags: {shown})"
        return NotFound(
            f"image {self.display} not found: manifest {reference} is unknown in {repo} on "
            f"{host}{hint}: check the tag or digest"
        )

    async def get_manifest(self, reference: str) -> FetchedManifest:
        """Fetch a manifest or index by tag or digest, verifying a digest reference."""
        action = f"fetching manifest {reference}"
        resp = await self._get(
            self._url("manifests", reference),
            {"Accept": ACCEPT},
            aiohttp.ClientTimeout(total=MANIFEST_TIMEOUT),
            action,
        )
        try:
            if resp.status == 404:
                body = await resp.content.read(64 << 10)
                raise await self._not_found(reference, body)
            if resp.status != 200:
                raise await self._status_error(resp, action)
            if (resp.content_length or 0) > MAX_MANIFEST_BYTES:
                raise Unavailable(
                    f"pulling {self.display}: manifest {reference} is larger than "
                    f"{MAX_MANIFEST_BYTES} bytes: refusing it"
                )
            try:
                body = await resp.content.read(MAX_MANIFEST_BYTES + 1)
            except aiohttp.ClientError as e:
                raise self._transport_error(e, action) from None
            if len(body) > MAX_MANIFEST_BYTES:
                raise Unavailable(
                    f"pulling {self.display}: manifest {reference} is larger than "
                    f"{MAX_MANIFEST_BYTES} bytes: refusing it"
                )
            media_type = resp.headers.get("Content-Type", "")
            served = resp.headers.get("Docker-Content-Digest")
        finally:
            resp.release()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ":" in reference:
            # Tags cannot contain ':', so this is a digest reference: the body must match it.
            algo = reference.split(":", 1)[0]
            if algo not in ("sha256", "sha512"):
                raise UnsupportedImage(
                    f"pulling {self.display}: unsupported digest algorithm {algo!r}"
                )
            got = f"{algo}:" + hashlib.new(algo, body).hexdigest()
            if got != reference:
                raise DigestMismatch(
                    f"pulling {self.display}: manifest content hashes to {got}, not {reference}: "
                    "the registry or something in between corrupted it; retry or report it"
                )
            digest = got
        elif served and served.startswith("sha256:") and served != digest:
            raise DigestMismatch(
                f"pulling {self.display}: manifest for {reference} hashes to {digest} but the "
                f"registry says {served}: the response was corrupted; retry"
            )
        return FetchedManifest(media_type=media_type, digest=digest, body=body)

    @asynccontextmanager
    async def blob(self, digest: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a blob's bytes; the caller verifies size and digest."""
        action = f"downloading blob {digest}"
        resp = await self._get(
            self._url("blobs", digest),
            {},
            aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT),
            action,
        )
        try:
            if resp.status == 404:
                raise NotFound(
                    f"image {self.display}: blob {digest} is missing from "
                    f"{self.ref.repository} on {self.ref.registry_host}: the image is broken "
                    "on the registry; re-push it"
                )
            if resp.status != 200:
                raise await self._status_error(resp, action)
            yield self._chunks(resp, action)
        finally:
            resp.release()

    async def _chunks(self, resp: aiohttp.ClientResponse, action: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.content.iter_chunked(BLOB_CHUNK):
                yield chunk
        except aiohttp.ClientPayloadError as e:
            raise TruncatedTransfer(str(e) or "the connection closed early") from None
        except aiohttp.ClientError as e:
            raise self._transport_error(e, action) from None
        except TimeoutError as e:
            raise self._transport_error(e, action) from None


class TruncatedTransfer(Exception):
    """The HTTP body ended early; the cache turns this into a `TruncatedBlob` with context."""
