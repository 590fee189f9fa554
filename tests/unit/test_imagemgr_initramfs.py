"""stoker's own initramfs for the golden image: module load order, the archive, fallbacks."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from stoker.daemon.imagemgr import golden, initramfs

pytestmark = pytest.mark.unit

VER = "6.1.0-9-cloud-amd64"
INTERP = "/lib/klibc-ABCdef_12-x.so"


def fake_elf(interp: str | None) -> bytes:
    """A minimal ELF64 with (optionally) one PT_INTERP program header."""
    phoff, phentsize = 64, 56
    body = (interp.encode() + b"\0") if interp else b""
    phnum = 1 if interp else 0
    head = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    head += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64, phentsize, phnum, 0, 0, 0)
    ph = b""
    if interp:
        off = phoff + phentsize
        ph = struct.pack("<IIQQQQQQ", 3, 4, off, off, off, len(body), len(body), 1)
    return head + ph + body


def fake_tree(tmp_path: Path, *, klibc: bool = True, xz: bool = False) -> Path:
    tree = tmp_path / "tree"
    mods = tree / "usr/lib/modules" / VER
    ko = ".ko.xz" if xz else ".ko"
    rel = {
        "virtio_ring": f"kernel/drivers/virtio/virtio_ring{ko}",
        "virtio": f"kernel/drivers/virtio/virtio{ko}",
        "virtio_mmio": f"kernel/drivers/virtio/virtio_mmio{ko}",
        "virtio_blk": f"kernel/drivers/block/virtio_blk{ko}",
        "failover": f"kernel/net/core/failover{ko}",
        "net_failover": f"kernel/drivers/net/net_failover{ko}",
        "virtio_net": f"kernel/drivers/net/virtio_net{ko}",
        "virtio_rng": f"kernel/drivers/char/hw_random/virtio-rng{ko}",
        "virtio_console": f"kernel/drivers/char/virtio_console{ko}",
        "vsock": f"kernel/net/vmw_vsock/vsock{ko}",
        "common": f"kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common{ko}",
        "vmw_vsock_virtio_transport": f"kernel/net/vmw_vsock/vmw_vsock_virtio_transport{ko}",
        "overlay": f"kernel/fs/overlayfs/overlay{ko}",
        "unrelated": f"kernel/drivers/md/dm-mod{ko}",
    }
    deps = {
        "virtio_mmio": ["virtio_ring", "virtio"],
        "virtio_blk": ["virtio_ring", "virtio"],
        "virtio_net": ["net_failover", "virtio_ring", "virtio", "failover"],
        "net_failover": ["failover"],
        "virtio_rng": ["virtio_ring", "virtio"],
        "virtio_console": ["virtio_ring", "virtio"],
        "vmw_vsock_virtio_transport": ["common", "virtio_ring", "virtio", "vsock"],
        "common": ["vsock"],
    }
    for name, path in rel.items():
        (mods / path).parent.mkdir(parents=True, exist_ok=True)
        (mods / path).write_bytes(f"module {name}".encode())
    (mods / "modules.dep").write_text(
        "".join(f"{rel[n]}:{''.join(' ' + rel[d] for d in deps.get(n, []))}\n" for n in rel)
    )
    (mods / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    if klibc:
        kb = tree / "usr/lib/klibc/bin"
        kb.mkdir(parents=True)
        for tool in initramfs.KLIBC_TOOLS:
            (kb / tool).write_bytes(fake_elf(INTERP) + tool.encode())
        (tree / "usr" / INTERP.lstrip("/")).write_bytes(b"klibc shared library")
        (tree / "lib").symlink_to("usr/lib")  # merged /usr, as on Debian
    return tree


def indexes(tree: Path) -> tuple[str, str]:
    mods = tree / "usr/lib/modules" / VER
    return (mods / "modules.dep").read_text(), (mods / "modules.builtin").read_text()


def members(data: bytes) -> dict[str, bytes]:
    """name -> content of an uncompressed newc archive."""
    out: dict[str, bytes] = {}
    pos = 0
    while data[pos : pos + 6] == b"070701":
        namesize = int(data[pos + 94 : pos + 102], 16)
        size = int(data[pos + 54 : pos + 62], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        out[name] = data[pos : pos + size]
        pos = (pos + size + 3) & ~3
    return out


def test_load_order_puts_dependencies_first_and_skips_builtins(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    order = initramfs.load_order(*indexes(tree), golden.INITRAMFS_MODULES)
    assert order is not None
    names = [p.rsplit("/", 1)[-1] for p in order]
    assert len(names) == len(set(names))
    assert "dm-mod.ko" not in names and not any("ext4" in n for n in names)
    for mod, dep in [
        ("virtio_mmio.ko", "virtio.ko"),
        ("virtio_mmio.ko", "virtio_ring.ko"),
        ("virtio_net.ko", "net_failover.ko"),
        ("net_failover.ko", "failover.ko"),
        ("vmw_vsock_virtio_transport.ko", "vmw_vsock_virtio_transport_common.ko"),
        ("vmw_vsock_virtio_transport_common.ko", "vsock.ko"),
    ]:
        assert names.index(dep) < names.index(mod), (dep, mod)
    assert set(names) >= {"virtio-rng.ko", "virtio_console.ko", "overlay.ko", "virtio_blk.ko"}


def test_load_order_refuses_unknown_or_compressed_modules(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    assert initramfs.load_order(*indexes(tree), ["virtio_blk", "no_such_module"]) is None
    xz = fake_tree(tmp_path / "xz", xz=True)
    assert initramfs.load_order(*indexes(xz), ["virtio_blk"]) is None
    assert initramfs.build(xz, VER, ["virtio_blk"]) is None
    assert initramfs.load_order("../../etc/x.ko:\n", "", ["x"]) is None


def test_build_reads_inside_the_tree_only(tmp_path: Path) -> None:
    """A module path that is an absolute link resolves inside the tree, as in the guest:
    the host's file is never read into the image."""
    tree = fake_tree(tmp_path)
    outside = tmp_path / "host-secret"
    outside.write_bytes(b"host secret")
    ko = tree / "usr/lib/modules" / VER / "kernel/drivers/virtio/virtio.ko"
    ko.unlink()
    ko.symlink_to(outside)
    assert initramfs.build(tree, VER, golden.INITRAMFS_MODULES) is None
    assert initramfs.build(tree, "../../..", golden.INITRAMFS_MODULES) is None


