"""Startup reconcile: rehydrate handles, reap VMs whose VMM died, republish DNS."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stoker.daemon.daemon import Daemon


async def reconcile(d: Daemon) -> None:
    """Bring recorded state in line with what is really running on the host."""
    assert d.vm is not None
    await d.vm.reconcile()
    if d.pool is not None:  # pool VMs: kept if ready, running and answering, else reaped
        await d.pool.reconcile()
    if d.images is not None:  # leftovers of a crash or `kill -9` (staging, orphan dirs)
        await d.images.sweep_leftovers()
    await d.vm.sweep_orphan_dirs()
