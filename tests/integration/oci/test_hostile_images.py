"""Hostile images end to end (issue 9 items 1-3, 6): an image pushed to a real local
`docker-registry` and pulled through the daemon's pull path (`ImageService.pull`) must
never write a host file or copy a host directory into its disks, and bad layers are
refused with a message naming what was wrong, leaving nothing behind.

Every host "victim" is a temporary file or directory the test makes, never a real one.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from ocitestlib import Entry, Pusher, RegistryProcess, dcat, dls, make_layer

from stoker.config import parse_config
from stoker.daemon.daemon import Daemon
from stoker.daemon.imagemgr import inject
from stoker.daemon.imagemgr.safetree import TooLarge
from stoker.daemon.oci import UnsafeLayer
from stoker.daemon.oci.errors import LayerTooLarge
from stoker.layout import Layout
from stoker.model.records import Kernel
from stoker.store import Store
from stoker.store.db import now

pytestmark = pytest.mark.integration


def _noop(*a: Any, **k: Any) -> None:
    pass


def _daemon(tmp_path: Path, **config: Any) -> Daemon:
    layout = Layout(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "s")
    layout.ensure()
    d = Daemon(
        layout=layout,
        config=parse_config(config),
        store=Store(layout.db_path),
        logger=logging.getLogger("stoker.test"),
    )
    assert d.store is not None
    kdir = tmp_path / "kern"
    kdir.mkdir()
    (kdir / "vmlinux").write_bytes(b"\x7fELF")
    d.store.upsert_kernel(
        Kernel(name="k1", version="6.1", arch="x86_64", dir=str(kdir),
               vmlinux=str(kdir / "vmlinux"), bzimage=None, initrd=None, modules_dir=None,
               source="test", created_at=now())
    )  # fmt: skip
    return d


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    return _daemon(tmp_path)


def base_entries(root_home: bool = True) -> list[Entry]:
    out = [
        Entry("bin", "dir"),
        Entry("bin/sh", data=b"#!fake\n", mode=0o755),
        Entry("etc", "dir"),
        Entry("lib", "dir"),
        Entry("lib/systemd", "dir"),
        Entry("lib/systemd/systemd", data=b"\x7fELF", mode=0o755),
        Entry("usr", "dir"),
        Entry("usr/sbin", "dir"),
        Entry("usr/sbin/sshd", data=b"\x7fELF", mode=0o755),
    ]
    if root_home:
        out += [Entry("root", "dir", mode=0o700), Entry("root/.profile", data=b"# hi\n")]
    return out


def _snapshot(p: Path) -> tuple[bytes, int, int]:
    st = p.stat()
    return p.read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns


def _assert_nothing_left(d: Daemon) -> None:
    assert d.layout is not None
    assert os.listdir(d.layout.staging_dir) == []
    assert os.listdir(d.layout.images_dir) == []


async def test_planted_temp_links_cannot_overwrite_a_host_file(
    daemon: Daemon, pusher: Pusher, registry: RegistryProcess, tmp_path: Path
) -> None:
    """Escape 1: `etc/.fstab.stoker-tmp -> <host file>` made the old injector write the
    image's fstab lines plus stoker's into that host file, as root."""
    images = daemon.images
    assert images is not None
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in ("authorized_keys", "overlay-init", "sshd_config"):
        (victims / name).write_text(f"host {name}\n")
        os.chmod(victims / name, 0o600)
    before = {p.name: _snapshot(p) for p in victims.iterdir()}
    hostile = [
        *base_entries(),
        Entry("etc/fstab", data=b"attacker-line /x none 0 0\n"),
        Entry("etc/.fstab.stoker-tmp", "symlink", linkname=str(victims / "authorized_keys")),
        Entry("etc/ssh", "dir"),
        Entry("etc/ssh/sshd_config", data=b"PermitRootLogin yes\n"),
        Entry("etc/ssh/.sshd_config.stoker-tmp", "symlink", linkname=str(victims / "sshd_config")),
        Entry("usr/lib", "dir"),
        Entry("usr/lib/stoker", "dir"),
        Entry(
            "usr/lib/stoker/.overlay-init.stoker-tmp",
            "symlink",
            linkname=str(victims / "overlay-init"),
        ),
    ]
    await pusher.image("evil/tmplink", "v1", [make_layer(hostile)])
    im = await images.pull(f"{registry.host}/evil/tmplink:v1", "tmplink", _noop)
    assert {p.name: _snapshot(p) for p in victims.iterdir()} == before
    # The image itself got its files, in the image.
    fstab = dcat(Path(im.rootfs), "/etc/fstab").decode()
    # /root is mounted by overlay-init now: the image keeps its own lines, gains none.
    assert inject.FSTAB_WORK_LINE not in fstab and "attacker-line" in fstab
    assert "overlay-init" in dls(Path(im.rootfs), "/usr/lib/stoker")


async def test_root_linked_to_a_host_directory_is_not_copied(
    daemon: Daemon, pusher: Pusher, registry: RegistryProcess, tmp_path: Path
) -> None:
    """Escape 2: `/root -> /proc/self/root/<host dir>` made `mkfs.ext4 -d` copy the host
    directory into work-seed.ext4."""
    images = daemon.images
    assert images is not None
    hostdir = tmp_path / "host-home"
    hostdir.mkdir()
    (hostdir / "id_secret").write_text("host private key\n")
    os.chmod(hostdir, 0o700)
    hostile = [*base_entries(root_home=False), Entry("root", "symlink",
               linkname=f"/proc/self/root{hostdir}")]  # fmt: skip
    await pusher.image("evil/roothome", "v1", [make_layer(hostile)])
    im = await images.pull(f"{registry.host}/evil/roothome:v1", "roothome", _noop)
    assert im.work_seed is not None
    seed = Path(im.work_seed)
    assert "id_secret" not in dls(seed, "/")
    assert b"host private key" not in seed.read_bytes()
    assert sorted(os.listdir(hostdir)) == ["id_secret"]
    assert stat.S_IMODE(hostdir.stat().st_mode) == 0o700
    # /root in the image is a real directory now (the mount point of the work disk).
    assert "root" in dls(Path(im.rootfs), "/")
    assert set(dls(Path(im.rootfs), "/root")) <= {".", ".."}


async def test_injection_runs_off_the_event_loop(
    daemon: Daemon,
    pusher: Pusher,
    registry: RegistryProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = daemon.images
    assert images is not None
    seen: list[threading.Thread] = []
    real = inject.inject_guest_files

    def spy(root: Path, **kw: Any) -> None:
        seen.append(threading.current_thread())
        real(root, **kw)

    monkeypatch.setattr(inject, "inject_guest_files", spy)
    await pusher.image("ok/offloop", "v1", [make_layer(base_entries())])
    await images.pull(f"{registry.host}/ok/offloop:v1", "offloop", _noop)
    assert len(seen) == 1 and seen[0] is not threading.main_thread()


async def test_oversized_fstab_is_refused_and_nothing_is_published(
    daemon: Daemon, pusher: Pusher, registry: RegistryProcess
) -> None:
    images = daemon.images
    assert images is not None
    big = b"\n" * (inject.MAX_CONFIG_READ + 1)
    await pusher.image(
        "evil/fstab", "v1", [make_layer([*base_entries(), Entry("etc/fstab", data=big)])]
    )
    with pytest.raises(TooLarge, match=r"/etc/fstab in the image is \d+ bytes, over"):
        await images.pull(f"{registry.host}/evil/fstab:v1", "fstab", _noop)
    assert await images.list_images() == []
    _assert_nothing_left(daemon)


async def test_bad_tar_metadata_is_an_unsafe_layer(
    daemon: Daemon, pusher: Pusher, registry: RegistryProcess
) -> None:
    images = daemon.images
    assert images is not None
    layer = make_layer([*base_entries(), Entry("etc/owned", data=b"x", uid=1 << 40)])
    await pusher.image("evil/uid", "v1", [layer])
    with pytest.raises(UnsafeLayer, match=r"entry 'etc/owned' has an out-of-range uid"):
        await images.pull(f"{registry.host}/evil/uid:v1", "uid", _noop)
    _assert_nothing_left(daemon)


async def test_layer_over_the_configured_ceiling_is_refused(
    pusher: Pusher, registry: RegistryProcess, tmp_path: Path
) -> None:
    d = _daemon(tmp_path, max_layer_size="2M")
    assert d.images is not None
    bomb = make_layer([*base_entries(), Entry("zeros", data=bytes(6 << 20))])
    assert bomb.size < 1 << 20
    await pusher.image("evil/bomb", "v1", [bomb])
    with pytest.raises(LayerTooLarge, match=r"more than 2 MiB \(max_layer_size\)"):
        await d.images.pull(f"{registry.host}/evil/bomb:v1", "bomb", _noop)
    _assert_nothing_left(d)


async def test_a_layer_too_deep_for_mkfs_is_refused_and_cleaned_up(
    daemon: Daemon, pusher: Pusher, registry: RegistryProcess
) -> None:
    """1,100 nested directories: once RecursionError in tree_usage and the cleanup (staging
    left behind); mke2fs 1.47 then aborts with heap corruption on such paths. Refused
    as an unsafe layer, nothing left."""
    images = daemon.images
    assert images is not None
    deep = [Entry("/".join(["d"] * i), "dir") for i in range(1, 1101)]
    deep.append(Entry("/".join(["d"] * 1100) + "/leaf", data=b"deep\n"))
    await pusher.image("evil/deep", "v1", [make_layer([*base_entries(), *deep])])
    with pytest.raises(UnsafeLayer, match=r"over the 1536 stoker accepts"):
        await images.pull(f"{registry.host}/evil/deep:v1", "deep", _noop)
    _assert_nothing_left(daemon)
