"""The golden image: Debian built locally with mmdebstrap, turned into ext4 without mounting.

`build_golden` runs mmdebstrap (root mode, into a directory) inside a private mount and
PID namespace, so a cancelled build takes every apt/dpkg process and every mount with it.
A daemon that is not root uses mmdebstrap's unshare mode instead, writing a tar that is
unpacked with an `OwnerLedger` (see `build_golden`).
The tree then gets its kernel moved out, stoker's guest files injected, and becomes
`rootfs.ext4` (the read-only base), `work-seed.ext4` (its /root) and `kernel/`
(`vmlinuz`, `initrd.img`) via `mkfs.ext4 -d`. Everything happens in a staging directory
beside `out_dir`; only the finished files are renamed into place.

The initramfs is generated once, by the kernel package's own postinst: an essential hook
writes the module list (virtio over mmio, vsock, overlay) before the kernel is installed,
and the result is checked by reading the initramfs back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import zstandard

from stoker.daemon.imagemgr import ext4, initramfs
from stoker.daemon.imagemgr.inject import guest_files_digest, inject_guest_files
from stoker.daemon.imagemgr.owners import OwnerLedger
from stoker.daemon.imagemgr.publish import publish_dir
from stoker.daemon.imagemgr.safetree import SafeTree, rmtree
from stoker.daemon.oci.layers import LayerApplier
from stoker.errors import CommandFailed, InvalidArgument, PermissionDenied, StokerError
from stoker.runner import Runner

Progress = Callable[[str, str], None]

# Bump when the recipe below changes in a way that changes the image.
BUILDER_VERSION = 1
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
VARIANT = "minbase"
PACKAGES: tuple[str, ...] = (
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "git",
    "ca-certificates",
    "curl",
    "jq",
    "sudo",
    "procps",
    "iproute2",
    "python3",
    "linux-image-cloud-amd64",
    "initramfs-tools",
)
# Loaded by the initramfs: the cloud kernel has these as modules (ext4 is built in on
# Debian's, listed for kernels where it is not).
INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport",
    "overlay",
    "ext4",
)
# Keep the image small: no manuals, docs (copyright files stay) or translations.
DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
# Lean boot (docs/guest-boot.md, "Boot time"): under TCG the single vCPU is the bottleneck,
# so time to SSH is about the CPU work of everything that runs before sshd. Masked (a
# /dev/null link in /etc/systemd/system): what a sandbox does not use. Periodic jobs,
# gettys (root has no password; the console is a log), pstore, modprobe@ (every module a
# guest needs is loaded by the initramfs or on demand), binfmt, debug/trace/config/fuse
# mounts, logind + D-Bus (socket-activated together; nothing in the image needs them:
# stop goes over SSH, pam_systemd is optional), journal flush (the journal is volatile),
# the random seed (virtio-rng seeds the kernel, and a seed file cloned into many VMs would
# be shared), firstboot prompts.
MASKED_UNITS: tuple[str, ...] = (
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    "getty.target",
    "getty@.service",
    "serial-getty@.service",
    "systemd-pstore.service",
    "modprobe@.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "systemd-logind.service",
    "dbus.service",
    "dbus.socket",
    "systemd-journal-flush.service",
    "systemd-random-seed.service",
    "systemd-firstboot.service",
)
# Generators run on every boot before any unit starts; only fstab's is of use here.
MASKED_GENERATORS: tuple[str, ...] = (
    "systemd-cryptsetup-generator",
    "systemd-debug-generator",
    "systemd-getty-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-integritysetup-generator",
    "systemd-rc-local-generator",
    "systemd-run-generator",
    "systemd-system-update-generator",
    "systemd-sysv-generator",
    "systemd-veritysetup-generator",
)
LEAN_FILES: dict[str, str] = {
    # sshd listens on 0.0.0.0 and has its host key from the overlay: it needs neither the
    # network nor sysinit.target, and `sshd -t` before every start only costs CPU.
    "/etc/systemd/system/ssh.service.d/stoker-lean.conf": (
        "# stoker lean boot: start sshd as soon as the journal socket is there.\n"
        "[Unit]\n"
        "DefaultDependencies=no\n"
        "After=systemd-journald.socket\n"
        "Conflicts=shutdown.target\n"
        "Before=shutdown.target\n"
        "[Service]\n"
        "ExecStartPre=\n"
    ),
    # Coldplug (udev loading modules for every device) is not needed to reach SSH: the
    # initramfs loaded the guest's drivers. Let it run once sshd listens, not beside it.
    "/etc/systemd/system/systemd-udevd.service.d/stoker-lean.conf": (
        "# stoker lean boot: udev after sshd (the initramfs loaded the drivers).\n"
        "[Unit]\n"
        "After=ssh.service\n"
    ),
    "/etc/systemd/system/systemd-udev-trigger.service.d/stoker-lean.conf": (
        "# stoker lean boot: coldplug after sshd (the initramfs loaded the drivers).\n"
        "[Unit]\n"
        "After=ssh.service\n"
    ),
    "/etc/systemd/journald.conf.d/stoker-volatile.conf": (
        "# stoker lean boot: the journal lives in /run (a VM's log is `vm logs` + this).\n"
        "[Journal]\n"
        "Storage=volatile\n"
    ),
}
WORK_SEED_SIZE = 64 * 1024**2
BOOTSTRAP_TIMEOUT = 1800.0
MANIFEST = "manifest.json"
ROOTFS = "rootfs.ext4"
WORK_SEED = "work-seed.ext4"
KERNEL_DIR = "kernel"


@dataclass(frozen=True)
class GoldenSpec:
    """Everything that decides what a golden build produces (hashed by `spec_hash`)."""

    suite: str
    sources: tuple[str, ...]  # one-line "deb URI SUITE main" entries
    packages: tuple[str, ...] = PACKAGES
    variant: str = VARIANT
    arch: str = "amd64"


@dataclass(frozen=True)
class GoldenResult:
    """A finished golden build in `dir`."""

    dir: Path
    rootfs: Path
    work_seed: Path
    kernel_dir: Path  # vmlinuz + initrd.img, ready for kernel.import_kernel
    vmlinuz: Path
    initrd: Path
    kernel_version: str
    spec_hash: str
    manifest: Path
    packages: int  # installed package count
    reused: bool = False  # True when an up-to-date build was already there


# --- mirrors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _AptEntry:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def _parse_one_line(text: str) -> list[_AptEntry]:
    out: list[_AptEntry] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^]]*\]", " ", line[4:])
        fields = line.split()
        if len(fields) >= 3:
            out.append(_AptEntry(fields[0], (fields[1],), tuple(fields[2:])))
    return out


def _parse_deb822(text: str) -> list[_AptEntry]:
    out: list[_AptEntry] = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in para.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key:
                fields[key] += " " + raw.strip()
                continue
            if ":" in raw:
                key, _, value = raw.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        suites = tuple(fields.get("suites", "").split())
        comps = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            out.append(_AptEntry(uri, suites, comps))
    return out


def _host_entries(apt_dir: Path) -> list[_AptEntry]:
    entries: list[_AptEntry] = []
    files = [apt_dir / "sources.list"]
    d = apt_dir / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        entries += _parse_deb822(text) if f.suffix == ".sources" else _parse_one_line(text)
    return entries


def host_debian_mirror(suite: str = DEFAULT_SUITE, apt_dir: Path = Path("/etc/apt")) -> str | None:
    """The host's Debian mirror URI for `suite` (from its apt sources), if it has one."""
    for e in _host_entries(apt_dir):
        if suite in e.suites and "main" in e.components:
            return e.uri
    return None


