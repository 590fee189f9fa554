"""`image pull` through ImageService: OCI images land as managed images with the guest
files injected, concurrent pulls of one ref coalesce, failures publish nothing, an image
without sshd becomes a workload root (its config kept; bad configs refused), and the blob
cache prunes."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from ocitestlib import Entry, Pusher, RegistryProcess, RegistryProxy, dcat, dls, make_layer

from stoker.config import parse_config
from stoker.daemon.daemon import Daemon
from stoker.daemon.imagemgr import ext4
from stoker.daemon.imagemgr.workload import DEFAULT_PATH
from stoker.daemon.vm_service import CreateRequest
from stoker.daemon.vmm.standin import StandInDriver
from stoker.errors import Conflict, InvalidArgument, NotFound, StokerError
from stoker.layout import Layout
from stoker.model.records import Kernel
from stoker.runner import Runner
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


def workload_config(env: list[str] | None, workdir: str = "/srv", user: str = "") -> bytes:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env, "WorkingDir": workdir, "User": user, "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    return json.dumps(doc).encode()


def no_sshd_layers() -> list[Any]:
    passwd = b"root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
    return [
        make_layer(
            [
                Entry("bin", "dir"),
                Entry("bin/sh", data=b"#!fake\n", mode=0o755),
                Entry("etc", "dir"),
                Entry("etc/os-release", data=b"ID=tiny\n"),
                Entry("etc/passwd", data=passwd),
                Entry("etc/group", data=b"root:x:0:\napp:x:1001:\nstaff:x:50:\n"),
                Entry("srv", "dir"),
            ]
        )
    ]


async def push_config(pusher: Pusher, repo: str, cfg: bytes) -> None:
    la = no_sshd_layers()
    doc = json.loads(cfg)
    doc["rootfs"]["diff_ids"] = [x.diff_id for x in la]
    await pusher.image(repo, "v1", la, config=json.dumps(doc).encode())


async def system_image(daemon: Daemon, tmp_path: Path, name: str, with_setup: bool) -> None:
    """A registered stand-in system image: an ext4 with (or without) the workload setup."""
    tree = tmp_path / f"{name}-tree"
    (tree / "usr/lib/stoker").mkdir(parents=True)
    if with_setup:
        (tree / "usr/lib/stoker/stoker-workload").write_text("#!/bin/sh\n")
    out = tmp_path / f"{name}.ext4"
    await ext4.build_from_dir(Runner(), tree, out, 64 << 20, label="t")
    assert daemon.images is not None
    await daemon.images.register_image(name, str(out), "k1")


def recorder(events: list[tuple[str, str]]) -> Any:
    def progress(stage: str, message: str = "", **fields: Any) -> None:
        events.append((stage, message))

    return progress


async def test_image_without_sshd_is_a_workload_root(
    daemon: Daemon, pusher: Pusher, registry: RegistryProcess, tmp_path: Path
) -> None:
    """No sshd: pulled as a workload root (nothing of stoker's injected, the config's
    Env/WorkingDir/User kept, resolved in the image's own passwd), and a VM on it boots
    the default system image with the workload root as its fourth disk."""
    images, vm = daemon.images, daemon.vm
    assert images is not None and vm is not None and daemon.store is not None
    cfg = workload_config(["PATH=/bin", "FOO=bar=baz"], "/srv", "app:staff")
    await push_config(pusher, "team/nossh", cfg)
    events: list[tuple[str, str]] = []
    im = await images.pull(f"{registry.host}/team/nossh:v1", "nossh", recorder(events))
    assert not im.has_sshd and im.role == "workload"
    assert "usr" not in dls(Path(im.rootfs), "/"), "guest files were injected into a workload root"
    wl = im.meta["workload"]
    assert wl["env"] == ["PATH=/bin", "FOO=bar=baz"]
    assert (wl["working_dir"], wl["uid"], wl["gid"], wl["home"]) == ("/srv", 1000, 50, "/home/app")
    assert any(st == "workload" for st, _ in events)
    assert not any(st == "note" for st, _ in events), "PATH was set: no default-PATH note"
    assert (await images.get_image("nossh")).role == "workload"  # as stored

    # A system image that predates workload roots is refused, with what to do.
    await system_image(daemon, tmp_path, "oldsys", with_setup=False)
    vm.config = parse_config({"default_image": "oldsys"})
    with pytest.raises(Conflict, match="predates workload roots"):
        await vm.create_vm(CreateRequest(name="x", image="nossh", no_start=True), _noop)
    assert await vm.list_vms() == []

    await system_image(daemon, tmp_path, "sys", with_setup=True)
    vm.config = parse_config({"default_image": "sys"})
    rec = await vm.create_vm(CreateRequest(name="w1", image="nossh", no_start=True), _noop)
    assert (rec.image, rec.system_image) == ("nossh", "sys")
    stored = daemon.store.get_vm(rec.id)
    assert stored is not None and stored.system_image == "sys"
    overlay = Path(rec.vm_dir) / "overlay.ext4"
    assert dcat(overlay, "/upper/etc/stoker/workload.env") == b"PATH=/bin\nFOO=bar=baz\n"
    conf = dcat(overlay, "/upper/etc/stoker/workload.conf").decode()
    assert "WORKLOAD_UID=1000\n" in conf and "WORKLOAD_GID=50\n" in conf
    assert "WORKLOAD_CWD=/srv\n" in conf and "WORKLOAD_HOME=/home/app\n" in conf
    dropin = dcat(overlay, "/upper/etc/ssh/sshd_config.d/stoker-workload.conf").decode()
    assert "ForceCommand /usr/lib/stoker/stoker-enter" in dropin
    assert "AcceptEnv STOKER_ROOT" in dropin
    # What the VMM is given: the system image's root and kernel, the workload root as vdd.
    kernel = await vm.boot_kernel(rec, im)
    vm._driver_cache = StandInDriver()
    mc = vm._machine_config(rec, kernel, im, "tap0")
    assert [d.id for d in mc.disks] == ["rootfs", "overlay", "work", "workload"]
    assert mc.disks[0].path == Path((await images.get_image("sys")).rootfs)
    assert mc.disks[3].path == Path(im.rootfs) and mc.disks[3].read_only
    assert mc.cmdline.endswith(" stoker.workload=/dev/vdd")
    # Neither image can go while the VM exists.
    for name in ("sys", "nossh"):
        with pytest.raises(Conflict, match="used by VM"):
            await images.delete_image(name)
    await vm.delete_vm("w1")
    await images.delete_image("nossh")
    assert not Path(im.rootfs).exists()
    with pytest.raises(StokerError):
        await images.get_image("nossh")


async def test_workload_config_without_path_gets_the_default(
    daemon: Daemon, pusher: Pusher, registry: RegistryProcess
) -> None:
    """An image config with no PATH: the documented default PATH, and a note saying so."""
    images = daemon.images
    assert images is not None
    await push_config(pusher, "team/nopath", workload_config(["FOO=1"], "", ""))
    events: list[tuple[str, str]] = []
    im = await images.pull(f"{registry.host}/team/nopath:v1", "nopath", recorder(events))
    assert im.meta["workload"]["env"] == [f"PATH={DEFAULT_PATH}", "FOO=1"]
    assert im.meta["workload"]["working_dir"] == "/"
    assert (im.meta["workload"]["uid"], im.meta["workload"]["home"]) == (0, "/root")
    notes = [m for st, m in events if st == "note"]
    assert len(notes) == 1 and "sets no PATH" in notes[0] and DEFAULT_PATH in notes[0]


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (workload_config(["PATH=/bin"], "/", "nobody"), "user 'nobody'"),
        (workload_config(["PATH=/bin"], "/", "app:wheel"), "group 'wheel'"),
        (workload_config(["PATH=/bin"], "srv", ""), "WorkingDir 'srv' is not an absolute"),
        (workload_config(["NOEQUALS"], "/", ""), "Env entry 1"),
        (workload_config(["A=line\nbreak"], "/", ""), "Env entry 1"),
    ],
)
async def test_bad_workload_config_is_refused_and_publishes_nothing(
    daemon: Daemon, pusher: Pusher, registry: RegistryProcess, cfg: bytes, match: str
) -> None:
    images = daemon.images
    assert images is not None and daemon.layout is not None
    await push_config(pusher, "team/bad", cfg)
    with pytest.raises(InvalidArgument, match=match):
        await images.pull(f"{registry.host}/team/bad:v1", "bad", _noop)
    assert await images.list_images() == []
    assert list(daemon.layout.images_dir.iterdir()) == []
    assert list(daemon.layout.staging_dir.iterdir()) == []


async def test_a_non_root_daemon_pulls_a_plain_oci_image_with_the_layers_owners(
    daemon: Daemon, pusher: Pusher, proxy: RegistryProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service wires the unprivileged path (ledger + debugfs fix-up) into both disks.

    `geteuid` is faked, so nothing on disk is chowned and every owner, mode and device in
    the images comes from the fix-up; tests/integration/oci/test_unprivileged_unpack.py
    runs the same path as a real plain user.
    """
    from stoker.daemon import image_service

    images = daemon.images
    assert images is not None and daemon.layout is not None
    extra = [
        Entry("usr/bin", "dir"),
        Entry("usr/bin/tool", data=b"\x7fELF", mode=0o4750, uid=0, gid=1234),
        Entry("dev", "dir"),
        Entry("dev/null", "char", mode=0o666, major=1, minor=3),
        Entry("root/.ssh", "dir", mode=0o700, uid=1000, gid=1000),
    ]
    await pusher.image("team/app", "v2", [*layers(True), make_layer(extra)])
    monkeypatch.setattr(image_service.os, "geteuid", lambda: 4321)
    im = await images.pull(f"{proxy.host}/team/app:v2", None, _noop)
    monkeypatch.undo()
    rootfs, seed, run = Path(im.rootfs), Path(im.work_seed or ""), Runner()
    tool = await ext4.stat_path(run, rootfs, "/usr/bin/tool")
    assert tool is not None and (tool.mode, tool.uid, tool.gid) == (0o4750, 0, 1234)
    sh = await ext4.stat_path(run, rootfs, "/bin/sh")
    assert sh is not None and (sh.mode, sh.uid) == (0o755, 0)  # 0400 stand-in on disk
    null = await ext4.stat_path(run, rootfs, "/dev/null")
    assert null is not None and (null.kind, null.mode) == ("character special", 0o666)
    init = await ext4.stat_path(run, rootfs, "/usr/lib/stoker/overlay-init")
    assert init is not None and (init.mode, init.uid) == (0o755, 0)
    ssh = await ext4.stat_path(run, seed, "/.ssh")
    assert ssh is not None and (ssh.mode, ssh.uid, ssh.gid) == (0o700, 1000, 1000)
    profile = await ext4.stat_path(run, seed, "/.profile")
    assert profile is not None and profile.mode == 0o644
    assert list(daemon.layout.staging_dir.iterdir()) == []
