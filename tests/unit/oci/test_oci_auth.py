"""Credential lookup and login files (oci/auth.py): Docker's config.json (auths, identity
tokens, credHelpers, credsStore), containers' auth.json, and the bad inputs of helpers."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from stoker.daemon.oci.auth import (
    CredentialError,
    erase_credential,
    lookup,
    normalize_key,
    store_credential,
)

pytestmark = pytest.mark.unit


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        "HOME": str(home),
        "PATH": f"{tmp_path / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        **extra,
    }


def _docker_config(env: dict[str, str], doc: dict[str, object]) -> Path:
    p = Path(env["HOME"]) / ".docker" / "config.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc))
    return p


def _helper(tmp_path: Path, name: str, script: str) -> None:
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    h = b / f"docker-credential-{name}"
    h.write_text("#!/bin/sh\n" + script)
    h.chmod(0o755)


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_normalize_key() -> None:
    assert normalize_key("https://index.docker.io/v1/") == "docker.io"
    assert normalize_key("registry-1.docker.io") == "docker.io"
    assert normalize_key("http://Reg.Lan:5000/v2/") == "reg.lan:5000"


def test_auths_basic_and_identity_token(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _docker_config(
        env,
        {
            "auths": {
                "https://reg.lan:5000/v1/": {"auth": _b64("alice:s3cr:et")},
                "other.lan": {"identitytoken": "refresh-me"},
                "https://index.docker.io/v1/": {"auth": _b64("hub:pw")},
            }
        },
    )
    c = lookup("reg.lan:5000", env)
    assert c is not None and (c.username, c.password) == ("alice", "s3cr:et")
    assert "config.json" in c.source and "s3cr" not in repr(c)
    t = lookup("other.lan", env)
    assert t is not None and t.identity_token == "refresh-me" and not t.password
    hub = lookup("docker.io", env)
    assert hub is not None and hub.username == "hub"
    assert lookup("nowhere.lan", env) is None


def test_bad_auth_blob_names_the_file_and_the_fix(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _docker_config(env, {"auths": {"reg.lan": {"auth": "!!notbase64"}}})
    with pytest.raises(CredentialError, match=r"config.json.*stoker image login reg.lan"):
        lookup("reg.lan", env)


def test_containers_auth_json(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "containers").mkdir(parents=True)
    (run / "containers" / "auth.json").write_text(
        json.dumps({"auths": {"quay.lan": {"auth": _b64("bob:pw")}}})
    )
    env = _env(tmp_path, XDG_RUNTIME_DIR=str(run))
    c = lookup("quay.lan", env)
    assert c is not None and c.username == "bob" and "auth.json" in c.source
    # ~/.config/containers/auth.json too
    cfg = Path(env["HOME"]) / ".config" / "containers"
    cfg.mkdir(parents=True)
    (cfg / "auth.json").write_text(json.dumps({"auths": {"x.lan": {"auth": _b64("x:y")}}}))
    assert lookup("x.lan", env) is not None


def test_cred_helper_and_store(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _helper(
        tmp_path,
        "good",
        'read url; echo "{\\"ServerURL\\": \\"$url\\", \\"Username\\": \\"u-$url\\", '
        '\\"Secret\\": \\"pw\\"}"\n',
    )
    _helper(tmp_path, "tok", 'echo \'{"Username": "<token>", "Secret": "idtok"}\'\n')
    _docker_config(env, {"credHelpers": {"reg.lan": "good"}, "credsStore": "tok"})
    c = lookup("reg.lan", env)
    assert c is not None and c.username == "u-reg.lan" and c.password == "pw"
    assert "docker-credential-good" in c.source
    # credsStore for everything else; "<token>" means an identity token.
    t = lookup("docker.io", env)
    assert t is not None and t.identity_token == "idtok" and not t.username


def test_helper_missing(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _docker_config(env, {"credHelpers": {"reg.lan": "nosuch"}})
    with pytest.raises(CredentialError, match=r"docker-credential-nosuch.*is not installed"):
        lookup("reg.lan", env)


def test_helper_fails(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _helper(tmp_path, "broken", "echo 'keyring exploded' >&2; exit 3\n")
    _docker_config(env, {"credsStore": "broken"})
    with pytest.raises(CredentialError, match=r"broken get failed \(exit 3\): keyring exploded"):
        lookup("reg.lan", env)


def test_helper_not_found_means_anonymous(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _helper(tmp_path, "empty", "echo 'credentials not found in native keychain'; exit 1\n")
    _docker_config(env, {"credsStore": "empty"})
    assert lookup("reg.lan", env) is None


def test_helper_prints_garbage(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _helper(tmp_path, "garbage", "echo 'this is not json'\n")
    _docker_config(env, {"credsStore": "garbage"})
    with pytest.raises(CredentialError, match="printed something that is not a credential"):
        lookup("reg.lan", env)
    _helper(tmp_path, "garbage", "echo '{\"Username\": 5}'\n")
    with pytest.raises(CredentialError, match="not a credential"):
        lookup("reg.lan", env)


def test_store_is_0600_atomic_and_keeps_other_keys(tmp_path: Path) -> None:
    env = _env(tmp_path)
    cfg = _docker_config(env, {"auths": {"keep.lan": {"auth": _b64("k:k")}}, "psFormat": "x"})
    cfg.chmod(0o644)
    where = store_credential("reg.lan:5000", "alice", "pw", env)
    assert where == str(cfg)
    doc = json.loads(cfg.read_text())
    assert doc["psFormat"] == "x" and "keep.lan" in doc["auths"]
    assert doc["auths"]["reg.lan:5000"] == {"auth": _b64("alice:pw")}
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert [p.name for p in cfg.parent.iterdir()] == ["config.json"]  # no temp file left
    c = lookup("reg.lan:5000", env)
    assert c is not None and c.password == "pw"
    assert erase_credential("reg.lan:5000", env) == [str(cfg)]
    assert lookup("reg.lan:5000", env) is None
    assert "keep.lan" in json.loads(cfg.read_text())["auths"]


def test_store_through_symlink_replaces_the_target_not_the_link(tmp_path: Path) -> None:
    env = _env(tmp_path)
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    real = dotfiles / "docker.json"
    real.write_text("{}")
    link = Path(env["HOME"]) / ".docker" / "config.json"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    store_credential("reg.lan", "a", "b", env)
    assert link.is_symlink() and json.loads(real.read_text())["auths"]
    assert stat.S_IMODE(real.stat().st_mode) == 0o600


def test_store_uses_the_configured_helper(tmp_path: Path) -> None:
    env = _env(tmp_path)
    saved = tmp_path / "saved"
    _helper(tmp_path, "keep", f'cat > {saved}; echo "$1" >> {saved}\n')
    cfg = _docker_config(env, {"credHelpers": {"reg.lan": "keep"}})
    assert (
        store_credential("reg.lan", "alice", "pw", env)
        == "credential helper docker-credential-keep"
    )
    payload, action = saved.read_text().rsplit("}", 1)
    assert json.loads(payload + "}") == {
        "ServerURL": "reg.lan",
        "Username": "alice",
        "Secret": "pw",
    }
    assert action.strip() == "store"
    assert "auths" not in json.loads(cfg.read_text())  # the secret stayed out of the file


def test_registry_config_keys() -> None:
    from stoker.config import parse_config
    from stoker.errors import ConfigError

    c = parse_config(
        {
            "insecure_registries": ["Reg.lan:5000", "http://x.lan:1/"],
            "registry_mirrors": {"index.docker.io": ["127.0.0.1:5000"]},
        }
    )
    assert c.insecure_registries == {"reg.lan:5000", "x.lan:1"}
    assert dict(c.registry_mirrors) == {"docker.io": ("127.0.0.1:5000",)}
    for data, key in (
        ({"insecure_registries": "reg.lan"}, "insecure_registries"),
        ({"insecure_registries": ["a b"]}, r"insecure_registries\[0\]"),
        ({"registry_mirrors": ["m:1"]}, "registry_mirrors"),
        ({"registry_mirrors": {"docker.io": []}}, "registry_mirrors.docker.io"),
    ):
        with pytest.raises(ConfigError, match=key):
            parse_config(data)
