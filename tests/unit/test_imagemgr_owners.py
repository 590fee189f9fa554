"""OwnerLedger and the debugfs fix-up lines (no debugfs run here: see
tests/integration/oci/test_unprivileged_unpack.py for images built by a plain user)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stoker.daemon.imagemgr import owners
from stoker.daemon.imagemgr.owners import Meta, OwnerLedger, UnquotableName, fixup_commands

pytestmark = pytest.mark.unit


def test_quote_doubles_quotes_and_keeps_the_name_one_word() -> None:
    assert owners._quote('/etc/q" uid 0 "') == b'"/etc/q"" uid 0 """'
    assert owners._quote("/a b;c") == b'"/a b;c"'
    assert owners._quote("/caf\udcc3") == b'"/caf\xc3"'  # surrogateescape'd bytes


@pytest.mark.parametrize("name", ["/a\nsif / mode 0104777", "/a\rb", "/a\x00b"])
def test_quote_refuses_what_debugfs_cannot_read_as_one_line(name: str) -> None:
    with pytest.raises(UnquotableName, match="newline, carriage return or NUL"):
        owners._quote(name)


def _tree(tmp_path: Path) -> tuple[Path, OwnerLedger]:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    os.chmod(root / "bin", owners.DIR_STANDIN)
    for name in ("sudo", "kept", "chmodded", "dev"):
        p = root / "bin" / name
        p.write_bytes(b"x")
        os.chmod(p, owners.STANDIN)
    led = OwnerLedger()
    ino = {n: os.lstat(root / "bin" / n).st_ino for n in ("sudo", "kept", "chmodded", "dev")}
    led.record(os.lstat(root / "bin").st_ino, Meta(stat.S_IFDIR, 0o755, 0, 0))
    led.record(ino["sudo"], Meta(stat.S_IFREG, 0o4755, 0, 0))
    led.record(ino["kept"], Meta(stat.S_IFREG, 0o640, 7, 42))
    led.record(ino["chmodded"], Meta(stat.S_IFREG, 0o600, 9, 9))
    led.record(ino["dev"], Meta(stat.S_IFCHR, 0o666, 0, 0, os.makedev(1, 3)))
    led.freeze(root)
    return root, led


def test_a_record_applies_only_while_its_inode_is_untouched(tmp_path: Path) -> None:
    root, led = _tree(tmp_path)
    # stoker's post-processing replaces one file (new inode) and chmods another in place.
    new = root / "bin" / ".sudo.tmp"
    new.write_bytes(b"ours")
    os.chmod(new, 0o755)
    os.rename(new, root / "bin" / "sudo")
    os.chmod(root / "bin" / "chmodded", 0o644)
    st = {n: os.lstat(root / "bin" / n) for n in ("sudo", "kept", "chmodded")}
    assert led.lookup("bin/sudo", st["sudo"]) is None
    assert led.lookup("bin/chmodded", st["chmodded"]) is None
    assert led.lookup("bin/kept", st["kept"]) == Meta(stat.S_IFREG, 0o640, 7, 42)


def test_fixup_lines_set_modes_owners_and_make_devices(tmp_path: Path) -> None:
    root, led = _tree(tmp_path)
    uid, gid = os.getuid(), os.getgid()
    lines = b"".join(fixup_commands(led, root)).decode().splitlines()
    assert 'sif "/bin/sudo" mode 0104755' in lines
    assert 'sif "/bin/kept" mode 0100640' in lines
    assert 'sif "/bin/kept" uid 7' in lines and 'sif "/bin/kept" gid 42' in lines
    assert 'sif "/bin" mode 040755' in lines
    i = lines.index('cd "/bin"')
    assert lines[i + 1 : i + 4] == ['rm "dev"', 'mknod "dev" c 1 3', 'sif "/bin/dev" mode 020666']
    if uid != 0:
        assert 'sif "/bin/sudo" uid 0' in lines
    if gid == 0:
        # Only the new device node is given gid 0; the others already have it.
        assert [x for x in lines if x.endswith(" gid 0")] == ['sif "/bin/dev" gid 0']


def test_an_overlong_line_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(40):  # 10,000 bytes: past PATH_MAX too, so relative to fds
            os.mkdir("d" * 250, dir_fd=fd)
            fd, old = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(old)
    finally:
        os.close(fd)
    led = OwnerLedger()
    led.freeze(root)
    with pytest.raises(UnquotableName, match="too long"):
        fixup_commands(led, root)
