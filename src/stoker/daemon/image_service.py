"""ImageService: images and kernels (register, promote, delete, pull, build, catalog).

`image_ops_lock` is the publication-window lock: held only across recheck-name +
atomic rename + store upsert. Downloads, ext4 builds and copies run without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from stoker.config import Config
from stoker.daemon.imagemgr.safetree import rmtree
from stoker.daemon.locks import LockSet
from stoker.daemon.opstate import Registry
from stoker.daemon.opstate.registry import OpState
from stoker.daemon.opstate.singleflight import SingleFlight
from stoker.daemon.revert import Reverter
from stoker.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from stoker.layout import Layout
from stoker.model.names import validate_artifact_name
from stoker.model.records import Image, Kernel
from stoker.model.wire import AvailableKernel, CachePruned, Deleted, Pushed
from stoker.runner import Runner
from stoker.store import Store
from stoker.store.db import now

Progress = Callable[..., None]
T = TypeVar("T")


class ImageService:
    """Owns image and kernel artifacts under the state dir and their store rows."""

    def __init__(
        self, store: Store, layout: Layout, config: Config, runner: Runner, logger: logging.Logger
    ) -> None:
        self.store = store
        self.layout = layout
        self.config = config
        self.runner = runner
        self.log = logger
        self.image_ops_lock = asyncio.Lock()
        # Per-name locks for pull/build/delete (taken before image_ops_lock).
        self.name_locks = LockSet()
        # Run before an image is deleted or replaced, under its name lock (the warm pool
        # drains it: wiring registers PoolService.drain).
        self.before_delete: list[Callable[[str], Awaitable[object]]] = []
        # Concurrent pulls/builds of one name share one task (`SingleFlight`).
        self._inflight: SingleFlight[str, Image] = SingleFlight()
        self._kernel_inflight: SingleFlight[str, Kernel] = SingleFlight()
        self.ops: Registry[OpState] = Registry()

    async def list_images(self) -> list[Image]:
        """All registered images."""
        return self.store.list_images()

    async def get_image(self, name: str) -> Image:
        """One image by name, or a NotFound that says how to get it."""
        im = self.store.get_image(name)
        if im is None:
            raise NotFound(f"image {name!r} not found: run `stoker image pull {name}`")
        return im

    async def list_kernels(self) -> list[Kernel]:
        """All registered kernels."""
        return self.store.list_kernels()

    async def get_kernel(self, name: str) -> Kernel:
        """One kernel by name."""
        k = self.store.get_kernel(name)
        if k is None:
            raise NotFound(f"kernel {name!r} not found: run `stoker kernel pull {name}`")
        return k

    # --- start-up sweep ----------------------------------------------------------------

    async def sweep_leftovers(self) -> list[str]:
        """At daemon start (nothing is pulling or building yet): delete what a crash or a
        `kill -9` left behind. That is everything in `staging/`, every image directory
        and kernel directory with no store row, and the `kernels/.*` temporaries of
        imports. Returns the paths removed (also logged)."""
        norm = os.path.normpath
        managed = {norm(Path(im.rootfs).parent) for im in self.store.list_images() if im.managed}
        kernels = {norm(k.dir) for k in self.store.list_kernels()}
        targets = [
            (self.layout.staging_dir, set[str]()),
            (self.layout.images_dir, managed),
            (self.layout.kernels_dir, kernels),
        ]
        removed = await asyncio.to_thread(_sweep, targets)
        for p in removed:
            self.log.info("start-up sweep: removed leftover %s", p)
        return removed

    # --- helpers -----------------------------------------------------------------------

    @staticmethod
    def _check_ext4(path: Path, what: str) -> None:
        if not path.is_file():
            raise InvalidArgument(f"{what} {path} does not exist or is not a regular file")
        try:
            with open(path, "rb") as f:
                f.seek(1080)
                magic = f.read(2)
        except OSError as e:
            raise InvalidArgument(f"cannot read {what} {path}: {e.strerror}") from None
        if magic != b"\x53\xef":
            raise InvalidArgument(f"{what} {path} is not an ext4 filesystem image")

    def _users_of_image(self, name: str) -> list[str]:
        return [v.name for v in self.store.list_vms() if v.image == name]

    def _tracked(
        self, kind: str, target: str, progress: Progress, work: Callable[[Progress], Awaitable[T]]
    ) -> Callable[[], Awaitable[T]]:
        """A `SingleFlight` start for `work`: registered in `ops`, its stages recorded."""

        def start() -> asyncio.Future[T]:
            op = self.ops.add(OpState(kind=kind, target=target))
            fut = asyncio.ensure_future(work(op.tracking(progress)))
            fut.add_done_callback(lambda f: op.finish(_failure(f)))
            return fut

        return start

    async def _copy_sparse(self, src: Path, dst: Path) -> None:
        await self.runner.run(["cp", "--sparse=always", "--", str(src), str(dst)], timeout=1800)

    # --- register / promote / delete ---------------------------------------------------

    async def register_image(
        self,
        name: str,
        rootfs: str,
        kernel: str,
        work_seed: str | None = None,
        has_sshd: bool = True,
    ) -> Image:
        """Record host paths as they are (unmanaged: stoker never deletes them)."""
        validate_artifact_name(name, "image")
        rp = Path(rootfs).resolve()
        self._check_ext4(rp, "rootfs")
        wp = Path(work_seed).resolve() if work_seed else None
        if wp is not None:
            self._check_ext4(wp, "work-seed")
        await self.get_kernel(kernel)
        async with self.name_locks.hold(f"image:{name}"), self.image_ops_lock:
            if self.store.get_image(name) is not None:
                raise AlreadyExists(
                    f"image {name!r} already exists: pick another name or "
                    f"`stoker image delete {name}`"
                )
            im = Image(
                name=name,
                managed=False,
                rootfs=str(rp),
                work_seed=str(wp) if wp else None,
                kernel=kernel,
                source=f"register:{rp}",
                size=rp.stat().st_size,
                created_at=now(),
                has_sshd=has_sshd,
                # Without an SSH server it cannot boot as a guest: a workload root.
                role="system" if has_sshd else "workload",
            )
            self.store.upsert_image(im)
        return im

    async def promote_image(self, name: str) -> Image:
        """Copy an unmanaged image's files into managed storage."""
        async with self.name_locks.hold(f"image:{name}"):
            im = await self.get_image(name)
            if im.managed:
                return im
            final = self.layout.images_dir / name
            staging = Path(tempfile.mkdtemp(prefix=f"promote-{name}-", dir=self.layout.staging_dir))
            try:
                await self._copy_sparse(Path(im.rootfs), staging / "rootfs.ext4")
                if im.work_seed:
                    await self._copy_sparse(Path(im.work_seed), staging / "work-seed.ext4")
                async with self.image_ops_lock:
                    cur = self.store.get_image(name)
                    if cur is None or cur.managed:
                        raise Conflict(f"image {name!r} changed while promoting: retry")
                    if final.exists():
                        rmtree(final)
                    os.replace(staging, final)
                    im.managed = True
                    im.rootfs = str(final / "rootfs.ext4")
                    im.work_seed = str(final / "work-seed.ext4") if im.work_seed else None
                    self.store.upsert_image(im)
            finally:
                rmtree(staging, ignore_errors=True)
        return im

    async def delete_image(self, name: str) -> Deleted:
        """Remove an image (refused while a VM uses it); managed files are deleted."""
        async with self.name_locks.hold(f"image:{name}"):
            im = await self.get_image(name)
            await self.drain_pools(name)
            users = self._users_of_image(name)
            if users:
                raise Conflict(
                    f"image {name!r} is used by VM(s) {', '.join(users)}: delete those first"
                )
            async with self.image_ops_lock:
                self.store.delete_image(name)
            if im.managed:
                rmtree(self.layout.images_dir / name, ignore_errors=True)
        return Deleted(name)

    async def drain_pools(self, name: str) -> None:
        """Before `name` is deleted or replaced: empty its warm pool (`before_delete`
        hooks; the caller holds the image's name lock, so no new pool VM of it starts)."""
        for hook in self.before_delete:
            await hook(name)

    async def delete_kernel(self, name: str) -> Deleted:
        """Remove a kernel (refused while an image uses it)."""
        async with self.name_locks.hold(f"kernel:{name}"):
            k = await self.get_kernel(name)
            async with self.image_ops_lock:
                self.store.delete_kernel(name)
            d = Path(k.dir)
            if d.is_relative_to(self.layout.kernels_dir):
                rmtree(d, ignore_errors=True)
        return Deleted(name)

    # --- golden build, kernels, ensure ---------------------------------------------------

    async def ensure_image(self, name: str, progress: Progress) -> Image:
        """The named image, building or pulling it first when it is a known name."""
        im = self.store.get_image(name)
        if im is not None:
            return im
        from stoker.daemon.catalog import load_catalog

        if load_catalog().find_image(name) is not None:
            progress("image", f"image {name} is not here yet: pulling it from the catalog")
            return await self.pull(name, None, progress)
        if GOLDEN_NAME.match(name):
            progress("image", f"image {name} is not here yet: building it (first run only)")
            return await self.build_golden(name, False, progress)
        raise NotFound(
            f"image {name!r} not found: run `stoker image pull {name}` or "
            "`stoker image build debian-bookworm`"
        )

    async def build_golden(self, name: str, force: bool, progress: Progress) -> Image:
        """`image build debian-SUITE`: mmdebstrap a golden image and import its kernel.
        Building the same spec again is a no-op unless `force`."""
        from stoker.daemon.imagemgr import golden

        m = GOLDEN_NAME.match(name)
        if not m:
            raise InvalidArgument(
                f"cannot build {name!r}: golden images are named debian-SUITE, e.g. debian-bookworm"
            )

        async def run(progress: Progress) -> Image:
            async with self.name_locks.hold(f"image:{name}"):
                existing = self.store.get_image(name)
                if existing is not None and existing.source != f"golden:{m.group(1)}":
                    raise AlreadyExists(
                        f"image {name!r} exists and was not built by stoker "
                        f"({existing.source}): delete it first"
                    )
                cache = (
                    Path(self.config.golden_cache_dir)
                    if self.config.golden_cache_dir
                    else self.layout.cache_dir / "apt"
                )

                def report(stage: str, detail: str = "") -> None:
                    progress(stage, detail)

                res = await golden.build_golden(
                    self.runner,
                    self.layout.images_dir / name,
                    suite=m.group(1),
                    mirror=self.config.debian_mirror,
                    cache_dir=cache,
                    progress=report,
                    force=force,
                )
                if existing is not None and res.reused:
                    return existing
                kname = f"debian-{res.kernel_version}"
                progress("kernel", f"importing kernel {kname}")
                kernel = await self._import_kernel_files(kname, res.kernel_dir, "golden")
                im = Image(
                    name=name,
                    managed=True,
                    rootfs=str(res.rootfs),
                    work_seed=str(res.work_seed),
                    kernel=kernel.name,
                    source=f"golden:{m.group(1)}",
                    size=res.rootfs.stat().st_size,
                    created_at=now(),
                    digest=res.spec_hash,
                    meta={"packages": res.packages},
                )
                async with self.image_ops_lock:
                    self.store.upsert_image(im)
                progress("done", f"{name} built ({res.packages} packages)")
                return im

        return await self._inflight.run(
            f"build:{name}",
            self._tracked("build", name, progress, run),
            on_join=lambda: progress("build", f"joining the build of {name} already in progress"),
        )

    async def _import_kernel_files(self, name: str, source: Path, origin: str) -> Kernel:
        from stoker.daemon.imagemgr import kernel as kmod

        validate_artifact_name(name, "kernel")
        async with self.name_locks.hold(f"kernel:{name}"):
            dest = self.layout.kernels_dir / name
            files = await kmod.import_kernel(self.runner, source, dest)
            k = Kernel(
                name=name,
                version=files.version,
                arch=files.arch,
                dir=str(files.dir),
                vmlinux=str(files.vmlinux),
                bzimage=str(files.bzimage) if files.bzimage else None,
                initrd=str(files.initrd) if files.initrd else None,
                modules_dir=str(files.modules_dir) if files.modules_dir else None,
                source=origin,
                created_at=now(),
            )
            async with self.image_ops_lock:
                self.store.upsert_kernel(k)
            return k

    async def import_kernel(self, name: str, source: str, progress: Progress) -> Kernel:
        """`kernel import NAME --from DIR|PACKAGE.deb|FILE`."""
        validate_artifact_name(name, "kernel")
        src = Path(source)
        if not src.exists():
            raise InvalidArgument(f"kernel source {source} does not exist")
        if self.store.get_kernel(name) is not None:
            raise AlreadyExists(
                f"kernel {name!r} already exists: `stoker kernel rm {name}` first or pick "
                "another name"
            )
        progress("import", f"importing {source}")
        return await self._import_kernel_files(name, src.resolve(), f"import:{src.resolve()}")

    # --- pull ---------------------------------------------------------------------------

    def default_kernel(self) -> str:
        """The kernel OCI images boot with: the default image's, else the newest one."""
        im = self.store.get_image(self.config.default_image)
        if im is not None and im.kernel:
            return im.kernel
        kernels = sorted(self.store.list_kernels(), key=lambda k: k.created_at)
        if kernels:
            return kernels[-1].name
        raise NotFound(
            "no kernel is registered for OCI images to boot with: run "
            f"`stoker image build {self.config.default_image}` (it imports one) or "
            "`stoker kernel import NAME --from PACKAGE.deb`"
        )

    async def pull(
        self, ref: str, name: str | None, progress: Progress, credential: Any = None
    ) -> Image:
        """`image pull REF`: a catalog name takes the bundle fast path, anything else is
        pulled from its OCI registry. Concurrent pulls of one ref share one download.
        `credential` (an `oci.auth.Credential` the CLI resolved) is for REF's registry."""
        return await self._inflight.run(
            f"pull:{ref}",
            self._tracked(
                "pull",
                ref,
                progress,
                # (without a credential, the call stays the 3-argument one tests stand in for)
                lambda p: (
                    self._pull(ref, name, p)
                    if credential is None
                    else self._pull(ref, name, p, credential)
                ),
            ),
            on_join=lambda: progress("pull", f"joining the pull of {ref} already in progress"),
        )

    async def _pull(
        self, ref: str, name: str | None, progress: Progress, credential: Any = None
    ) -> Image:
        from stoker.daemon.catalog import load_catalog

        entry = load_catalog().find_image(ref)
        if entry is not None and entry.ref:
            return await self._pull_oci(entry.ref, name or entry.name, progress, credential)
        if entry is not None:
            return await self._pull_bundle(entry, name, progress)
        return await self._pull_oci(ref, name, progress, credential)

    async def _pull_bundle(self, entry: Any, name: str | None, progress: Progress) -> Image:
        """Catalog fast path: a verified .tar.zst bundle, published by atomic rename."""
        from stoker.daemon.catalog import fetch_catalog_entry

        image_name = name or entry.name
        validate_artifact_name(image_name, "image")
        async with self.name_locks.hold(f"image:{image_name}"):
            existing = self.store.get_image(image_name)
            if existing is not None:
                if existing.source == f"catalog:{entry.name}":
                    return existing
                raise AlreadyExists(
                    f"image {image_name!r} already exists (from {existing.source}): pass "
                    "--name to pull under another name"
                )
            kernel = await self.pull_kernel(entry.kernel_ref, progress)
            dest = self.layout.staging_dir / f"bundle-{image_name}-{os.urandom(4).hex()}"
            files = await fetch_catalog_entry(entry, dest, progress=progress)
            im = Image(
                name=image_name,
                managed=True,
                rootfs=str(self.layout.images_dir / image_name / "rootfs.ext4"),
                work_seed=(
                    str(self.layout.images_dir / image_name / "work-seed.ext4")
                    if files.work_seed
                    else None
                ),
                kernel=kernel.name,
                source=f"catalog:{entry.name}",
                size=files.rootfs.stat().st_size if files.rootfs else 0,
                created_at=now(),
                digest="sha256:" + files.sha256,
                meta={"version": entry.version},
            )
            async with Reverter(self.log) as revert:
                revert.add(lambda: rmtree(dest, ignore_errors=True), "remove the bundle staging")
                await self._publish(im, dest)
                revert.success()
            progress("done", f"pulled {entry.name} {entry.version}")
            return im

    async def pull_kernel(self, name: str, progress: Progress) -> Kernel:
        """`kernel pull NAME` from the embedded catalog (a no-op when already present)."""
        from stoker.daemon.catalog import fetch_catalog_entry, load_catalog

        existing = self.store.get_kernel(name)
        if existing is not None:
            return existing
        entry = load_catalog().kernel(name)

        async def run() -> Kernel:
            async with self.name_locks.hold(f"kernel:{name}"):
                cur = self.store.get_kernel(name)
                if cur is not None:
                    return cur
                files = await fetch_catalog_entry(
                    entry, self.layout.kernels_dir / name, progress=progress
                )
                k = Kernel(
                    name=name,
                    version=files.manifest.version,
                    arch=files.manifest.arch,
                    dir=str(files.dir),
                    vmlinux=str(files.vmlinux) if files.vmlinux else None,
                    bzimage=str(files.bzimage) if files.bzimage else None,
                    initrd=str(files.initrd) if files.initrd else None,
                    modules_dir=str(files.modules_dir) if files.modules_dir else None,
                    source=f"catalog:{name}",
                    created_at=now(),
                )
                async with Reverter(self.log) as revert:
                    revert.add(lambda: rmtree(files.dir, ignore_errors=True), "kernel files")
                    async with self.image_ops_lock:
                        self.store.upsert_kernel(k)
                    revert.success()
                return k

        return await self._kernel_inflight.run(f"kernel-pull:{name}", run)

    async def kernel_list(self, available: bool) -> list[Kernel] | list[AvailableKernel]:
        """`kernel list`: the kernels here, or (`available`) the catalog's."""
        return self.available_kernels() if available else await self.list_kernels()

    def available_kernels(self) -> list[AvailableKernel]:
        """The catalog's kernels, with whether each is installed here."""
        from stoker.daemon.catalog import load_catalog

        have = {k.name for k in self.store.list_kernels()}
        return [
            AvailableKernel(**k.to_dict(), installed=k.name in have) for k in load_catalog().kernels
        ]

    async def _credential(self, ref: str, given: Any) -> Any:
        """The credential the client sent for REF's registry, else the daemon's own user's
        (pulls the daemon starts itself, e.g. `vm create --image REF`, get those)."""
        if given is not None:
            return given
        from stoker.daemon.oci import parse_reference
        from stoker.daemon.oci.auth import lookup

        return await asyncio.to_thread(lookup, parse_reference(ref).domain)

    def _registry_options(self, ref: str) -> tuple[set[str], list[str]]:
        """(insecure registries, mirrors for REF's registry) from the daemon's config."""
        from stoker.daemon.oci import parse_reference

        mirrors = dict(self.config.registry_mirrors).get(parse_reference(ref).domain, ())
        return set(self.config.insecure_registries), list(mirrors)

    async def _pull_oci(
        self, ref: str, name: str | None, progress: Progress, credential: Any = None
    ) -> Image:
        from stoker.daemon import oci
        from stoker.daemon.imagemgr import ext4, inject, workload

        image_name = name or oci_image_name(ref)
        validate_artifact_name(image_name, "image")
        async with self.name_locks.hold(f"image:{image_name}"):
            existing = self.store.get_image(image_name)
            if existing is not None:
                if existing.source == f"oci:{ref}":
                    progress("pull", f"{image_name} is already pulled from {ref}")
                    return existing
                raise AlreadyExists(
                    f"image {image_name!r} already exists (from {existing.source}): pass "
                    "--name to pull under another name"
                )
            from stoker.daemon.oci import push as artifact

            insecure, mirrors = self._registry_options(ref)
            credential = await self._credential(ref, credential)
            progress("resolve", f"resolving {ref}")
            art = await artifact.pull_artifact(
                ref,
                staging_dir=self.layout.staging_dir,
                progress=progress,
                credential=credential,
                insecure_registries=insecure,
                mirrors=mirrors,
            )
            if art is not None:
                try:
                    return await self._install_artifact(art, image_name, progress)
                finally:
                    art.discard()
            kernel = self.default_kernel()
            pulled = await oci.pull_image(
                ref,
                cache_dir=self.layout.oci_cache_dir,
                staging_dir=self.layout.staging_dir,
                progress=progress,
                runner=self.runner,
                max_layer_size=self.config.max_layer_size,
                credential=credential,
                insecure_registries=insecure,
                mirrors=mirrors,
            )
            staging = Path(
                tempfile.mkdtemp(prefix=f"img-{image_name}-", dir=self.layout.staging_dir)
            )
            revert = Reverter(self.log)
            # Deleting a large unpacked tree takes seconds: not on the event loop.
            revert.add(lambda: _in_thread(lambda: rmtree(staging, ignore_errors=True)), "staging")
            try:
                init: Literal["systemd", "stoker-init"] = (
                    "systemd" if pulled.has_systemd else "stoker-init"
                )
                role = workload.role_for(pulled.has_sshd)
                extra_meta: dict[str, Any] = {}
                if role == workload.ROLE_SYSTEM:
                    progress("inject", "installing stoker's guest files")
                    # Blocking file work on an untrusted tree: off the event loop.
                    await _in_thread(lambda: inject.inject_guest_files(pulled.rootfs, init=init))
                else:
                    # A workload root: nothing of stoker's goes into it; it runs on the
                    # system image (docs/guest-boot.md "Workload roots").
                    c = pulled.config
                    wl, notes = await _in_thread(
                        lambda: workload.from_oci(c.env, c.working_dir, c.user, pulled.rootfs, ref)
                    )
                    for note in notes:
                        progress("note", note)
                    progress(
                        "workload",
                        f"{ref} has no SSH server: it becomes a workload root, run on the "
                        f"system image {self.config.default_image}",
                    )
                    await _in_thread(lambda: inject.real_root_dir(pulled.rootfs))
                    extra_meta["workload"] = wl.to_meta()
                progress("ext4", "building the work seed and the root filesystem")
                # /root is a real directory now (a symlinked one was replaced), and the
                # builder refuses a source that is or passes through a symlink.
                home = await _in_thread(lambda: inject.work_seed_source(pulled.rootfs))
                await ext4.build_from_dir(
                    self.runner,
                    home,
                    staging / "work-seed.ext4",
                    None,
                    label="stoker-work",
                    within=pulled.rootfs,
                    ledger=pulled.ledger,
                )
                # A daemon that is not root unpacked with a ledger of the real owners.
                built = await oci.build_ext4(
                    pulled.rootfs,
                    staging / "rootfs.ext4",
                    runner=self.runner,
                    what=ref,
                    ledger=pulled.ledger,
                )
                im = Image(
                    name=image_name,
                    managed=True,
                    rootfs=str(self.layout.images_dir / image_name / "rootfs.ext4"),
                    work_seed=str(self.layout.images_dir / image_name / "work-seed.ext4"),
                    kernel=kernel,
                    source=f"oci:{ref}",
                    size=built.size,
                    created_at=now(),
                    digest=pulled.manifest_digest,
                    has_sshd=pulled.has_sshd,
                    init=init,
                    meta={
                        "canonical_ref": pulled.canonical_ref,
                        "entrypoint": pulled.config.entrypoint,
                        "cmd": pulled.config.cmd,
                        "content_size": pulled.content_size,
                        **extra_meta,
                    },
                    role=role,
                )
                await self._publish(im, staging)
                revert.success()
            finally:
                await _in_thread(pulled.discard)
                await revert.fail()
            progress("done", f"pulled {ref} as {image_name}")
            return im

    async def _install_artifact(self, art: Any, image_name: str, progress: Progress) -> Image:
        """Publish a pulled stoker artifact as is: its kernel (reused when identical), then
        the image. The caller holds the image name lock."""
        cfg = art.config
        img = cfg.get("image") if isinstance(cfg.get("image"), dict) else {}
        kcfg = cfg.get("kernel") if isinstance(cfg.get("kernel"), dict) else {}
        kfile = art.files.get("vmlinux") or art.files.get("bzimage")
        ksha = await asyncio.to_thread(_sha256_file, str(kfile))
        base = str(kcfg.get("name") or "kernel")
        try:
            validate_artifact_name(base, "kernel")
        except InvalidArgument:
            base = "kernel"
        kernel = None
        for cand in (base, f"{base}-{ksha[:12]}"):
            async with self.name_locks.hold(f"kernel:{cand}"):
                cur = self.store.get_kernel(cand)
                if cur is not None:
                    have = cur.vmlinux if "vmlinux" in art.files else cur.bzimage
                    same = bool(have) and await asyncio.to_thread(_sha256_file, str(have)) == ksha
                    if same:
                        kernel = cur
                        break
                    continue
                kdir = art.dir / "kernel"
                kdir.mkdir()
                for role in ("vmlinux", "bzimage", "initrd"):
                    if role in art.files:
                        os.replace(art.files[role], kdir / art.files[role].name)
                final = self.layout.kernels_dir / cand
                self.layout.kernels_dir.mkdir(parents=True, exist_ok=True)
                if final.exists():
                    rmtree(final)  # leftovers of a crash, never registered
                os.replace(kdir, final)
                kernel = Kernel(
                    name=cand,
                    version=str(kcfg.get("version") or ""),
                    arch=str(kcfg.get("arch") or "x86_64"),
                    dir=str(final),
                    vmlinux=str(final / "vmlinux") if "vmlinux" in art.files else None,
                    bzimage=str(final / "bzImage") if "bzimage" in art.files else None,
                    initrd=str(final / "initrd.img") if "initrd" in art.files else None,
                    modules_dir=None,
                    source=f"oci:{art.ref}",
                    created_at=now(),
                )
                async with self.image_ops_lock:
                    self.store.upsert_kernel(kernel)
                progress("kernel", f"installed kernel {cand}")
                break
        assert kernel is not None
        staging = Path(tempfile.mkdtemp(prefix=f"img-{image_name}-", dir=self.layout.staging_dir))
        try:
            os.replace(art.files["rootfs"], staging / "rootfs.ext4")
            if "work_seed" in art.files:
                os.replace(art.files["work_seed"], staging / "work-seed.ext4")
            init = img.get("init") if img.get("init") in ("systemd", "stoker-init") else "systemd"
            raw_meta = img.get("meta")
            meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
            im = Image(
                name=image_name,
                managed=True,
                rootfs=str(self.layout.images_dir / image_name / "rootfs.ext4"),
                work_seed=(
                    str(self.layout.images_dir / image_name / "work-seed.ext4")
                    if "work_seed" in art.files
                    else None
                ),
                kernel=kernel.name,
                source=f"oci:{art.ref}",
                size=(staging / "rootfs.ext4").stat().st_size,
                created_at=now(),
                digest=art.digest,
                has_sshd=bool(img.get("has_sshd", True)),
                init=str(init),
                meta={**meta, "artifact": True, "pushed_name": str(img.get("name") or "")},
                role="workload" if img.get("role") == "workload" else "system",
            )
            await self._publish(im, staging)
            staging = None  # type: ignore[assignment]
        finally:
            if staging is not None:
                rmtree(staging, ignore_errors=True)
        progress("done", f"pulled stoker image {art.ref} as {image_name} (no conversion)")
        return im

    async def push(self, name: str, ref: str, progress: Progress, credential: Any = None) -> Pushed:
        """`image push NAME REF`: publish an image and its kernel as a stoker artifact."""
        from stoker.daemon.oci import push as artifact

        im = await self.get_image(name)
        if not im.kernel:
            raise InvalidArgument(f"image {name!r} has no kernel: it cannot be pushed")
        k = await self.get_kernel(im.kernel)
        files = [artifact.ArtifactFile("rootfs", Path(im.rootfs))]
        if im.work_seed:
            files.append(artifact.ArtifactFile("work_seed", Path(im.work_seed)))
        for role, p in (("vmlinux", k.vmlinux), ("bzimage", k.bzimage), ("initrd", k.initrd)):
            if p:
                files.append(artifact.ArtifactFile(role, Path(p)))
        for f in files:
            if not f.path.is_file():
                raise NotFound(
                    f"cannot push {name}: its {f.role} file {f.path} is missing: rebuild or "
                    "re-pull the image"
                )
        config = {
            "schema": 1,
            "created": im.created_at,  # stable: pushing the same image twice is a no-op
            "image": {
                "name": im.name,
                "has_sshd": im.has_sshd,
                "init": im.init,
                "role": im.role,
                "source": im.source,
                "meta": im.meta,
            },
            "kernel": {"name": k.name, "version": k.version, "arch": k.arch},
        }
        insecure, _ = self._registry_options(ref)
        credential = await self._credential(ref, credential)
        op = self.ops.add(OpState(kind="push", target=ref))
        progress = op.tracking(progress)
        try:
            async with self.name_locks.hold(f"image:{name}"):
                res = await artifact.push_artifact(
                    ref,
                    files,
                    config,
                    progress=progress,
                    digest_cache=self.layout.cache_dir / "push-digests.json",
                    credential=credential,
                    insecure_registries=insecure,
                )
        except BaseException as e:
            op.finish(str(e) or type(e).__name__)
            raise
        op.finish(None)
        progress("done", f"pushed {name} to {ref} ({res.digest})")
        return Pushed(name=name, **res.to_dict())

    async def _publish(self, im: Image, staging: Path) -> None:
        """The publication atom: recheck the name, rename into place, upsert."""
        final = self.layout.images_dir / im.name
        async with self.image_ops_lock:
            if self.store.get_image(im.name) is not None:
                raise AlreadyExists(f"image {im.name!r} appeared while it was being made")
            if final.exists():
                rmtree(final)  # leftovers of a crash, never registered
            async with Reverter(self.log) as revert:
                os.replace(staging, final)
                revert.add(lambda: rmtree(final, ignore_errors=True), "unpublish the image")
                self.store.upsert_image(im)
                revert.success()

    async def prune_cache(self, dry_run: bool) -> CachePruned:
        """Remove cached OCI blobs no in-flight pull uses; reports bytes freed."""
        from stoker.daemon.oci import BlobCache

        r = await BlobCache(self.layout.oci_cache_dir).prune(dry_run=dry_run)
        return CachePruned(
            dry_run=r.dry_run,
            bytes_freed=r.bytes_freed,
            removed=len(r.removed),
            in_use=len(r.in_use),
        )


