"""Forward-only schema migrations. Append; never edit a released step."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE kernels (
        name        TEXT PRIMARY KEY,
        version     TEXT NOT NULL,
        arch        TEXT NOT NULL,
        dir         TEXT NOT NULL,
        vmlinux     TEXT,
        bzimage     TEXT,
        initrd      TEXT,
        modules_dir TEXT,
        source      TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE images (
        name       TEXT PRIMARY KEY,
        managed    INTEGER NOT NULL,
        rootfs     TEXT NOT NULL,
        work_seed  TEXT,
        kernel     TEXT REFERENCES kernels(name) ON DELETE RESTRICT,
        source     TEXT NOT NULL,
        size       INTEGER NOT NULL,
        digest     TEXT,
        has_sshd   INTEGER NOT NULL DEFAULT 1,
        init       TEXT NOT NULL DEFAULT 'systemd',
        meta       TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL
    );
    CREATE TABLE vms (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        state       TEXT NOT NULL,
        image       TEXT NOT NULL REFERENCES images(name) ON DELETE RESTRICT,
        spec        TEXT NOT NULL,
        guest_ip    TEXT NOT NULL UNIQUE,
        dns_name    TEXT NOT NULL,
        vm_dir      TEXT NOT NULL,
        last_error  TEXT,
        workspace   TEXT,
        teardown    TEXT NOT NULL DEFAULT '{}',
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        started_at  TEXT
    );
    CREATE TABLE operations (
        id         TEXT PRIMARY KEY,
        kind       TEXT NOT NULL,
        target     TEXT NOT NULL,
        state      TEXT NOT NULL,
        stage      TEXT NOT NULL,
        error      TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE vm_stats (
        vm_id      TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        sample     TEXT NOT NULL,
        sampled_at TEXT NOT NULL
    );
    """,
    # network policy per VM (spec.net): VMs made with --nat keep it, the rest get the new
    # default, host-only
    """
    UPDATE vms SET spec = json_set(spec, '$.net',
        CASE WHEN json_extract(spec, '$.nat') THEN 'nat' ELSE 'host-only' END)
    WHERE json_extract(spec, '$.net') IS NULL
    """,
    # vm TTL: when set, the VM is deleted at this time (UTC, like created_at)
    """
    ALTER TABLE vms ADD COLUMN expires_at TEXT;
    """,
    # derived images: the image they were made from and the hash of their recipe
    """
    ALTER TABLE images ADD COLUMN parent TEXT;
    ALTER TABLE images ADD COLUMN recipe_hash TEXT;
    CREATE INDEX images_recipe_hash ON images(recipe_hash);
    """,
    # snapshots of a VM (issue 13): files under the VM's dir, `meta` is what a restore must
    # match (VMM kind + version, accel, kernel, image id, machine shape); gone with the VM
    """
    CREATE TABLE snapshots (
        vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        dir        TEXT NOT NULL,
        meta       TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (vm_id, name)
    )
    """,
    # workload roots (issue 11): an image is either a system image (boots directly) or a
    # workload root (an OCI image without sshd: runs on a system image, docs/guest-boot.md);
    # images pulled before this without sshd are workload roots. A VM on a workload root
    # records the system image it boots.
    """
    ALTER TABLE images ADD COLUMN role TEXT NOT NULL DEFAULT 'system';
    UPDATE images SET role = 'workload' WHERE has_sshd = 0;
    ALTER TABLE vms ADD COLUMN system_image TEXT REFERENCES images(name) ON DELETE RESTRICT;
    """,
    # the warm pool (issue 13): a VM with a row here is a pool VM (hidden from `vm list`,
    # prune and TTL) kept booted for `image`; `ready` once its agent and SSH answered;
    # taking it from the pool deletes the row (and renames the VM) in one transaction
    """
    CREATE TABLE pool_vms (
        vm_id      TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        image      TEXT NOT NULL,
        ready      INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    )
    """,
    # the warm pool's template (issue 13): a pool row with `template` is the hidden VM of
    # an image whose snapshot the pool forks its VMs from (ready once the snapshot exists)
    """
    ALTER TABLE pool_vms ADD COLUMN template INTEGER NOT NULL DEFAULT 0
    """,
]
