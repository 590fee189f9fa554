"""Kernel import from .deb packages: a package built here, a corrupt one, and the real
Debian cloud kernel (downloaded once into the test cache; skipped when offline)."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from prereq import require
from stoker.daemon.imagemgr import kernel as km
from stoker.errors import InvalidArgument, NotFound
from stoker.runner import RecordingRunner, Runner

pytestmark = pytest.mark.integration

CACHE = Path(os.environ.get("STOKER_TEST_CACHE", "/var/cache/stoker-test"))


def fake_elf() -> bytes:
    hdr = bytearray(64)
    hdr[0:4] = b"\x7fELF"
    hdr[4:7] = b"\x02\x01\x01"
    struct.pack_into("<HH", hdr, 16, 2, 0x3E)
    return bytes(hdr) + b"Linux version 6.1.0-99-cloud-amd64 (t@e) #1\n" + b"\0" * 100_000


def fake_bzimage(payload: bytes, *, usize: int, version: str) -> bytes:
    """Boot sector with the header fields the importer reads, then payload + size."""
    setup = bytearray(4 * 512)
    setup[0x1F1] = 3
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    vstr = f"{version} (t@e) #1\0".encode()
    setup[0x400 : 0x400 + len(vstr)] = vstr
    struct.pack_into("<H", setup, 0x20E, 0x200)
    full = payload + struct.pack("<I", usize)
    struct.pack_into("<II", setup, 0x248, 0, len(full))
    return bytes(setup) + full


@pytest.fixture(autouse=True)
def _dpkg() -> None:
    require(shutil.which("dpkg-deb"), "dpkg-deb is not installed")


def build_deb(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    root = tmp_path / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\nMaintainer: t <t@e>\n"
        "Description: test\n"
    )
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    deb = tmp_path / f"{name}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


async def test_import_built_deb(tmp_path: Path) -> None:
    ver = "6.1.0-99-cloud-amd64"
    elf = fake_elf()
    deb = build_deb(
        tmp_path,
        "linux-image-test",
        {
            f"boot/vmlinuz-{ver}": fake_bzimage(gzip.compress(elf), usize=len(elf), version=ver),
            f"boot/config-{ver}": b"CONFIG_X=y\n",
            f"lib/modules/{ver}/kernel/drivers/virtio/virtio_mmio.ko": b"ko",
        },
    )
    runner = RecordingRunner()
    files = await km.import_kernel(runner, deb, tmp_path / "kernels" / "k")
    assert runner.calls[0][:2] == ("dpkg-deb", "-x")
    assert files.version == ver and files.arch == "x86_64"
    assert files.vmlinux.read_bytes() == elf
    assert files.initrd is None  # packages carry none
    assert files.modules_dir is not None
    assert (files.modules_dir / ver / "kernel/drivers/virtio/virtio_mmio.ko").is_file()
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == ["k"]


async def test_corrupt_and_empty_packages(tmp_path: Path) -> None:
    good = build_deb(tmp_path, "meta", {"usr/share/doc/meta/README": b"metapackage\n"})
    with pytest.raises(NotFound, match="holds no kernel image"):
        await km.import_kernel(Runner(), good, tmp_path / "k1")
    corrupt = tmp_path / "corrupt.deb"
    data = good.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArgument, match="not a readable Debian package"):
        await km.import_kernel(Runner(), corrupt, tmp_path / "k2")
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == []
    assert not (tmp_path / "k1").exists() and not (tmp_path / "k2").exists()


def _download_cloud_kernel(dest: Path) -> Path:
    """The versioned package behind linux-image-cloud-amd64, cached across runs."""
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob("linux-image-*-cloud-amd64_*.deb"))
    if have:
        return have[-1]
    dep = subprocess.run(
        ["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True
    )
    m = re.search(r"Depends: (linux-image-\S+-cloud-amd64(?:-unsigned)?)", dep.stdout)
    require(
        dep.returncode == 0 and m is not None,
        "apt does not know linux-image-cloud-amd64 (run apt-get update)",
    )
    assert m is not None
    r = subprocess.run(
        ["apt-get", "download", "-q", m.group(1)],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=600,
    )
    require(
        r.returncode == 0, f"cannot download {m.group(1)} (offline?): {r.stderr.strip()[-300:]}"
    )
    return sorted(dest.glob("linux-image-*-cloud-amd64_*.deb"))[-1]


async def test_import_real_debian_cloud_kernel(tmp_path: Path) -> None:
    require(shutil.which("apt-get"), "apt-get is not available")
    deb = _download_cloud_kernel(CACHE / "kernel-deb")
    files = await km.import_kernel(Runner(), deb, tmp_path / "k")
    assert re.match(r"^\d+\.\d+\.\d+-\d+-cloud-amd64$", files.version), files.version
    assert deb.name.startswith(f"linux-image-{files.version}")
    elf = files.vmlinux.read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and files.arch == "x86_64"
    assert len(elf) > 20 * 1024 * 1024
    assert f"Linux version {files.version} ".encode() in elf
    assert files.bzimage is not None
    bz = files.bzimage.read_bytes()
    assert bz == next((tmp_path / "k").glob("bzImage")).read_bytes()
    assert km.bzimage_version(bz) == files.version
    # The kernel appends the payload's uncompressed size: it must match what we produced.
    setup_sects = bz[0x1F1] or 4
    off, length = struct.unpack_from("<II", bz, 0x248)
    start = (setup_sects + 1) * 512 + off
    assert struct.unpack_from("<I", bz, start + length - 4)[0] == len(elf)
    assert files.modules_dir is not None
    assert (files.modules_dir / files.version / "modules.builtin").is_file()
    # The e2e boot uses the kernel from the golden build; this one must be its equal.
    if shutil.which("lz4") and bz[start : start + 4] == struct.pack("<I", 0x184C2102):
        ref = subprocess.run(
            ["lz4", "-dc"], input=bz[start : start + length], capture_output=True
        ).stdout
        assert ref[: len(elf)] == elf