def _sweep(targets: list[tuple[Path, set[str]]]) -> list[str]:
    """Blocking: remove every entry of each directory whose path is not in its keep-set
    (iteratively; a symlink is removed, never followed)."""
    removed: list[str] = []
    for base, keep in targets:
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            continue
        for n in names:
            p = base / n
            if os.path.normpath(p) not in keep:
                rmtree(p, ignore_errors=True)
                removed.append(str(p))
    return removed


def oci_image_name(ref: str) -> str:
    """A default image name for an OCI ref: `alpine:3.19` -> `alpine-3.19`,
    `localhost:5000/team/app:v1` -> `localhost-5000-team-app-v1`."""
    from stoker.daemon.oci import parse_reference

    r = parse_reference(ref)
    repo = r.repository
    if r.domain in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        repo = repo.removeprefix("library/")
        base = repo
    else:
        base = f"{r.domain}/{repo}"
    tag = r.tag or (r.digest.split(":", 1)[-1][:12] if r.digest else "latest")
    name = re.sub(r"[^a-z0-9._-]+", "-", f"{base}-{tag}".lower()).strip("-._")
    return name[:128]


GOLDEN_NAME = re.compile(r"^debian-([a-z]+)$")


async def _in_thread(fn: Callable[[], T]) -> T:
    """Run blocking `fn` in a worker thread. If the caller is cancelled, wait for the worker
    to finish before re-raising: the tree it works on is deleted right after."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()
        raise


def _sha256_file(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _failure(f: asyncio.Future[Any]) -> str | None:
    if f.cancelled():
        return "cancelled"
    e = f.exception()
    return str(e) if e is not None else None
