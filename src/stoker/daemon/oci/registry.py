"""An async registry v2 client: manifests and blobs, anonymous, Basic or bearer-token auth.

Auth follows the distribution token spec: a request answered with `401` and
`WWW-Authenticate: Bearer realm=...,service=...,scope=...` is retried once with a token
from the realm, fetched anonymously or with the user's `Credential` (Basic auth on a GET,
or an OAuth2 `refresh_token` POST for an identity token). A `Basic` challenge is answered
with the credential's user and password. Without a credential a `401` says which
`stoker image login` to run; with one, that the registry rejected it.

Redirects are followed by hand so no Authorization header (token or Basic) ever travels
to another host than the registry that asked for it (blob CDNs reject, or worse log,
foreign Authorization headers). Credentials go to a token realm on another host only over
HTTPS (or when the realm is on the registry's own host).

`open_client` picks the endpoint: a configured mirror that has the manifest, else the
registry itself; HTTPS with verified TLS, except for loopback (plain HTTP) and hosts in
`insecure_registries` (HTTPS without verification, falling back to plain HTTP).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp

from stoker.daemon.oci.auth import Credential, normalize_key
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


def _basic_header(cred: Credential) -> str:
    raw = f"{cred.username}:{cred.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def is_insecure(host: str, insecure_registries: set[str] | None) -> bool:
    """Whether `host` (host[:port]) is listed in `insecure_registries` (host or host:port)."""
    insecure = insecure_registries or set()
    hostname = host[1 : host.index("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
    return host in insecure or hostname in insecure


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
        credential: Credential | None = None,
        verify_tls: bool = True,
        actions: str = "pull",
        host: str | None = None,
        verb: str = "pulling",
    ) -> None:
        self.session = session
        self.ref = ref
        self.display = display or str(ref)
        self.host = host or ref.registry_host
        self.base = f"{scheme}://{self.host}"
        self.credential = credential
        self.verify_tls = verify_tls
        self.actions = actions
        self.verb = verb
        self._token: str | None = None
        self._basic: str | None = None
        self._token_lock = asyncio.Lock()
        self._manifests: dict[str, FetchedManifest] = {}

    @property
    def _login_hint(self) -> str:
        return f"`stoker image login {self.host}`"

    def _auth_header(self) -> str | None:
        if self._token is not None:
            return f"Bearer {self._token}"
        return self._basic

    def _ssl(self) -> bool:
        return self.verify_tls

    def _url(self, kind: str, what: str) -> str:
        return f"{self.base}/v2/{self.ref.repository}/{kind}/{what}"

    def _transport_error(self, e: BaseException, action: str) -> StokerError:
        host = self.host
        if isinstance(e, TimeoutError):
            return Timeout(
                f"{self.verb} {self.display}: registry {host} did not answer in time while "
                f"{action}: check the network or retry"
            )
        hint = ""
        if isinstance(e, aiohttp.ClientSSLError | aiohttp.ClientConnectorCertificateError):
            hint = (
                f" (TLS failed: if {host} speaks plain HTTP or has a self-signed certificate, "
                f'add "{host}" to insecure_registries in the daemon\'s config.toml)'
            )
        return Unavailable(
            f"{self.verb} {self.display}: cannot reach registry {host} while {action}: "
            f"{e or type(e).__name__}{hint}"
        )

    def _realm_may_get_credentials(self, realm: str) -> bool:
        parts = urlsplit(realm)
        if parts.scheme == "https":
            return True
        registry_hostname = urlsplit(self.base).hostname
        return parts.hostname == registry_hostname or parts.hostname in LOCAL_HOSTS

    async def _fetch_token(self, params: dict[str, str]) -> None:
        realm = params.get("realm")
        if not realm:
            raise PermissionDenied(
                f"{self.verb} {self.display}: registry {self.host} sent a Bearer "
                "challenge without a realm: stoker cannot get a token from it"
            )
        scope = f"repository:{self.ref.repository}:{self.actions}"
        if self.actions == "pull" and params.get("scope"):
            scope = params["scope"]
        query = {"service": params.get("service", "")} if params.get("service") else {}
        query["scope"] = scope
        cred = self.credential
        realm_host = urlsplit(realm).netloc
        if cred is not None and not self._realm_may_get_credentials(realm):
            raise PermissionDenied(
                f"{self.verb} {self.display}: registry {self.host} sends clients to the token "
                f"server {realm} over plain HTTP on another host; stoker does not send "
                "credentials there: fix the registry's token realm"
            )
        try:
            timeout = aiohttp.ClientTimeout(total=TOKEN_TIMEOUT)
            if cred is not None and cred.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": cred.identity_token,
                    "client_id": "stoker",
                    **query,
                }
                req = self.session.post(
                    realm, data=form, timeout=timeout, ssl=self._ssl(), allow_redirects=False
                )
            else:
                url = realm + ("&" if "?" in realm else "?") + urlencode(query)
                headers = {}
                if cred is not None and (cred.username or cred.password):
                    basic = _basic_header(cred)
                    headers["Authorization"] = basic
                req = self.session.get(
                    url, headers=headers, timeout=timeout, ssl=self._ssl(), allow_redirects=False
                )
            async with req as resp:
                body = await resp.content.read(MAX_MANIFEST_BYTES)
                if resp.status in (401, 403):
                    if cred is not None:
                        raise PermissionDenied(
                            f"{self.verb} {self.display}: the token server {realm_host} of "
                            f"registry {self.host} rejected the credentials from "
                            f"{cred.source} (HTTP {resp.status}): run {self._login_hint} "
                            "with a valid user and password"
                        )
                    raise PermissionDenied(
                        f"{self.verb} {self.display}: the token server {realm_host} "
                        f"refused an anonymous token (HTTP {resp.status}): the image is "
                        f"private or does not exist; if it is private, run {self._login_hint}"
                    )
                if resp.status != 200:
                    raise Unavailable(
                        f"{self.verb} {self.display}: token server {realm_host} "
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
                f"{self.verb} {self.display}: token server {realm_host} returned no token"
            )
        self._token = token

    async def _authenticate(self, challenge: str, stale: str | None) -> None:
        scheme, params = parse_challenge(challenge)
        cred = self.credential
        if scheme == "basic" and cred is not None and (cred.username or cred.password):
            self._basic = _basic_header(cred)
            return
        if scheme != "bearer":
            what = f"a {scheme.capitalize()} challenge" if scheme else "no challenge"
            if cred is not None and cred.registry_token:
                self._token = cred.registry_token
                return
            raise PermissionDenied(
                f"{self.verb} {self.display}: registry {self.host} requires "
                f"credentials (HTTP 401 with {what}) and stoker has none for it: run "
                f"{self._login_hint} (or add it to ~/.docker/config.json)"
            )
        async with self._token_lock:
            # Another request may have refreshed the token while this one waited.
            if self._token is not None and self._token != stale:
                return
            if cred is not None and cred.registry_token and stale != cred.registry_token:
                self._token = cred.registry_token
                return
            await self._fetch_token(params)

    def _refused(self) -> PermissionDenied:
        if self.credential is not None:
            return PermissionDenied(
                f"{self.verb} {self.display}: registry {self.host} rejected the "
                f"credentials from {self.credential.source} (HTTP 401): run "
                f"{self._login_hint} with a valid user and password"
            )
        return PermissionDenied(
            f"{self.verb} {self.display}: registry {self.host} refused the "
            "anonymous token (HTTP 401): the image is private or does not exist; if it is "
            f"private, run {self._login_hint}"
        )

    async def _get(
        self, url: str, headers: dict[str, str], timeout: aiohttp.ClientTimeout, action: str
    ) -> aiohttp.ClientResponse:
        """GET with auth retry and manual redirects; the caller must release the response."""
        return await self.request("GET", url, headers, timeout, action)

    async def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
        action: str,
        data: Any = None,
    ) -> aiohttp.ClientResponse:
        """Any request with auth retry (GET/HEAD also follow redirects by hand).

        `data` must be re-sendable (bytes) since a 401 replays the request once. The
        caller must release the response.
        """
        authed_once = False
        while True:
            sent, sent_token = self._auth_header(), self._token
            if method in ("GET", "HEAD"):
                resp = await self._get_following(url, headers, timeout, action, method)
            else:
                resp = await self._send(method, url, headers, timeout, action, data)
            if resp.status != 401:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.release()
            if authed_once:
                raise self._refused()
            authed_once = True
            if sent is not None and sent == self._basic:
                raise self._refused()
            await self._authenticate(challenge, sent_token)

    async def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
        action: str,
        data: Any,
    ) -> aiohttp.ClientResponse:
        h = dict(headers)
        auth = self._auth_header()
        if auth is not None and urlsplit(url).netloc == urlsplit(self.base).netloc:
            h["Authorization"] = auth
        try:
            return await self.session.request(
                method,
                url,
                headers=h,
                data=data,
                timeout=timeout,
                allow_redirects=False,
                ssl=self._ssl(),
            )
        except aiohttp.ClientError as e:
            raise self._transport_error(e, action) from None
        except TimeoutError as e:
            raise self._transport_error(e, action) from None

    async def _get_following(
        self,
        url: str,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
        action: str,
        method: str = "GET",
    ) -> aiohttp.ClientResponse:
        origin = urlsplit(self.base).netloc
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            auth = self._auth_header()
            if auth is not None and urlsplit(url).netloc == origin:
                h["Authorization"] = auth
            try:
                resp = await self.session.request(
                    method,
                    url,
                    headers=h,
                    timeout=timeout,
                    allow_redirects=False,
                    auto_decompress=False,
                    read_bufsize=BLOB_CHUNK,
                    ssl=self._ssl(),
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
        raise Unavailable(f"{self.verb} {self.display}: too many redirects while {action}")

    async def ping(self) -> None:
        """`GET /v2/` with auth: proves the endpoint speaks the API and accepts us."""
        action = "checking the registry API"
        resp = await self._get(
            f"{self.base}/v2/", {}, aiohttp.ClientTimeout(total=MANIFEST_TIMEOUT), action
        )
        try:
            if resp.status != 200:
                raise await self._status_error(resp, action)
        finally:
            resp.release()

    async def _status_error(self, resp: aiohttp.ClientResponse, action: str) -> StokerError:
        try:
            body = await resp.content.read(64 << 10)
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        summary = _error_summary(body)
        if resp.status == 403:
            return PermissionDenied(
                f"{self.verb} {self.display}: registry {self.host} denied access "
                f"while {action} (HTTP 403: {summary})"
            )
        if resp.status == 429:
            return Unavailable(
                f"{self.verb} {self.display}: registry {self.host} is rate-limiting "
                "pulls (HTTP 429): wait a while and retry"
            )
        return Unavailable(
            f"{self.verb} {self.display}: registry {self.host} answered HTTP "
            f"{resp.status} while {action}: {summary or 'no detail'}"
        )

    async def _not_found(self, reference: str, body: bytes) -> NotFound:
        """Tell 'no such repository' from 'no such tag', which the manifest 404 conflates."""
        repo, host = self.ref.repository, self.host
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
        cached = self._manifests.get(reference)
        if cached is not None:
            return cached
        fetched = await self._get_manifest(reference)
        self._manifests[reference] = fetched
        return fetched

    async def _get_manifest(self, reference: str) -> FetchedManifest:
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
                    f"{self.verb} {self.display}: manifest {reference} is larger than "
                    f"{MAX_MANIFEST_BYTES} bytes: refusing it"
                )
            try:
                body = await resp.content.read(MAX_MANIFEST_BYTES + 1)
            except aiohttp.ClientError as e:
                raise self._transport_error(e, action) from None
            if len(body) > MAX_MANIFEST_BYTES:
                raise Unavailable(
                    f"{self.verb} {self.display}: manifest {reference} is larger than "
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
                    f"{self.verb} {self.display}: unsupported digest algorithm {algo!r}"
                )
            got = f"{algo}:" + hashlib.new(algo, body).hexdigest()
            if got != reference:
                raise DigestMismatch(
                    f"{self.verb} {self.display}: manifest content hashes to {got}, not "
                    f"{reference}: the registry or something in between corrupted it; retry "
                    "or report it"
                )
            digest = got
        elif served and served.startswith("sha256:") and served != digest:
            raise DigestMismatch(
                f"{self.verb} {self.display}: manifest for {reference} hashes to {digest} but the "
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
                    f"{self.ref.repository} on {self.host}: the image is broken "
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


async def open_client(
    session: aiohttp.ClientSession,
    ref: Reference,
    *,
    display: str,
    insecure_registries: set[str] | None = None,
    credential: Credential | None = None,
    mirrors: list[str] | None = None,
    actions: str = "pull",
    verb: str = "pulling",
) -> RegistryClient:
    """A client for `ref`: the first mirror that serves its manifest, else the registry.

    `credential` is used only for the registry it names (never sent to a mirror).
    Loopback hosts are spoken to over plain HTTP; hosts in `insecure_registries` over
    HTTPS without certificate checks, or plain HTTP when TLS does not answer.
    """

    async def client_for(host: str) -> RegistryClient:
        cred = credential
        if cred is not None and (
            host != ref.registry_host or normalize_key(cred.registry) != normalize_key(ref.domain)
        ):
            cred = None  # a mirror never sees the registry's credential
        hostname = host[1 : host.index("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if hostname in LOCAL_HOSTS:
            scheme, verify = "http", True
        elif is_insecure(host, insecure_registries) or is_insecure(
            ref.domain if host == ref.registry_host else host, insecure_registries
        ):
            scheme, verify = "https", False
            probe = RegistryClient(
                session, ref, scheme="https", display=display, verify_tls=False, host=host
            )
            try:
                async with session.get(
                    f"{probe.base}/v2/",
                    timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT),
                    ssl=False,
                    allow_redirects=False,
                ) as resp:
                    resp.release()
            except (aiohttp.ClientError, TimeoutError):
                scheme = "http"
        else:
            scheme, verify = "https", True
        return RegistryClient(
            session,
            ref,
            scheme=scheme,
            display=display,
            credential=cred,
            verify_tls=verify,
            actions=actions,
            host=host,
            verb=verb,
        )

    for mirror in mirrors or []:
        client = await client_for(normalize_key(mirror))
        try:
            await client.get_manifest(ref.manifest_ref)
        except StokerError:
            continue  # the mirror lacks it or is down: try the next, then the registry
        return client
    return await client_for(ref.registry_host)
