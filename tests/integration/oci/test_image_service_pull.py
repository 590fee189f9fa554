"""`image pull` through ImageService: OCI images land as managed images with the guest
files injected, concurrent pulls of one ref coalesce, failures publish nothing, an image
without sshd is refused by `vm create`, and the blob cache prunes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from ocitestlib import Entry, Pusher, RegistryProcess, RegistryProxy, dcat, dls, make_layer

from stoker.config import parse_config
from stoker.daemon.daemon import Daemon
from stoker.daemon.vm_service import CreateRequest
from stoker.errors import Conflict, NotFound, StokerError
from stoker.layout import Layout
from stoker.model.records import Kernel
from stoker.store import Store
from stoker.store.db import now

pytestmark = pytest.mark.integration


def _noop(*a: Any, **k: Any) -> None:
    pass


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    layout = Layout(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "s")
    layout.ensure()
    d = Daemon(
        layout=layout,
        config=parse_config({}),
        store=Store(layout.db_path),
        logger=logging.getLogger("stoker.test"),
    )
    assert d.store is not None
    kdir = tmp_path / "kern"
    kdir.mkdir()
    (kdir / "vmlinux").write_bytes(b"\x7fELF")
    d.store.upsert_kernel(
        Kernel(
            name="k1",
            version="6.1",
            arch="x86_64",
            dir=str(kdir),
            vmlinux=str(kdir / "vmlinux"),
            bzimage=None,
            initrd=None,
            modules_dir=None,
            source="test",
            created_at=now(),
        )
    )
    return d


def layers(with_sshd: bool) -> list[Any]:
    base = [
        Entry("bin", "dir"),
        Entry("bin/sh", data=b"#!fake\n", mode=0o755),
        Entry("etc", "dir"),
        Entry("etc/os-release", data=b"ID=test\n"),
        Entry("lib", "dir"),
        Entry("lib/systemd", "dir"),
        Entry("lib/systemd/systemd", data=b"\x7fELF", mode=0o755),
        Entry("sbin", "dir"),
        Entry("sbin/init", "symlink", linkname="/lib/systemd/systemd"),
        Entry("root", "dir", mode=0o700),
        Entry("root/.profile", data=b"# hi\n"),
    ]
    if with_sshd:
        base += [
            Entry("usr", "dir"),
            Entry("usr/sbin", "dir"),
            Entry("usr/sbin/sshd", data=b"\x7fELF", mode=0o755),
        ]
    return [
        make_layer(base),
        make_layer([Entry("etc/.wh.os-release"), Entry("etc/motd", data=b"layer two\n")]),
    ]


async def test_pull_publishes_managed_image_and_coalesces(
    daemon: Daemon, pusher: Pusher, proxy: RegistryProxy
) -> None:
    images = daemon.images
    assert images is not None
    pushed = await pusher.image("team/app", "v1", layers(True))
    ref = f"{proxy.host}/team/app:v1"
    a, b = await asyncio.gather(images.pull(ref, None, _noop), images.pull(ref, None, _noop))
    assert a.name == b.name == f"127.0.0.1-{proxy.host.split(':')[1]}-team-app-v1"
    for d in pushed.layer_digests:
        assert proxy.blob_gets(d) == 1, "a layer was downloaded twice"
    im = await images.get_image(a.name)
    assert im.managed and im.kernel == "k1" and im.has_sshd and im.init == "systemd"
    rootfs = Path(im.rootfs)
    assert rootfs.parent == daemon.layout.images_dir / a.name  # type: ignore[union-attr]
    # Merged tree, whiteout applied, guest files injected, no SSH host keys.
    assert "os-release" not in dls(rootfs, "/etc")
    assert dcat(rootfs, "/etc/motd") == b"layer two\n"
    assert "overlay-init" in dls(rootfs, "/usr/lib/stoker")
    assert im.work_seed and Path(im.work_seed).exists()
    # Pulling again is a no-op returning the same image.
    again = await images.pull(ref, None, _noop)
    assert again.name == im.name
    # Cache prune frees the blobs (nothing is pulling now).
    dry = await images.prune_cache(dry_run=True)
    assert dry.bytes_freed > 0
    real = await images.prune_cache(dry_run=False)
    assert real.bytes_freed == dry.bytes_freed
    assert (await images.prune_cache(dry_run=True)).bytes_freed == 0


async def test_failed_pull_publishes_nothing(daemon: Daemon, registry: RegistryProcess) -> None:
    images = daemon.images
    assert images is not None and daemon.layout is not None
    with pytest.raises(NotFound):
        await images.pull(f"{registry.host}/nope/missing:v1", None, _noop)
    assert await images.list_images() == []
    assert list(daemon.layout.images_dir.iterdir()) == []
    assert list(daemon.layout.staging_dir.iterdir()) == []


async def test_image_without_sshd_is_pulled_but_vm_create_refuses(
    daemon: Daemon, pusher: Pusher, registry: RegistryProcess
) -> None:
    images, vm = daemon.images, daemon.vm
    assert images is not None and vm is not None
    await pusher.image("team/nossh", "v1", layers(False))
    im = await images.pull(f"{registry.host}/team/nossh:v1", "nossh", _noop)
    assert not im.has_sshd
    with pytest.raises(Conflict, match="no SSH server"):
        await vm.create_vm(CreateRequest(name="x", image="nossh", no_start=True), _noop)
    assert await vm.list_vms() == []
    # Deleting it removes its managed files.
    await images.delete_image("nossh")
    assert not Path(im.rootfs).exists()
    with pytest.raises(StokerError):
        await images.get_image("nossh")
