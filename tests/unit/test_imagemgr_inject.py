"""The shared injection step: what lands in a root tree, idempotence, symlink safety."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from stoker.daemon.imagemgr import inject
from stoker.errors import InvalidArgument

pytestmark = pytest.mark.unit

CONTRACT_FILES = {
    "usr/lib/stoker/overlay-init": 0o755,
    "usr/lib/stoker/stoker-net": 0o755,
    "usr/lib/stoker/stoker-init": 0o755,
    "usr/lib/systemd/system/stoker-net.service": 0o644,
    "etc/ssh/sshd_config.d/stoker.conf": 0o644,
    "usr/lib/tmpfiles.d/stoker-sshd.conf": 0o644,
}


def debian_like(root: Path) -> Path:
    """A tiny tree shaped like a merged-usr Debian with sshd, host keys and an fstab."""
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "bin").mkdir()
    (root / "lib").symlink_to("usr/lib")
    (root / "bin").symlink_to("usr/bin")
    ssh = root / "etc" / "ssh"
    ssh.mkdir(parents=True)
    (ssh / "sshd_config").write_text("Include /etc/ssh/sshd_config.d/*.conf\nUsePAM yes\n")
    for k in ("rsa", "ecdsa", "ed25519"):
        (ssh / f"ssh_host_{k}_key").write_text("PRIVATE")
        (ssh / f"ssh_host_{k}_key.pub").write_text("PUBLIC")
    (ssh / "ssh_config").write_text("# client\n")
    (root / "etc" / "fstab").write_text(
        "# UNCONFIGURED FSTAB\nUUID=abcd / ext4 ro,errors=remount-ro 0 1\n"
        "tmpfs /tmp tmpfs defaults 0 0\n"
    )
    (root / "root").mkdir(mode=0o700)
    os.chmod(root / "root", 0o700)
    return root


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_packaged_files_cover_the_contract() -> None:
    files = inject.guest_files()
    for rel in CONTRACT_FILES:
        assert rel in files, rel
    conf = files["etc/ssh/sshd_config.d/stoker.conf"].decode()
    assert "PermitRootLogin prohibit-password" in conf
    assert "PasswordAuthentication no" in conf
    assert "HostKey /etc/ssh/ssh_host_ed25519_key" in conf
    assert files["usr/lib/tmpfiles.d/stoker-sshd.conf"].decode().split("\n")[-2] == (
        "d /run/sshd 0755 root root -"
    )
    unit = files["usr/lib/systemd/system/stoker-net.service"].decode()
    assert "Before=network-pre.target network.target" in unit
    # Lean boot: it runs at once (no udev ordering) and sshd does not wait for it.
    unit_section = unit.split("[Unit]")[1].split("[Service]")[0]
    assert "DefaultDependencies=no" in unit_section and "udev" not in unit_section
    assert "ssh.service" not in unit
    assert len(inject.guest_files_digest()) == 64


@pytest.mark.parametrize("script", ["overlay-init", "stoker-net", "stoker-init"])
def test_scripts_are_valid_posix_sh(script: str) -> None:
    data = inject.guest_files()[f"usr/lib/stoker/{script}"]
    assert data.startswith(b"#!/bin/sh\n")
    shells = [s for s in ("dash", "sh", "busybox") if shutil.which(s)]
    for sh in shells:
        argv = [sh, "sh", "-n"] if sh == "busybox" else [sh, "-n"]
        r = subprocess.run(argv, input=data, capture_output=True)
        assert r.returncode == 0, f"{sh}: {r.stderr.decode()}"


def test_overlay_init_follows_the_contract() -> None:
    text = inject.guest_files()["usr/lib/stoker/overlay-init"].decode()
    for needle in (
        "modprobe overlay",
        "/dev/vdb",
        "/run/stoker/rw" if "/run/stoker/rw" in text else 'STAGE/rw"',
        "lowerdir=/,upperdir=",
        "pivot_root",
        "mount --move",
        'exec "$NEXT_INIT" "$@"',
        "tmpfs upper layer",
    ):
        assert needle in text, needle
    assert "STAGE=/run/stoker" in text
    # The work disk goes on /root before the init runs (no fstab entry any more).
    mount_root = text.index('"$WORK_DEV" "$NEW/root"')
    assert "WORK_DEV=/dev/vdc" in text and mount_root < text.index("pivot_root . ")


def test_inject_systemd_tree(tmp_path: Path) -> None:
    root = debian_like(tmp_path / "root")
    inject.inject_guest_files(root)

    for rel, want in CONTRACT_FILES.items():
        p = root / rel
        assert p.is_file() and not p.is_symlink(), rel
        assert mode(p) == want, f"{rel}: {oct(mode(p))}"
        assert p.read_bytes() == inject.guest_files()[rel]
    wants = root / "etc/systemd/system/multi-user.target.wants/stoker-net.service"
    assert wants.is_symlink()
    assert os.readlink(wants) == "/usr/lib/systemd/system/stoker-net.service"
    assert not (root / "usr/lib/stoker/init.conf").exists()

    # overlay-init mounts / and /root: fstab keeps only the image's other entries.
    fstab = (root / "etc/fstab").read_text().splitlines()
    assert inject.FSTAB_WORK_LINE not in fstab
    assert "# disabled by stoker: UUID=abcd / ext4 ro,errors=remount-ro 0 1" in fstab
    assert "tmpfs /tmp tmpfs defaults 0 0" in fstab
    active = [ln.split() for ln in fstab if ln.strip() and not ln.startswith("#")]
    assert [f[1] for f in active] == ["/tmp"]

    ssh = sorted(p.name for p in (root / "etc/ssh").iterdir())
    assert ssh == ["ssh_config", "sshd_config", "sshd_config.d"]
    assert (root / "etc/ssh/sshd_config").read_text().count("Include") == 1
    assert mode(root / "root") == 0o755


def test_inject_is_idempotent(tmp_path: Path) -> None:
    root = debian_like(tmp_path / "root")
    inject.inject_guest_files(root)

    def snapshot() -> dict[str, tuple[int, bytes]]:
        out = {}
        for dirpath, dirs, files in os.walk(root):
            for n in dirs + files:
                p = Path(dirpath) / n
                data = (
                    os.readlink(p).encode()
                    if p.is_symlink()
                    else (b"" if p.is_dir() else p.read_bytes())
                )
                out[str(p.relative_to(root))] = (p.lstat().st_mode, data)
        return out

    first = snapshot()
    inject.inject_guest_files(root)
    assert snapshot() == first
    assert inject.FSTAB_WORK_LINE not in (root / "etc/fstab").read_text()


def test_inject_drops_the_work_line_of_older_versions(tmp_path: Path) -> None:
    """An image injected by an older stoker had /root in fstab; overlay-init mounts it now,
    and a second mount by systemd (with its fsck job and device wait) must not remain."""
    root = debian_like(tmp_path / "root")
    (root / "etc/fstab").write_text(f"tmpfs /tmp tmpfs defaults 0 0\n{inject.FSTAB_WORK_LINE}\n")
    inject.inject_guest_files(root)
    assert (root / "etc/fstab").read_text() == "tmpfs /tmp tmpfs defaults 0 0\n"


def test_inject_stoker_init_and_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    inject.inject_guest_files(root, init="stoker-init")
    conf = root / "usr/lib/stoker/init.conf"
    assert conf.read_text() == "STOKER_INIT=/usr/lib/stoker/stoker-init\n"
    # A bare tree gets the directories it needs and an empty fstab.
    assert (root / "etc/fstab").read_text() == ""
    assert mode(root / "root") == 0o755
    assert inject.is_injected(root)
    inject.inject_guest_files(root, init="systemd")
    assert not conf.exists()


def test_sshd_config_without_include_gets_one(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/sshd_config").write_text("PermitRootLogin yes\n")
    inject.inject_guest_files(root)
    text = (root / "etc/ssh/sshd_config").read_text()
    # First match wins in sshd_config, so the drop-ins must come first.
    assert text.startswith("Include /etc/ssh/sshd_config.d/*.conf\n")
    assert text.endswith("PermitRootLogin yes\n")


def test_symlinks_never_lead_outside_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    (root / "etc").mkdir()
    # Hostile layout: absolute and relative links aiming at the host.
    (root / "usr" / "lib").symlink_to(str(outside))
    (root / "etc" / "ssh").symlink_to("../../outside")
    (root / "etc" / "fstab").symlink_to(str(outside / "fstab"))
    (outside / "fstab").write_text("host fstab\n")
    inject.inject_guest_files(root)
    assert sorted(p.name for p in outside.iterdir()) == ["fstab"]
    assert (outside / "fstab").read_text() == "host fstab\n"
    # The absolute link resolves inside the root, as the guest would see it.
    assert (root / str(outside).lstrip("/") / "stoker" / "overlay-init").is_file()
    assert (root / "etc" / "fstab").is_file() and not (root / "etc" / "fstab").is_symlink()


def test_resolve_in_root_clamps_dotdot(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    (root / "a" / "up").symlink_to("../../../../..")
    assert inject.resolve_in_root(root, "/a/up/etc/passwd") == root / "etc" / "passwd"
    (root / "loop").symlink_to("loop")
    with pytest.raises(InvalidArgument, match="too many symlinks"):
        inject.resolve_in_root(root, "/loop/x")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        inject.inject_guest_files(tmp_path / "missing")
    with pytest.raises(InvalidArgument):
        inject.inject_guest_files(tmp_path, init="openrc")  # type: ignore[arg-type]


# --- issue 9 items 1-3: symlink-safe writes, a symlinked /root, bounded reads ----------------


def test_planted_temp_name_links_never_write_to_the_host(tmp_path: Path) -> None:
    """A layer that plants `.NAME.stoker-tmp -> host file` next to every file stoker writes
    (the temp names of the old writer) must not get that host file written or chmodded."""
    host = tmp_path / "host"
    host.mkdir()
    root = debian_like(tmp_path / "root")
    targets = []
    written = ["etc/fstab", "etc/ssh/sshd_config", *CONTRACT_FILES]
    (root / "usr/lib/stoker").mkdir(parents=True)
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    (root / "usr/lib/tmpfiles.d").mkdir(parents=True)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True)
    for i, rel in enumerate(written):
        target = host / f"victim{i}"
        target.write_text("host secret\n")
        os.chmod(target, 0o600)
        targets.append(target)
        p = root / rel
        (p.parent / f".{p.name}.stoker-tmp").symlink_to(target)
    # And the file itself as a link to the host (must be replaced, not followed).
    (root / "etc/ssh/sshd_config").unlink()
    (root / "etc/ssh/sshd_config").symlink_to(host / "victim0")
    inject.inject_guest_files(root)
    for t in targets:
        assert t.read_text() == "host secret\n", t
        assert mode(t) == 0o600, t
    assert sorted(p.name for p in host.iterdir()) == sorted(t.name for t in targets)
    assert "tmpfs /tmp" in (root / "etc/fstab").read_text()


def test_symlinked_root_home_is_replaced_by_a_real_directory(tmp_path: Path) -> None:
    """`/root -> /proc/self/root/<host dir>` (or any absolute link): after injection /root
    is a real directory inside the tree and the host directory is not touched."""
    hostdir = tmp_path / "hostdir"
    hostdir.mkdir()
    (hostdir / "secret").write_text("host data\n")
    os.chmod(hostdir, 0o700)
    root = tmp_path / "root"
    root.mkdir()
    (root / "root").symlink_to(f"/proc/self/root{hostdir}")
    inject.inject_guest_files(root)
    home = root / "root"
    assert home.is_dir() and not home.is_symlink()
    assert mode(home) == 0o755
    assert list(home.iterdir()) == []
    assert mode(hostdir) == 0o700
    assert sorted(p.name for p in hostdir.iterdir()) == ["secret"]
    assert inject.work_seed_source(root) == home


def test_work_seed_source_refuses_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "root").symlink_to(str(tmp_path))
    with pytest.raises(InvalidArgument, match="not a real directory"):
        inject.work_seed_source(root)


def test_oversized_fstab_is_refused_clearly(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    with open(root / "etc/fstab", "wb") as f:
        f.truncate(inject.MAX_CONFIG_READ + 1)  # sparse: cheap to make
    with pytest.raises(InvalidArgument, match=r"/etc/fstab in the image is \d+ bytes, over"):
        inject.inject_guest_files(root)


def test_fifo_fstab_does_not_hang(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.mkfifo(root / "etc/fstab")
    inject.inject_guest_files(root)  # a blocking open would hang here forever
    assert (root / "etc/fstab").read_text() == ""


async def test_ext4_builders_refuse_a_symlinked_source(tmp_path: Path) -> None:
    """mkfs.ext4 -d follows its source on the host: a source that is a symlink, or passes
    through one inside the untrusted tree, is refused before mkfs runs."""
    from stoker.daemon.imagemgr import ext4
    from stoker.daemon.oci import build_ext4
    from stoker.runner import RecordingRunner

    hostdir = tmp_path / "hostdir"
    hostdir.mkdir()
    (hostdir / "secret").write_text("host data\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "root").symlink_to(f"/proc/self/root{hostdir}")
    (tree / "via").symlink_to(str(tmp_path))
    runner = RecordingRunner()
    with pytest.raises(InvalidArgument, match="is a symlink"):
        await ext4.build_from_dir(runner, tree / "root", tmp_path / "seed.ext4", within=tree)
    with pytest.raises(InvalidArgument, match="via is a symlink"):
        await ext4.build_from_dir(
            runner, tree / "via" / "hostdir", tmp_path / "seed.ext4", within=tree
        )
    with pytest.raises(InvalidArgument, match="is a symlink"):
        await build_ext4(tree / "root", tmp_path / "rootfs.ext4", runner=runner)
    assert runner.calls == []
    assert not (tmp_path / "seed.ext4").exists() and not (tmp_path / "rootfs.ext4").exists()
