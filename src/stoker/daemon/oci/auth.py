"""Registry credentials the way container tools keep them, and `image login/logout`.

Read, first match wins:

1. Docker's config (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`):
   `credHelpers[REGISTRY]`, then `credsStore` (both run `docker-credential-NAME get` with
   the server URL on stdin), then `auths[REGISTRY]` (`auth` = base64 `user:password`, or
   `identitytoken`, or `registrytoken`).
2. containers' `auth.json` (`$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
   `~/.config/containers/auth.json`): `auths[REGISTRY]`.

`auths` keys are matched after normalisation (`https://host:port/v1/` == `host:port`);
Docker Hub is looked up under `https://index.docker.io/v1/` and its aliases.

Credentials are resolved by the CLI, as the user, with the user's environment (a
credential helper needs the user's keyring or gpg-agent), and only the one credential for
the registry of the reference travels to the daemon, in the request. The daemon never
reads another user's home directory. `store_credential` writes the Docker config format
(0600, in a 0700 directory, atomically by rename; a symlinked config.json is resolved and
its target replaced, never written through).

Standard library only (plus `oci/errors.py`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.daemon.oci.errors import CredentialError
from stoker.errors import InvalidArgument

__all__ = ["Credential", "CredentialError", "erase_credential", "lookup", "store_credential"]

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_NAMES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
HELPER_TIMEOUT = 30.0
_NOT_FOUND_MARKERS = ("credentials not found", "not found in native keychain", "no credentials")


@dataclass(frozen=True)
class Credential:
    """What to authenticate to one registry with, and where it came from (for messages)."""

    registry: str
    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth2 refresh token for the registry's token server
    registry_token: str = ""  # a bearer token to send to the registry as is
    source: str = ""

    def to_wire(self) -> dict[str, str]:
        """The form sent to the daemon in a pull/push request."""
        return {
            "registry": self.registry,
            "username": self.username,
            "password": self.password,
            "identity_token": self.identity_token,
            "registry_token": self.registry_token,
            "source": self.source,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Credential:
        def s(k: str) -> str:
            v = d.get(k, "")
            if not isinstance(v, str):
                raise InvalidArgument(f"credential field {k!r} must be a string")
            return v

        if not s("registry"):
            raise InvalidArgument("a credential must name its registry")
        return cls(
            registry=s("registry"),
            username=s("username"),
            password=s("password"),
            identity_token=s("identity_token"),
            registry_token=s("registry_token"),
            source=s("source") or "the request",
        )

    def __repr__(self) -> str:  # never print secrets
        return (
            f"Credential(registry={self.registry!r}, username={self.username!r}, "
            f"source={self.source!r})"
        )


def normalize_key(key: str) -> str:
    """`https://host:5000/v1/` -> `host:5000`; Docker Hub's names -> `docker.io`."""
    k = key.strip()
    if "://" in k:
        k = k.split("://", 1)[1]
    k = k.split("/", 1)[0].lower()
    return "docker.io" if k in _HUB_NAMES else k


def server_url(registry: str) -> str:
    """What a credential helper is asked for (Docker Hub's historic URL, else the host)."""
    return DOCKER_HUB_KEY if normalize_key(registry) == "docker.io" else normalize_key(registry)


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    e = os.environ if env is None else env
    if e.get("DOCKER_CONFIG"):
        return Path(e["DOCKER_CONFIG"]) / "config.json"
    return Path(e.get("HOME") or Path.home()) / ".docker" / "config.json"


