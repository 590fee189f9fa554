"""WorkspaceService: workspace.prepare / workspace.export, auth-key and git-identity sync.

It holds no pointer to VMService. It receives function-typed seams at wiring time
(`vm_resolver`, `alive_checker`, `with_vm_lock_by_ref`, `image_resolver`,
`image_work_seed`) so it sees exactly the operations it needs.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.config import Config
from stoker.daemon import workspace as ws
from stoker.daemon.guestssh import GuestSSH, SSHTarget, ensure_keypair
from stoker.daemon.locks import LockSet
from stoker.daemon.opstate import Registry
from stoker.daemon.opstate.registry import OpState
from stoker.daemon.vm_disks import sync_work_disk
from stoker.errors import Conflict, InvalidArgument, NotFound
from stoker.layout import Layout
from stoker.model.records import Image, VMRecord, VMState, Workspace
from stoker.runner import Runner
from stoker.store import Store
from stoker.store.db import now

VMResolver = Callable[[str], Awaitable[VMRecord]]
AliveChecker = Callable[[VMRecord], Awaitable[bool]]
VMLockByRef = Callable[[str], AbstractAsyncContextManager[VMRecord]]
ImageResolver = Callable[[str], Awaitable[Image]]
ImageWorkSeed = Callable[[Image], Awaitable[str | None]]
Progress = Callable[..., None]


@dataclass
class WorkspaceSeams:
    """The narrow view of other services that workspace operations need."""

    vm_resolver: VMResolver
    alive_checker: AliveChecker
    with_vm_lock_by_ref: VMLockByRef
    image_resolver: ImageResolver
    image_work_seed: ImageWorkSeed


class WorkspaceService:
    """Moves a git workspace into a VM and a patch back out."""

    def __init__(
        self,
        store: Store,
        layout: Layout,
        config: Config,
        runner: Runner,
        logger: logging.Logger,
        seams: WorkspaceSeams,
    ) -> None:
        self.store = store
        self.layout = layout
        self.config = config
        self.runner = runner
        self.log = logger
        self.seams = seams
        self.workspace_locks = LockSet()
        self.ops: Registry[OpState] = Registry()
        self.ssh = GuestSSH()  # test seam
        # The commit each VM's checkout was last prepared at, as the guest has it.
        self.bases: dict[str, str | None] = {}

    # --- work-disk sync (before every start) -------------------------------------------

    async def host_git_identity(self) -> str | None:
        """The host's global git identity as a .gitconfig snippet, or None."""
        vals = {}
        for key in ("user.name", "user.email"):
            r = await self.runner.run(["git", "config", "--global", "--get", key], check=False)
            if r.returncode == 0 and r.out.strip():
                vals[key.split(".")[1]] = r.out.strip()
        if not vals:
            return None
        body = "".join(f"\t{k} = {v}\n" for k, v in vals.items())
        return f"[user]\n{body}"

    async def sync_work_disk(self, vm: VMRecord) -> None:
        """Write authorized_keys, git identity and `[[file_sync]]` onto the VM's work disk
        (no mount). /root stays 0755 root:root so sshd's StrictModes passes."""
        pub = await ensure_keypair(self.runner, self.layout.ssh_key)
        files: list[tuple[str, bytes, int]] = []
        for ent in self.config.file_sync:
            try:
                with open(ent.host, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise InvalidArgument(
                    f"file_sync entry {ent.host} -> {ent.guest}: cannot read the host file "
                    f"({e.strerror}): fix or remove it in the config"
                ) from None
            files.append((ent.guest, data, ent.mode))
        disk = os.path.join(vm.vm_dir, "work.ext4")
        await sync_work_disk(self.runner, Path(disk), pub, await self.host_git_identity(), files)

    # --- prepare / export ----------------------------------------------------------------

    def _target(self, vm: VMRecord) -> SSHTarget:
        return SSHTarget.for_guest(vm.name, vm.guest_ip, self.layout)

    async def inspect(self, path: str, include_untracked: bool, with_files: bool) -> dict[str, Any]:
        """Host-side preflight for `vm run PATH` (nothing created): the repo facts, and the
        file list for --dry-run."""
        info = await ws.inspect_repo(self.runner, Path(path))
        out: dict[str, Any] = {
            "root": str(info.root),
            "head": info.head,
            "branch": info.branch,
            "origin": info.origin,
        }
        if with_files:
            out["files"] = await ws.list_files(self.runner, info.root, include_untracked)
        return out

    async def _running_vm(self, ref: str) -> VMRecord:
        """Hold the VM lock only to validate state and snapshot the VM (seed lock rule)."""
        async with self.seams.with_vm_lock_by_ref(ref) as vm:
            if vm.state != VMState.RUNNING or not await self.seams.alive_checker(vm):
                raise Conflict(
                    f"VM {vm.name} is {vm.state}: start it with `stoker vm start {vm.name}`"
                )
            return vm

    async def prepare(
        self,
        ref: str,
        path: str,
        guest_path: str,
        branch: str | None,
        from_ref: str | None,
        include_untracked: bool | None,
        progress: Progress,
    ) -> Workspace:
        """Ship a git workspace into a running VM (a shallow history + the working tree's
        changes), or bring an existing one up to date sending only what changed."""
        ws.check_guest_path(guest_path)
        vm = await self._running_vm(ref)
        op = self.ops.add(OpState(kind="prepare", target=vm.name))
        progress = op.tracking(progress)
        try:
            async with self.workspace_locks.hold(vm.id):
                rec = await self._prepare_locked(
                    vm, path, guest_path, branch, from_ref, include_untracked, progress
                )
        except BaseException as e:
            op.finish(str(e) or type(e).__name__)
            raise
        op.finish()
        return rec

    async def _prepare_locked(
        self,
        vm: VMRecord,
        path: str,
        guest_path: str,
        branch: str | None,
        from_ref: str | None,
        include_untracked: bool | None,
        progress: Progress,
    ) -> Workspace:
        if include_untracked is None:
            # Re-prepare keeps what the first prepare shipped (else untracked files it
            # sent would be deleted as no longer part of the workspace).
            prev = vm.workspace
            include_untracked = bool(prev and prev.include_untracked)
        progress("inspect", f"reading {path}")
        info = await ws.inspect_repo(self.runner, Path(path))
        files = await ws.list_files(self.runner, info.root, include_untracked)
        t = self._target(vm)
        r = await self.ssh.run(t, ws.remote_command(ws.guest_state_script(guest_path)), timeout=120)
        state = ws.parse_guest_state(r.exit_status, r.stdout, r.stderr)
        plan = await ws.plan_transfer(
            self.runner, info, files, state, branch=branch, from_ref=from_ref
        )
        progress(
            "transfer", f"{plan.mode}: {len(plan.ship)} files to send, {len(plan.delete)} to delete"
        )
        payload = ws.build_payload(self.runner, plan, tmp_dir=self.layout.staging_dir)

        def on_line(line: bytes) -> None:
            parts = line.decode(errors="replace").split()
            if len(parts) >= 2 and parts[0] == "stage":
                progress(parts[1], "")

        try:
            res = await self.ssh.run_stream(
                t,
                ws.remote_command(ws.guest_import_script(guest_path, plan)),
                payload,
                on_stdout_line=on_line,
            )
        finally:
            aclose = getattr(payload, "aclose", None)  # an async generator: stop its work
            if aclose is not None:
                await aclose()
        head = ws.check_import_result(res.exit_status, res.stdout, res.stderr)
        rec = Workspace(
            guest_path=guest_path,
            host_path=str(info.root),
            head=plan.host_head or head or "",
            branch=plan.branch,
            prepared_at=now(),
            include_untracked=include_untracked,
        )
        rec_base = head
        self.store.set_vm_workspace(vm.id, rec)
        self.bases[vm.id] = rec_base
        progress("done", f"{info.root} -> {vm.name}:{guest_path}")
        return rec

    async def export(self, ref: str, base_commit: str | None) -> dict[str, Any]:
        """A binary-safe patch of everything changed in the guest checkout since the
        prepared commit (or `base_commit`). Never changes the guest repo."""
        vm = await self._running_vm(ref)
        if vm.workspace is None:
            raise NotFound(
                f"VM {vm.name} has no workspace: run `stoker vm workspace prepare {vm.name} PATH`"
            )
        base = base_commit or self.bases.get(vm.id) or vm.workspace.head or ws.EMPTY_TREE
        async with self.workspace_locks.hold(vm.id):
            r = await self.ssh.run(
                self._target(vm),
                ws.remote_command(ws.guest_export_script(vm.workspace.guest_path, base)),
                timeout=600,
            )
        result = ws.parse_export_output(r.exit_status, r.stdout, r.stderr)
        return {
            "name": vm.name,
            "base": base,
            "guest_path": vm.workspace.guest_path,
            "patch_b64": base64.b64encode(result.patch).decode(),
            "files": [{"status": s, "path": p} for s, p in result.files],
        }