def resolve_sources(
    suite: str = DEFAULT_SUITE, mirror: str | None = None, apt_dir: Path = Path("/etc/apt")
) -> tuple[str, ...]:
    """The apt lines a build uses: SUITE, SUITE-updates and SUITE-security, main.

    An explicit `mirror` serves SUITE and SUITE-updates. Otherwise the host's apt sources
    for those three suites are used as they are; without any, the official mirrors.
    """
    if mirror:
        if not re.match(r"^(https?|file)://\S+$", mirror):
            raise InvalidArgument(f"debian mirror {mirror!r} is not an http(s):// or file:// URL")
        m = mirror.rstrip("/")
        return (f"deb {m} {suite} main", f"deb {m} {suite}-updates main")
    wanted = (suite, f"{suite}-updates", f"{suite}-security")
    lines: list[str] = []
    entries = _host_entries(apt_dir)
    if any(suite in e.suites and "main" in e.components for e in entries):
        for s in wanted:
            for e in entries:
                line = f"deb {e.uri.rstrip('/')} {s} main"
                if s in e.suites and "main" in e.components and line not in lines:
                    lines.append(line)
        return tuple(lines)
    return (
        f"deb {DEFAULT_MIRROR} {suite} main",
        f"deb {DEFAULT_MIRROR} {suite}-updates main",
        f"deb {DEFAULT_SECURITY_MIRROR} {suite}-security main",
    )


