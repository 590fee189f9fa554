"""OCI pulls from a real docker-registry into an ext4 image, checked with debugfs."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest
from ocitestlib import (
    Entry,
    PullDirs,
    Pusher,
    RegistryProcess,
    RegistryProxy,
    dcat,
    debugfs,
    dls,
    dstat,
    make_layer,
    tree_files,
)

from stoker.daemon.oci import BlobCache, build_ext4, pull_image
from stoker.runner import Runner

pytestmark = pytest.mark.integration

GIB = 1 << 30
T1, T2, T3 = 1_600_000_000, 1_650_000_000, 1_700_000_000


def repo_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Events:
    """A progress sink that remembers what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, stage: str, message: str = "", **fields: Any) -> None:
        self.events.append((stage, message, fields))

    @property
    def stages(self) -> list[str]:
        return [e[0] for e in self.events]


def rich_layers(flavour: str = "oci") -> list[Any]:
    """Three layers exercising every entry type and both whiteout kinds."""
    l1 = [
        Entry("etc", "dir", mtime=T1),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n", mtime=T1),
        Entry("etc/removed", data=b"gone in layer 2\n"),
        Entry("usr", "dir"),
        Entry("usr/bin", "dir"),
        Entry("usr/sbin", "dir"),
        Entry("usr/lib", "dir"),
        Entry("usr/lib/systemd", "dir"),
        Entry("usr/lib/systemd/systemd", data=b"\x7fELF fake init", mode=0o755),
        Entry("usr/sbin/sshd", data=b"\x7fELF fake sshd", mode=0o755),
        Entry("usr/bin/su", data=b"\x7fELF su", mode=0o4755),
        Entry("usr/bin/wall", data=b"\x7fELF wall", mode=0o2755, gid=5),
        Entry("usr/bin/prog", data=b"shared inode", mode=0o755),
        Entry("usr/bin/prog-link", "hardlink", linkname="usr/bin/prog"),
        Entry("usr/bin/ping", data=b"ping", mode=0o755, xattrs={"user.stoker": "cap-ish"}),
        Entry("bin", "symlink", linkname="usr/bin"),
        Entry("home", "dir"),
        Entry("home/user", "dir", mode=0o750, uid=1000, gid=1000, mtime=T2),
        Entry("home/user/notes", data=b"private", mode=0o600, uid=1000, gid=1000, mtime=T2),
        Entry("home/user/drop", data=b"whited out by layer 3", uid=1000, gid=1000),
        Entry("opt", "dir"),
        Entry("opt/data", "dir"),
        Entry("opt/data/a", data=b"a"),
        Entry("opt/data/sub", "dir"),
        Entry("opt/data/sub/c", data=b"c"),
        Entry("opt/x", "dir"),
        Entry("opt/x/inner", data=b"replaced by a file later"),
        Entry("tmp", "dir", mode=0o1777),
        Entry("dev", "dir"),
        Entry("dev/null", "char", mode=0o666, major=1, minor=3),
        Entry("dev/loop0", "block", mode=0o660, gid=6, major=7, minor=0),
        Entry("run", "dir"),
        Entry("run/initctl", "fifo", mode=0o600),
        Entry("abs-link", "symlink", linkname="/etc/passwd"),
    ]
    l2 = [
        Entry("etc", "dir", mtime=T1),
        Entry("etc/.wh.removed"),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:\n"),
        Entry("opt/data", "dir"),
        Entry("opt/data/.wh..wh..opq"),
        Entry("opt/data/new", data=b"only this survives"),
        # Written through the in-root symlink bin -> usr/bin.
        Entry("bin/tool", data=b"via symlink", mode=0o755),
    ]
    l3 = [
        Entry("home/user/.wh.drop"),
        Entry("opt/x", data=b"a file now", mtime=T3),
        Entry("late", data=b"x" * 5000, mode=0o640, uid=33, gid=33, mtime=T3),
    ]
    if flavour == "docker":
        return [make_layer(l1, "gzip", "docker"), make_layer(l2, "gzip", "docker"),
                make_layer(l3, "none", "docker")]  # fmt: skip
    return [make_layer(l1, "gzip"), make_layer(l2, "zstd"), make_layer(l3, "none")]