def test_build_is_klibc_modules_and_init(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    data = initramfs.build(tree, VER, golden.INITRAMFS_MODULES)
    assert data is not None
    assert data[:6] == b"070701", "uncompressed: the kernel has nothing to decompress"
    got = members(data)
    assert got["init"] == initramfs.INIT.encode()
    for tool in initramfs.KLIBC_TOOLS:
        assert got[f"bin/{tool}"].endswith(tool.encode())
    # klibc's binaries name their shared library as interpreter: it is where they look.
    assert got[INTERP.lstrip("/")] == b"klibc shared library"
    order = got["modules/order"].decode().split()
    assert order[:3] == ["virtio_ring.ko", "virtio.ko", "virtio_mmio.ko"]
    for name in order:
        assert got[f"modules/{name}"].startswith(b"module ")
    assert "dev/console" in got
    # What the golden build checks it against: nothing missing.
    img = tmp_path / "initrd.img"
    img.write_bytes(data)
    assert golden.missing_initramfs_modules(img, tree / "usr/lib/modules" / VER) == []
    assert len(data) % 512 == 0


def test_build_without_klibc_falls_back(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path, klibc=False)
    assert initramfs.build(tree, VER, golden.INITRAMFS_MODULES) is None
    odd = fake_tree(tmp_path / "odd")
    # An interpreter outside /lib/klibc-*.so is not followed into the tree.
    (odd / "usr/lib/klibc/bin/sh").write_bytes(fake_elf("/../../etc/passwd"))
    assert initramfs.build(odd, VER, golden.INITRAMFS_MODULES) is None


def test_elf_interpreter() -> None:
    assert initramfs.elf_interpreter(fake_elf(INTERP)) == INTERP
    assert initramfs.elf_interpreter(fake_elf(None)) is None
    assert initramfs.elf_interpreter(b"#!/bin/sh\n") is None


def test_postprocess_installs_the_lean_initramfs(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    for d in ("boot", "etc/ssh", "var/cache/apt/archives", "var/lib/dpkg", "root"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "boot" / f"vmlinuz-{VER}").write_bytes(b"kernel")
    debian = gzip.compress(b"debian initramfs")
    (tree / "boot" / f"initrd.img-{VER}").write_bytes(
        gzip.compress(
            b"".join(
                initramfs_entry(f"usr/lib/modules/{VER}/{m}.ko") for m in golden.INITRAMFS_MODULES
            )
            + initramfs_entry("TRAILER!!!")
        )
    )
    (tree / "var/lib/dpkg/status").write_text("Status: install ok installed\n")
    out = tmp_path / "kernel"
    golden._postprocess(tree, out)
    got = members((out / "initrd.img").read_bytes())
    assert "modules/order" in got and "init" in got
    assert list((tree / "boot").iterdir()) == []
    assert (out / "initrd.img").read_bytes() != debian


def initramfs_entry(name: str) -> bytes:
    c = initramfs._Cpio()
    c.file(name, b"k")
    return b"".join(c.parts)


def test_init_is_valid_sh() -> None:
    assert initramfs.INIT.startswith("#!/bin/sh\n")
    shells = [s for s in ("dash", "sh") if shutil.which(s)]
    for sh in shells:
        r = subprocess.run([sh, "-n"], input=initramfs.INIT.encode(), capture_output=True)
        assert r.returncode == 0, f"{sh}: {r.stderr.decode()}"
    for needle in ("insmod", "run-init /root", "mount -o move", "root=/dev/*"):
        assert needle in initramfs.INIT, needle
