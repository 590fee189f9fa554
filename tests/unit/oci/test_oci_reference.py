"""Reference parsing, auth challenges, manifest parsing and sizing rules of the OCI leaf."""

from __future__ import annotations

import json

import pytest

from stoker.daemon.oci import UnsupportedImage, ext4_size, parse_reference
from stoker.daemon.oci.manifest import (
    DOCKER_LIST,
    OCI_MANIFEST,
    Index,
    Manifest,
    parse_config,
    parse_manifest,
    select_platform,
)
from stoker.daemon.oci.registry import parse_challenge, registry_scheme
from stoker.errors import InvalidArgument

pytestmark = pytest.mark.unit

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("ref", "domain", "repo", "tag", "digest", "host"),
    [
        ("debian", "docker.io", "library/debian", "latest", None, "registry-1.docker.io"),
        ("debian:bookworm", "docker.io", "library/debian", "bookworm", None, None),
        ("user/app:1.2", "docker.io", "user/app", "1.2", None, None),
        ("docker.io/debian", "docker.io", "library/debian", "latest", None, None),
        ("index.docker.io/library/x:y", "docker.io", "library/x", "y", None, None),
        ("ghcr.io/o/r/sub:v1", "ghcr.io", "o/r/sub", "v1", None, "ghcr.io"),
        ("localhost/app", "localhost", "app", "latest", None, "localhost"),
        ("localhost:5000/a/b:c", "localhost:5000", "a/b", "c", None, "localhost:5000"),
        ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None, None),
        ("Registry/app", "Registry", "app", "latest", None, None),
        (f"quay.io/x/y@{D}", "quay.io", "x/y", None, D, None),
        (f"quay.io/x/y:t@{D}", "quay.io", "x/y", "t", D, None),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None, None),
        ("a__b/c-d.e_f", "docker.io", "a__b/c-d.e_f", "latest", None, None),
    ],
)
def test_parse_reference(
    ref: str, domain: str, repo: str, tag: str | None, digest: str | None, host: str | None
) -> None:
    r = parse_reference(ref)
    assert (r.domain, r.repository, r.tag, r.digest) == (domain, repo, tag, digest)
    if host is not None:
        assert r.registry_host == host
    assert r.manifest_ref == (digest or tag)
    assert parse_reference(str(r)) == r


@pytest.mark.parametrize(
    "ref",
    ["", "  ", "UPPER", "app:", "app:-x", "https://x.io/a", "a//b", "x.io/", f"a@{D[:20]}",
     "a/B", "x.io/a..b", "-a"],
)  # fmt: skip
def test_bad_references(ref: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(ref)


def test_scheme_http_only_for_loopback_and_insecure() -> None:
    assert registry_scheme(parse_reference("localhost:5000/a")) == "http"
    assert registry_scheme(parse_reference("127.0.0.1:5000/a")) == "http"
    assert registry_scheme(parse_reference("[::1]:5000/a")) == "http"
    assert registry_scheme(parse_reference("debian")) == "https"
    assert registry_scheme(parse_reference("reg.lan:5000/a")) == "https"
    assert registry_scheme(parse_reference("reg.lan:5000/a"), {"reg.lan:5000"}) == "http"
    assert registry_scheme(parse_reference("reg.lan/a"), {"reg.lan"}) == "http"


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/debian:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/debian:pull",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
    assert parse_challenge("") == ("", {})


def _index(*platforms: tuple[str, str, str | None]) -> Index:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": f"sha256:{str(i) * 64}",
                    "size": 10,
                    "platform": {"os": o, "architecture": a, **({"variant": v} if v else {})},
                }
                for i, (o, a, v) in enumerate(platforms)
            ],
        }
    ).encode()
    doc = parse_manifest(body, "", D, "ref")
    assert isinstance(doc, Index)
    return doc


def test_select_platform() -> None:
    idx = _index(("linux", "arm64", "v8"), ("linux", "amd64", None), ("unknown", "unknown", None))
    assert select_platform(idx, "ref").digest == "sha256:" + "1" * 64
    with pytest.raises(
        UnsupportedImage, match=r"no linux/amd64 variant \(it has: linux/arm64/v8\)"
    ):
        select_platform(_index(("linux", "arm64", "v8"), ("unknown", "unknown", None)), "ref")


def test_parse_manifest_kinds() -> None:
    m = parse_manifest(
        json.dumps(
            {
                "schemaVersion": 2,
                "config": {"mediaType": "x", "digest": D, "size": 3},
                "layers": [{"mediaType": "y", "digest": D, "size": 4}],
            }
        ).encode(),
        OCI_MANIFEST + "; charset=utf-8",
        D,
        "ref",
    )
    assert isinstance(m, Manifest) and m.layers[0].size == 4
    with pytest.raises(UnsupportedImage, match="schema 1"):
        parse_manifest(b'{"schemaVersion": 1, "fsLayers": []}', "", D, "ref")
    with pytest.raises(UnsupportedImage, match="not valid JSON"):
        parse_manifest(b"{", "", D, "ref")
    with pytest.raises(UnsupportedImage, match="malformed manifest"):
        parse_manifest(b'{"layers": [{"digest": "nope"}]}', OCI_MANIFEST, D, "ref")


def test_parse_config() -> None:
    c = parse_config(
        json.dumps(
            {
                "os": "linux",
                "architecture": "amd64",
                "config": {"Entrypoint": ["/e"], "Cmd": None, "Env": ["A=1"], "User": "1000"},
                "rootfs": {"diff_ids": [D]},
            }
        ).encode(),
        D,
        "ref",
    )
    assert (c.entrypoint, c.cmd, c.env, c.user, c.diff_ids) == (["/e"], [], ["A=1"], "1000", [D])


def test_ext4_size() -> None:
    gib, mib = 1 << 30, 1 << 20
    assert ext4_size(0) == gib
    assert ext4_size(500 * mib) == gib
    assert ext4_size(1000 * mib) == 1500 * mib
    assert ext4_size(1000 * mib + 1) == 1501 * mib
