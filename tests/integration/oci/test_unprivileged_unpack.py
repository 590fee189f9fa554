"""A daemon that is not root unpacks layers and builds the ext4 with the layers' owners.

The same layers are built twice by `_unpriv_build.py`, once as root (today's fast path:
chown/mknod on disk, `mkfs.ext4 -d` copies them) and once as a throwaway user the test
creates (ledger + stand-ins + the debugfs fix-up), and every inode of both images is
compared: type, mode (setuid/setgid/sticky included), uid, gid, device numbers, file
capabilities. Hostile names (quotes, spaces, a would-be debugfs injection) land as
themselves; a newline in a name is refused with nothing left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from ocitestlib import Entry, make_tar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "net"))
from _nonroot import NonRootUser, make_user, nonroot_python

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
# v2 file capabilities, effective, permitted = cap_net_raw (13): what ping carries.
CAP_NET_RAW = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
INJECT = 'etc/q" uid 0 "'
# systemd's /var/log/journal ACL (posix_acl_xattr v2): user::rwx group::r-x group:adm:r-x
# mask::r-x other::r-x. Applied on disk it would rewrite a stand-in's mode.
_ALL = "\udcff" * 4
ACL = (
    f"\x02\x00\x00\x00\x01\x00\x07\x00{_ALL}\x04\x00\x05\x00{_ALL}"
    f"\x08\x00\x05\x00\x04\x00\x00\x00\x10\x00\x05\x00{_ALL}\x20\x00\x05\x00{_ALL}"
)


def _layers() -> list[list[Entry]]:
    one = [
        Entry("bin", "dir"),
        Entry("bin/ping", data=b"\x7fELF", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}),
        Entry("etc", "dir"),
        Entry("etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42),
        Entry("etc/tagged", data=b"t", mode=0o444, xattrs={"user.stoker.test": "kept"}),
        Entry("etc/tagged.d", "dir", mode=0o555, xattrs={"user.stoker.test": "dir"}),
        Entry("etc/secret", data=b"gone in layer two\n", mode=0o000),
        Entry("etc/nothing-readable", data=b"x", mode=0o000, uid=7, gid=7),
        Entry('etc/we"ird', data=b"q", uid=123, gid=321),
        Entry("etc/sp ace", data=b"s", mode=0o600, uid=124),
        Entry(INJECT, data=b"i", mode=0o640, uid=125, gid=125),
        Entry("etc/semi;colon $(x) `y`", data=b"c", uid=126),
        Entry("usr", "dir"),
        Entry("usr/bin", "dir"),
        Entry("usr/bin/sudo", data=b"\x7fELF sudo", mode=0o4755),
        Entry("usr/bin/sudoedit", "hardlink", linkname="usr/bin/sudo"),
        Entry("usr/bin/wall", data=b"\x7fELF wall", mode=0o2755, gid=5),
        Entry("usr/bin/su", data=b"\x7fELF su", mode=0o6750, uid=0, gid=27),
        Entry("var", "dir"),
        Entry("var/mail", "dir", mode=0o2775, gid=8),
        Entry("tmp", "dir", mode=0o1777),
        Entry("var/log", "dir"),
        Entry(
            "var/log/journal",
            "dir",
            mode=0o2755,
            gid=999,
            xattrs={"system.posix_acl_access": ACL, "system.posix_acl_default": ACL},
        ),
        Entry("dev", "dir"),
        Entry("dev/null", "char", mode=0o666, major=1, minor=3),
        Entry("dev/sda", "block", mode=0o660, gid=6, major=8, minor=0),
        Entry("dev/initctl", "fifo", mode=0o600),
        Entry("root", "dir", mode=0o700),
        Entry("root/.profile", data=b"# hi\n", mode=0o600),
        Entry("root/.ssh", "dir", mode=0o700, uid=0),
        Entry("home", "dir"),
        Entry("home/u", "dir", mode=0o750, uid=1000, gid=1000),
        Entry("home/u/notes", data=b"n", mode=0o600, uid=1000, gid=1000),
        Entry("home/u/link", "symlink", linkname="notes", uid=1000, gid=1000),
        Entry("srv", "dir"),
        Entry("srv/ro", "dir", mode=0o555, uid=33, gid=33),
        Entry("opt/implied/file", data=b"parents made by the unpack", uid=99999, gid=70000),
        Entry("lib/systemd/systemd", data=b"\x7fELF", mode=0o755),
    ]
    two = [
        Entry("etc/.wh.secret"),
        Entry("srv/ro/new", data=b"written into a 0555 directory", uid=33, gid=33),
        Entry("usr/bin/sudo", data=b"\x7fELF sudo v2", mode=0o4711),
        Entry("usr/bin/sudoedit", "hardlink", linkname="usr/bin/sudo"),
        Entry("dev/null", "char", mode=0o666, major=1, minor=3),
    ]
    return [one, two]


def _debugfs(image: Path, cmds: list[str]) -> str:
    p = subprocess.run(
        ["debugfs", "-f", "-", str(image)],
        input="".join(c + "\n" for c in cmds).encode(),
        capture_output=True,
        timeout=120,
        check=True,
    )
    return p.stdout.decode("utf-8", "surrogateescape")


def _q(path: str) -> str:
    return '"' + path.replace('"', '""') + '"'


def tree(image: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every inode below / in `image`: path -> (inode, mode with type, uid, gid)."""
    out: dict[str, tuple[int, int, int, int]] = {}
    todo = ["/"]
    while todo:
        text = _debugfs(image, [f"ls -p {_q(d)}" for d in todo])
        sections = re.split(r"^debugfs: ls -p .*$", text, flags=re.M)[1:]
        assert len(sections) == len(todo)
        nxt: list[str] = []
        for d, sec in zip(todo, sections, strict=True):
            for line in sec.splitlines():
                f = line.split("/")
                if len(f) < 7 or not f[1].isdigit():
                    continue
                name = "/".join(f[5:-2])
                if name in (".", "..") or (d == "/" and name == "lost+found"):
                    continue
                path = (d.rstrip("/") + "/" + name) if d != "/" else "/" + name
                mode = int(f[2], 8)
                out[path] = (int(f[1]), mode, int(f[3]), int(f[4]))
                if mode & 0o170000 == 0o040000:
                    nxt.append(path)
        todo = nxt
    return out


