"""Environments on real guests: recipes, derived images, setup steps, vm commit.

Package builds need the Debian mirror, which the test namespace cannot reach, so the
package stage of the C repo's recipe is built ahead with `image build --recipe` by a
daemon in the host namespace (like the golden build: it makes no bridge or tap); the
same recipe is then resolved by `vm run` inside the namespace from the cache. Setup
steps run in a builder VM inside the namespace; its NAT reaches only a small HTTP
server in a test-host namespace of the test's own.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from stokerenv import StokerEnv, destroy_env, make_env, serving_host

# Package builds and boots under TCG on a shared 2-core host: far past the 600 s default.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

C_RECIPE = """\
[image]
packages = ["make", "gcc", "libc6-dev"]

[vm]
memory = 1024
"""
MAKEFILE = """\
test: hello_test
\t./hello_test

hello_test: hello_test.c
\tgcc -O0 -o hello_test hello_test.c
"""
C_TEST = """\
#include <stdio.h>
int add(int a, int b) { return a + b; }
int main(void) {
    if (add(2, 2) != 4) { printf("FAIL\\n"); return 1; }
    printf("C TEST PASSED\\n");
    return 0;
}
"""
HOST_IP = "192.0.2.2"
WHEEL = "hello_stoker-1.0-py3-none-any.whl"


def git_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=path, check=True)
    return path


@pytest.fixture(scope="module")
def env() -> Iterator[StokerEnv]:
    """This module's own namespace and daemon: boots here include builder VMs and happen
    after long package builds, so the boot timeout is raised for loaded 2-core hosts."""
    e = make_env("envs", 'boot_timeout = "8m"\n')
    try:
        e.build_image(1800)
        yield e
    finally:
        destroy_env(e)


def host_run(e: StokerEnv, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        e.argv(*args, host=True), env=e.env, capture_output=True, text=True, timeout=timeout
    )
    e.log.append(f"$ (host) stoker {' '.join(args)} -> {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def make_wheel(dest: Path) -> Path:
    """A minimal pure-Python wheel, built by hand (no pip or build backend needed)."""
    files = {
        "hello_stoker/__init__.py": "MSG = 'hello from a locally served wheel'\n",
        "hello_stoker-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: hello-stoker\n"
        "Version: 1.0\n",
        "hello_stoker-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        record = []
        for name, text in files.items():
            z.writestr(name, text)
            record.append(f"{name},,")
        z.writestr("hello_stoker-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / WHEEL
    out.write_bytes(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def built(env: StokerEnv) -> Iterator[dict[str, object]]:
    """The C repo, its image built twice by a host-namespace daemon (the second time a
    no-op), and that daemon stopped again."""
    env.run("daemon", "stop", check=False)
    repo = git_repo(
        env.root / "c-repo",
        {"stoker.toml": C_RECIPE, "Makefile": MAKEFILE, "hello_test.c": C_TEST},
    )
    t0 = time.monotonic()
    first = host_run(env, "image", "build", "--recipe", str(repo))
    t_first = time.monotonic() - t0
    t0 = time.monotonic()
    second = host_run(env, "image", "build", "--recipe", str(repo))
    t_second = time.monotonic() - t0
    unknown = host_run(env, "image", "build", "nopkg", "--packages", "make,no-such-package-stk")
    leftovers = sorted(p.name for p in (env.state_dir / "staging").glob("*"))
    host_run(env, "daemon", "stop", timeout=60)
    assert first.returncode == 0, first.stdout + first.stderr + env.daemon_log_tail()
    assert second.returncode == 0, second.stdout + second.stderr
    yield {
        "repo": repo,
        "first": first,
        "second": second,
        "t_first": t_first,
        "t_second": t_second,
        "unknown": unknown,
        "leftovers": leftovers,
    }


def test_c_repo_make_test_with_recipe(env: StokerEnv, built: dict[str, object]) -> None:
    first = built["first"]
    second = built["second"]
    assert isinstance(first, subprocess.CompletedProcess)
    assert isinstance(second, subprocess.CompletedProcess)
    images = json.loads(env.run("image", "list", "--json").stdout)
    derived = [i for i in images if i["name"].startswith("env-")]
    assert len(derived) == 1, images  # the same recipe twice built once
    im1 = derived[0]
    assert first.stdout.split()[0] == second.stdout.split()[0] == im1["name"]
    assert "bootstrap" in first.stderr  # progress was streamed
    assert "up to date" in second.stderr and "bootstrap" not in second.stderr
    assert im1["parent"] == "debian-bookworm" and len(im1["recipe_hash"]) == 64
    print(f"derived build {built['t_first']:.1f}s, cached {built['t_second']:.2f}s")

    r = env.run("vm", "run", "--rm", str(built["repo"]), "--", "make", "test", timeout=900)
    assert "C TEST PASSED" in r.stdout, r.stdout + r.stderr
    assert "bootstrap" not in r.stderr  # the recipe resolved to the cached image
    shown = env.run("image", "show", im1["name"]).stdout
    assert "parent:     debian-bookworm" in shown and im1["recipe_hash"] in shown
    assert "make, gcc, libc6-dev" in shown


def test_unknown_package_reports_apt_and_publishes_nothing(
    env: StokerEnv, built: dict[str, object]
) -> None:
    r = built["unknown"]
    assert isinstance(r, subprocess.CompletedProcess)
    assert r.returncode != 0
    assert "Unable to locate package no-such-package-stk" in r.stderr, r.stderr
    images = [i["name"] for i in json.loads(env.run("image", "list", "--json").stdout)]
    assert "nopkg" not in images and not [i for i in images if i.startswith("pkgs-")]
    assert built["leftovers"] == []  # the build's staging dir is gone


@pytest.fixture(scope="module")
def test_host(env: StokerEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A test host at 192.0.2.2 (own namespace, veth to stoker's) serving a wheel."""
    served = tmp_path_factory.mktemp("served")
    make_wheel(served)
    with serving_host(env, "eh", served, HOST_IP) as url:
        yield url