def containers_auth_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    e = os.environ if env is None else env
    out = []
    if e.get("REGISTRY_AUTH_FILE"):
        out.append(Path(e["REGISTRY_AUTH_FILE"]))
    if e.get("XDG_RUNTIME_DIR"):
        out.append(Path(e["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    home = Path(e.get("HOME") or Path.home())
    xdg = Path(e["XDG_CONFIG_HOME"]) if e.get("XDG_CONFIG_HOME") else home / ".config"
    out.append(xdg / "containers" / "auth.json")
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CredentialError(f"cannot read {path}: {e.strerror}") from None
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise CredentialError(
            f"{path} is not valid JSON ({e}): fix or remove it, then `stoker image login`"
        ) from None
    if not isinstance(doc, dict):
        raise CredentialError(f"{path} must hold a JSON object: fix or remove it")
    return doc


def _from_auths(doc: dict[str, Any], registry: str, path: Path) -> Credential | None:
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return None
    want = normalize_key(registry)
    for key, entry in auths.items():
        if normalize_key(str(key)) != want or not isinstance(entry, dict):
            continue
        src = f"{path} auths[{key!r}]"
        ident = entry.get("identitytoken") or ""
        regtok = entry.get("registrytoken") or ""
        user, pw = str(entry.get("username") or ""), str(entry.get("password") or "")
        blob = entry.get("auth")
        if isinstance(blob, str) and blob:
            try:
                user, sep, pw = base64.b64decode(blob, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                sep = ""
            if not sep:
                raise CredentialError(
                    f"{src}: 'auth' is not base64 of USER:PASSWORD: run "
                    f"`stoker image login {want}` to rewrite it"
                )
        if not (user or pw or ident or regtok):
            continue
        return Credential(
            want, user, pw, identity_token=str(ident), registry_token=str(regtok), source=src
        )
    return None


def run_helper(
    name: str, action: str, payload: str, config: Path, env: Mapping[str, str] | None = None
) -> str:
    """Run `docker-credential-NAME ACTION` with `payload` on stdin; its stdout."""
    exe = f"docker-credential-{name}"
    try:
        proc = subprocess.run(
            [exe, action],
            input=payload.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
            env=None if env is None else dict(env),
        )
    except FileNotFoundError:
        raise CredentialError(
            f"credential helper {exe} (named in {config}) is not installed: install it, or "
            f"remove it from {config} and run `stoker image login`"
        ) from None
    except subprocess.TimeoutExpired:
        raise CredentialError(
            f"credential helper {exe} did not answer within {HELPER_TIMEOUT:.0f}s: is its "
            "keyring locked? unlock it and retry"
        ) from None
    except OSError as e:
        raise CredentialError(f"cannot run credential helper {exe}: {e.strerror}") from None
    if proc.returncode != 0:
        text = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        if action == "get" and any(m in text.lower() for m in _NOT_FOUND_MARKERS):
            return ""
        raise CredentialError(
            f"credential helper {exe} {action} failed (exit {proc.returncode}): "
            f"{text[:300] or 'no message'}: fix the helper or its entry in {config}"
        )
    return proc.stdout.decode(errors="replace")


def _from_helper(
    name: str, registry: str, config: Path, env: Mapping[str, str] | None
) -> Credential | None:
    exe = f"docker-credential-{name}"
    out = run_helper(name, "get", server_url(registry), config, env)
    if not out.strip():
        return None
    try:
        doc = json.loads(out)
        user, secret = doc["Username"], doc["Secret"]
        if not isinstance(user, str) or not isinstance(secret, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CredentialError(
            f"credential helper {exe} printed something that is not a credential (expected "
            f'JSON {{"Username": ..., "Secret": ...}}, got {out.strip()[:80]!r}): fix the '
            f"helper or its entry in {config}"
        ) from None
    src = f"credential helper {exe}"
    if user == "<token>":
        return Credential(normalize_key(registry), identity_token=secret, source=src)
    return Credential(normalize_key(registry), user, secret, source=src)


def _helper_for(doc: dict[str, Any], registry: str) -> str | None:
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        want = normalize_key(registry)
        for key, name in helpers.items():
            if normalize_key(str(key)) == want and isinstance(name, str) and name:
                return name
    store = doc.get("credsStore")
    return store if isinstance(store, str) and store else None


def lookup(registry: str, env: Mapping[str, str] | None = None) -> Credential | None:
    """The credential for `registry` (host[:port]), or None to go anonymous."""
    cfg = docker_config_path(env)
    doc = _read_json(cfg)
    if doc is not None:
        helper = _helper_for(doc, registry)
        if helper is not None:
            cred = _from_helper(helper, registry, cfg, env)
            if cred is not None:
                return cred
        cred = _from_auths(doc, registry, cfg)
        if cred is not None:
            return cred
    for path in containers_auth_paths(env):
        d = _read_json(path)
        if d is not None:
            cred = _from_auths(d, registry, path)
            if cred is not None:
                return cred
    return None


# --- writing (login / logout) -------------------------------------------------------------


def _atomic_write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Replace `path` (or the file a symlink at `path` points to) with `doc`, mode 0600."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=target.parent)  # O_EXCL, 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent="\t")
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def _auths_key(doc: dict[str, Any], registry: str) -> str:
    """The existing key for `registry` in `auths`, or the one Docker would write."""
    want = normalize_key(registry)
    auths = doc.get("auths")
    if isinstance(auths, dict):
        for key in auths:
            if normalize_key(str(key)) == want:
                return str(key)
    return server_url(registry)


def store_credential(
    registry: str, username: str, password: str, env: Mapping[str, str] | None = None
) -> str:
    """Save a login where Docker would (a helper if configured, else `auths`); says where."""
    cfg = docker_config_path(env)
    doc = _read_json(cfg) or {}
    helper = _helper_for(doc, registry)
    if helper is not None:
        payload = json.dumps(
            {"ServerURL": server_url(registry), "Username": username, "Secret": password}
        )
        run_helper(helper, "store", payload, cfg, env)
        return f"credential helper docker-credential-{helper}"
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        auths = {}
        doc["auths"] = auths
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    auths[_auths_key(doc, registry)] = {"auth": token}
    return str(_atomic_write_json(cfg, doc))


def erase_credential(registry: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Forget `registry` everywhere stoker wrote or reads it; the places it was removed from."""
    removed: list[str] = []
    cfg = docker_config_path(env)
    doc = _read_json(cfg)
    if doc is not None:
        helper = _helper_for(doc, registry)
        if helper is not None:
            try:
                run_helper(helper, "erase", server_url(registry), cfg, env)
                removed.append(f"credential helper docker-credential-{helper}")
            except CredentialError as e:
                if not any(m in e.message.lower() for m in _NOT_FOUND_MARKERS):
                    raise
        auths = doc.get("auths")
        if isinstance(auths, dict):
            want = normalize_key(registry)
            keys = [k for k in auths if normalize_key(str(k)) == want]
            for k in keys:
                del auths[k]
            if keys:
                removed.append(str(_atomic_write_json(cfg, doc)))
    return removed
