"""SQLite store. WAL, busy timeout and foreign keys on every connection."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stoker.errors import AlreadyExists, Conflict, NotFound, StateError, StoreBusy
from stoker.model.records import (
    Image,
    Kernel,
    Operation,
    PoolMember,
    Teardown,
    VMRecord,
    VMSpec,
    VMState,
    Workspace,
)
from stoker.store.migrations import MIGRATIONS

SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_MS = 5000


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Store:
    """Durable state. Methods are synchronous and short; a lock serialises writers."""

    def __init__(self, path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._lock = threading.RLock()
        _private_files(path)
        self._conn = self._connect(path, busy_timeout_ms)
        # SQLite gives -wal and -shm the database file's mode; an older install may have
        # left them 0644, so set them too.
        _private_files(path)
        self._migrate()

    # --- connection and schema ---------------------------------------------------------

    @staticmethod
    def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                str(path),
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            conn.execute("PRAGMA foreign_keys = ON")
            # Before anything writes: switching to WAL rewrites the file header.
            _refuse_newer_schema(conn, path)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateError(f"state store {path}: could not enable WAL (got {mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise _busy_error(path, busy_timeout_ms) from None
            raise StateError(
                f"state store {path} is not a readable SQLite database ({e}): move it aside "
                "and restart stokerd to start with empty state; nothing was overwritten"
            ) from None
        except sqlite3.DatabaseError as e:
            raise StateError(
                f"state store {path} is not a readable SQLite database ({e}): move it aside "
                "and restart stokerd to start with empty state; nothing was overwritten"
            ) from None
        return conn

    def _migrate(self) -> None:
        c = self._conn
        try:
            with self._lock:
                c.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
                row = c.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
                current = int(row[0] or 0)
                if current > SCHEMA_VERSION:
                    raise StateError(
                        f"state store {self.path} has schema version {current}, newer than this "
                        f"stoker understands ({SCHEMA_VERSION}): upgrade stoker; nothing was "
                        "changed"
                    )
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    c.execute("BEGIN IMMEDIATE")
                    try:
                        for stmt in _split(MIGRATIONS[version - 1]):
                            c.execute(stmt)
                        c.execute(
                            "INSERT INTO schema_migrations(version, applied_at) VALUES (?, ?)",
                            (version, now()),
                        )
                        c.execute("COMMIT")
                    except BaseException:
                        c.execute("ROLLBACK")
                        raise
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise _busy_error(self.path, self.busy_timeout_ms) from None
            raise StateError(
                f"state store {self.path} is corrupt or unreadable ({e}): move it aside and "
                "restart stokerd; nothing was overwritten"
            ) from None
        except sqlite3.DatabaseError as e:
            raise StateError(
                f"state store {self.path} is corrupt or unreadable ({e}): move it aside and "
                "restart stokerd; nothing was overwritten"
            ) from None

    def schema_version(self) -> int:
        row = self._conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT).

        A lock held by another writer past the busy timeout raises `StoreBusy`, never a
        raw sqlite3 error; the transaction is rolled back and nothing is written.
        """
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                if _is_busy(e):
                    raise _busy_error(self.path, self.busy_timeout_ms) from None
                raise
            try:
                yield self._conn
            except BaseException:
                with contextlib.suppress(sqlite3.OperationalError):
                    self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                with contextlib.suppress(sqlite3.OperationalError):
                    self._conn.execute("ROLLBACK")
                if _is_busy(e):
                    raise _busy_error(self.path, self.busy_timeout_ms) from None
                raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return list(self._conn.execute(sql, args).fetchall())
            except sqlite3.OperationalError as e:
                if _is_busy(e):
                    raise _busy_error(self.path, self.busy_timeout_ms) from None
                raise

    # --- VMs ---------------------------------------------------------------------------

    def insert_vm(self, vm: VMRecord, pool: str | None = None, template: bool = False) -> None:
        """Insert a VM; with `pool`, in the same transaction its pool row (a warm VM kept
        for that image, or with `template` the pool's template VM; not ready yet)."""
        try:
            with self.tx() as c:
                c.execute(
                    "INSERT INTO vms(id, name, state, image, spec, guest_ip, dns_name, vm_dir, "
                    "last_error, workspace, teardown, created_at, updated_at, started_at, "
                    "system_image) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    _vm_row(vm),
                )
                if pool is not None:
                    c.execute(
                        "INSERT INTO pool_vms(vm_id, image, ready, created_at, template) "
                        "VALUES (?,?,0,?,?)",
                        (vm.id, pool, now(), int(template)),
                    )
        except sqlite3.IntegrityError as e:
            msg = str(e)
            if "vms.name" in msg:
                raise AlreadyExists(f"a VM named {vm.name!r} already exists") from None
            if "vms.guest_ip" in msg:
                raise Conflict(f"guest IP {vm.guest_ip} is already in use") from None
            if "FOREIGN KEY" in msg:
                raise NotFound(
                    f"image {vm.image!r} not found: run `stoker image pull {vm.image}`"
                ) from None
            raise

    def update_vm(self, vm: VMRecord) -> None:
        vm.updated_at = now()
        with self.tx() as c:
            row = _vm_row(vm)
            # The workspace column is not written here: WorkspaceService records it with
            # set_vm_workspace without the VM lock, and a lifecycle op's stale copy must not
            # overwrite it.
            cur = c.execute(
                "UPDATE vms SET name=?, state=?, image=?, spec=?, guest_ip=?, dns_name=?, "
                "vm_dir=?, last_error=?, teardown=?, created_at=?, updated_at=?, "
                "started_at=?, system_image=? WHERE id=?",
                (*row[1:9], *row[10:], row[0]),
            )
            if cur.rowcount == 0:
                raise NotFound(f"VM {vm.name!r} no longer exists")

    def set_vm_workspace(self, vm_id: str, ws: Workspace | None) -> None:
        """Record (or clear) the workspace shipped into a VM."""
        with self.tx() as c:
            cur = c.execute(
                "UPDATE vms SET workspace=?, updated_at=? WHERE id=?",
                (json.dumps(dataclasses.asdict(ws)) if ws else None, now(), vm_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"VM {vm_id} no longer exists")

    def set_vm_expiry(self, vm_id: str, expires_at: str | None) -> None:
        """Set (or clear) when a VM is deleted (`--ttl`); not written by update_vm."""
        with self.tx() as c:
            cur = c.execute(
                "UPDATE vms SET expires_at=?, updated_at=? WHERE id=?", (expires_at, now(), vm_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"VM {vm_id} no longer exists")

    def delete_vm(self, vm_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM vms WHERE id=?", (vm_id,))

    def get_vm(self, vm_id: str) -> VMRecord | None:
        rows = self._query("SELECT * FROM vms WHERE id=?", (vm_id,))
        return _vm_from(rows[0]) if rows else None

    def list_vms(self) -> list[VMRecord]:
        """The user's VMs: pool VMs (a `pool_vms` row) are not among them."""
        return [
            _vm_from(r)
            for r in self._query(
                "SELECT * FROM vms WHERE id NOT IN (SELECT vm_id FROM pool_vms) "
                "ORDER BY created_at, name"
            )
        ]

    def list_all_vms(self) -> list[VMRecord]:
        """Every VM row, pool VMs included (reconcile, the VMM watch, the orphan sweep)."""
        return [_vm_from(r) for r in self._query("SELECT * FROM vms ORDER BY created_at, name")]

    # --- the warm pool -----------------------------------------------------------------

    def pool_members(self, image: str | None = None, template: bool = False) -> list[PoolMember]:
        """Pool rows (oldest first), of one image or all: the warm VMs, or with `template`
        the template VMs forks are made from (`ready` once its snapshot is taken)."""
        sql = "SELECT vm_id, image, ready, created_at FROM pool_vms WHERE template=?"
        args: tuple[Any, ...] = (int(template),)
        if image is not None:
            sql, args = sql + " AND image=?", (*args, image)
        rows = self._query(sql + " ORDER BY created_at, vm_id", args)
        return [PoolMember(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    def is_pool_vm(self, vm_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM pool_vms WHERE vm_id=?", (vm_id,)))

    def set_pool_ready(self, vm_id: str) -> None:
        with self.tx() as c:
            cur = c.execute("UPDATE pool_vms SET ready=1 WHERE vm_id=?", (vm_id,))
            if cur.rowcount == 0:
                raise NotFound(f"pool VM {vm_id} no longer exists")

    def take_pool_vm(self, vm: VMRecord, expires_at: str | None) -> None:
        """The pool VM becomes the user's VM `vm` (its new name, spec, expiry): the row
        update and the pool row's removal are one transaction."""
        with self.tx() as c:
            cur = c.execute("DELETE FROM pool_vms WHERE vm_id=?", (vm.id,))
            if cur.rowcount == 0:
                raise NotFound(f"pool VM {vm.id} is no longer in the pool")
            vm.updated_at = now()
            row = _vm_row(vm)
            try:
                c.execute(
                    "UPDATE vms SET name=?, state=?, image=?, spec=?, guest_ip=?, dns_name=?, "
                    "vm_dir=?, last_error=?, teardown=?, created_at=?, updated_at=?, "
                    "started_at=?, system_image=?, expires_at=? WHERE id=?",
                    (*row[1:9], *row[10:], expires_at, row[0]),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"a VM named {vm.name!r} already exists") from None

    def used_ips(self) -> set[str]:
        return {r[0] for r in self._query("SELECT guest_ip FROM vms")}

    # --- kernels -----------------------------------------------------------------------

    def upsert_kernel(self, k: Kernel) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO kernels(name, version, arch, dir, vmlinux, bzimage, initrd, "
                "modules_dir, source, created_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET version=excluded.version, arch=excluded.arch, "
                "dir=excluded.dir, vmlinux=excluded.vmlinux, bzimage=excluded.bzimage, "
                "initrd=excluded.initrd, modules_dir=excluded.modules_dir, "
                "source=excluded.source, created_at=excluded.created_at",
                (
                    k.name,
                    k.version,
                    k.arch,
                    k.dir,
                    k.vmlinux,
                    k.bzimage,
                    k.initrd,
                    k.modules_dir,
                    k.source,
                    k.created_at,
                ),
            )

    def get_kernel(self, name: str) -> Kernel | None:
        rows = self._query("SELECT * FROM kernels WHERE name=?", (name,))
        return Kernel(**dict(rows[0])) if rows else None

    def list_kernels(self) -> list[Kernel]:
        return [Kernel(**dict(r)) for r in self._query("SELECT * FROM kernels ORDER BY name")]

    def delete_kernel(self, name: str) -> None:
        try:
            with self.tx() as c:
                c.execute("DELETE FROM kernels WHERE name=?", (name,))
        except sqlite3.IntegrityError:
            users = [i.name for i in self.list_images() if i.kernel == name]
            raise Conflict(
                f"kernel {name!r} is used by image(s) {', '.join(users)}: delete those first"
            ) from None

    # --- images ------------------------------------------------------------------------

    def upsert_image(self, im: Image) -> None:
        try:
            with self.tx() as c:
                c.execute(
                    "INSERT INTO images(name, managed, rootfs, work_seed, kernel, source, size, "
                    "digest, has_sshd, init, meta, created_at, parent, recipe_hash, role) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(name) DO UPDATE SET managed=excluded.managed, "
                    "rootfs=excluded.rootfs, work_seed=excluded.work_seed, kernel=excluded.kernel,"
                    " source=excluded.source, size=excluded.size, digest=excluded.digest, "
                    "has_sshd=excluded.has_sshd, init=excluded.init, meta=excluded.meta, "
                    "created_at=excluded.created_at, parent=excluded.parent, "
                    "recipe_hash=excluded.recipe_hash, role=excluded.role",
                    (
                        im.name,
                        int(im.managed),
                        im.rootfs,
                        im.work_seed,
                        im.kernel,
                        im.source,
                        im.size,
                        im.digest,
                        int(im.has_sshd),
                        im.init,
                        json.dumps(im.meta),
                        im.created_at,
                        im.parent,
                        im.recipe_hash,
                        im.role,
                    ),
                )
        except sqlite3.IntegrityError:
            raise NotFound(
                f"kernel {im.kernel!r} for image {im.name!r} not found: "
                f"run `stoker kernel pull {im.kernel}` or `stoker kernel import`"
            ) from None

    def get_image(self, name: str) -> Image | None:
        rows = self._query("SELECT * FROM images WHERE name=?", (name,))
        return _image_from(rows[0]) if rows else None

    def find_image_by_recipe(self, recipe_hash: str) -> Image | None:
        rows = self._query(
            "SELECT * FROM images WHERE recipe_hash=? ORDER BY created_at DESC", (recipe_hash,)
        )
        return _image_from(rows[0]) if rows else None

    def list_images(self) -> list[Image]:
        return [_image_from(r) for r in self._query("SELECT * FROM images ORDER BY name")]

    def delete_image(self, name: str) -> None:
        try:
            with self.tx() as c:
                c.execute("DELETE FROM images WHERE name=?", (name,))
        except sqlite3.IntegrityError:
            users = [v.name for v in self.list_all_vms() if name in (v.image, v.system_image)]
            raise Conflict(
                f"image {name!r} is used by VM(s) {', '.join(users)}: delete those first"
            ) from None

    # --- operations --------------------------------------------------------------------

    def upsert_operation(self, op: Operation) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO operations(id, kind, target, state, stage, error, created_at, "
                "updated_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                "state=excluded.state, stage=excluded.stage, error=excluded.error, "
                "updated_at=excluded.updated_at",
                (
                    op.id,
                    op.kind,
                    op.target,
                    op.state,
                    op.stage,
                    op.error,
                    op.created_at,
                    op.updated_at,
                ),
            )

    def list_operations(self) -> list[Operation]:
        return [
            Operation(**dict(r))
            for r in self._query("SELECT * FROM operations ORDER BY created_at DESC LIMIT 200")
        ]

    def delete_operations_before(self, ts: str) -> int:
        with self.tx() as c:
            cur = c.execute(
                "DELETE FROM operations WHERE state != 'running' AND updated_at < ?", (ts,)
            )
            return int(cur.rowcount)

    # --- stats -------------------------------------------------------------------------

    def put_stats(self, vm_id: str, sample: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO vm_stats(vm_id, sample, sampled_at) VALUES (?,?,?) "
                "ON CONFLICT(vm_id) DO UPDATE SET sample=excluded.sample, "
                "sampled_at=excluded.sampled_at",
                (vm_id, json.dumps(sample), now()),
            )

    def get_stats(self, vm_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT sample FROM vm_stats WHERE vm_id=?", (vm_id,))
        return dict(json.loads(rows[0][0])) if rows else None

    # --- snapshots ---------------------------------------------------------------------

    def insert_snapshot(self, vm_id: str, name: str, dir: Path, meta: dict[str, Any]) -> None:
        """Record a complete snapshot (its files are written first); a second one of the
        same name for this VM is refused."""
        with self.tx() as c:
            try:
                c.execute(
                    "INSERT INTO snapshots(vm_id, name, dir, meta, created_at) VALUES (?,?,?,?,?)",
                    (vm_id, name, str(dir), json.dumps(meta, sort_keys=True), now()),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(
                    f"this VM already has a snapshot named {name!r}: pick another --name "
                    "or delete it first"
                ) from None

    def list_snapshots(self, vm_id: str | None = None) -> list[dict[str, Any]]:
        """Snapshots (of one VM, or all), oldest first: vm_id, name, dir, meta, created_at."""
        sql = "SELECT vm_id, name, dir, meta, created_at FROM snapshots"
        rows = (
            self._query(sql + " WHERE vm_id=? ORDER BY created_at, name", (vm_id,))
            if vm_id is not None
            else self._query(sql + " ORDER BY created_at, name")
        )
        return [
            {
                "vm_id": r[0],
                "name": r[1],
                "dir": r[2],
                "meta": json.loads(r[3]),
                "created_at": r[4],
            }
            for r in rows
        ]

    def get_snapshot(self, vm_id: str, name: str) -> dict[str, Any] | None:
        return next((s for s in self.list_snapshots(vm_id) if s["name"] == name), None)

    def delete_snapshot(self, vm_id: str, name: str) -> None:
        with self.tx() as c:
            cur = c.execute("DELETE FROM snapshots WHERE vm_id=? AND name=?", (vm_id, name))
            if cur.rowcount == 0:
                raise NotFound(
                    f"this VM has no snapshot named {name!r} (see `stoker vm snapshot list`)"
                )


def _is_busy(e: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED, by code where Python exposes it, else by message."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def _busy_error(path: Path, busy_timeout_ms: int) -> StoreBusy:
    return StoreBusy(
        f"state store {path} stayed locked by another writer for more than "
        f"{busy_timeout_ms / 1000:g}s: retry; if it persists, look for another process "
        f"holding {path} open (e.g. `fuser {path}`) and stop it"
    )


def _private_files(db: Path) -> None:
    """State dir 0700, state.db and its -wal/-shm 0600, whoever created them first.

    The database holds VM records and paths of keys; a system install's
    `StateDirectory=` makes the directory 0755 and a default umask makes files 0644.
    """
    try:
        db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = db.parent.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(db.parent, st.st_mode & 0o7700)
        if not db.exists():
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(p, st.st_mode & 0o7700)
    except OSError as e:
        raise StateError(
            f"state store {db}: cannot make it private ({e.strerror}): check the ownership "
            f"of {db.parent}"
        ) from None


def _refuse_newer_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Raise StateError, without writing, when the file's schema is newer than ours."""
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'"
    ).fetchone()
    if has_table is None:
        return
    current = int(conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] or 0)
    if current > SCHEMA_VERSION:
        conn.close()
        raise StateError(
            f"state store {path} has schema version {current}, newer than this stoker "
            f"understands ({SCHEMA_VERSION}): upgrade stoker; nothing was changed"
        )


def _split(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _vm_row(vm: VMRecord) -> tuple[Any, ...]:
    return (
        vm.id,
        vm.name,
        str(vm.state),
        vm.image,
        json.dumps(dataclasses.asdict(vm.spec)),
        vm.guest_ip,
        vm.dns_name,
        vm.vm_dir,
        vm.last_error,
        json.dumps(dataclasses.asdict(vm.workspace)) if vm.workspace else None,
        json.dumps(dataclasses.asdict(vm.teardown)),
        vm.created_at,
        vm.updated_at,
        vm.started_at,
        vm.system_image,
    )


def _vm_from(r: sqlite3.Row) -> VMRecord:
    ws = json.loads(r["workspace"]) if r["workspace"] else None
    return VMRecord(
        id=r["id"],
        name=r["name"],
        state=VMState(r["state"]),
        image=r["image"],
        spec=VMSpec(**json.loads(r["spec"])),
        guest_ip=r["guest_ip"],
        dns_name=r["dns_name"],
        vm_dir=r["vm_dir"],
        last_error=r["last_error"],
        workspace=Workspace(**ws) if ws else None,
        teardown=Teardown.from_dict(json.loads(r["teardown"] or "{}")),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        started_at=r["started_at"],
        expires_at=r["expires_at"] if "expires_at" in r.keys() else None,  # noqa: SIM118
        system_image=r["system_image"] if "system_image" in r.keys() else None,  # noqa: SIM118
    )


def _image_from(r: sqlite3.Row) -> Image:
    d = dict(r)
    d["managed"] = bool(d["managed"])
    d["has_sshd"] = bool(d["has_sshd"])
    d["meta"] = json.loads(d["meta"] or "{}")
    return Image(**d)
