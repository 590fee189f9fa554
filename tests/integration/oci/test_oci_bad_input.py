"""Every bad input of an OCI pull: a clear error naming the ref and cause, nothing left behind.

"Nothing left behind" is checked the same way each time: the staging dir is empty, the
cache has no partial download and no blob under a digest its content does not match.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tarfile
import uuid
from pathlib import Path

import pytest
from ocitestlib import (
    Entry,
    PullDirs,
    Pusher,
    RegistryProcess,
    RegistryProxy,
    TokenRegistry,
    make_layer,
    make_tar,
    tmpfs,
)

from stoker.daemon.oci import (
    BlobCache,
    DigestMismatch,
    NoSpace,
    TruncatedBlob,
    UnsafeLayer,
    UnsupportedImage,
    build_ext4,
    pull_image,
)
from stoker.errors import InvalidArgument, NotFound, PermissionDenied, StokerError
from stoker.runner import Runner

pytestmark = pytest.mark.integration


def repo_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def pull(ref: str, dirs: PullDirs, **kw: object) -> None:
    pulled = await pull_image(
        ref,
        cache_dir=dirs.cache,
        staging_dir=dirs.staging,
        progress=None,
        runner=Runner(),
        **kw,  # type: ignore[arg-type]
    )
    pulled.discard()
    raise AssertionError(f"pull of {ref} unexpectedly succeeded")


def assert_clean(dirs: PullDirs) -> None:
    """No staging leftovers; every cached blob is complete and matches its digest."""
    if dirs.staging.exists():
        assert os.listdir(dirs.staging) == []
    cache = BlobCache(dirs.cache)
    if cache.tmp_dir.exists():
        assert os.listdir(cache.tmp_dir) == []
    blobs = cache.blobs_dir / "sha256"
    if blobs.exists():
        for p in blobs.iterdir():
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name


async def test_unknown_repository(registry: RegistryProcess, dirs: PullDirs) -> None:
    ref = f"{registry.host}/no-such-repo-{uuid.uuid4().hex[:6]}:latest"
    with pytest.raises(NotFound) as ei:
        await pull(ref, dirs)
    msg = str(ei.value)
    assert ref in msg and "does not exist" in msg
    assert_clean(dirs)


async def test_unknown_tag_is_a_manifest_404(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs
) -> None:
    repo = repo_name("tags")
    await pusher.image(repo, "v1", [make_layer([Entry("f")])])
    ref = f"{registry.host}/{repo}:v2"
    with pytest.raises(NotFound) as ei:
        await pull(ref, dirs)
    msg = str(ei.value)
    assert ref in msg and "manifest v2 is unknown" in msg and "v1" in msg
    assert_clean(dirs)


async def test_unknown_digest(registry: RegistryProcess, pusher: Pusher, dirs: PullDirs) -> None:
    repo = repo_name("digest")
    await pusher.image(repo, "v1", [make_layer([Entry("f")])])
    ref = f"{registry.host}/{repo}@sha256:{'0' * 64}"
    with pytest.raises(NotFound, match="is unknown"):
        await pull(ref, dirs)


async def test_invalid_reference(dirs: PullDirs) -> None:
    with pytest.raises(InvalidArgument, match="Bad_Name"):
        await pull("127.0.0.1:1/Bad_Name:1", dirs)


async def test_401_without_token_flow(basic_registry: RegistryProcess, dirs: PullDirs) -> None:
    ref = f"{basic_registry.host}/private/app:1"
    with pytest.raises(PermissionDenied) as ei:
        await pull(ref, dirs)
    msg = str(ei.value)
    assert ref in msg and "Basic" in msg and "401" in msg
    assert_clean(dirs)


async def test_bearer_token_flow_with_real_registry(
    token_registry: TokenRegistry, session: object, dirs: PullDirs
) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    reg, tokens = token_registry.registry, token_registry.tokens
    repo = repo_name("tok")
    pushed = await Pusher(session, reg.host).image(
        repo, "1", [make_layer([Entry("hello", data=b"token ok")], "zstd")]
    )
    before = len(tokens.requests)
    pulled = await pull_image(
        f"{reg.host}/{repo}:1",
        cache_dir=dirs.cache,
        staging_dir=dirs.staging,
        progress=None,
        runner=Runner(),
    )
    try:
        assert (pulled.rootfs / "hello").read_bytes() == b"token ok"
        assert pulled.manifest_digest == pushed.manifest_digest
    finally:
        pulled.discard()
    asked = tokens.requests[before:]
    assert asked and all(q["scope"] == f"repository:{repo}:pull" for q in asked)
    assert all(q["service"] == tokens.service for q in asked)


async def test_token_server_refusal(token_registry: TokenRegistry, dirs: PullDirs) -> None:
    ref = f"{token_registry.registry.host}/deny/secret:1"
    with pytest.raises(PermissionDenied) as ei:
        await pull(ref, dirs)
    assert ref in str(ei.value) and "refused an anonymous token" in str(ei.value)
    assert_clean(dirs)


async def test_tampered_blob_on_registry_disk(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs
) -> None:
    repo = repo_name("tamper")
    good = make_layer([Entry("ok", data=b"fine")])
    bad = make_layer([Entry("payload", data=os.urandom(50_000))])
    await pusher.image(repo, "1", [good, bad])
    data = registry.blob_data_path(bad.digest)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content
    data.write_bytes(bytes(raw))
    ref = f"{registry.host}/{repo}:1"
    with pytest.raises(DigestMismatch) as ei:
        await pull(ref, dirs)
    msg = str(ei.value)
    assert ref in msg and bad.digest in msg and "tampered" in msg
    assert not BlobCache(dirs.cache).contains(bad.digest)
    assert_clean(dirs)


async def test_truncated_download(
    registry: RegistryProcess, pusher: Pusher, proxy: RegistryProxy, dirs: PullDirs
) -> None:
    repo = repo_name("trunc")
    layer = make_layer([Entry("big", data=os.urandom(1 << 20))])
    await pusher.image(repo, "1", [layer])
    proxy.truncate.add(layer.digest)
    ref = f"{proxy.host}/{repo}:1"
    with pytest.raises(TruncatedBlob) as ei:
        await pull(ref, dirs)
    msg = str(ei.value)
    assert ref in msg and layer.digest in msg and "cut off" in msg
    assert proxy.blob_gets(layer.digest) == 3  # retried, then gave up
    assert not BlobCache(dirs.cache).contains(layer.digest)
    assert_clean(dirs)


def raw_layer(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A tar with names tarfile's writer would normally never produce for us."""
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            ti.size = len(data) if ti.isreg() else 0
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def ti(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type = kind
    t.linkname = linkname
    t.mode = 0o644
    return t


@pytest.mark.parametrize(
    ("members", "expect"),
    [
        ([(ti("../../escaped"), b"x")], "path traversal"),
        ([(ti("ok/../../escaped"), b"x")], "path traversal"),
        ([(ti("/etc/absolute"), b"x")], "absolute path"),
        ([(ti("link", tarfile.LNKTYPE, "../../outside"), b"")], "path traversal"),
        ([(ti("link", tarfile.LNKTYPE, "/etc/passwd"), b"")], "absolute hardlink target"),
        ([(ti("link", tarfile.LNKTYPE, "missing/file"), b"")], "does not exist"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "hardlink-dotdot",
        "hardlink-abs",
        "hardlink-missing",
    ],
)
async def test_unsafe_layer_entries(
    registry: RegistryProcess,
    pusher: Pusher,
    dirs: PullDirs,
    members: list[tuple[tarfile.TarInfo, bytes]],
    expect: str,
) -> None:
    repo = repo_name("unsafe")
    layer = make_layer(raw_layer([(ti("first"), b"1"), *members]), "gzip")
    await pusher.image(repo, "1", [layer])
    ref = f"{registry.host}/{repo}:1"
    with pytest.raises(UnsafeLayer) as ei:
        await pull(ref, dirs)
    msg = str(ei.value)
    assert ref in msg and layer.digest in msg and expect in msg
    assert not (dirs.staging.parent / "escaped").exists()
    assert not (dirs.staging / "escaped").exists()
    assert_clean(dirs)


async def test_symlink_escape_then_write_through_it(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    depth = "../" * (len(dirs.staging.parts) + 4)
    repo = repo_name("symesc")
    l1 = make_layer([Entry("evil", "symlink", linkname=f"{depth}{str(outside).lstrip('/')}")])
    l2 = make_layer([Entry("evil/pwned", data=b"owned")], "zstd")
    await pusher.image(repo, "1", [l1, l2])
    ref = f"{registry.host}/{repo}:1"
    with pytest.raises(UnsafeLayer) as ei:
        await pull(ref, dirs)
    msg = str(ei.value)
    assert ref in msg and "symlink 'evil'" in msg and "outside the image root" in msg
    assert os.listdir(outside) == []
    assert_clean(dirs)


async def test_absolute_symlinks_resolve_inside_the_root(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs, tmp_path: Path
) -> None:
    """An absolute link target means the image's own path, never the host's."""
    host_dir = tmp_path / "hostdir"
    host_dir.mkdir()
    host_file = tmp_path / "hostfile"
    host_file.write_text("host")
    repo = repo_name("symabs")
    l1 = make_layer(
        [
            Entry("dirlink", "symlink", linkname=str(host_dir)),
            Entry("filelink", "symlink", linkname=str(host_file)),
        ]
    )
    l2 = make_layer(
        [Entry("dirlink/pwned", data=b"in image"), Entry("filelink", data=b"replaced link")]
    )
    await pusher.image(repo, "1", [l1, l2])
    pulled = await pull_image(
        f"{registry.host}/{repo}:1",
        cache_dir=dirs.cache,
        staging_dir=dirs.staging,
        progress=None,
        runner=Runner(),
    )
    try:
        assert os.listdir(host_dir) == []
        assert host_file.read_text() == "host"
        inside = pulled.rootfs / str(host_dir).lstrip("/") / "pwned"
        assert inside.read_bytes() == b"in image"
        assert not os.path.islink(pulled.rootfs / "filelink")
        assert (pulled.rootfs / "filelink").read_bytes() == b"replaced link"
    finally:
        pulled.discard()


async def test_hardlink_through_symlink_to_host_file_is_refused(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    repo = repo_name("hlesc")
    depth = "../" * (len(dirs.staging.parts) + 4)
    layer = make_layer(
        [
            Entry("up", "symlink", linkname=f"{depth}{str(tmp_path).lstrip('/')}"),
            Entry("stolen", "hardlink", linkname="up/secret"),
        ]
    )
    await pusher.image(repo, "1", [layer])
    ref = f"{registry.host}/{repo}:1"
    with pytest.raises(UnsafeLayer, match="outside the image root"):
        await pull(ref, dirs)
    assert secret.stat().st_nlink == 1
    assert_clean(dirs)


async def test_device_nodes_refused_when_not_allowed(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs
) -> None:
    repo = repo_name("dev")
    layer = make_layer([Entry("dev", "dir"), Entry("dev/sda", "block", major=8, minor=0)])
    await pusher.image(repo, "1", [layer])
    ref = f"{registry.host}/{repo}:1"
    with pytest.raises(UnsafeLayer, match="device node"):
        await pull(ref, dirs, allow_devices=False)
    assert_clean(dirs)


async def test_arm64_only_image_is_refused(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs
) -> None:
    repo = repo_name("arm")
    arm = await pusher.image(repo, None, [make_layer([Entry("a")])], arch="arm64")
    await pusher.index(repo, "1", [(arm, "arm64")])
    ref = f"{registry.host}/{repo}:1"
    with pytest.raises(UnsupportedImage, match=r"no linux/amd64 variant.*linux/arm64"):
        await pull(ref, dirs)
    await pusher.image(repo, "single", [make_layer([Entry("a")])], arch="arm64")
    with pytest.raises(UnsupportedImage, match="linux/arm64"):
        await pull(f"{registry.host}/{repo}:single", dirs)
    assert_clean(dirs)


async def test_corrupt_layer_stream(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs
) -> None:
    """The digest matches (the registry serves what was pushed) but the gzip is garbage."""
    repo = repo_name("corrupt")
    good = make_layer([Entry("f", data=os.urandom(10_000))])
    broken = good.blob[:20] + bytes(200) + good.blob[220:]
    from ocitestlib import Layer

    await pusher.image(repo, "1", [Layer(broken, good.diff_id, good.media_type)])
    with pytest.raises(StokerError, match="is not a valid tar stream"):
        await pull(f"{registry.host}/{repo}:1", dirs)
    assert_clean(dirs)


async def test_no_space_while_downloading(
    registry: RegistryProcess, pusher: Pusher, proxy: RegistryProxy, tmp_path: Path
) -> None:
    """Two pulls that each fit alone but not together: one hits ENOSPC mid-download."""
    repos = [repo_name("nospace-a"), repo_name("nospace-b")]
    layers = [make_layer([Entry("blob", data=os.urandom(6 << 20))]) for _ in repos]
    for r, la in zip(repos, layers, strict=True):
        await pusher.image(r, "1", [la])
        proxy.stall[la.digest] = asyncio.Event()
    with tmpfs(tmp_path / "small", "10m") as small:
        dirs = PullDirs(cache=small / "cache", staging=small / "staging")
        tasks = [asyncio.ensure_future(pull(f"{proxy.host}/{r}:1", dirs)) for r in repos]
        # Both are past the free-space check, each holding half its blob, when released.
        for la in layers:
            await asyncio.wait_for(proxy.stalled.setdefault(la.digest, asyncio.Event()).wait(), 30)
        for la in layers:
            proxy.stall[la.digest].set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, NoSpace)]
        assert errors, results
        assert any("while downloading blob" in str(e) for e in errors), errors
        for e in errors:
            assert "no space left" in str(e) and proxy.host in str(e)
        assert_clean(dirs)


async def test_no_space_precheck_and_while_unpacking(
    registry: RegistryProcess, pusher: Pusher, tmp_path: Path
) -> None:
    big = repo_name("nospace-big")
    await pusher.image(big, "1", [make_layer([Entry("blob", data=os.urandom(12 << 20))])])
    zeros = repo_name("nospace-zeros")
    # Compresses to almost nothing: the download fits, the unpacked file does not.
    await pusher.image(zeros, "1", [make_layer([Entry("zeros", data=bytes(20 << 20))])])
    with tmpfs(tmp_path / "small", "8m") as small:
        dirs = PullDirs(cache=small / "cache", staging=small / "staging")
        ref = f"{registry.host}/{big}:1"
        with pytest.raises(NoSpace) as ei:
            await pull(ref, dirs)
        assert ref in str(ei.value) and "MiB" in str(ei.value)
        ref = f"{registry.host}/{zeros}:1"
        with pytest.raises(NoSpace) as ei:
            await pull(ref, dirs)
        assert ref in str(ei.value) and "no space left" in str(ei.value)
        assert_clean(dirs)


async def test_no_space_for_ext4(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(6 << 20))
    with tmpfs(tmp_path / "small", "4m") as small:
        with pytest.raises(NoSpace, match="not enough space"):
            await build_ext4(tree, small / "rootfs.ext4", runner=Runner(), what="img")
        assert os.listdir(small) == []


def test_layer_tar_helper_sanity() -> None:
    """Guard for the helper itself: it really writes the entry types the tests rely on."""
    import io

    data = make_tar([Entry("d", "dir"), Entry("d/.wh..wh..opq"), Entry("c", "char", major=1)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        kinds = {m.name: m.type for m in tf}
    assert kinds == {"d": tarfile.DIRTYPE, "d/.wh..wh..opq": tarfile.REGTYPE, "c": tarfile.CHRTYPE}
