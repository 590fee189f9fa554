"""State store: pragmas on every connection, migrations, refusing bad files, constraints."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from stoker.errors import AlreadyExists, Conflict, NotFound, StateError
from stoker.model.records import (
    Image,
    Kernel,
    Operation,
    Teardown,
    VMRecord,
    VMSpec,
    VMState,
    Workspace,
)
from stoker.store import SCHEMA_VERSION, Store
from stoker.store.db import BUSY_TIMEOUT_MS, now

pytestmark = pytest.mark.unit


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def kernel(name: str = "k1") -> Kernel:
    return Kernel(
        name=name,
        version="6.1.0",
        arch="x86_64",
        dir=f"/k/{name}",
        vmlinux=f"/k/{name}/vmlinux",
        bzimage=None,
        initrd=None,
        modules_dir=None,
        source="test",
        created_at=now(),
    )


def image(name: str = "img", kernel: str | None = "k1") -> Image:
    return Image(
        name=name,
        managed=True,
        rootfs=f"/i/{name}/rootfs.ext4",
        work_seed=None,
        kernel=kernel,
        source="test",
        size=123,
        created_at=now(),
        meta={"a": 1},
    )


def vm(name: str = "web", ip: str = "172.30.0.2", image: str = "img", vid: str = "") -> VMRecord:
    ts = now()
    return VMRecord(
        id=vid or hashlib.sha1(name.encode()).hexdigest()[:16],
        name=name,
        state=VMState.CREATED,
        image=image,
        spec=VMSpec(vcpu=1, memory_mib=1024, disk_size=8 << 30, overlay_size=8 << 30),
        guest_ip=ip,
        dns_name=f"{name}.vm",
        vm_dir=f"/v/{name}",
        created_at=ts,
        updated_at=ts,
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state.db")
    yield s  # type: ignore[misc]
    s.close()


@pytest.fixture
def populated(store: Store) -> Store:
    store.upsert_kernel(kernel())
    store.upsert_image(image())
    return store


def pragmas(conn: sqlite3.Connection) -> tuple[str, int, int]:
    return (
        str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower(),
        int(conn.execute("PRAGMA foreign_keys").fetchone()[0]),
        int(conn.execute("PRAGMA busy_timeout").fetchone()[0]),
    )


def test_connection_pragmas(store: Store) -> None:
    assert pragmas(store._conn) == ("wal", 1, BUSY_TIMEOUT_MS)
    assert BUSY_TIMEOUT_MS > 0


def test_every_connection_gets_pragmas(tmp_path: Path) -> None:
    a = Store(tmp_path / "state.db")
    b = Store(tmp_path / "state.db")
    try:
        assert pragmas(a._conn) == pragmas(b._conn) == ("wal", 1, BUSY_TIMEOUT_MS)
    finally:
        a.close()
        b.close()


def test_migrations_table_and_tables(store: Store) -> None:
    assert store.schema_version() == SCHEMA_VERSION >= 1
    rows = store._conn.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
    assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    assert all(r[1] for r in rows)
    tables = {
        r[0] for r in store._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert {"schema_migrations", "vms", "images", "kernels", "operations"} <= tables


def test_reopen_is_idempotent(tmp_path: Path) -> None:
    p = tmp_path / "state.db"
    s = Store(p)
    s.upsert_kernel(kernel())
    s.close()
    for _ in range(3):
        s = Store(p)
        assert s.schema_version() == SCHEMA_VERSION
        n = s._conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0]
        assert n == SCHEMA_VERSION
        assert [k.name for k in s.list_kernels()] == ["k1"]
        s.close()


def test_corrupt_file_is_refused_and_untouched(tmp_path: Path) -> None:
    p = tmp_path / "state.db"
    p.write_bytes(os.urandom(64 * 1024))
    before = sha(p)
    with pytest.raises(StateError) as ei:
        Store(p)
    assert str(p) in ei.value.message
    assert "nothing was overwritten" in ei.value.message
    assert ei.value.code == "state_error"
    assert sha(p) == before
    assert p.stat().st_size == 64 * 1024


def test_truncated_database_is_refused_and_untouched(tmp_path: Path) -> None:
    """A real SQLite file cut short (valid header, missing pages)."""
    p = tmp_path / "state.db"
    s = Store(p)
    s.upsert_kernel(kernel())
    s.close()
    data = p.read_bytes()
    p.write_bytes(data[:100] + os.urandom(len(data) - 100))
    before = sha(p)
    with pytest.raises(StateError):
        Store(p)
    assert sha(p) == before


def test_too_new_schema_is_refused_and_untouched(tmp_path: Path) -> None:
    p = tmp_path / "state.db"
    s = Store(p)
    s._conn.execute("INSERT INTO schema_migrations(version, applied_at) VALUES (999, 'future')")
    s.close()
    before = sha(p)
    with pytest.raises(StateError) as ei:
        Store(p)
    assert "999" in ei.value.message
    assert "upgrade stoker" in ei.value.message
    assert sha(p) == before
    # the refused open left the rows alone too
    conn = sqlite3.connect(p)
    try:
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] == 999
    finally:
        conn.close()


def test_too_new_schema_in_rollback_journal_file_is_untouched(tmp_path: Path) -> None:
    """Refusing must happen before the switch to WAL, which rewrites the header."""
    p = tmp_path / "state.db"
    conn = sqlite3.connect(p)
    conn.execute(
        "CREATE TABLE schema_migrations(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    conn.execute("INSERT INTO schema_migrations VALUES (999, 'future')")
    conn.commit()
    conn.close()
    before = sha(p)
    with pytest.raises(StateError, match="999"):
        Store(p)
    assert sha(p) == before


def test_vm_round_trip(populated: Store) -> None:
    v = vm()
    v.workspace = Workspace(guest_path="/root/repo", host_path="/src/repo", head="abc")
    v.teardown = Teardown(tap="tap0", vmm="qemu", vmm_pid=42, nat=True)
    v.last_error = "boom"
    populated.insert_vm(v)
    got = populated.get_vm(v.id)
    assert got == v
    assert populated.list_vms() == [v]
    assert populated.used_ips() == {"172.30.0.2"}

    v.state = VMState.RUNNING
    v.spec.vcpu = 2
    populated.update_vm(v)
    got = populated.get_vm(v.id)
    assert got is not None and got.state is VMState.RUNNING and got.spec.vcpu == 2

    populated.delete_vm(v.id)
    assert populated.get_vm(v.id) is None
    with pytest.raises(NotFound):
        populated.update_vm(v)


def test_duplicate_vm_name_is_already_exists(populated: Store) -> None:
    populated.insert_vm(vm("web", "172.30.0.2"))
    with pytest.raises(AlreadyExists, match="'web'"):
        populated.insert_vm(vm("web", "172.30.0.3", vid="other-id"))
    assert len(populated.list_vms()) == 1


def test_duplicate_guest_ip_is_conflict(populated: Store) -> None:
    populated.insert_vm(vm("a", "172.30.0.2"))
    with pytest.raises(Conflict, match=r"172\.30\.0\.2"):
        populated.insert_vm(vm("b", "172.30.0.2"))


def test_vm_with_unknown_image_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="image pull"):
        store.insert_vm(vm(image="nope"))
    assert store.list_vms() == []


def test_delete_image_used_by_vm_is_conflict(populated: Store) -> None:
    populated.insert_vm(vm("web"))
    with pytest.raises(Conflict) as ei:
        populated.delete_image("img")
    assert "web" in ei.value.message
    assert populated.get_image("img") is not None
    populated.delete_vm(populated.list_vms()[0].id)
    populated.delete_image("img")
    assert populated.get_image("img") is None


def test_delete_kernel_used_by_image_is_conflict(populated: Store) -> None:
    with pytest.raises(Conflict) as ei:
        populated.delete_kernel("k1")
    assert "img" in ei.value.message
    assert populated.get_kernel("k1") is not None


def test_image_with_unknown_kernel_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="kernel"):
        store.upsert_image(image(kernel="missing"))
    assert store.list_images() == []


def test_image_and_kernel_round_trip_and_upsert(populated: Store) -> None:
    ref = image("exact")
    populated.upsert_image(ref)
    assert populated.get_image("exact") == ref
    populated.delete_image("exact")
    newer = image()
    newer.size = 999
    populated.upsert_image(newer)
    got = populated.get_image("img")
    assert got is not None and got.size == 999
    assert [i.name for i in populated.list_images()] == ["img"]
    k = kernel()
    k.version = "6.2"
    populated.upsert_kernel(k)
    assert populated.get_kernel("k1") == k
    # an image without a kernel is allowed
    populated.upsert_image(image("bare", kernel=None))
    assert [i.name for i in populated.list_images()] == ["bare", "img"]


def test_operations(store: Store) -> None:
    old = Operation("op1", "pull", "img", "done", "done", "2000-01-01T00:00:00.000000Z", "2000")
    running = Operation("op2", "create", "web", "running", "boot", now(), "2000")
    store.upsert_operation(old)
    store.upsert_operation(running)
    assert {o.id for o in store.list_operations()} == {"op1", "op2"}
    running.stage = "ssh"
    store.upsert_operation(running)
    assert {o.id: o.stage for o in store.list_operations()}["op2"] == "ssh"
    # only finished ones are pruned
    assert store.delete_operations_before("2999") == 1
    assert [o.id for o in store.list_operations()] == ["op2"]


def test_stats_cascade_with_vm(populated: Store) -> None:
    v = vm()
    populated.insert_vm(v)
    populated.put_stats(v.id, {"cpu": 1.5})
    assert populated.get_stats(v.id) == {"cpu": 1.5}
    populated.delete_vm(v.id)
    assert populated.get_stats(v.id) is None


def test_failed_transaction_rolls_back(populated: Store) -> None:
    with pytest.raises(RuntimeError), populated.tx() as c:
        c.execute("DELETE FROM images")
        raise RuntimeError("abort")
    assert populated.get_image("img") is not None


# --- issue 9 item 15: a lock held past the busy timeout ------------------------------------


def test_lock_held_past_busy_timeout_is_store_busy(tmp_path: Path) -> None:
    """Old behaviour: a raw sqlite3.OperationalError("database is locked") escaped."""
    from stoker.errors import StoreBusy

    s = Store(tmp_path / "state.db", busy_timeout_ms=100)
    other = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        with pytest.raises(StoreBusy) as ei:
            s.upsert_kernel(kernel())
        assert ei.value.code == "store_busy"
        assert "locked by another writer" in ei.value.message
        assert "state.db" in ei.value.message
        # Reads still work in WAL mode while a writer holds the lock.
        assert s.list_kernels() == []
    finally:
        other.execute("ROLLBACK")
        other.close()
    s.upsert_kernel(kernel())  # the store is usable again once the lock is released
    assert [k.name for k in s.list_kernels()] == ["k1"]
    s.close()


def test_exclusive_lock_at_open_is_store_busy(tmp_path: Path) -> None:
    """Old behaviour: an exclusive lock at open said the store was 'not a readable SQLite
    database ... move it aside', a wrong and dangerous instruction."""
    from stoker.errors import StoreBusy

    Store(tmp_path / "state.db").close()
    other = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None)
    other.execute("PRAGMA locking_mode = EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreBusy, match="locked by another writer"):
            Store(tmp_path / "state.db", busy_timeout_ms=100)
    finally:
        other.execute("ROLLBACK")
        other.close()


# --- issue 9 item 14: private state whoever made the directory -----------------------------


def test_state_dir_and_db_files_are_private(tmp_path: Path) -> None:
    """Old behaviour: a 0755 state dir (systemd StateDirectory=) stayed 0755 and state.db
    with its -wal/-shm came out 0644 under a 022 umask."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    old = os.umask(0o022)
    try:
        s = Store(state / "state.db")
        s.upsert_kernel(kernel())  # makes sure -wal and -shm exist
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in state.iterdir() if p.is_file()}
        assert modes == {"state.db": "0o600", "state.db-wal": "0o600", "state.db-shm": "0o600"}
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        s.close()
        # An older install's 0644 files are tightened at the next open.
        for p in state.iterdir():
            os.chmod(p, 0o644)
        os.chmod(state, 0o755)
        Store(state / "state.db").close()
        assert oct((state / "state.db").stat().st_mode & 0o777) == "0o600"
        assert oct(state.stat().st_mode & 0o777) == "0o700"
    finally:
        os.umask(old)


def test_teardown_of_an_older_version_loads_without_its_unfilled_fields(
    populated: Store,
) -> None:
    v = vm()
    populated.insert_vm(v)
    old = '{"tap": "tap0", "vmm": "qemu", "vmm_pid": 42, "api_socket": "/s", "loops": [], "dm_names": [], "nat": false}'  # noqa: E501
    populated._conn.execute("UPDATE vms SET teardown=? WHERE id=?", (old, v.id))
    got = populated.get_vm(v.id)
    assert got is not None
    assert got.teardown == Teardown(tap="tap0", vmm="qemu", vmm_pid=42, api_socket="/s")


def test_snapshots_round_trip_are_unique_per_vm_and_go_with_the_vm(populated: Store) -> None:
    v = vm("web")
    populated.insert_vm(v)
    meta = {"vmm": "qemu", "vmm_version": "7.2.19", "vcpu": 1}
    populated.insert_snapshot(v.id, "s1", Path("/v/web/snapshots/s1"), meta)
    with pytest.raises(AlreadyExists, match="already has a snapshot named 's1'"):
        populated.insert_snapshot(v.id, "s1", Path("/elsewhere"), {})
    got = populated.get_snapshot(v.id, "s1")
    assert got is not None and got["meta"] == meta and got["dir"] == "/v/web/snapshots/s1"
    assert [s["name"] for s in populated.list_snapshots()] == ["s1"]
    assert populated.list_snapshots("other") == []
    with pytest.raises(NotFound, match="no snapshot named 'nope'"):
        populated.delete_snapshot(v.id, "nope")
    populated.insert_snapshot(v.id, "s2", Path("/v/web/snapshots/s2"), meta)
    populated.delete_snapshot(v.id, "s2")
    assert populated.get_snapshot(v.id, "s2") is None
    populated.delete_vm(v.id)
    assert populated.list_snapshots() == []  # ON DELETE CASCADE


def test_workload_migration_marks_old_images_without_sshd(tmp_path: Path) -> None:
    """The workload-roots migration (appended last): images pulled without sshd become
    workload roots, the rest stay system images; VMs gain system_image."""
    import sqlite3

    from stoker.store.db import _split
    from stoker.store.migrations import MIGRATIONS

    path = tmp_path / "old.db"
    c = sqlite3.connect(path)
    c.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    # Everything before this migration (others may be appended after it).
    idx = next(i for i, m in enumerate(MIGRATIONS) if "ADD COLUMN role" in m)
    for v, script in enumerate(MIGRATIONS[:idx], 1):
        for stmt in _split(script):
            c.execute(stmt)
        c.execute("INSERT INTO schema_migrations VALUES (?, 'then')", (v,))
    for name, sshd in (("busy", 0), ("deb", 1)):
        c.execute(
            "INSERT INTO images(name, managed, rootfs, source, size, has_sshd, created_at) "
            "VALUES (?, 1, '/r', 'oci:x', 1, ?, 'then')",
            (name, sshd),
        )
    c.commit()
    c.close()
    s = Store(path)
    try:
        roles = {i.name: i.role for i in s.list_images()}
        assert roles == {"busy": "workload", "deb": "system"}
        assert "system_image" in [r[1] for r in s._query("PRAGMA table_info(vms)")]
    finally:
        s.close()
