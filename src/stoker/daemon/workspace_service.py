"""WorkspaceService: workspace.prepare / workspace.export, auth-key and git-identity sync.

It holds no pointer to VMService. It receives function-typed seams at wiring time
(`vm_resolver`, `alive_checker`, `with_vm_lock_by_ref`, `image_resolver`,
`image_work_seed`) so it sees exactly the operations it needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from stoker.config import Config
from stoker.daemon.guestssh import ensure_keypair
from stoker.daemon.locks import LockSet
from stoker.daemon.opstate import Registry
from stoker.daemon.opstate.registry import OpState
from stoker.daemon.vm_disks import sync_work_disk
from stoker.errors import InvalidArgument
from stoker.layout import Layout
from stoker.model.records import Image, VMRecord
from stoker.runner import Runner
from stoker.store import Store

VMResolver = Callable[[str], Awaitable[VMRecord]]
AliveChecker = Callable[[VMRecord], Awaitable[bool]]
VMLockByRef = Callable[[str], AbstractAsyncContextManager[VMRecord]]
ImageResolver = Callable[[str], Awaitable[Image]]
ImageWorkSeed = Callable[[Image], Awaitable[str | None]]


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
        from pathlib import Path

        await sync_work_disk(self.runner, Path(disk), pub, await self.host_git_identity(), files)
