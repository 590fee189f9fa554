"""Turn a VM's copy-on-write root into a new image, without mounting anything.

A VM's `/` is an overlay inside the guest: lower = the image's `rootfs.ext4`, upper =
`upper/` on the per-VM overlay disk (docs/guest-boot.md). To commit it:

1. copy the overlay disk (sparse) and let e2fsck replay its journal on the copy, so the
   source VM's files are never written and what debugfs reads is the synced state;
2. `debugfs rdump` the base's `/` and the copy's `/upper` into a staging tree;
3. list the upper dir with debugfs (rdump skips device nodes and drops xattrs): overlayfs
   whiteouts are character devices 0/0, opaque directories carry
   `trusted.overlay.opaque=y`;
4. merge the upper tree onto the base tree: a whiteout deletes the base path, an opaque
   or non-directory entry replaces it whole, a plain directory merges recursively. Every
   path is resolved inside the tree with lstat (symlinks are never followed);
5. `mkfs.ext4 -d` the result into `rootfs.ext4`.

The work disk (the guest's /root) is committed the same way, minus excluded paths.
File xattrs (e.g. file capabilities) are not carried over: rdump does not copy them.

A daemon that is not root: rdump cannot chown (its complaints about that are expected),
so the tree is made owner-accessible on disk (set-id bits dropped) and every entry's mode,
uid and gid from the listings (upper over base) are set in the new image by the debugfs
fix-up of `owners.py` (`PathOwners`).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stoker.daemon.imagemgr import ext4
from stoker.daemon.imagemgr.owners import Meta, PathOwners, walk_paths
from stoker.errors import CommandFailed
from stoker.runner import Runner

Progress = Callable[[str, str], None]

# Files the host writes into each VM's upper layer (docs/guest-boot.md, "Per-VM files")
# and per-boot identity: a committed image takes the base's versions of these.
PER_VM_PATHS: tuple[str, ...] = (
    "etc/hostname",
    "etc/hosts",
    "etc/resolv.conf",
    "etc/machine-id",
    "etc/stoker/network.env",
    "etc/ssh/ssh_host_ed25519_key",
    "etc/ssh/ssh_host_ed25519_key.pub",
    "var/lib/systemd/random-seed",
    "var/log/journal",
)
# On the work disk: what the host writes before each start, and the repo copy.
WORK_DISK_EXCLUDES: tuple[str, ...] = (".ssh/authorized_keys", ".gitconfig")

RDUMP_TIMEOUT = 1800.0
LS_TIMEOUT = 300.0


@dataclass
class UpperListing:
    """What a tree in an ext4 image holds that rdump does not reproduce (paths relative
    to the scanned dir): whiteouts and opaque dirs (overlay uppers), and set-id/sticky
    permission bits (rdump's chown clears them, and it never sets the sticky bit)."""

    whiteouts: set[str] = field(default_factory=set)
    opaque: set[str] = field(default_factory=set)
    special_modes: dict[str, int] = field(default_factory=dict)
    # Every entry: (mode with type bits, uid, gid); what a daemon that is not root sets
    # in the committed image (rdump cannot chown for it).
    meta: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    dirs: int = 0
    entries: int = 0


def _quotable(path: str) -> bool:
    return '"' not in path and "\n" not in path and "\x00" not in path


async def _debugfs_batch(runner: Runner, image: Path, commands: list[str]) -> str:
    script = "".join(c + "\n" for c in commands).encode()
    res = await runner.run(
        ["debugfs", "-f", "-", str(image)], input=script, timeout=LS_TIMEOUT, check=False
    )
    if res.returncode != 0:
        raise CommandFailed(f"debugfs could not read {image}: {res.err.strip()[-500:]}")
    return res.out


_OPAQUE = re.compile(r'trusted\.overlay\.opaque \(\d+\) = "y"')
# "/ino/mode/uid/gid/name/size/" per entry ("ls -p").
_LS_ENTRY = re.compile(r"^/(\d+)/(\d+)/(-?\d+)/(-?\d+)/(.*)/(\d*)/$")


def parse_ls_p(text: str) -> list[tuple[int, str]]:
    """(mode, name) of each entry in `debugfs ls -p` output, without . and .."""
    return [(mode, name) for mode, _, _, name in parse_ls_p_owners(text)]


def parse_ls_p_owners(text: str) -> list[tuple[int, int, int, str]]:
    """(mode, uid, gid, name) of each entry in `debugfs ls -p` output, without . and .."""
    out: list[tuple[int, int, int, str]] = []
    for line in text.splitlines():
        m = _LS_ENTRY.match(line)
        if m is None:
            continue
        name = m.group(5)
        if name in (".", "..", "") or "/" in name:
            continue
        # debugfs prints ids as signed 32-bit numbers.
        uid, gid = int(m.group(3)) & 0xFFFFFFFF, int(m.group(4)) & 0xFFFFFFFF
        out.append((int(m.group(2), 8), uid, gid, name))
    return out


async def scan_tree(
    runner: Runner, image: Path, root: str = "/upper", *, overlay: bool = True
) -> UpperListing:
    """Walk `root` in `image` level by level (one debugfs run per level). With `overlay`,
    also find whiteouts and opaque directories."""
    listing = UpperListing()
    base = root.rstrip("/")
    level = [""]
    while level:
        for rel in level:
            if not _quotable(rel):
                raise CommandFailed(
                    f"cannot commit: the VM's disk has a path with a quote or newline in "
                    f"its name ({rel!r}); remove it in the guest and retry"
                )
        per = 2 if overlay else 1
        cmds: list[str] = []
        for rel in level:
            p = f"{base}/{rel}".rstrip("/") or "/"
            cmds.append(f'ls -p "{p}"')
            if overlay:
                cmds.append(f'ea_list "{p}"')
        out = await _debugfs_batch(runner, image, cmds)
        sections = re.split(r"^debugfs: (?:ls -p|ea_list) .*$", out, flags=re.M)[1:]
        if len(sections) != len(cmds):
            raise CommandFailed(f"debugfs listing of {image}:{root} was cut short")
        nxt: list[str] = []
        chars: list[str] = []
        for i, rel in enumerate(level):
            ls_text = sections[per * i]
            opaque = overlay and rel and _OPAQUE.search(sections[per * i + 1])
            if opaque:
                listing.opaque.add(rel)
            for mode, uid, gid, name in parse_ls_p_owners(ls_text):
                child = f"{rel}/{name}" if rel else name
                listing.entries += 1
                listing.meta[child] = (mode, uid, gid)
                if mode & 0o7000 and not stat.S_ISLNK(mode):
                    listing.special_modes[child] = stat.S_IMODE(mode)
                if stat.S_ISDIR(mode):
                    listing.dirs += 1
                    nxt.append(child)
                elif overlay and stat.S_ISCHR(mode):
                    chars.append(child)
        if chars:
            for c in chars:
                if not _quotable(c):
                    raise CommandFailed(f"cannot commit: unreadable name {c!r} in the VM's root")
            out = await _debugfs_batch(runner, image, [f'stat "{base}/{c}"' for c in chars])
            stats = re.split(r"^debugfs: stat .*$", out, flags=re.M)[1:]
            for c, text in zip(chars, stats, strict=False):
                if re.search(r"Device major/minor number: 0+:0+ ", text):
                    listing.whiteouts.add(c)
        level = nxt
    return listing


def restore_special_modes(tree: Path, modes: dict[str, int]) -> None:
    """Put back set-id and sticky bits rdump lost (never through a symlink)."""
    for rel, mode in modes.items():
        p = tree
        ok = True
        for part in rel.split("/")[:-1]:
            p = p / part
            if not _is_real_dir(p):
                ok = False
                break
        if not ok:
            continue
        target = p / rel.rsplit("/", 1)[-1]
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            continue
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(target, mode)


async def rdump(runner: Runner, image: Path, src: str, dest: Path) -> None:
    """`debugfs rdump SRC DEST` (DEST must exist); any stderr complaint is an error."""
    res = await runner.run(
        ["debugfs", "-R", f'rdump "{src}" "{dest}"', str(image)],
        timeout=RDUMP_TIMEOUT,
        check=False,
    )
    bad = [ln for ln in res.err.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if os.geteuid() != 0:
        # A plain user cannot chown: the owners are set in the new image instead
        # (`_owners`, from the listing).
        bad = [ln for ln in bad if "Operation not permitted while changing ownership" not in ln]
    if res.returncode != 0 or bad:
        raise CommandFailed(
            f"could not read {src} out of {image}: "
            f"{'; '.join(dict.fromkeys(bad))[-800:] or res.returncode}"
        )


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _excluded(rel: str, excludes: Iterable[str]) -> bool:
    return any(rel == e or rel.startswith(e + "/") for e in excludes)


def merge_upper(
    upper: Path, tree: Path, listing: UpperListing, excludes: Iterable[str] = ()
) -> int:
    """Apply the dumped upper dir onto `tree` (consumed: entries are moved). -> changes."""
    excl = tuple(excludes)
    changes = 0

    def walk(rel: str) -> None:
        nonlocal changes
        src_dir = upper / rel if rel else upper
        dst_dir = tree / rel if rel else tree
        names = set(os.listdir(src_dir))
        prefix = f"{rel}/" if rel else ""
        names |= {w[len(prefix) :] for w in listing.whiteouts if _parent(w) == rel}
        for name in sorted(names):
            child = prefix + name
            if _excluded(child, excl):
                continue
            target = dst_dir / name
            if child in listing.whiteouts:
                _remove(target)
                changes += 1
                continue
            src = src_dir / name
            st = os.lstat(src)
            if stat.S_ISDIR(st.st_mode) and child not in listing.opaque and _is_real_dir(target):
                walk(child)
                os.chmod(target, stat.S_IMODE(st.st_mode))
                os.lchown(target, st.st_uid, st.st_gid)
                continue
            _remove(target)
            os.rename(src, target)
            changes += 1

    walk("")
    return changes


def _parent(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def _owners(*listings: tuple[UpperListing, Iterable[str]]) -> PathOwners:
    """Path -> metadata for a daemon that is not root; later listings win (the upper
    over the base), except below their excluded paths."""
    out = PathOwners()
    for listing, excludes in listings:
        excl = tuple(excludes)
        for rel, (mode, uid, gid) in listing.meta.items():
            if not _excluded(rel, excl):
                out.by_path[rel] = Meta(stat.S_IFMT(mode), stat.S_IMODE(mode), uid, gid)
    return out


def make_owner_accessible(tree: Path) -> None:
    """Give the owner (us) read/write/search on every directory and read on every file of
    an rdump'ed tree: the merge renames into its directories and mkfs must read it all.
    The real modes are set in the image from the listing. Never through a symlink."""
    for rel, st in walk_paths(tree):
        if stat.S_ISLNK(st.st_mode):
            continue
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o400
        mode = stat.S_IMODE(st.st_mode)
        # rdump as a plain user keeps set-id bits on files it now owns: drop them on disk.
        new = (mode | want) & ~0o6000
        if new != mode:
            os.chmod(tree / rel, new)  # not a symlink (skipped above)


@dataclass(frozen=True)
class CommitResult:
    rootfs: Path
    work_seed: Path | None
    changes: int


async def _journal_replayed_copy(runner: Runner, disk: Path, dest: Path) -> None:
    await runner.run(["cp", "--sparse=always", "--", str(disk), str(dest)], timeout=1800)
    await ext4.fsck(runner, dest)


async def commit_root(
    runner: Runner,
    base_rootfs: Path,
    overlay_disk: Path,
    out_dir: Path,
    staging: Path,
    *,
    work_disk: Path | None = None,
    work_excludes: Iterable[str] = WORK_DISK_EXCLUDES,
    progress: Progress | None = None,
) -> CommitResult:
    """Write `out_dir/rootfs.ext4` (base + the overlay's upper dir) and, with
    `work_disk`, `out_dir/work-seed.ext4` (its content minus `work_excludes`).

    `staging` is a scratch directory (removed by the caller). The source disks are only
    read; a failure (a full disk included) leaves no file in `out_dir`.
    """
    report = progress or (lambda stage, detail: None)
    tree = staging / "tree"
    upper = staging / "upper"
    tree.mkdir()
    upper.mkdir()
    report("commit", "reading the VM's copy-on-write layer")
    overlay_copy = staging / "overlay.ext4"
    await _journal_replayed_copy(runner, overlay_disk, overlay_copy)
    listing = await scan_tree(runner, overlay_copy, "/upper")
    report("commit", f"extracting the base ({base_rootfs.name})")
    base_listing = await scan_tree(runner, base_rootfs, "/", overlay=False)
    await rdump(runner, base_rootfs, "/", tree)
    await rdump(runner, overlay_copy, "/upper", upper)
    overlay_copy.unlink()
    import asyncio

    owners: PathOwners | None = None
    if os.geteuid() == 0:
        await asyncio.to_thread(restore_special_modes, tree, base_listing.special_modes)
        await asyncio.to_thread(restore_special_modes, upper / "upper", listing.special_modes)
    else:
        # Not root: everything is ours on disk; owners and modes go into the image after.
        owners = _owners((base_listing, ()), (listing, PER_VM_PATHS))
        await asyncio.to_thread(make_owner_accessible, tree)
        await asyncio.to_thread(make_owner_accessible, upper / "upper")
    await asyncio.to_thread(_remove, tree / "lost+found")
    changes = await asyncio.to_thread(merge_upper, upper / "upper", tree, listing, PER_VM_PATHS)
    report("commit", f"{changes} changed paths, {len(listing.whiteouts)} deleted; building ext4")
    out_dir.mkdir(parents=True, exist_ok=True)
    rootfs = out_dir / "rootfs.ext4"
    await ext4.build_from_dir(
        runner, tree, rootfs, label="stoker-root", journal=False, within=tree, ledger=owners
    )
    await asyncio.to_thread(shutil.rmtree, tree, True)
    seed: Path | None = None
    if work_disk is not None:
        report("commit", "capturing the work disk (/root)")
        seed = out_dir / "work-seed.ext4"
        await commit_work_disk(runner, work_disk, seed, staging, excludes=work_excludes)
    return CommitResult(rootfs=rootfs, work_seed=seed, changes=changes)


async def commit_work_disk(
    runner: Runner, work_disk: Path, out: Path, staging: Path, *, excludes: Iterable[str] = ()
) -> None:
    """`out` = an ext4 image of `work_disk`'s content without `excludes` (relative paths)."""
    import asyncio

    copy = staging / "work.ext4"
    await _journal_replayed_copy(runner, work_disk, copy)
    home = staging / "home"
    home.mkdir()
    listing = await scan_tree(runner, copy, "/", overlay=False)
    await rdump(runner, copy, "/", home)
    copy.unlink()
    owners: PathOwners | None = None
    if os.geteuid() == 0:
        await asyncio.to_thread(restore_special_modes, home, listing.special_modes)
    else:
        owners = _owners((listing, ()))
        await asyncio.to_thread(make_owner_accessible, home)

    def prune() -> None:
        for e in (*excludes, "lost+found"):
            p = home
            ok = True
            for part in e.split("/"):
                if not _is_real_dir(p):
                    ok = False
                    break
                p = p / part
            if ok:
                _remove(p)

    await asyncio.to_thread(prune)
    await ext4.build_from_dir(
        runner, home, out, None, label="stoker-work", within=home, ledger=owners
    )
