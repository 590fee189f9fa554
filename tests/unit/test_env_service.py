"""EnvService planning and cache lookups against a real store (no VMs, no builds)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from stoker.daemon.env_service import BuildRequest, EnvService
from stoker.daemon.imagemgr.derived import (
    CopyItem,
    SetupStep,
    check_copy,
    host_copy,
    split_copy,
)
from stoker.errors import InvalidArgument
from stoker.model.records import Image, Kernel
from stoker.store import Store
from stoker.store.db import now

pytestmark = pytest.mark.unit


def _image(name: str, source: str, **kw: object) -> Image:
    return Image(
        name=name,
        managed=True,
        rootfs=f"/i/{name}/rootfs.ext4",
        work_seed=None,
        kernel="k1",
        source=source,
        size=1,
        created_at=now(),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def svc(tmp_path: Path) -> tuple[EnvService, Store]:
    store = Store(tmp_path / "db.sqlite")
    store.upsert_kernel(
        Kernel("k1", "6.1", "x86_64", "/k", "/k/v", None, None, None, "test", now())
    )
    store.upsert_image(_image("debian-bookworm", "golden:bookworm", digest="g1"))
    images = SimpleNamespace(store=store, layout=None, runner=None)
    return EnvService(images, None, None), store  # type: ignore[arg-type]


def test_store_keeps_parent_and_recipe_hash(svc: tuple[EnvService, Store]) -> None:
    _, store = svc
    store.upsert_image(
        _image("d", "derived:debian-bookworm", parent="debian-bookworm", recipe_hash="ab" * 32)
    )
    got = store.get_image("d")
    assert got is not None and got.parent == "debian-bookworm" and got.recipe_hash == "ab" * 32
    assert store.find_image_by_recipe("ab" * 32) == got


def test_plan_packages_only_is_one_stage(svc: tuple[EnvService, Store]) -> None:
    env, store = svc
    parent = store.get_image("debian-bookworm")
    assert parent is not None
    plan = env._plan(BuildRequest(packages=("make", "gcc")), parent)
    assert plan.key1 == plan.key and plan.name == plan.name1 == f"env-{plan.key[:12]}"
    same = env._plan(BuildRequest(packages=("gcc", "make")), parent)
    assert same.key == plan.key


def test_plan_setup_keeps_packages_stage_apart(svc: tuple[EnvService, Store]) -> None:
    env, store = svc
    parent = store.get_image("debian-bookworm")
    assert parent is not None
    a = env._plan(BuildRequest(packages=("make",), setup=(SetupStep("s", "echo 1"),)), parent)
    b = env._plan(BuildRequest(packages=("make",), setup=(SetupStep("s", "echo 2"),)), parent)
    assert a.key1 == b.key1 and a.name1 == b.name1 and a.name1 is not None
    assert a.name1.startswith("pkgs-") and a.key != b.key


def test_cached_finds_only_the_same_recipe(svc: tuple[EnvService, Store]) -> None:
    env, store = svc
    req = BuildRequest(packages=("make",))
    assert env.cached(req) is None
    parent = store.get_image("debian-bookworm")
    assert parent is not None
    plan = env._plan(req, parent)
    store.upsert_image(_image(plan.name, "derived:debian-bookworm", recipe_hash=plan.key))
    hit = env.cached(req)
    assert hit is not None and hit.name == plan.name
    assert env.cached(BuildRequest(packages=("make",), force=True)) is None
    assert env.cached(BuildRequest(packages=("make", "gcc"))) is None
    # A new golden build (new digest) changes the parent's identity: no stale hit.
    store.upsert_image(_image("debian-bookworm", "golden:bookworm", digest="g2"))
    assert env.cached(req) is None


def test_packages_need_a_golden_parent(svc: tuple[EnvService, Store]) -> None:
    env, store = svc
    store.upsert_image(_image("oci-x", "oci:reg/x:1", digest="sha256:1"))
    parent = store.get_image("oci-x")
    assert parent is not None
    with pytest.raises(InvalidArgument, match="need a golden parent"):
        env._plan(BuildRequest(from_image="oci-x", packages=("make",)), parent)


def test_build_refuses_nothing_to_do_and_bad_input(svc: tuple[EnvService, Store]) -> None:
    env, _ = svc

    def prog(*a: object, **kw: object) -> None:
        pass

    with pytest.raises(InvalidArgument, match="nothing to build"):
        asyncio.run(env.build(BuildRequest(from_image="debian-bookworm"), prog))
    with pytest.raises(InvalidArgument, match="Debian package name"):
        asyncio.run(env.build(BuildRequest(packages=("Bad Name",)), prog))
    with pytest.raises(InvalidArgument, match="setup-timeout"):
        asyncio.run(env.build(BuildRequest(setup=(SetupStep("s", "x"),), setup_timeout=0), prog))


def test_build_refuses_a_cycle_of_derived_images(svc: tuple[EnvService, Store]) -> None:
    env, store = svc
    store.upsert_image(
        _image("d1", "derived:debian-bookworm", parent="debian-bookworm", recipe_hash="1" * 64)
    )
    store.upsert_image(_image("d2", "derived:d1", parent="d1", recipe_hash="2" * 64))

    def prog(*a: object, **kw: object) -> None:
        pass

    req = BuildRequest(name="d1", from_image="d2", setup=(SetupStep("s", "true"),))
    with pytest.raises(InvalidArgument, match=r"cycle of derived images \(d1 -> d2 -> d1\)"):
        asyncio.run(env.build(req, prog))


def test_unnamed_recipe_reuses_the_same_recipe_built_under_a_name(
    svc: tuple[EnvService, Store],
) -> None:
    env, store = svc
    parent = store.get_image("debian-bookworm")
    assert parent is not None
    plan = env._plan(BuildRequest(packages=("make",)), parent)
    store.upsert_image(_image("cdev", "derived:debian-bookworm", recipe_hash=plan.key))
    hit = env.cached(BuildRequest(packages=("make",)))
    assert hit is not None and hit.name == "cdev"
    assert env.cached(BuildRequest(name="other", packages=("make",))) is None


def test_copies_are_part_of_the_key_and_need_the_builder(
    svc: tuple[EnvService, Store], tmp_path: Path
) -> None:
    """`--copy`: the copied file's hash, guest path and mode decide the image; a copy
    alone is a build (setup stage); a workload root is no parent."""
    env, store = svc
    parent = store.get_image("debian-bookworm")
    assert parent is not None
    f = tmp_path / "tool.sh"
    f.write_text("#!/bin/sh\necho one\n")
    f.chmod(0o755)
    a = host_copy(str(f), "/usr/local/bin/tool")
    assert a.mode == 0o755 and a.host == str(f)
    plan = env._plan(BuildRequest(copies=(a,)), parent)
    assert plan.key1 is None and plan.name == f"env-{plan.key[:12]}"
    f.write_text("#!/bin/sh\necho two\n")
    b = host_copy(str(f), "/usr/local/bin/tool")
    assert env._plan(BuildRequest(copies=(b,)), parent).key != plan.key
    moved = host_copy(str(f), "/usr/local/bin/tool2")
    assert (
        env._plan(BuildRequest(copies=(moved,)), parent).key
        != env._plan(BuildRequest(copies=(b,)), parent).key
    )
    f.chmod(0o644)
    plain = host_copy(str(f), "/usr/local/bin/tool")
    assert plain.mode == 0o644 and plain.sha256 == b.sha256
    assert (
        env._plan(BuildRequest(copies=(plain,)), parent).key
        != env._plan(BuildRequest(copies=(b,)), parent).key
    )
    store.upsert_image(_image("busy", "oci:reg/busy:1", digest="sha256:2", role="workload"))
    wl = store.get_image("busy")
    assert wl is not None
    with pytest.raises(InvalidArgument, match="is a workload root"):
        env._plan(BuildRequest(from_image="busy", copies=(a,)), wl)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nocolon", "is not HOST:GUEST"),
        ("f:relative/x", "must be an absolute file path"),
        ("f:/etc/../shadow", "must be an absolute file path"),
        ("f:/a//b", "must be an absolute file path"),
        ("f:/", "must be an absolute file path"),
        ("f:/etc/x\n", "must be an absolute file path"),
        ("f:/etc/it's", "must be an absolute file path"),
        ("f:/proc/sys/kernel/x", "under /proc"),
        ("f:/dev/sda", "under /dev"),
        ("f:/run/x", "under /run"),
    ],
)
def test_hostile_copy_guest_paths_are_refused(spec: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        split_copy(spec)


def test_copy_host_file_must_be_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read"):
        host_copy(str(tmp_path / "missing"), "/x")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        host_copy(str(tmp_path), "/x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        host_copy(str(fifo), "/x")  # refused at once, never read (no hang)
    ok = CopyItem("/h", "/etc/x", "0" * 64)
    assert check_copy(ok) is ok
    for bad in (
        CopyItem("rel", "/etc/x", "0" * 64),
        CopyItem("/h", "/etc/x", "xyz"),
        CopyItem("/h", "/etc/x", "0" * 64, 0o4755),
        CopyItem("/h", "/sys/x", "0" * 64),
    ):
        with pytest.raises(InvalidArgument):
            check_copy(bad)


def test_commit_of_a_vm_on_a_workload_root_is_refused(svc: tuple[EnvService, Store]) -> None:
    import contextlib

    from stoker.errors import Conflict
    from stoker.model.records import VMRecord, VMSpec, VMState

    env, _ = svc
    rec = VMRecord(
        id="v1", name="w1", state=VMState.STOPPED, image="busy", spec=VMSpec(1, 512, 1, 1),
        guest_ip="172.30.0.9", dns_name="w1.vm", vm_dir="/nonexistent", created_at=now(),
        updated_at=now(), system_image="debian-bookworm",
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def locked(ref: str):  # type: ignore[no-untyped-def]
        yield rec

    async def alive(vm: VMRecord) -> bool:
        return False

    env.vm = SimpleNamespace(with_vm_lock_by_ref=locked, is_alive=alive)  # type: ignore[assignment]
    with pytest.raises(Conflict, match=r"workload root .* not supported yet"):
        asyncio.run(env.commit("w1", "img", False, False, lambda *a, **k: None))
