"""WorkspaceService: workspace.prepare / workspace.export, auth-key and git-identity sync.

It holds no pointer to VMService. It receives function-typed seams at wiring time
(`with_vm_lock_by_ref`, `alive_checker`) so it sees exactly the operations it needs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from stoker.config import FILE_SYNC_MAX_BYTES, Config
from stoker.daemon import workspace as ws
from stoker.daemon.guestssh import GuestSSHLike, SSHTarget, ensure_keypair
from stoker.daemon.locks import LockSet
from stoker.daemon.opstate import Registry
from stoker.daemon.opstate.registry import OpState
from stoker.daemon.vm_disks import sync_work_disk
from stoker.errors import Conflict, InvalidArgument, NotFound
from stoker.layout import Layout
from stoker.model.records import VMRecord, VMState, Workspace
from stoker.model.wire import ChangedFile, RepoInfo, WorkspacePatch
from stoker.runner import Runner
from stoker.store import Store
from stoker.store.db import now

AliveChecker = Callable[[VMRecord], Awaitable[bool]]
VMLockByRef = Callable[[str], AbstractAsyncContextManager[VMRecord]]
Progress = Callable[..., None]


def read_sync_file(host: str, guest: str, max_bytes: int = FILE_SYNC_MAX_BYTES) -> bytes:
    """The content of a `[[file_sync]]` host file, which must still be a regular file.

    Checked again here (the config only checked at load): a FIFO would block the open or
    the read forever and a device such as /dev/zero would read until memory runs out. The
    path is stat'ed before it is opened (opening a device can have side effects), opened
    O_NONBLOCK so a FIFO swapped in since cannot block, checked again with fstat on the
    fd, and read at most `max_bytes` + 1 bytes. A symlink to a regular file is followed:
    dotfile managers link ~/.gitconfig and friends.
    """

    def refuse(why: str) -> InvalidArgument:
        return InvalidArgument(
            f"file_sync entry {host} -> {guest}: {why}: fix or remove it in the config"
        )

    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise refuse("the host path is not a regular file")
        if st.st_size > max_bytes:
            raise refuse(f"the host file is {st.st_size} bytes, more than {max_bytes}")

    try:
        check(os.stat(host))
        fd = os.open(host, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise refuse(f"cannot read the host file ({e.strerror})") from None
    try:
        check(os.fstat(fd))
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise refuse(f"the host file grew past {max_bytes} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise refuse(f"cannot read the host file ({e.strerror})") from None
    finally:
        os.close(fd)


@dataclass
class WorkspaceSeams:
    """The narrow view of other services that workspace operations need."""

    with_vm_lock_by_ref: VMLockByRef  # hold the VM's lock, yielding it as re-read
    alive_checker: AliveChecker  # its VMM process is alive


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
        ssh: GuestSSHLike,
    ) -> None:
        self.store = store
        self.layout = layout
        self.config = config
        self.runner = runner
        self.log = logger
        self.seams = seams
        self.workspace_locks = LockSet()
        self.ops: Registry[OpState] = Registry()
        self.ssh = ssh
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
        files: list[tuple[str, bytes, int]] = []
        for ent in self.config.file_sync:
            # Off the event loop: even a regular file may sit on a slow or hung mount.
            data = await asyncio.to_thread(read_sync_file, ent.host, ent.guest)
            files.append((ent.guest, data, ent.mode))
        pub = await ensure_keypair(self.runner, self.layout.ssh_key)
        disk = os.path.join(vm.vm_dir, "work.ext4")
        await sync_work_disk(self.runner, Path(disk), pub, await self.host_git_identity(), files)

    # --- prepare / export ----------------------------------------------------------------

    def _target(self, vm: VMRecord) -> SSHTarget:
        return SSHTarget.for_guest(vm.name, vm.guest_ip, self.layout)

    async def inspect(self, path: str, include_untracked: bool, with_files: bool) -> RepoInfo:
        """Host-side preflight for `vm run PATH` (nothing created): the repo facts, and the
        file list for --dry-run."""
        info = await ws.inspect_repo(self.runner, Path(path))
        files = (
            await ws.list_files(self.runner, info.root, include_untracked) if with_files else None
        )
        return RepoInfo(str(info.root), info.head, info.branch, info.origin, files)

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

    async def export(self, ref: str, base_commit: str | None) -> WorkspacePatch:
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
        return WorkspacePatch(
            name=vm.name,
            base=base,
            guest_path=vm.workspace.guest_path,
            patch_b64=base64.b64encode(result.patch).decode(),
            files=[ChangedFile(s, p) for s, p in result.files],
        )
