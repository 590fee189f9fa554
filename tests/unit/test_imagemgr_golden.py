"""Golden build pieces that need no network or root: sources, spec hash, argv, progress,
initramfs inspection, post-processing of a tree, the no-op rebuild."""

from __future__ import annotations

import gzip
import json
import os
import stat
import time
from pathlib import Path

import pytest

from stoker.daemon.imagemgr import golden
from stoker.errors import CommandFailed, InvalidArgument, PermissionDenied
from stoker.runner import RecordingRunner

pytestmark = pytest.mark.unit


def apt_dir(tmp_path: Path, *, sources: str = "", lists: dict[str, str] | None = None) -> Path:
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    (d / "sources.list").write_text(sources)
    for name, text in (lists or {}).items():
        (d / "sources.list.d" / name).write_text(text)
    return d


DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no
"""


def test_host_sources_deb822(tmp_path: Path) -> None:
    d = apt_dir(
        tmp_path,
        lists={
            "debian.sources": DEB822,
            # Not a .list/.sources file: ignored.
            "other.list.disabled": "deb http://wrong.example/debian bookworm main\n",
            "nodesource.sources": "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\n"
            "Suites: nodistro\nComponents: main\n",
        },
    )
    assert golden.host_debian_mirror("bookworm", d) == "http://mirror.example/debian"
    assert golden.resolve_sources("bookworm", None, d) == (
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main",
    )


def test_host_sources_one_line_format(tmp_path: Path) -> None:
    d = apt_dir(
        tmp_path,
        sources="# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://one.example/debian/ "
        "bookworm main non-free\ndeb-src http://one.example/debian bookworm main\n",
    )
    assert golden.host_debian_mirror("bookworm", d) == "http://one.example/debian/"
    assert golden.resolve_sources("bookworm", None, d) == (
        "deb http://one.example/debian bookworm main",
    )


def test_sources_fallback_and_explicit_mirror(tmp_path: Path) -> None:
    d = apt_dir(tmp_path, sources="deb http://x.example/ubuntu jammy main\n")
    assert golden.host_debian_mirror("bookworm", d) is None
    assert golden.resolve_sources("bookworm", None, d)[0] == (
        "deb http://deb.debian.org/debian bookworm main"
    )
    assert golden.resolve_sources("bookworm", "http://m.example/debian/", d) == (
        "deb http://m.example/debian bookworm main",
        "deb http://m.example/debian bookworm-updates main",
    )
    with pytest.raises(InvalidArgument, match="mirror"):
        golden.resolve_sources("bookworm", "ftp://nope", d)
    with pytest.raises(InvalidArgument, match="suite"):
        golden.golden_spec("Bookworm; rm -rf /", None, d)


def test_spec_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    d = apt_dir(tmp_path)
    a = golden.golden_spec("bookworm", "http://a.example/debian", d)
    b = golden.golden_spec("bookworm", "http://b.example/debian", d)
    assert golden.spec_hash(a) == golden.spec_hash(
        golden.golden_spec("bookworm", "http://a.example/debian", d)
    )
    assert golden.spec_hash(a) != golden.spec_hash(b)
    assert golden.spec_hash(a) != golden.spec_hash(
        golden.golden_spec("trixie", "http://a.example/debian", d)
    )


def test_mmdebstrap_argv(tmp_path: Path) -> None:
    spec = golden.GoldenSpec("bookworm", ("deb http://m/debian bookworm main",))
    argv = golden._mmdebstrap_argv(spec, tmp_path / "tree", tmp_path / "log", tmp_path / "cache")
    assert argv[:8] == [
        "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
        "--mount-proc",
    ]  # fmt: skip
    assert "mmdebstrap" in argv and "--mode=root" in argv and "--variant=minbase" in argv
    include = next(a for a in argv if a.startswith("--include="))
    for pkg in ("systemd-sysv", "openssh-server", "python3", "linux-image-cloud-amd64"):
        assert pkg in include.split("=", 1)[1].split(",")
    hook = next(a for a in argv if a.startswith("--essential-hook="))
    assert "MODULES=list" in hook and "virtio_mmio\\nvirtio_blk" in hook
    assert f"--setup-hook=sync-in {tmp_path / 'cache'} /var/cache/apt/archives/" in argv
    assert argv[-3:] == ["bookworm", str(tmp_path / "tree"), "deb http://m/debian bookworm main"]
    no_cache = golden._mmdebstrap_argv(spec, tmp_path / "t", tmp_path / "l", None)
    assert not any("sync-in" in a for a in no_cache)


LOG = """\
I: automatically chosen mode: root
I: running apt-get update...
Get:1 http://m/debian bookworm InRelease [151 kB]
I: downloading packages with apt...
0 upgraded, 3 newly installed, 0 to remove and 0 not upgraded.
Get:1 http://m/debian bookworm/main amd64 base-files amd64 12.4 [70.8 kB]
Get:2 http://m/debian bookworm/main amd64 bash amd64 5.2 [1489 kB]
I: extracting archives...
I: installing essential packages...
I: installing remaining packages inside the chroot...
0 upgraded, 2 newly installed, 0 to remove and 0 not upgraded.
Get:1 http://m/debian bookworm/main amd64 git amd64 1 [1 kB]
E: Failed to fetch http://m/debian/pool/x.deb  404  Not Found
"""


def test_log_tail_reports_stages_and_counts(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []
    log = tmp_path / "log"
    tail = golden._LogTail(log, lambda s, d: calls.append((s, d)))
    tail.poll()  # not there yet
    half = LOG.index("I: extracting")
    log.write_text(LOG[: half + 5])  # ends mid-line
    tail.poll()
    with log.open("a") as f:
        f.write(LOG[half + 5 :])
    tail.poll()
    stages = [d for s, d in calls if s == "bootstrap"]
    assert stages == [
        "updating package lists",
        "downloading packages",
        "extracting packages",
        "installing essential packages",
        "installing packages",
    ]
    downloads = [d for s, d in calls if s == "download"]
    # Index fetches (InRelease) are not packages; counts grow across both apt runs.
    assert downloads == ["1/3 packages", "2/3 packages", "3/5 packages"]
    assert "Failed to fetch" in tail.summary()


def newc(entries: list[tuple[str, bytes]]) -> bytes:
    out = bytearray()
    for i, (name, data) in enumerate([*entries, ("TRAILER!!!", b"")]):
        nb = name.encode() + b"\0"
        mode = 0o100644 if data or name != "TRAILER!!!" else 0
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (i + 1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        out += hdr.encode() + nb
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def test_initramfs_members_and_missing_modules(tmp_path: Path) -> None:
    ver = "6.1.0-1-cloud-amd64"
    mods = [
        f"usr/lib/modules/{ver}/kernel/drivers/virtio/virtio_mmio.ko",
        f"usr/lib/modules/{ver}/kernel/drivers/block/virtio_blk.ko",
        f"usr/lib/modules/{ver}/kernel/drivers/char/hw_random/virtio-rng.ko",
        f"usr/lib/modules/{ver}/kernel/net/vmw_vsock/vsock.ko.xz",
    ]
    early = newc([("kernel/x86/microcode/GenuineIntel.bin", b"ucode")])
    main = gzip.compress(newc([("init", b"#!/bin/sh\n"), *((m, b"ko") for m in mods)]))
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(early + b"\0" * 512 + main)
    names = golden.initramfs_members(initrd.read_bytes())
    assert names[0] == "kernel/x86/microcode/GenuineIntel.bin" and "init" in names
    moddir = tmp_path / "modules"
    moddir.mkdir()
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    missing = golden.missing_initramfs_modules(initrd, moddir)
    assert missing == ["virtio_net", "virtio_console", "vmw_vsock_virtio_transport", "overlay"]


def fake_built_tree(tmp_path: Path, *, modules_ok: bool = True) -> Path:
    ver = "6.1.0-9-cloud-amd64"
    tree = tmp_path / "tree"
    for d in ("boot", "etc/ssh", "var/cache/apt/archives", "var/lib/dpkg", "root",
              f"usr/lib/modules/{ver}", "etc/dpkg/dpkg.cfg.d"):  # fmt: skip
        (tree / d).mkdir(parents=True)
    (tree / "boot" / f"vmlinuz-{ver}").write_bytes(b"kernel")
    present = [m for m in golden.INITRAMFS_MODULES if m != "ext4"]
    if not modules_ok:
        present.remove("overlay")
    (tree / "boot" / f"initrd.img-{ver}").write_bytes(
        gzip.compress(newc([(f"usr/lib/modules/{ver}/{m}.ko", b"k") for m in present]))
    )
    (tree / f"usr/lib/modules/{ver}/modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    (tree / "vmlinuz").symlink_to(f"boot/vmlinuz-{ver}")
    (tree / "initrd.img.old").symlink_to(f"boot/initrd.img-{ver}")
    (tree / "var/cache/apt/archives/bash_5.2_amd64.deb").write_bytes(b"deb")
    (tree / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (tree / "etc/ssh/sshd_config").write_text("Include /etc/ssh/sshd_config.d/*.conf\n")
    (tree / "etc/hostname").write_text("buildhost\n")
    (tree / "etc/fstab").write_text("# UNCONFIGURED FSTAB FOR BASE SYSTEM\n")
    (tree / "etc/dpkg/dpkg.cfg.d/99mmdebstrap").write_text(
        "path-exclude=/usr/share/man/*\nforce-unsafe-io\n"
    )
    (tree / "var/lib/dpkg/status").write_text(
        "Package: a\nStatus: install ok installed\n\nPackage: b\nStatus: install ok installed\n"
    )
    return tree


def test_postprocess_moves_kernel_and_cleans_the_tree(tmp_path: Path) -> None:
    tree = fake_built_tree(tmp_path)
    out = tmp_path / "kernel"
    version, packages = golden._postprocess(tree, out)
    assert (version, packages) == ("6.1.0-9-cloud-amd64", 2)
    assert (out / "vmlinuz").read_bytes() == b"kernel"
    assert (out / "initrd.img").is_file()
    assert list((tree / "boot").iterdir()) == []
    assert not (tree / "vmlinuz").is_symlink() and not (tree / "initrd.img.old").is_symlink()
    assert list((tree / "var/cache/apt/archives").iterdir()) == []
    assert not (tree / "etc/ssh/ssh_host_ed25519_key").exists()
    assert (tree / "etc/hostname").read_text() == "stoker\n"
    assert (tree / "etc/resolv.conf").read_text() == ""
    assert "force-unsafe-io" not in (tree / "etc/dpkg/dpkg.cfg.d/99mmdebstrap").read_text()
    assert (tree / "usr/lib/stoker/overlay-init").is_file()
    assert "/root" not in (tree / "etc/fstab").read_text()


def test_postprocess_applies_the_lean_boot(tmp_path: Path) -> None:
    tree = fake_built_tree(tmp_path)
    (tree / "usr").mkdir(exist_ok=True)
    os.utime(tree / "usr", (1_700_000_000, 1_700_000_000))
    (tree / "etc/systemd/system").mkdir(parents=True, exist_ok=True)
    # An enabled unit (a real file where the mask goes) is replaced by the mask.
    (tree / "etc/systemd/system/fstrim.timer").write_text("[Timer]\n")
    golden._postprocess(tree, tmp_path / "kernel")
    for unit in golden.MASKED_UNITS:
        link = tree / "etc/systemd/system" / unit
        assert link.is_symlink() and os.readlink(link) == "/dev/null", unit
    assert {"e2scrub_reap.service", "systemd-logind.service", "dbus.socket"} <= set(
        golden.MASKED_UNITS
    )
    for gen in golden.MASKED_GENERATORS:
        assert os.readlink(tree / "etc/systemd/system-generators" / gen) == "/dev/null"
    assert "systemd-fstab-generator" not in golden.MASKED_GENERATORS
    dropin = (tree / "etc/systemd/system/ssh.service.d/stoker-lean.conf").read_text()
    assert "DefaultDependencies=no" in dropin and "ExecStartPre=\n" in dropin
    journald = (tree / "etc/systemd/journald.conf.d/stoker-volatile.conf").read_text()
    assert "Storage=volatile" in journald
    # systemd's ConditionNeedsUpdate= compares /usr's mtime with these stamps.
    for d in ("etc", "var"):
        stamp = tree / d / ".updated"
        assert stamp.stat().st_mtime_ns >= (tree / "usr").stat().st_mtime_ns
        assert "TIMESTAMP_NSEC=1700000000000000000" in stamp.read_text()


def test_postprocess_refuses_an_initramfs_without_the_modules(tmp_path: Path) -> None:
    tree = fake_built_tree(tmp_path, modules_ok=False)
    with pytest.raises(CommandFailed, match="lacks modules overlay"):
        golden._postprocess(tree, tmp_path / "kernel")


def write_fake_build(out: Path, digest: str) -> None:
    (out / "kernel").mkdir(parents=True)
    for rel in ("rootfs.ext4", "work-seed.ext4", "kernel/vmlinuz", "kernel/initrd.img"):
        (out / rel).write_bytes(b"x")
    (out / "manifest.json").write_text(
        json.dumps({"spec_hash": digest, "kernel_version": "6.1.0-9-cloud-amd64", "packages": 7})
    )


async def test_same_spec_is_a_noop(tmp_path: Path) -> None:
    d = apt_dir(tmp_path)
    out = tmp_path / "images" / "debian-bookworm"
    write_fake_build(out, golden.spec_hash(golden.golden_spec("bookworm", None, d)))
    runner = RecordingRunner()
    calls: list[tuple[str, str]] = []
    t0 = time.monotonic()
    res = await golden.build_golden(
        runner, out, apt_dir=d, progress=lambda s, m: calls.append((s, m))
    )
    assert time.monotonic() - t0 < 1.0
    assert runner.calls == []
    assert res.reused and res.kernel_version == "6.1.0-9-cloud-amd64" and res.packages == 7
    assert res.rootfs == out / "rootfs.ext4" and res.initrd == out / "kernel/initrd.img"
    assert calls and calls[-1][0] == "done"


def test_incomplete_or_foreign_builds_are_not_reused(tmp_path: Path) -> None:
    out = tmp_path / "b"
    write_fake_build(out, "abc")
    assert golden.read_manifest(out) is not None
    (out / "kernel" / "initrd.img").unlink()
    assert golden.read_manifest(out) is None
    (out / "manifest.json").write_text("{not json")
    assert golden.read_manifest(out) is None
    assert golden.read_manifest(tmp_path / "nothing") is None


async def test_building_without_root_needs_a_subid_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 54321)
    monkeypatch.setattr(golden.shutil, "which", lambda t: f"/usr/bin/{t}")
    etc = tmp_path / "etc"
    etc.mkdir()
    monkeypatch.setattr(golden, "SUBID_DIR", etc)
    runner = RecordingRunner()
    with pytest.raises(PermissionDenied, match=r"needs a range of 65536 ids for 54321 in .*subuid"):
        await golden.build_golden(runner, tmp_path / "out", apt_dir=apt_dir(tmp_path))
    assert runner.calls == []
    assert not (tmp_path / "out").exists()
    (etc / "subuid").write_text("54321:100000:65536\n")
    (etc / "subgid").write_text("other:100000:65536\n54321:200000:1000\n")
    with pytest.raises(PermissionDenied, match="subgid"):
        golden.check_unshare_mode()
    (etc / "subgid").write_text("54321:200000:65536\n")
    golden.check_unshare_mode()  # enough


def test_building_without_root_needs_newuidmap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 54321)
    monkeypatch.setattr(golden.shutil, "which", lambda t: None if t == "newuidmap" else t)
    with pytest.raises(PermissionDenied, match="needs newuidmap: install the package uidmap"):
        golden.check_unshare_mode()


def test_mmdebstrap_argv_unshare_mode(tmp_path: Path) -> None:
    spec = golden.golden_spec("bookworm", None, apt_dir(tmp_path))
    argv = golden._mmdebstrap_argv(
        spec, tmp_path / "t.tar", tmp_path / "log", tmp_path / "cache", unshare=True
    )
    assert argv[0] == "mmdebstrap" and "unshare" not in argv
    assert "--mode=unshare" in argv and "--format=tar" in argv
    assert argv[-1 - len(spec.sources)] == str(tmp_path / "t.tar")
    chown = argv.index('--customize-hook=chown -R 0:0 "$1/var/cache/apt/archives"')
    assert chown > argv.index(
        f"--customize-hook=sync-out /var/cache/apt/archives {tmp_path / 'cache'}"
    )


def test_postprocess_writes_stay_inside_the_tree(tmp_path: Path) -> None:
    """systemd-resolved images link /etc/resolv.conf to an absolute path: rewriting it
    (and hostname, hosts, the dpkg config) must land inside the tree, never on the host."""
    host = tmp_path / "host"
    host.mkdir()
    for name in ("resolv.conf", "hosts", "dpkg.cfg"):
        (host / name).write_text(f"host {name}\n")
    tree = fake_built_tree(tmp_path)
    (tree / "etc/resolv.conf").symlink_to(str(host / "resolv.conf"))
    (tree / "etc/hosts").symlink_to(str(host / "hosts"))
    (tree / "etc/dpkg/dpkg.cfg.d/99mmdebstrap").unlink()
    (tree / "etc/dpkg/dpkg.cfg.d/99mmdebstrap").symlink_to(str(host / "dpkg.cfg"))
    golden._postprocess(tree, tmp_path / "kernel")
    for name in ("resolv.conf", "hosts", "dpkg.cfg"):
        assert (host / name).read_text() == f"host {name}\n", name
    assert not (tree / "etc/resolv.conf").is_symlink()
    assert (tree / "etc/resolv.conf").read_text() == ""


def test_postprocess_refuses_a_kernel_that_is_a_symlink(tmp_path: Path) -> None:
    host = tmp_path / "host-file"
    host.write_text("host\n")
    os.chmod(host, 0o600)
    tree = fake_built_tree(tmp_path)
    (tree / "boot" / "vmlinuz-6.1.0-9-cloud-amd64").unlink()
    (tree / "boot" / "vmlinuz-6.1.0-9-cloud-amd64").symlink_to(host)
    with pytest.raises(CommandFailed, match="not a regular file"):
        golden._postprocess(tree, tmp_path / "kernel")
    assert stat.S_IMODE(host.stat().st_mode) == 0o600