def check_tree(root: Path) -> None:
    """The merged tree on the host, before it becomes an ext4."""
    assert not (root / "etc/removed").exists()
    assert (root / "etc/passwd").read_bytes().endswith(b"user:x:1000:1000::/home/user:\n")
    assert sorted(os.listdir(root / "opt/data")) == ["new"]
    assert (root / "usr/bin/tool").read_bytes() == b"via symlink"
    assert os.readlink(root / "bin") == "usr/bin"
    assert not (root / "home/user/drop").exists()
    assert (root / "opt/x").is_file()
    su = os.lstat(root / "usr/bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert os.lstat(root / "usr/bin/prog").st_ino == os.lstat(root / "usr/bin/prog-link").st_ino
    assert os.lstat(root / "home/user").st_uid == 1000
    assert os.lstat(root / "home/user").st_mtime == T2
    assert stat.S_ISCHR(os.lstat(root / "dev/null").st_mode)
    assert os.getxattr(root / "usr/bin/ping", "user.stoker") == b"cap-ish"
    assert not any(".wh." in p for p in tree_files(root))


def check_ext4(img: Path) -> None:
    """The same facts read back from the ext4 image with debugfs (no mount)."""
    root = dstat(img, "/")
    assert root and root.uid == 0 and root.gid == 0 and root.mode == 0o755
    su = dstat(img, "/usr/bin/su")
    assert su and su.type == "regular" and su.mode == 0o4755 and su.uid == 0
    wall = dstat(img, "/usr/bin/wall")
    assert wall and wall.mode == 0o2755 and wall.gid == 5
    home = dstat(img, "/home/user")
    assert home and home.type == "directory" and home.mode == 0o750
    assert (home.uid, home.gid, home.mtime) == (1000, 1000, T2)
    notes = dstat(img, "/home/user/notes")
    assert notes and (notes.uid, notes.mode, notes.mtime) == (1000, 0o600, T2)
    late = dstat(img, "/late")
    assert late and (late.uid, late.gid, late.mode, late.size, late.mtime) == (
        33, 33, 0o640, 5000, T3)  # fmt: skip
    tmp = dstat(img, "/tmp")
    assert tmp and tmp.mode == 0o1777
    link = dstat(img, "/bin")
    assert link and link.type == "symlink" and link.link_target == "usr/bin"
    abs_link = dstat(img, "/abs-link")
    assert abs_link and abs_link.link_target == "/etc/passwd"
    prog, prog_link = dstat(img, "/usr/bin/prog"), dstat(img, "/usr/bin/prog-link")
    assert prog and prog_link and prog.inode == prog_link.inode and prog.links == 2
    null = dstat(img, "/dev/null")
    assert null and null.type == "character special" and null.device == (1, 3)
    assert null.mode == 0o666
    loop = dstat(img, "/dev/loop0")
    assert loop and loop.type == "block special" and loop.device == (7, 0) and loop.gid == 6
    fifo = dstat(img, "/run/initctl")
    assert fifo and fifo.type == "FIFO"
    # whiteouts and the opaque dir were applied, markers never materialised
    assert dstat(img, "/etc/removed") is None
    assert dstat(img, "/home/user/drop") is None
    assert dls(img, "/opt/data") == ["new"]
    assert dls(img, "/etc") == ["passwd"]
    opt_x = dstat(img, "/opt/x")
    assert opt_x and opt_x.type == "regular"
    assert dcat(img, "/usr/bin/tool") == b"via symlink"
    assert dcat(img, "/etc/passwd").endswith(b"user:x:1000:1000::/home/user:\n")
    assert "cap-ish" in debugfs(img, 'ea_get "/usr/bin/ping" user.stoker')


async def test_pull_index_three_layers_to_ext4(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs, tmp_path: Path
) -> None:
    repo = repo_name("rich")
    layers = rich_layers()
    amd = await pusher.image(repo, None, layers, entrypoint=["/usr/bin/prog"], env=["A=1"])
    arm = await pusher.image(repo, None, [make_layer([Entry("arm", data=b"arm")])], arch="arm64")
    index_digest = await pusher.index(repo, "v1", [(arm, "arm64"), (amd, "amd64")])
    events = Events()
    ref = f"{registry.host}/{repo}:v1"

    pulled = await pull_image(
        ref, cache_dir=dirs.cache, staging_dir=dirs.staging, progress=events, runner=Runner()
    )
    try:
        assert pulled.digest == index_digest
        assert pulled.manifest_digest == amd.manifest_digest
        assert pulled.canonical_ref == ref
        assert pulled.config.entrypoint == ["/usr/bin/prog"]
        assert pulled.config.env == ["A=1"]
        assert pulled.layers == 3
        assert (pulled.has_systemd, pulled.has_sshd) == (True, True)
        assert not (pulled.rootfs / "arm").exists()
        assert pulled.rootfs.parent.parent == dirs.staging
        check_tree(pulled.rootfs)
        assert "resolve" in events.stages and events.stages.count("unpack") == 3

        img = tmp_path / "out" / "rootfs.ext4"
        built = await build_ext4(pulled.rootfs, img, runner=Runner(), what=ref)
        assert built.size == GIB == img.stat().st_size
        assert built.content_bytes >= pulled.content_size > 0
        assert sorted(os.listdir(img.parent)) == ["rootfs.ext4"]
        check_ext4(img)
    finally:
        pulled.discard()
    assert os.listdir(dirs.staging) == []
    cache = BlobCache(dirs.cache)
    for d in [amd.config_digest, *amd.layer_digests]:
        assert cache.contains(d)
    for d in arm.layer_digests:
        assert not cache.contains(d)  # the arm64 image was never downloaded


async def test_pull_docker_media_types_by_digest(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs
) -> None:
    repo = repo_name("docker")
    amd = await pusher.image(repo, None, rich_layers("docker"), flavour="docker")
    arm = await pusher.image(
        repo, None, [make_layer([Entry("arm")], "gzip", "docker")], flavour="docker", arch="arm64"
    )
    list_digest = await pusher.index(
        repo, "latest", [(amd, "amd64"), (arm, "arm64")], flavour="docker"
    )
    for ref in (f"{registry.host}/{repo}", f"{registry.host}/{repo}@{list_digest}",
                f"{registry.host}/{repo}@{amd.manifest_digest}"):  # fmt: skip
        pulled = await pull_image(
            ref, cache_dir=dirs.cache, staging_dir=dirs.staging, progress=None, runner=Runner()
        )
        try:
            check_tree(pulled.rootfs)
            assert pulled.manifest_digest == amd.manifest_digest
        finally:
            pulled.discard()


async def test_image_without_systemd_or_sshd_is_detected(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs
) -> None:
    repo = repo_name("plain")
    layer = make_layer(
        [
            Entry("sbin", "dir"),
            Entry("sbin/init", "symlink", linkname="/bin/busybox"),
            Entry("bin", "dir"),
            Entry("bin/busybox", data=b"bb", mode=0o755),
        ]
    )
    await pusher.image(repo, "1", [layer])
    pulled = await pull_image(
        f"{registry.host}/{repo}:1",
        cache_dir=dirs.cache,
        staging_dir=dirs.staging,
        progress=None,
        runner=Runner(),
    )
    try:
        assert (pulled.has_systemd, pulled.has_sshd) == (False, False)
    finally:
        pulled.discard()


async def test_merged_usr_symlinks_are_followed_inside_root(
    registry: RegistryProcess, pusher: Pusher, dirs: PullDirs
) -> None:
    repo = repo_name("usrmerge")
    l1 = make_layer(
        [
            Entry("usr", "dir"),
            Entry("usr/lib", "dir"),
            Entry("usr/lib/systemd", "dir"),
            Entry("usr/sbin", "dir"),
            Entry("lib", "symlink", linkname="/usr/lib"),
            Entry("sbin", "symlink", linkname="usr/sbin"),
        ]
    )
    l2 = make_layer(
        [
            Entry("lib/systemd/systemd", data=b"init", mode=0o755),
            Entry("sbin/sshd", data=b"sshd", mode=0o755),
        ]
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
        assert (pulled.rootfs / "usr/lib/systemd/systemd").read_bytes() == b"init"
        assert (pulled.rootfs / "usr/sbin/sshd").is_file()
        assert os.path.islink(pulled.rootfs / "lib")
        assert (pulled.has_systemd, pulled.has_sshd) == (True, True)
    finally:
        pulled.discard()


async def test_concurrent_pulls_download_each_blob_once(
    registry: RegistryProcess, pusher: Pusher, proxy: RegistryProxy, dirs: PullDirs
) -> None:
    repo = repo_name("twice")
    big = make_layer([Entry("big", data=os.urandom(4 << 20))])
    pushed = await pusher.image(repo, "1", [*rich_layers(), big])
    ref = f"{proxy.host}/{repo}:1"
    # Hold the big layer half-sent so both pulls are certainly in flight together.
    proxy.stall[big.digest] = asyncio.Event()

    async def one(i: int) -> Any:
        return await pull_image(
            ref,
            cache_dir=dirs.cache,
            staging_dir=dirs.staging / str(i),
            progress=None,
            runner=Runner(),
        )

    t1, t2 = asyncio.create_task(one(1)), asyncio.create_task(one(2))
    await asyncio.wait_for(proxy.stalled.setdefault(big.digest, asyncio.Event()).wait(), 30)
    await asyncio.sleep(0.3)
    proxy.stall[big.digest].set()
    a, b = await asyncio.wait_for(asyncio.gather(t1, t2), 60)
    try:
        assert tree_files(a.rootfs) == tree_files(b.rootfs)
        check_tree(a.rootfs)
        check_tree(b.rootfs)
    finally:
        a.discard()
        b.discard()
    for d in [pushed.config_digest, *pushed.layer_digests]:
        assert proxy.blob_gets(d) == 1, (d, proxy.counts)
    assert os.listdir(BlobCache(dirs.cache).tmp_dir) == []


async def test_prune_reports_and_spares_blobs_of_inflight_pull(
    registry: RegistryProcess, pusher: Pusher, proxy: RegistryProxy, dirs: PullDirs
) -> None:
    repo_a, repo_b = repo_name("prune-a"), repo_name("prune-b")
    a = await pusher.image(repo_a, "1", [make_layer([Entry("a", data=os.urandom(100_000))])])
    slow = make_layer([Entry("slow", data=os.urandom(300_000))])
    fast = make_layer([Entry("fast", data=b"fast")])
    b = await pusher.image(repo_b, "1", [fast, slow])
    cache = BlobCache(dirs.cache)

    pulled = await pull_image(
        f"{registry.host}/{repo_a}:1",
        cache_dir=dirs.cache,
        staging_dir=dirs.staging,
        progress=None,
        runner=Runner(),
    )
    pulled.discard()
    a_bytes = sum(cache.path(d).stat().st_size for d in [a.config_digest, *a.layer_digests])

    dry = await cache.prune(dry_run=True)
    assert dry.dry_run and dry.bytes_freed == a_bytes
    assert all(cache.contains(d) for d in a.layer_digests)

    proxy.stall[slow.digest] = asyncio.Event()
    task = asyncio.create_task(
        pull_image(
            f"{proxy.host}/{repo_b}:1",
            cache_dir=dirs.cache,
            staging_dir=dirs.staging,
            progress=None,
            runner=Runner(),
        )
    )
    await asyncio.wait_for(proxy.stalled.setdefault(slow.digest, asyncio.Event()).wait(), 30)
    for _ in range(100):  # the fast layer lands while the slow one is held
        if cache.contains(fast.digest):
            break
        await asyncio.sleep(0.05)
    assert cache.contains(fast.digest)
    result = await cache.prune(dry_run=False)
    assert result.bytes_freed == a_bytes
    assert set(result.removed) == {a.config_digest, *a.layer_digests}
    assert {b.config_digest, fast.digest} <= set(result.in_use)
    assert cache.contains(fast.digest) and cache.contains(b.config_digest)
    proxy.stall[slow.digest].set()
    pulled_b = await asyncio.wait_for(task, 60)
    try:
        assert (pulled_b.rootfs / "fast").read_bytes() == b"fast"
    finally:
        pulled_b.discard()
    b_config = cache.path(b.config_digest).stat().st_size
    after = await cache.prune(dry_run=False)
    assert after.bytes_freed == b_config + len(fast.blob) + len(slow.blob)
    assert after.in_use == []
    assert not any(cache.contains(d) for d in [b.config_digest, *b.layer_digests])


async def test_cancelled_pull_leaves_no_partial_files(
    registry: RegistryProcess, pusher: Pusher, proxy: RegistryProxy, dirs: PullDirs
) -> None:
    repo = repo_name("cancel")
    small = make_layer([Entry("small", data=b"s")])
    big = make_layer([Entry("big", data=os.urandom(2 << 20))])
    await pusher.image(repo, "1", [small, big])
    proxy.stall[big.digest] = asyncio.Event()
    task = asyncio.create_task(
        pull_image(
            f"{proxy.host}/{repo}:1",
            cache_dir=dirs.cache,
            staging_dir=dirs.staging,
            progress=None,
            runner=Runner(),
        )
    )
    await asyncio.wait_for(proxy.stalled.setdefault(big.digest, asyncio.Event()).wait(), 30)
    cache = BlobCache(dirs.cache)
    for _ in range(100):  # the partial download is on disk, the small layer unpacked
        if cache.contains(small.digest) and os.listdir(cache.tmp_dir):
            break
        await asyncio.sleep(0.05)
    assert os.listdir(cache.tmp_dir)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(cache.tmp_dir) == []
    assert os.listdir(dirs.staging) == []
    assert not cache.contains(big.digest)
    assert cache.contains(small.digest)
