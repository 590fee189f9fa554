"""The golden build by a daemon that is not root: mmdebstrap's unshare mode, its tar
replayed with an owner ledger, the ext4 fixed up with debugfs.

Heavy (a real mmdebstrap run from the Debian mirror, ~1 minute with the test apt cache)
but no guest boots. A throwaway user with a sub-id range the test adds (and removes)
builds the image; its owners, modes, setuid bits and device nodes are checked, and, when
the root-built golden image of test_golden_boot.py is in the test cache, compared with
it inode for inode.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from prereq import require, require_tools

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "net"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "oci"))
from _nonroot import NonRootUser, make_user, nonroot_python
from test_unprivileged_unpack import stat_text, tree

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("STOKER_TEST_CACHE", "/var/cache/stoker-test"))
ROOT_GOLDEN = CACHE / "golden-image" / "debian-bookworm"
APT_CACHE = CACHE / "apt"
SUB_FIRST, SUB_COUNT = 300000, 65536
# Where mmdebstrap's unshare mode itself differs from its root mode (not the fix-up):
# apt (re)makes its partial dirs owned by _apt (42) in unshare mode, root-owned in root
# mode: what the tar says, reproduced faithfully. (The archives dir itself would carry the
# builder's uid from sync-in: a customize hook chowns it, and this test checks it.)
MODE_DIFFERENCES = {"/var/cache/apt/archives/partial", "/var/lib/apt/lists/partial"}


def _strip_subids(name: str) -> None:
    for f in ("/etc/subuid", "/etc/subgid"):
        p = Path(f)
        if p.exists():
            lines = p.read_text().splitlines(keepends=True)
            p.write_text("".join(ln for ln in lines if not ln.startswith(name + ":")))


@pytest.fixture(scope="module")
def user() -> Iterator[NonRootUser]:
    if os.geteuid() != 0:
        pytest.skip("needs root to make the test user and its sub-id range")
    require_tools("mmdebstrap", "newuidmap", "newgidmap", "debugfs", "useradd", "setpriv")
    with make_user("stkgold") as u:
        span = f"{SUB_FIRST}-{SUB_FIRST + SUB_COUNT - 1}"
        try:
            subprocess.run(
                ["usermod", "--add-subuids", span, "--add-subgids", span, u.name],
                check=True,
                capture_output=True,
            )
            yield u
        finally:
            _strip_subids(u.name)


@pytest.fixture(scope="module")
def built(user: NonRootUser) -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="stoker-golden-unpriv-"))
    os.chmod(top, 0o755)
    try:
        apt = top / "apt"
        if APT_CACHE.is_dir():
            shutil.copytree(APT_CACHE, apt, symlinks=True)
        else:
            apt.mkdir()
        (top / "images").mkdir()
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(top)], check=True)
        exe, env = nonroot_python()
        p = subprocess.run(
            [*user.setpriv(), exe, str(HERE / "_golden_unpriv.py"), str(top / "images" / "g"),
             str(apt)],
            capture_output=True, text=True, timeout=1800, env={**env, "HOME": str(top)},
            cwd="/",
        )  # fmt: skip
        print(p.stderr[-3000:])
        require(
            "could not build" not in p.stderr or "is it reachable" not in p.stderr,
            "the Debian mirror is not reachable",
        )
        assert p.returncode == 0, p.stderr[-3000:]
        res = json.loads(p.stdout)
        assert res["kernel_version"] and res["packages"] > 100
        yield top / "images" / "g"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_unprivileged_golden_image_has_root_owners_setuid_and_devices(
    built: Path, user: NonRootUser
) -> None:
    t = tree(built / "rootfs.ext4")
    assert len(t) > 5000
    leaked = {p: v for p, v in t.items() if v[2] in (user.uid,) or v[2] >= SUB_FIRST or
              v[3] in (user.gid,) or v[3] >= SUB_FIRST}  # fmt: skip
    assert leaked == {}, "the builder's or a sub-id owner reached the image"
    assert t["/usr/bin/sudo"][1:] == (0o104755, 0, 0)
    assert t["/usr/bin/passwd"][1:] == (0o104755, 0, 0)
    assert t["/usr/bin/chage"][1:] == (0o102755, 0, 42)
    assert t["/etc/shadow"][1:] == (0o100640, 0, 42)
    assert t["/var/mail"][1:] == (0o042775, 0, 8)
    assert t["/tmp"][1:] == (0o041777, 0, 0)
    assert t["/dev/null"][1:] == (0o020666, 0, 0)
    assert "Device major/minor number: 01:03" in stat_text(built / "rootfs.ext4", "/dev/null")
    assert t["/usr/lib/stoker/overlay-init"][1:] == (0o100755, 0, 0)
    seed = tree(built / "work-seed.ext4")
    assert seed and all(v[2] == 0 and v[3] == 0 for v in seed.values())
    assert (built / "kernel" / "vmlinuz").stat().st_size > 1 << 20


def test_unprivileged_golden_image_matches_the_root_built_one(built: Path) -> None:
    if not (ROOT_GOLDEN / "rootfs.ext4").is_file():
        pytest.skip("no root-built golden image in the test cache (test_golden_boot.py makes it)")
    want = tree(ROOT_GOLDEN / "rootfs.ext4")
    got = tree(built / "rootfs.ext4")
    common = set(want) & set(got)
    assert len(common) > 0.98 * len(want), sorted(set(want) - set(got))[:50]
    diff = {
        p: (oct(got[p][1]), got[p][2:], oct(want[p][1]), want[p][2:])
        for p in sorted(common - MODE_DIFFERENCES)
        if got[p][1:] != want[p][1:]
    }
    assert diff == {}, f"(unprivileged, root) differ: {diff}"