INSTALL_SH = """\
set -eu
test -f /root/repo/stoker.toml   # the repo's files are there
curl -fsS -o /tmp/h.whl {url}/{wheel}
python3 - <<'EOF'
import site, zipfile
zipfile.ZipFile("/tmp/h.whl").extractall(site.getsitepackages()[0])
EOF
echo installed-the-wheel
"""


def test_setup_step_installs_a_locally_served_wheel(env: StokerEnv, test_host: str) -> None:
    repo = git_repo(
        env.root / "py-repo",
        {
            "stoker.toml": '[image]\nsetup = ["bash install.sh"]\n',
            "install.sh": INSTALL_SH.format(url=test_host, wheel=WHEEL),
        },
    )
    r = env.run("image", "build", "--recipe", str(repo), timeout=900)
    assert "installed-the-wheel" in r.stderr  # setup output is streamed
    im = json.loads(env.run("image", "show", r.stdout.split()[0], "--json").stdout)
    assert im["parent"] == "debian-bookworm" and im["source"] == "derived:debian-bookworm"
    vms = json.loads(env.run("vm", "list", "--json").stdout)
    assert not [v for v in vms if v["name"].startswith("build-")]  # builder VM removed
    t0 = time.monotonic()
    again = env.run("image", "build", "--recipe", str(repo), "--json")
    assert json.loads(again.stdout)["created_at"] == im["created_at"]
    assert time.monotonic() - t0 < 20
    code = "import hello_stoker; print(hello_stoker.MSG)"
    out = env.run("vm", "run", "--rm", str(repo), "--", "python3", "-c", code, timeout=600)
    assert "hello from a locally served wheel" in out.stdout, out.stdout + out.stderr
    assert "builder" not in out.stderr  # resolved from the cache, no builder VM


def test_failed_setup_step_leaves_no_image(env: StokerEnv) -> None:
    r = env.run(
        "image",
        "build",
        "broken",
        "--setup",
        "echo line-before-failure; exit 3",
        check=False,
        timeout=600,
    )
    assert r.returncode != 0
    assert "failed (exit 3)" in r.stderr and "line-before-failure" in r.stderr, r.stderr
    images = [i["name"] for i in json.loads(env.run("image", "list", "--json").stdout)]
    assert "broken" not in images
    vms = json.loads(env.run("vm", "list", "--json").stdout)
    assert not [v for v in vms if v["name"].startswith("build-")]


def test_commit_then_boot_from_the_committed_image(env: StokerEnv) -> None:
    env.run("vm", "create", "--name", "cm1")
    env.run(
        "vm",
        "ssh",
        "cm1",
        "--",
        "bash",
        "-c",
        "echo committed-content > /etc/stoker-marker && rm /etc/motd && "
        "echo in-root > /root/home-marker",
    )
    r = env.run("vm", "commit", "cm1", "cm1-img", check=False)
    assert r.returncode != 0 and "stop it first" in r.stderr
    env.run("vm", "stop", "cm1")
    vm_dir = Path(json.loads(env.run("vm", "show", "cm1", "--json").stdout)["vm_dir"])
    before = hashlib.sha256((vm_dir / "overlay.ext4").read_bytes()).hexdigest()
    out = env.run("vm", "commit", "cm1", "cm1-img", "--with-work-disk", "--json")
    im = json.loads(out.stdout)
    assert im["parent"] == "debian-bookworm" and im["source"] == "commit:cm1"
    assert hashlib.sha256((vm_dir / "overlay.ext4").read_bytes()).hexdigest() == before
    r = env.run("vm", "commit", "cm1", "cm1-img", check=False)
    assert r.returncode != 0 and "already exists" in r.stderr and "--force" in r.stderr
    got = env.run(
        "vm",
        "run",
        "--rm",
        "--image",
        "cm1-img",
        "--",
        "bash",
        "-c",
        "cat /etc/stoker-marker; test -e /etc/motd && echo motd-back; cat /root/home-marker",
        timeout=600,
    )
    assert "committed-content" in got.stdout
    assert "motd-back" not in got.stdout  # the whiteout was applied
    assert "in-root" in got.stdout
    env.run("vm", "delete", "cm1")


def test_setup_timeout_and_keep_failed(env: StokerEnv) -> None:
    r = env.run(
        "image",
        "build",
        "slow",
        "--setup",
        "echo started-sleeping; sleep 600",
        "--setup-timeout",
        "20",
        "--keep-failed",
        check=False,
        timeout=600,
    )
    assert r.returncode != 0
    assert "did not finish within 20s" in r.stderr and "started-sleeping" in r.stderr, r.stderr
    assert "kept" in r.stderr
    images = [i["name"] for i in json.loads(env.run("image", "list", "--json").stdout)]
    assert "slow" not in images
    kept = [v["name"] for v in json.loads(env.run("vm", "list", "--json").stdout)]
    kept = [n for n in kept if n.startswith("build-")]
    assert len(kept) == 1, kept  # --keep-failed: the builder VM is there to inspect
    env.run("vm", "delete", kept[0])