def golden_spec(
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
    apt_dir: Path = Path("/etc/apt"),
    packages: Iterable[str] = (),
) -> GoldenSpec:
    """The spec a build with these arguments would have. `packages` are installed on top
    of stoker's own list (a derived image); they are part of the spec hash."""
    if not re.match(r"^[a-z][a-z0-9-]*$", suite):
        raise InvalidArgument(f"suite {suite!r} is not a Debian suite name such as bookworm")
    extra = tuple(p for p in dict.fromkeys(packages) if p not in PACKAGES)
    return GoldenSpec(
        suite=suite, sources=resolve_sources(suite, mirror, apt_dir), packages=PACKAGES + extra
    )


def spec_hash(spec: GoldenSpec) -> str:
    """Identity of a build: same hash, same image (the mirror's content aside).

    Includes stoker's guest files, so a changed overlay-init or unit means a rebuild.
    """
    doc = {
        "builder": BUILDER_VERSION,
        "spec": asdict(spec),
        "initramfs_modules": INITRAMFS_MODULES,
        "dpkg_options": DPKG_OPTIONS,
        "guest_files": guest_files_digest(),
        "lean": [MASKED_UNITS, MASKED_GENERATORS, LEAN_FILES, initramfs.INIT, "pam-motd-off"],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def read_manifest(out_dir: Path) -> GoldenResult | None:
    """The build in `out_dir` as its manifest describes it, if complete; else None."""
    try:
        doc = json.loads((out_dir / MANIFEST).read_text())
        result = GoldenResult(
            dir=out_dir,
            rootfs=out_dir / ROOTFS,
            work_seed=out_dir / WORK_SEED,
            kernel_dir=out_dir / KERNEL_DIR,
            vmlinuz=out_dir / KERNEL_DIR / "vmlinuz",
            initrd=out_dir / KERNEL_DIR / "initrd.img",
            kernel_version=str(doc["kernel_version"]),
            spec_hash=str(doc["spec_hash"]),
            manifest=out_dir / MANIFEST,
            packages=int(doc.get("packages", 0)),
            reused=True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for p in (result.rootfs, result.work_seed, result.vmlinuz, result.initrd):
        if not p.is_file():
            return None
    return result


# --- progress ----------------------------------------------------------------------------

_STAGES = (
    ("running apt-get update", "bootstrap", "updating package lists"),
    ("downloading packages", "bootstrap", "downloading packages"),
    ("extracting archives", "bootstrap", "extracting packages"),
    ("installing essential packages", "bootstrap", "installing essential packages"),
    ("installing remaining packages", "bootstrap", "installing packages"),
    ("running --customize-hook", "bootstrap", "customizing"),
    ("cleaning package lists", "bootstrap", "cleaning up"),
)


class _LogTail:
    """Follows mmdebstrap's log file and turns it into progress calls."""

    def __init__(self, path: Path, progress: Progress) -> None:
        self.path = path
        self.progress = progress
        self.pos = 0
        self.partial = b""
        self.fetched = 0
        self.total = 0
        self.errors: list[str] = []
        self.last: list[str] = []
        self._last_stage = ""

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        self.pos += len(chunk)
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            self._line(raw.decode(errors="replace").rstrip("\r"))

    def _line(self, line: str) -> None:
        self.last = [*self.last[-29:], line]
        if line.startswith("E: "):
            self.errors.append(line[3:])
        m = re.search(r"(\d+) newly installed", line)
        if m:
            self.total += int(m.group(1))
            return
        # Package fetches only: index files are fetched (also "Get:") before any count.
        if self.total and line.startswith("Get:"):
            self.fetched += 1
            self.progress("download", f"{self.fetched}/{max(self.total, self.fetched)} packages")
            return
        if line.startswith("I: "):
            for needle, stage, detail in _STAGES:
                if needle in line and detail != self._last_stage:
                    self._last_stage = detail
                    self.progress(stage, detail)
                    break

    def summary(self) -> str:
        if self.errors:
            return "; ".join(self.errors[-5:])
        return " | ".join(line for line in self.last[-8:] if line.strip())


# --- initramfs check -------------------------------------------------------------------


def _decompress_any(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        # One gzip stream; zero padding may follow it, which gzip.decompress rejects.
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        dctx = zstandard.ZstdDecompressor()
        out: bytes = dctx.decompressobj().decompress(data)
        return out
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    raise InvalidArgument("initramfs compression not recognised (expected gzip, zstd or xz)")


def initramfs_members(data: bytes) -> list[str]:
    """File names in an initramfs: concatenated newc cpio archives, each maybe compressed."""
    names: list[str] = []
    pos = 0
    while pos < len(data):
        while pos < len(data) and data[pos] == 0:
            pos += 1  # padding between archives
        if pos >= len(data):
            break
        if data[pos : pos + 6] not in (b"070701", b"070702"):
            data = _decompress_any(data[pos:])
            pos = 0
            continue
        while data[pos : pos + 6] in (b"070701", b"070702"):
            namesize = int(data[pos + 94 : pos + 102], 16)
            filesize = int(data[pos + 54 : pos + 62], 16)
            name = data[pos + 110 : pos + 110 + namesize - 1].decode(errors="replace")
            pos = (pos + 110 + namesize + 3) & ~3
            pos = (pos + filesize + 3) & ~3
            if name == "TRAILER!!!":
                break
            names.append(name)
    return names


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def missing_initramfs_modules(
    initrd: Path, modules_dir: Path, wanted: Iterable[str] = INITRAMFS_MODULES
) -> list[str]:
    """Modules from `wanted` that are neither built into the kernel nor in the initramfs."""
    builtin: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        builtin = {
            _module_name(line.strip())
            for line in (modules_dir / "modules.builtin").read_text().splitlines()
        }
    present = {_module_name(n) for n in initramfs_members(initrd.read_bytes()) if ".ko" in n}
    return [m for m in wanted if m not in builtin and m not in present]


# --- the build ----------------------------------------------------------------------------


def _hook_write(path: str, lines: Iterable[str]) -> str:
    body = "".join(f"{line}\\n" for line in lines)
    return f"printf '{body}' > \"$1{path}\""


def _mmdebstrap_argv(
    spec: GoldenSpec, tree: Path, logfile: Path, cache_dir: Path | None, *, unshare: bool = False
) -> list[str]:
    """mmdebstrap's argv. Root: root mode into the directory `tree`, inside a private
    mount + PID namespace. Not root (`unshare`): unshare mode (its own user namespace,
    the caller's /etc/subuid range as the tree's uids) writing the tar `tree`, whose
    members carry the in-namespace owners as numbers."""
    essential_hook = " && ".join(
        [
            'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"',
            # list: only what is named (plus dependencies): a small initramfs boots fast.
            _hook_write(
                "/etc/initramfs-tools/conf.d/stoker.conf", ["MODULES=list", "COMPRESS=gzip"]
            ),
            _hook_write("/usr/share/initramfs-tools/modules.d/stoker.conf", INITRAMFS_MODULES),
        ]
    )
    # A private mount + PID namespace: killing `unshare` (a cancelled build) kills
    # mmdebstrap and every apt/dpkg below it, and its mounts vanish with them. Unshare
    # mode makes its own namespaces (an unprivileged caller could not make these).
    wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
    ]
    mode = ["--mode=unshare", "--format=tar"] if unshare else ["--mode=root", "--format=directory"]
    argv = [
        *([] if unshare else wrapper),
        "mmdebstrap",
        *mode,
        f"--variant={spec.variant}",
        f"--architectures={spec.arch}",
        "--verbose",
        f"--logfile={logfile}",
        f"--include={','.join(spec.packages)}",
        '--aptopt=Acquire::Retries "3"',
        *(f"--dpkgopt={o}" for o in DPKG_OPTIONS),
        # No fsync per file: the tree becomes an image or is thrown away, never crashes
        # halfway into use. Removed from the image again in _postprocess.
        "--dpkgopt=force-unsafe-io",
        f"--essential-hook={essential_hook}",
    ]
    if cache_dir is not None:
        c = str(cache_dir)
        argv += [
            "--skip=essential/unlink",
            '--setup-hook=mkdir -p "$1/var/cache/apt/archives"',
            f"--setup-hook=sync-in {c} /var/cache/apt/archives/",
            # Drop superseded .debs so the cache does not grow forever.
            '--customize-hook=chroot "$1" apt-get -q autoclean',
            f"--customize-hook=sync-out /var/cache/apt/archives {c}",
        ]
        if unshare:
            # sync-in copied the cache with its outer owner (the daemon's uid) as a number.
            argv.append('--customize-hook=chown -R 0:0 "$1/var/cache/apt/archives"')
    return [*argv, spec.suite, str(tree), *spec.sources]


def _processes_rooted_in(path: Path) -> list[int]:
    prefix = str(path)
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            root = os.readlink(f"/proc/{entry}/root")
        except OSError:
            continue
        if root == prefix or root.startswith(prefix + "/"):
            pids.append(int(entry))
    return pids


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    out: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                out.append(mnt)
    return out


async def _remove_staging(staging: Path) -> None:
    """Delete a staging dir, but only once nothing runs or is mounted inside it."""
    for _ in range(100):
        if not _processes_rooted_in(staging):
            break
        await asyncio.sleep(0.1)
    mounts = _mounts_under(staging)
    if mounts:
        # Deleting through a bind mount would delete host files: leave it to a human.
        raise StokerError(
            f"golden build staging {staging} still has mounts ({', '.join(mounts)}): "
            f"unmount them (umount -R) and remove {staging} by hand"
        )
    await asyncio.to_thread(rmtree, staging, ignore_errors=True)


_MAX_READ = 1 << 20  # config files read back from the built tree
_MAX_STATUS = 256 << 20  # dpkg's status file (a few MiB for a large system)


def _postprocess(tree: Path, kernel_out: Path) -> tuple[str, int]:
    """Blocking: move the kernel out, neutralise host leftovers, inject. -> (version, pkgs)."""
    boot = tree / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise CommandFailed(
            f"expected one kernel in the built tree's /boot, found {len(kernels)}: "
            "check that linux-image-cloud-amd64 installed"
        )
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = boot / f"initrd.img-{version}"
    if not initrd.is_file():
        raise CommandFailed(f"the build produced no initramfs for kernel {version}")
    for p in (boot, kernels[0], initrd):
        # Read, moved out and chmodded on the host: a symlink here would reach a host file.
        if p.is_symlink() or not (p.is_dir() if p == boot else p.is_file()):
            raise CommandFailed(f"{p} in the built tree is not a regular file or directory")
    missing = missing_initramfs_modules(initrd, tree / "usr" / "lib" / "modules" / version)
    if missing:
        raise CommandFailed(
            f"the initramfs for {version} lacks modules {', '.join(missing)}: "
            "the guest could not find its disks; report this as a bug"
        )
    kernel_out.mkdir(parents=True)
    shutil.move(kernels[0], kernel_out / "vmlinuz")
    lean = initramfs.build(tree, version, INITRAMFS_MODULES)
    if lean is not None:
        # stoker's own (initramfs.py); the Debian one stays the fallback when it cannot be.
        (kernel_out / "initrd.img").write_bytes(lean)
        initrd.unlink()
        missing = missing_initramfs_modules(
            kernel_out / "initrd.img", tree / "usr" / "lib" / "modules" / version
        )
        if missing:
            raise CommandFailed(
                f"stoker's initramfs for {version} lacks modules {', '.join(missing)}: "
                "report this as a bug"
            )
    else:
        shutil.move(initrd, kernel_out / "initrd.img")
    for p in (kernel_out / "vmlinuz", kernel_out / "initrd.img"):
        os.chmod(p, 0o644)
    # Everything below edits the tree through SafeTree: links resolve inside it (an
    # /etc/resolv.conf -> /run/systemd/resolve/... link must not write the host's file).
    with SafeTree(tree) as t:
        # The links point at the files just moved out (the guest boots an external kernel).
        for name in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
            st = t.lstat("/" + name)
            if st is not None and stat.S_ISLNK(st.st_mode):
                t.unlink("/" + name)
        dpkg_cfg = "/etc/dpkg/dpkg.cfg.d/99mmdebstrap"
        cfg = t.read(dpkg_cfg, _MAX_READ)
        if cfg is not None:
            lines = cfg.decode(errors="replace").splitlines()
            kept = [ln for ln in lines if ln.strip() != "force-unsafe-io"]
            t.write(dpkg_cfg, "".join(ln + "\n" for ln in kept).encode(), 0o644)
        t.remove_matching("/var/cache/apt/archives", lambda n: n.endswith(".deb"))
        # mmdebstrap copies the build host's identity in; each VM gets its own in the overlay.
        t.write("/etc/hostname", b"stoker\n", 0o644)
        t.write("/etc/resolv.conf", b"", 0o644)
        t.write(
            "/etc/hosts",
            b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        )
    inject_guest_files(tree, init="systemd")
    _lean_boot(tree)
    with SafeTree(tree) as t:
        status = (t.read("/var/lib/dpkg/status", _MAX_STATUS) or b"").decode(errors="replace")
    packages = status.count("Status: install ok installed")
    return version, packages


def _lean_boot(tree: Path) -> None:
    """Blocking: masks, drop-ins and update stamps that shorten the boot (see MASKED_UNITS).
    Through SafeTree, like the rest of the post-processing."""
    with SafeTree(tree) as t:
        for unit in MASKED_UNITS:
            t.symlink(f"/etc/systemd/system/{unit}", "/dev/null")
        for gen in MASKED_GENERATORS:
            t.symlink(f"/etc/systemd/system-generators/{gen}", "/dev/null")
        for path, text in LEAN_FILES.items():
            t.write(path, text.encode(), 0o644)
        # Each SSH session ran update-motd.d and checked mail: nothing a sandbox shows.
        pam = t.read("/etc/pam.d/sshd", _MAX_READ)
        if pam is not None:
            out = []
            for ln in pam.decode(errors="replace").splitlines():
                if not ln.lstrip().startswith("#") and (
                    "pam_motd.so" in ln.split() or "pam_mail.so" in ln.split()
                ):
                    ln = f"# stoker lean boot: {ln}"
                out.append(ln + "\n")
            t.write("/etc/pam.d/sshd", "".join(out).encode(), 0o644)
        # What systemd-update-done writes after a first boot: the image is prepared, so the
        # ConditionNeedsUpdate= units (sysusers, ldconfig, hwdb, catalog) skip every boot.
        # (They compare /usr's mtime with the stamp's, which is the build's: newer.)
        usr = t.lstat("/usr")
        usr_mtime = usr.st_mtime_ns if usr is not None else time.time_ns()
        stamp = (
            "# This file was created by systemd-update-done. Its only\n"
            "# purpose is to hold a timestamp of the time this directory\n"
            "# was updated. See man:systemd-update-done.service(8).\n"
            f"TIMESTAMP_NSEC={usr_mtime}\n"
        ).encode()
        for d in ("/etc", "/var"):
            t.write(f"{d}/.updated", stamp, 0o644)


def _no_progress(stage: str, detail: str) -> None:
    pass


def _subid_ranges(path: Path, user: str, uid: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            f = line.strip().split(":")
            if len(f) == 3 and f[0] in (user, str(uid)) and f[1].isdigit() and f[2].isdigit():
                out.append((int(f[1]), int(f[2])))
    return out


SUBID_DIR = Path("/etc")  # where subuid and subgid live (tests point it elsewhere)


def check_unshare_mode(etc: Path | None = None) -> None:
    """Refuse, saying what to do, when mmdebstrap's unshare mode cannot work for us."""
    import pwd

    etc = SUBID_DIR if etc is None else etc
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    for tool in ("newuidmap", "newgidmap", "mmdebstrap"):
        if shutil.which(tool) is None:
            pkg = "mmdebstrap" if tool == "mmdebstrap" else "uidmap"
            raise PermissionDenied(
                f"building a golden image as uid {uid} (not root) needs {tool}: install "
                f"the package {pkg} (scripts/setup does), or run stokerd as root"
            )
    for name in ("subuid", "subgid"):
        if not any(n >= 65536 for _, n in _subid_ranges(etc / name, user, uid)):
            raise PermissionDenied(
                f"building a golden image as {user} (uid {uid}, not root) needs a range of "
                f"65536 ids for {user} in {etc / name} (mmdebstrap's unshare mode maps the "
                f"image's users there): `stoker system install` adds one; by hand: "
                f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"
            )


def _unpack_tar(tarball: Path, tree: Path) -> OwnerLedger:
    """Blocking: mmdebstrap's tar -> `tree` with stand-ins, owners in the ledger."""
    applier = LayerApplier(tree, label="the golden build", ledger=OwnerLedger())
    applier.apply(tarball, digest="mmdebstrap")
    applier.finish()
    tarball.unlink()
    assert applier.ledger is not None
    return applier.ledger


async def build_golden(
    runner: Runner,
    out_dir: Path,
    *,
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
    apt_dir: Path = Path("/etc/apt"),
    extra_packages: Iterable[str] = (),
) -> GoldenResult:
    """Build the golden Debian image into `out_dir` (rootfs.ext4, work-seed.ext4, kernel/).

    When `out_dir` already holds a complete build of the same spec (`spec_hash`), that
    build is returned at once (`reused=True`) unless `force`. `mirror` None means the
    host's apt sources, else the official mirror. `cache_dir` keeps downloaded .debs
    between builds. `progress(stage, detail)` is called from the event loop thread.
    As root, mmdebstrap's root mode writes a directory with the real owners. Not root,
    its unshare mode (needs `newuidmap`/`newgidmap` and a /etc/subuid + /etc/subgid range
    of 65536 ids for the caller; `stoker system install` adds one) writes a tar, which is
    unpacked like an OCI layer with an `OwnerLedger` (`owners.py`): the post-processing
    runs on stand-ins and both ext4 images get the tar's owners, modes and devices from
    the debugfs fix-up. `extra_packages` adds Debian packages to stoker's list (derived
    images, `daemon/imagemgr/derived.py`).
    """
    report = progress or _no_progress
    spec = golden_spec(suite, mirror, apt_dir, extra_packages)
    digest = spec_hash(spec)
    existing = read_manifest(out_dir)
    if existing is not None and existing.spec_hash == digest and not force:
        report("done", f"up to date ({digest[:12]})")
        return existing
    unprivileged = os.geteuid() != 0
    if unprivileged:
        check_unshare_mode()
    if cache_dir is not None:
        if re.search(r"\s", str(cache_dir)):
            raise InvalidArgument(f"apt cache dir {cache_dir!r} must not contain whitespace")
        cache_dir.mkdir(parents=True, exist_ok=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        tree = staging / "tree"
        tarball = staging / "rootfs.tar"
        final = staging / "out"
        final.mkdir()
        logfile = staging / "mmdebstrap.log"
        report("bootstrap", f"mmdebstrap {spec.suite} from {spec.sources[0].split()[1]}")
        tail = _LogTail(logfile, report)
        argv = _mmdebstrap_argv(
            spec, tarball if unprivileged else tree, logfile, cache_dir, unshare=unprivileged
        )
        task = asyncio.create_task(runner.run(argv, timeout=BOOTSTRAP_TIMEOUT))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                tail.poll()
            tail.poll()
            task.result()
        except CommandFailed as e:
            raise CommandFailed(
                f"mmdebstrap could not build {spec.suite}: {tail.summary() or e.message} "
                f"(mirror: {spec.sources[0].split()[1]}; is it reachable?)",
                detail="\n".join(tail.last),
            ) from None
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

        ledger: OwnerLedger | None = None
        if unprivileged:
            report("unpack", "unpacking the tree (owners kept for the ext4 images)")
            ledger = await asyncio.to_thread(_unpack_tar, tarball, tree)
        report("kernel", "moving the kernel out, injecting stoker's guest files")
        version, packages = await asyncio.to_thread(_postprocess, tree, final / KERNEL_DIR)

        report("work-seed", "building work-seed.ext4 from /root")
        await ext4.build_from_dir(
            runner,
            tree / "root",
            final / WORK_SEED,
            WORK_SEED_SIZE,
            label="stoker-work",
            within=tree,
            ledger=ledger,
        )
        report("rootfs", "building rootfs.ext4")
        # The base is only ever mounted read-only: a journal would be dead weight.
        await ext4.build_from_dir(
            runner,
            tree,
            final / ROOTFS,
            label="stoker-root",
            journal=False,
            within=tree,
            ledger=ledger,
        )

        manifest = {
            "kind": "golden",
            "spec_hash": digest,
            "spec": asdict(spec),
            "builder": BUILDER_VERSION,
            "kernel_version": version,
            "packages": packages,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {
                ROOTFS: (final / ROOTFS).stat().st_size,
                WORK_SEED: (final / WORK_SEED).stat().st_size,
                f"{KERNEL_DIR}/vmlinuz": (final / KERNEL_DIR / "vmlinuz").stat().st_size,
                f"{KERNEL_DIR}/initrd.img": (final / KERNEL_DIR / "initrd.img").stat().st_size,
            },
        }
        (final / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        report("publish", str(out_dir))
        await asyncio.to_thread(publish_dir, final, out_dir)
    finally:
        await _remove_staging(staging)

    result = read_manifest(out_dir)
    if result is None:
        raise CommandFailed(f"golden build in {out_dir} is incomplete after publishing")
    report("done", f"{spec.suite}, kernel {version}, {packages} packages")
    return dataclasses.replace(result, reused=False)
