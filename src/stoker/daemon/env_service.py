"""Derived images: build (or find cached) an image from a parent + packages + setup steps,
and `vm commit`. See `daemon/imagemgr/derived.py` for the stages and their cache keys and
`daemon/imagemgr/commit.py` for how a VM's root becomes an image.

Uses the other services as they are: ImageService for parents, publication and kernels,
VMService for the builder VM, WorkspaceService to ship the repo to /root/repo.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import posixpath
import secrets
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.daemon.api import BuildImage
from stoker.daemon.imagemgr import commit as commitmod
from stoker.daemon.imagemgr import derived
from stoker.daemon.imagemgr.derived import CopyItem, SetupStep
from stoker.errors import (
    AlreadyExists,
    CommandFailed,
    Conflict,
    InvalidArgument,
    NotFound,
    StokerError,
    Timeout,
)
from stoker.model.names import validate_artifact_name
from stoker.model.records import Image, VMRecord, VMState
from stoker.store.db import now

if TYPE_CHECKING:
    from stoker.daemon.image_service import ImageService
    from stoker.daemon.vm_service import VMService
    from stoker.daemon.workspace_service import WorkspaceService
    from stoker.layout import Layout
    from stoker.runner import Runner
    from stoker.store import Store

Progress = Callable[..., None]

DEFAULT_SETUP_TIMEOUT = 3600.0
SETUP_DIR = "/root/.stoker-setup"
REPO_GUEST_PATH = "/root/repo"
TAIL_LINES = 20
# Kept out of a derived image's /root: the repo copy, the setup scripts and what the
# host writes before every start.
BUILD_WORK_EXCLUDES = (*commitmod.WORK_DISK_EXCLUDES, "repo", ".stoker-setup")


@dataclass(frozen=True)
class BuildRequest:
    """What `image build` (flags or a recipe) and `vm run` (a recipe) ask for."""

    name: str | None = None
    from_image: str = "debian-bookworm"
    packages: tuple[str, ...] = ()
    setup: tuple[SetupStep, ...] = ()
    inputs: tuple[tuple[str, str], ...] = ()
    copies: tuple[CopyItem, ...] = ()
    repo: str | None = None
    recipe: str | None = None
    force: bool = False
    keep_failed: bool = False
    setup_timeout: float = DEFAULT_SETUP_TIMEOUT


@dataclass
class _Plan:
    parent: Image | None
    key1: str | None  # packages stage (None: no packages)
    name1: str | None
    key: str  # the final image's recipe hash
    name: str
    notes: list[str] = field(default_factory=list)


async def _no_stdin() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover


def build_request(p: BuildImage) -> BuildRequest:
    """RPC parameters -> a build request (derived images)."""
    inputs: list[tuple[str, str]] = []
    for i in p.inputs:
        if len(i) != 2:
            raise InvalidArgument("inputs: each entry is [repo path, sha256]")
        inputs.append((i[0], i[1]))
    return BuildRequest(
        name=p.name,
        from_image=p.from_image or "debian-bookworm",
        packages=tuple(p.packages),
        setup=tuple(SetupStep(s.label, s.script) for s in p.setup),
        inputs=tuple(inputs),
        repo=p.repo,
        recipe=p.recipe,
        force=p.force,
        keep_failed=p.keep_failed,
        setup_timeout=float(p.setup_timeout or DEFAULT_SETUP_TIMEOUT),
    )


class EnvService:
    """Builds derived images and commits VMs; one per daemon."""

    def __init__(self, images: ImageService, vm: VMService, ws: WorkspaceService) -> None:
        self.images = images
        self.vm = vm
        self.ws = ws
        self._inflight: dict[str, asyncio.Future[Image]] = {}

    @property
    def store(self) -> Store:
        return self.images.store

    @property
    def layout(self) -> Layout:
        return self.images.layout

    @property
    def runner(self) -> Runner:
        return self.images.runner

    async def image_build(self, p: BuildImage, progress: Progress) -> Image:
        """`image.build`: the golden build by name, else a derived image (from, packages,
        setup steps)."""
        if p.from_image is None and not (p.packages or p.setup or p.inputs):
            return await self.images.build_golden(p.name or "debian-bookworm", p.force, progress)
        return await self.build(build_request(p), progress)

    # --- resolution ---------------------------------------------------------------------

    def _all_images(self) -> dict[str, Image]:
        return {i.name: i for i in self.store.list_images()}

    def _check_request(self, req: BuildRequest) -> None:
        if req.name is not None:
            validate_artifact_name(req.name, "image")
        derived.validate_packages(req.packages)
        if req.setup_timeout <= 0:
            raise InvalidArgument("--setup-timeout must be a positive number of seconds")
        for s in req.setup:
            if not s.script.strip():
                raise InvalidArgument(f"setup step {s.label!r} is empty")

    async def _parent(self, ref: str, progress: Progress) -> Image:
        """The image `from` names: one here, debian-SUITE (built), a catalog name or an
        OCI reference (pulled)."""
        from stoker.daemon.image_service import GOLDEN_NAME

        im = self.store.get_image(ref)
        if im is not None:
            return im
        if GOLDEN_NAME.match(ref):
            return await self.images.ensure_image(ref, progress)
        from stoker.daemon.catalog import load_catalog

        if load_catalog().find_image(ref) is not None or ("/" in ref or ":" in ref):
            try:
                return await self.images.pull(ref, None, progress)
            except InvalidArgument as e:
                raise NotFound(f"`from` {ref!r} does not resolve: {e.message}") from None
        raise NotFound(
            f"`from` {ref!r} does not resolve: it is no image here (`stoker image list`), "
            "not debian-SUITE and not an OCI reference such as registry:5000/repo:tag"
        )

    def _plan(self, req: BuildRequest, parent: Image) -> _Plan:
        if parent.role != "system":
            raise InvalidArgument(
                f"{parent.name!r} is a workload root (an OCI image without sshd): derived "
                "images are built from system images; install what you need in the OCI "
                "image itself, or build from debian-SUITE"
            )
        pid = derived.image_identity(parent)
        key1 = name1 = None
        stage_id = pid
        if req.packages:
            if not parent.source.startswith("golden:"):
                raise InvalidArgument(
                    f"packages go in at bootstrap, so they need a golden parent "
                    f"(debian-SUITE); {parent.name!r} is {parent.source}: install them in a "
                    f"setup step (apt-get install -y ...) or add them to its recipe"
                )
            key1 = derived.recipe_key(pid, req.packages)
            stage_id = f"recipe:{key1}"
        if req.setup or req.inputs or req.copies:
            key = derived.recipe_key(
                stage_id, setup=req.setup, inputs=req.inputs, copies=req.copies
            )
            if key1 is not None:
                name1 = derived.auto_name(key1, "pkgs")
        else:
            assert key1 is not None or not req.packages
            key = key1 if key1 is not None else derived.recipe_key(pid)
        name = req.name or derived.auto_name(key)
        if key1 is not None and name1 is None:
            name1 = name
        return _Plan(parent=parent, key1=key1, name1=name1, key=key, name=name)

    def cached(self, req: BuildRequest) -> Image | None:
        """The image this request resolves to when it is already built (no work done)."""
        if req.force:
            return None
        parent = self.store.get_image(req.from_image)
        if parent is None:
            return None
        try:
            plan = self._plan(req, parent)
        except StokerError:
            return None
        im = self.store.get_image(plan.name)
        if im is not None and im.recipe_hash == plan.key:
            return im
        # A recipe without a name is satisfied by the same recipe built under any name.
        return self.store.find_image_by_recipe(plan.key) if req.name is None else None

    # --- build ----------------------------------------------------------------------------

    async def build(self, req: BuildRequest, progress: Progress) -> Image:
        """Build (or reuse) the derived image `req` describes."""
        self._check_request(req)
        if not req.packages and not req.setup and not req.inputs and not req.copies:
            raise InvalidArgument(
                "nothing to build: give --packages, --setup and/or --copy (or a recipe with "
                "[image] packages/setup/copy); `--from` alone is the parent image itself"
            )
        hit = self.cached(req)
        if hit is not None:
            progress("image", f"{hit.name} is up to date (recipe {(hit.recipe_hash or '')[:12]})")
            return hit
        parent = await self._parent(req.from_image, progress)
        plan = self._plan(req, parent)
        derived.check_no_cycle(self._all_images(), plan.name, parent.name)
        fut = self._inflight.get(plan.key)
        if fut is None:
            fut = asyncio.ensure_future(self._build(req, plan, progress))
            self._inflight[plan.key] = fut
            key = plan.key
            fut.add_done_callback(lambda _: self._inflight.pop(key, None))
        else:
            progress("build", f"joining the build of {plan.name} already in progress")
        return await asyncio.shield(fut)

    async def _build(self, req: BuildRequest, plan: _Plan, progress: Progress) -> Image:
        assert plan.parent is not None
        stage = plan.parent
        if plan.key1 is not None:
            assert plan.name1 is not None
            stage = await self._packages_stage(req, plan, progress)
        if not (req.setup or req.inputs or req.copies):
            return stage
        return await self._setup_stage(req, plan, stage, progress)

    async def _replaceable(self, name: str, key: str, force: bool) -> Image | None:
        """An existing image under `name`: returned when it already is this build (and not
        `force`); removed first when it is an older derived build; else refused."""
        cur = self.store.get_image(name)
        if cur is None:
            return None
        if cur.recipe_hash == key and not force:
            return cur
        if not cur.source.startswith(("derived:", "commit:")):
            raise AlreadyExists(
                f"image {name!r} exists and is not a derived image ({cur.source}): pick "
                "another name or delete it first"
            )
        await self.images.drain_pools(name)
        users = [v.name for v in self.store.list_vms() if v.image == name]
        if users:
            raise Conflict(
                f"image {name!r} would be rebuilt but VM(s) {', '.join(users)} use it: "
                "delete them or build under another name"
            )
        self.store.delete_image(name)
        shutil.rmtree(self.layout.images_dir / name, ignore_errors=True)
        return None

    async def _packages_stage(self, req: BuildRequest, plan: _Plan, progress: Progress) -> Image:
        from stoker.daemon.imagemgr import golden

        assert plan.parent is not None and plan.key1 is not None and plan.name1 is not None
        name, key = plan.name1, plan.key1
        async with self.images.name_locks.hold(f"image:{name}"):
            cur = await self._replaceable(name, key, req.force and name == plan.name)
            if cur is not None:
                progress("packages", f"{name} is up to date")
                return cur
            suite = plan.parent.source.split(":", 1)[1]
            cfg = self.images.config
            cache = (
                Path(cfg.golden_cache_dir)
                if cfg.golden_cache_dir
                else self.layout.cache_dir / "apt"
            )
            self.layout.staging_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f"derive-{name}-", dir=self.layout.staging_dir))
            try:
                progress("packages", f"bootstrapping {suite} with {', '.join(req.packages)}")

                def report(stage: str, detail: str = "") -> None:
                    progress(stage, detail)

                res = await golden.build_golden(
                    self.runner,
                    staging / "out",
                    suite=suite,
                    mirror=cfg.debian_mirror,
                    cache_dir=cache,
                    progress=report,
                    force=True,
                    extra_packages=req.packages,
                )
                kname = f"debian-{res.kernel_version}"
                kernel = self.store.get_kernel(kname)
                if kernel is None:
                    kernel = await self.images._import_kernel_files(kname, res.kernel_dir, "golden")
                shutil.rmtree(res.kernel_dir, ignore_errors=True)
                im = Image(
                    name=name,
                    managed=True,
                    rootfs=str(self.layout.images_dir / name / "rootfs.ext4"),
                    work_seed=str(self.layout.images_dir / name / "work-seed.ext4"),
                    kernel=kernel.name,
                    source=f"derived:{plan.parent.name}",
                    size=res.rootfs.stat().st_size,
                    created_at=now(),
                    digest=res.spec_hash,
                    meta={
                        "packages": list(req.packages),
                        "installed_packages": res.packages,
                        **({"recipe": req.recipe} if req.recipe else {}),
                    },
                    parent=plan.parent.name,
                    recipe_hash=key,
                )
                await self.images._publish(im, res.dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            progress("packages", f"{name} built ({res.packages} packages)")
            return im

    async def _setup_stage(
        self, req: BuildRequest, plan: _Plan, stage: Image, progress: Progress
    ) -> Image:
        from stoker.daemon.vm_service import CreateRequest

        name, key = plan.name, plan.key
        async with self.images.name_locks.hold(f"image:{name}"):
            cur = await self._replaceable(name, key, req.force)
            if cur is not None:
                progress("setup", f"{name} is up to date")
                return cur
            vm_name = f"build-{key[:8]}-{secrets.token_hex(2)}"
            progress("builder", f"starting builder VM {vm_name} from {stage.name} (NAT on)")
            try:
                rec = await self.vm.create_vm(
                    CreateRequest(name=vm_name, image=stage.name, nat=True), progress
                )
            except BaseException:
                # A builder that failed to boot is of no use to inspect unless asked for.
                if not req.keep_failed:
                    await self._delete_builder(vm_name, progress)
                raise
            ok = False
            try:
                cwd = "/root"
                if req.repo:
                    if (Path(req.repo) / ".git").exists():
                        progress("builder", f"copying {req.repo} to {REPO_GUEST_PATH}")
                        await self.ws.prepare(
                            rec.name, req.repo, REPO_GUEST_PATH, None, None, None, progress
                        )
                        cwd = REPO_GUEST_PATH
                    else:
                        progress("builder", f"{req.repo} is not a git work tree: no /root/repo")
                for c in req.copies:
                    await self._copy_in(rec, c, progress)
                for i, step in enumerate(req.setup):
                    await self._run_step(rec, i, len(req.setup), step, cwd, req, progress)
                progress("builder", "stopping the builder VM")
                rec = await self.vm.stop_vm(rec.id)
                im = await self._commit_vm(
                    rec,
                    stage,
                    name,
                    with_work_disk=True,
                    work_excludes=BUILD_WORK_EXCLUDES,
                    source=f"derived:{plan.parent.name if plan.parent else stage.name}",
                    parent=(plan.parent.name if plan.parent else stage.name),
                    recipe_hash=key,
                    meta={
                        "packages": list(req.packages),
                        "setup": [s.label for s in req.setup],
                        "copy": [f"{c.guest} (sha256 {c.sha256[:12]})" for c in req.copies],
                        "stage": stage.name,
                        **({"recipe": req.recipe} if req.recipe else {}),
                    },
                    progress=progress,
                )
                ok = True
            except BaseException as e:
                if req.keep_failed and isinstance(e, StokerError):
                    e.message += (
                        f" (builder VM {vm_name} kept: `stoker vm ssh {vm_name}`, then "
                        f"`stoker vm delete {vm_name}`)"
                    )
                raise
            finally:
                if ok or not req.keep_failed:
                    await self._delete_builder(vm_name, progress)
            progress("done", f"{name} built")
            return im

    async def _delete_builder(self, vm_name: str, progress: Progress) -> None:
        from stoker.daemon.vm_service import run_to_end

        try:
            vm_id = self.vm.resolve(vm_name).id
        except NotFound:
            return
        try:
            await run_to_end(self.vm.delete_vm(vm_id))
        except StokerError as e:
            progress("warning", f"could not delete builder VM {vm_name}: {e}")

    async def _copy_in(self, rec: VMRecord, c: CopyItem, progress: Progress) -> None:
        """Copy one host file into the builder VM (its content checked against the hash
        the request was keyed by: a file changed since then is refused, not copied)."""
        data, _ = await asyncio.to_thread(derived.read_host_file, c.host)
        if hashlib.sha256(data).hexdigest() != c.sha256:
            raise Conflict(
                f"--copy {c.host}: the file changed after the build was asked for (its hash "
                "no longer matches): run the build again"
            )
        progress("copy", f"{c.host} -> {c.guest} ({len(data)} bytes)")
        g = shlex.quote(c.guest)
        tmp = shlex.quote(f"{c.guest}.stoker-copy")
        d = shlex.quote(posixpath.dirname(c.guest) or "/")
        r = await self.vm.ssh.run(
            self.vm.ssh_target(rec),
            f"mkdir -p {d} && cat > {tmp} && chmod {c.mode:o} {tmp} && mv -f {tmp} {g}",
            input=data,
            timeout=600,
        )
        if r.exit_status != 0:
            err = r.stderr.decode(errors="replace").strip()[-300:]
            raise CommandFailed(f"could not copy {c.host} to {c.guest} in the builder VM: {err}")

    async def _run_step(
        self,
        rec: VMRecord,
        i: int,
        n: int,
        step: SetupStep,
        cwd: str,
        req: BuildRequest,
        progress: Progress,
    ) -> None:
        t = self.vm.ssh_target(rec)
        path = f"{SETUP_DIR}/step-{i}"
        w = await self.vm.ssh.run(
            t,
            f"mkdir -p {SETUP_DIR} && cat > {path} && chmod 700 {path}",
            input=step.script.encode(),
            timeout=60,
        )
        if w.exit_status != 0:
            raise CommandFailed(f"could not copy setup step {step.label} into the builder VM")
        run = path if step.script.startswith("#!") else f"bash -e {path}"
        cmd = (
            f"cd {shlex.quote(cwd)} && DEBIAN_FRONTEND=noninteractive "
            f"exec bash -lc {shlex.quote(f'exec {run} 2>&1')}"
        )
        progress("setup", f"[{i + 1}/{n}] {step.label}")
        tail: list[str] = []

        def line(raw: bytes) -> None:
            text = raw.decode(errors="replace").rstrip("\r\n")
            tail.append(text)
            del tail[:-TAIL_LINES]
            progress("setup", f"[{i + 1}/{n}] {text}"[:300])

        try:
            r = await self.vm.ssh.run_stream(
                t, cmd, _no_stdin(), timeout=req.setup_timeout, on_stdout_line=line
            )
        except Timeout:
            raise Timeout(
                f"setup step {step.label} did not finish within {req.setup_timeout:.0f}s "
                f"(--setup-timeout); no image was made. Last output:\n" + "\n".join(tail)
            ) from None
        if r.exit_status != 0:
            raise CommandFailed(
                f"setup step {step.label} failed (exit {r.exit_status}); no image was made. "
                "Last output:\n" + "\n".join(tail)
            )

    # --- commit ---------------------------------------------------------------------------

    async def _commit_vm(
        self,
        rec: VMRecord,
        base: Image,
        name: str,
        *,
        with_work_disk: bool,
        work_excludes: tuple[str, ...],
        source: str,
        parent: str,
        recipe_hash: str | None,
        meta: dict[str, Any],
        progress: Progress,
    ) -> Image:
        from stoker.daemon.vm_service import OVERLAY, WORKDISK

        vm_dir = Path(rec.vm_dir)
        self.layout.staging_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"commit-{name}-", dir=self.layout.staging_dir))
        try:
            out = staging / "out"

            def report(stage: str, detail: str) -> None:
                progress(stage, detail)

            res = await commitmod.commit_root(
                self.runner,
                Path(base.rootfs),
                vm_dir / OVERLAY,
                out,
                staging,
                work_disk=(vm_dir / WORKDISK) if with_work_disk else None,
                work_excludes=work_excludes,
                progress=report,
            )
            if res.work_seed is None and base.work_seed:
                await self.runner.run(
                    ["cp", "--sparse=always", "--", base.work_seed, str(out / "work-seed.ext4")],
                    timeout=1800,
                )
            has_seed = (out / "work-seed.ext4").exists()
            final = self.layout.images_dir / name
            im = Image(
                name=name,
                managed=True,
                rootfs=str(final / "rootfs.ext4"),
                work_seed=str(final / "work-seed.ext4") if has_seed else None,
                kernel=base.kernel,
                source=source,
                size=res.rootfs.stat().st_size,
                created_at=now(),
                digest=None,
                has_sshd=base.has_sshd,
                init=base.init,
                meta={**meta, "changed_paths": res.changes},
                parent=parent,
                recipe_hash=recipe_hash,
            )
            progress("publish", name)
            await self.images._publish(im, out)
            return im
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)

    async def commit(
        self, ref: str, image: str, with_work_disk: bool, force: bool, progress: Progress
    ) -> Image:
        """`vm commit NAME IMAGE`: a stopped VM's root (+ /root) as a new image."""
        validate_artifact_name(image, "image")
        async with self.vm.with_vm_lock_by_ref(ref) as rec:
            if rec.state != VMState.STOPPED and rec.state != VMState.CREATED:
                raise Conflict(
                    f"VM {rec.name} is {rec.state}: stop it first (`stoker vm stop {rec.name}`)"
                    " so its disks are consistent"
                )
            if await self.vm.is_alive(rec):
                raise Conflict(f"VM {rec.name} still has a running VMM: stop it first")
            if rec.system_image is not None:
                raise Conflict(
                    f"VM {rec.name} runs on a workload root ({rec.image}): `vm commit` of "
                    "a workload root is not supported yet; commit a VM of a system image"
                )
            base = await self.images.get_image(rec.image)
            derived.check_no_cycle(self._all_images(), image, base.name)
            async with self.images.name_locks.hold(f"image:{image}"):
                cur = self.store.get_image(image)
                if cur is not None:
                    if not force:
                        raise AlreadyExists(
                            f"image {image!r} already exists: pass --force to replace it, or "
                            "pick another name"
                        )
                    await self.images.drain_pools(image)
                    users = [
                        v.name for v in self.store.list_vms() if image in (v.image, v.system_image)
                    ]
                    if users:
                        raise Conflict(
                            f"image {image!r} is used by VM(s) {', '.join(users)}: it cannot "
                            "be replaced while they exist"
                        )
                im = await self._commit_vm_replacing(
                    rec, base, image, cur, with_work_disk, progress
                )
        progress("done", f"committed {rec.name} as {image}")
        return im

    async def _commit_vm_replacing(
        self,
        rec: VMRecord,
        base: Image,
        image: str,
        cur: Image | None,
        with_work_disk: bool,
        progress: Progress,
    ) -> Image:
        # Build under a temporary name first: the old image stays until the new one exists.
        tmp = f"{image[:100]}.commit-{secrets.token_hex(3)}"
        im = await self._commit_vm(
            rec,
            base,
            tmp,
            with_work_disk=with_work_disk,
            work_excludes=commitmod.WORK_DISK_EXCLUDES,
            source=f"commit:{rec.name}",
            parent=base.name,
            recipe_hash=None,
            meta={"vm": rec.name, "with_work_disk": with_work_disk},
            progress=progress,
        )
        tmp_dir = self.layout.images_dir / tmp
        final = self.layout.images_dir / image
        async with self.images.image_ops_lock:
            if cur is not None:
                self.store.delete_image(image)
                shutil.rmtree(final, ignore_errors=True)
            self.store.delete_image(tmp)
            tmp_dir.rename(final)
            im = dataclasses.replace(
                im,
                name=image,
                rootfs=str(final / "rootfs.ext4"),
                work_seed=str(final / "work-seed.ext4") if im.work_seed else None,
            )
            self.store.upsert_image(im)
        return im
