"""WorkspaceService: workspace.prepare / workspace.export, auth-key and git-identity sync.

It holds no pointer to VMService. It receives function-typed seams at wiring time
(`vm_resolver`, `alive_checker`, `with_vm_lock_by_ref`, `image_resolver`,
`image_work_seed`) so it sees exactly the operations it needs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from stoker.daemon.locks import LockSet
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
        runner: Runner,
        logger: logging.Logger,
        seams: WorkspaceSeams,
    ) -> None:
        self.store = store
        self.layout = layout
        self.runner = runner
        self.log = logger
        self.seams = seams
        self.workspace_locks = LockSet()