def stat_text(image: Path, path: str) -> str:
    return _debugfs(image, [f"stat {_q(path)}"])


def xattr(image: Path, path: str, name: str) -> str:
    return _debugfs(image, [f"ea_get {_q(path)} {name}"])


@pytest.fixture(scope="module")
def user() -> Iterator[NonRootUser]:
    for tool in ("useradd", "userdel", "setpriv", "debugfs", "mkfs.ext4"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root to make the test user and the comparison build")
    with make_user("stkunp") as u:
        yield u


def _build(
    user: NonRootUser | None, layers: list[list[Entry]], work: Path
) -> subprocess.CompletedProcess[str]:
    work.mkdir(mode=0o755)
    blobs = []
    for i, entries in enumerate(layers):
        b = work / f"layer{i}.tar"
        b.write_bytes(make_tar(entries))
        blobs.append(str(b))
    if user is not None:
        os.chown(work, user.uid, user.gid)
    exe, env = nonroot_python()
    argv = [exe, str(HERE / "_unpriv_build.py"), json.dumps({"blobs": blobs, "work": str(work)})]
    if user is not None:
        argv = [*user.setpriv(), *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def builds(user: NonRootUser) -> Iterator[tuple[Path, Path]]:
    top = Path(tempfile.mkdtemp(prefix="stoker-unpriv-"))
    os.chmod(top, 0o755)
    try:
        as_root = _build(None, _layers(), top / "root")
        assert as_root.returncode == 0, as_root.stderr
        assert json.loads(as_root.stdout) == {"uid": 0, "ledger": False}
        plain = _build(user, _layers(), top / "user")
        assert plain.returncode == 0, plain.stderr
        assert json.loads(plain.stdout) == {"uid": user.uid, "ledger": True}
        yield top / "root", top / "user"
    finally:
        shutil.rmtree(top)


def test_the_unprivileged_image_matches_the_root_built_one_inode_for_inode(
    builds: tuple[Path, Path], user: NonRootUser
) -> None:
    root_dir, user_dir = builds
    for image in ("rootfs.ext4", "work-seed.ext4"):
        want = tree(root_dir / image)
        got = tree(user_dir / image)
        assert sorted(got) == sorted(want), image
        diff = {p: (got[p][1:], want[p][1:]) for p in want if got[p][1:] != want[p][1:]}
        assert diff == {}, f"{image}: (unprivileged, root) differ: {diff}"
        # Nothing in the image belongs to the user that built it.
        assert all(v[2] != user.uid and v[3] != user.gid for v in got.values())
    assert len(tree(user_dir / "rootfs.ext4")) > 40


def test_setuid_setgid_sticky_owners_and_unreadable_modes_arrive(
    builds: tuple[Path, Path],
) -> None:
    t = tree(builds[1] / "rootfs.ext4")
    assert t["/usr/bin/sudo"][1:] == (0o104711, 0, 0)
    assert t["/usr/bin/sudoedit"][0] == t["/usr/bin/sudo"][0], "hardlink became a copy"
    assert t["/usr/bin/wall"][1:] == (0o102755, 0, 5)
    assert t["/usr/bin/su"][1:] == (0o106750, 0, 27)
    assert t["/var/mail"][1:] == (0o042775, 0, 8)
    assert t["/tmp"][1:] == (0o041777, 0, 0)
    assert t["/etc/shadow"][1:] == (0o100640, 0, 42)
    assert t["/etc/nothing-readable"][1:] == (0o100000, 7, 7)
    assert "/etc/secret" not in t  # whited out by layer two
    assert t["/srv/ro"][1:] == (0o040555, 33, 33)
    assert t["/srv/ro/new"][1:] == (0o100644, 33, 33)
    assert t["/home/u"][1:] == (0o040750, 1000, 1000)
    assert t["/home/u/link"][1:] == (0o120777, 1000, 1000)
    assert t["/opt/implied/file"][2:] == (99999, 70000)
    assert t["/opt"][1:] == (0o040755, 0, 0)  # made by the unpack, as root would
    # stoker's injected files are root's, with the modes inject gave them.
    assert t["/usr/lib/stoker/overlay-init"][1:] == (0o100755, 0, 0)
    assert t["/etc/fstab"][1:] == (0o100644, 0, 0)
    assert t["/etc/systemd/system/multi-user.target.wants/stoker-net.service"][2:] == (0, 0)
    seed = tree(builds[1] / "work-seed.ext4")
    assert seed["/.profile"][1:] == (0o100600, 0, 0)
    assert seed["/.ssh"][1:] == (0o040700, 0, 0)


def test_devices_fifos_and_file_capabilities_arrive(builds: tuple[Path, Path]) -> None:
    image = builds[1] / "rootfs.ext4"
    t = tree(image)
    assert t["/dev/null"][1:] == (0o020666, 0, 0)
    assert t["/dev/sda"][1:] == (0o060660, 0, 6)
    assert t["/dev/initctl"][1:] == (0o010600, 0, 0)
    assert "Device major/minor number: 01:03" in stat_text(image, "/dev/null")
    assert "Device major/minor number: 08:00" in stat_text(image, "/dev/sda")
    for d in builds:
        got = xattr(d / "rootfs.ext4", "/bin/ping", "security.capability")
        assert "01 00 00 02 00 20 00 00" in got, f"{d.name}: {got}"
    for d in builds:
        got = xattr(d / "rootfs.ext4", "/etc/tagged", "user.stoker.test")
        assert "kept" in got, f"{d.name}: {got}"
        assert "dir" in xattr(d / "rootfs.ext4", "/etc/tagged.d", "user.stoker.test")
    assert t["/etc/tagged"][1:] == (0o100444, 0, 0)
    # The ACLs arrive, the same as root's, and the mode with them.
    assert t["/var/log/journal"][1:] == (0o042755, 0, 999)
    for name in ("system.posix_acl_access", "system.posix_acl_default"):
        got, want = (xattr(d / "rootfs.ext4", "/var/log/journal", name) for d in builds[::-1])
        assert got == want and "08 00 05 00 04 00 00 00" in got, (got, want)  # group:adm:r-x


def test_hostile_names_land_as_themselves_and_inject_nothing(builds: tuple[Path, Path]) -> None:
    t = tree(builds[1] / "rootfs.ext4")
    assert t['/etc/we"ird'][1:] == (0o100644, 123, 321)
    assert t["/etc/sp ace"][1:] == (0o100600, 124, 0)
    assert t["/" + INJECT][1:] == (0o100640, 125, 125)
    assert t["/etc/semi;colon $(x) `y`"][1:] == (0o100644, 126, 0)
    assert "/etc/q" not in t and "/etc/we" not in t


def test_a_name_with_a_newline_is_refused_by_an_unprivileged_unpack(
    user: NonRootUser,
) -> None:
    top = Path(tempfile.mkdtemp(prefix="stoker-unpriv-"))
    os.chmod(top, 0o755)
    try:
        layers = [[Entry("etc", "dir"), Entry("etc/x\nsif /etc/passwd mode 0104777", data=b"x")]]
        p = _build(user, layers, top / "bad")
        assert p.returncode == 1, p.stdout + p.stderr
        assert "newline or carriage return in its name" in p.stderr
        assert not (top / "bad" / "rootfs.ext4").exists()
        # As root the same layer unpacks (mkfs copies the name; no debugfs line is needed).
        ok = _build(None, layers, top / "root")
        assert ok.returncode == 0, ok.stderr
    finally:
        shutil.rmtree(top)
