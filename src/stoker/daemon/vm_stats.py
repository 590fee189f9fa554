"""VMService's observation side: agent clients, health, stats polling, ports.

Functions here take the VMService as their first argument; VMService forwards to them
(the seed's vm_stats / ports files). Nothing here holds a VM lock across guest I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.daemon.agent import (
    AgentClient,
    AgentError,
    AgentTransport,
    FirecrackerVsockTransport,
    GuestStats,
    SerialTransport,
    cpu_percent,
)
from stoker.errors import Conflict, StokerError
from stoker.model.records import VMRecord, VMState

if TYPE_CHECKING:
    from stoker.daemon.vm_service import VMService

AGENT_SOCKET = "agent.sock"
PROBE_TIMEOUT = 1.0


def agent_for(svc: VMService, vm: VMRecord) -> AgentClient:
    """The VM's agent client (one per VM: QEMU's chardev takes one client at a time), over
    the channel its VMM driver gives it."""
    c = svc.agents.get(vm.id)
    if c is None:
        handle = svc._handle(vm)
        channel = svc._driver().agent_transport(handle) if handle is not None else None
        if channel is None:
            # No VMM of this VM is found: a client (not kept) whose calls report the agent
            # unreachable, as they would for a VMM that has just exited.
            return AgentClient(SerialTransport(str(Path(vm.vm_dir) / AGENT_SOCKET)), name=vm.name)
        transport: AgentTransport = (
            FirecrackerVsockTransport(channel.socket)
            if channel.hybrid_vsock
            else SerialTransport(channel.socket)
        )
        c = AgentClient(transport, name=vm.name)
        svc.agents[vm.id] = c
    return c


async def drop_agent(svc: VMService, vm_id: str) -> None:
    svc.exec_capable.pop(vm_id, None)
    c = svc.agents.pop(vm_id, None)
    if c is not None:
        with contextlib.suppress(Exception):
            await c.close()


async def wait_agent(svc: VMService, vm: VMRecord, deadline: float) -> float | None:
    """Poll /healthz until it answers or the deadline passes; seconds waited or None."""
    t0 = time.monotonic()
    c = agent_for(svc, vm)
    while time.monotonic() < deadline:
        if await c.alive(timeout=1.0):
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    return None


async def health(svc: VMService, ref: str) -> dict[str, Any]:
    """Agent health for one VM, with the SSH fallback when the agent does not answer."""
    vm = svc.resolve(ref)
    out: dict[str, Any] = {"name": vm.name, "state": str(vm.state)}
    if vm.state != VMState.RUNNING or not await svc.is_alive(vm):
        out.update(running=False, healthy=False, agent=None)
        return out
    out["running"] = True
    try:
        h = await agent_for(svc, vm).healthz(timeout=2.0)
        out.update(
            healthy=h.ok,
            agent={
                "ok": h.ok,
                "uptime_s": h.uptime_s,
                "boot_id": h.boot_id,
                "load": list(h.load),
                "hostname": h.hostname,
                "sshd_running": h.sshd_running,
                "agent_version": h.agent_version,
            },
        )
    except AgentError as e:
        out.update(agent=None, agent_error=e.message)
        try:
            r = await svc.ssh.run(svc.ssh_target(vm), "true", timeout=5, connect_timeout=2)
            out.update(healthy=r.exit_status == 0, via="ssh")
        except StokerError as se:
            out.update(healthy=False, ssh_error=se.message)
    return out


def _proc_cpu_rss(pid: int) -> tuple[float, int] | None:
    """(cpu seconds used, RSS bytes) of a process from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/statm") as f:
            rss_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck, rss_pages * os.sysconf("SC_PAGE_SIZE")


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


async def sample(svc: VMService, vm: VMRecord) -> dict[str, Any]:
    """One stats sample for a VM; CPU % is measured against the previous sample."""
    vm_dir = Path(vm.vm_dir)
    now = time.time()
    out: dict[str, Any] = {
        "name": vm.name,
        "state": str(vm.state),
        "sampled_at": now,
        "overlay_bytes": _allocated(vm_dir / "overlay.ext4"),
        "work_disk_bytes": _allocated(vm_dir / "work.ext4"),
        "cpu_percent": None,
        "vmm_rss_bytes": None,
        "guest_mem_used": None,
        "guest_mem_total": None,
        "uptime_s": None,
        "last_activity_age_s": None,
    }
    prev = svc.last_samples.get(vm.id)
    pid = vm.teardown.vmm_pid
    if vm.state == VMState.RUNNING and pid:
        cr = _proc_cpu_rss(pid)
        if cr is not None:
            cpu_s, rss = cr
            out["vmm_rss_bytes"] = rss
            out["_cpu_s"] = cpu_s
            if prev and prev.get("_cpu_s") is not None and now > prev["sampled_at"]:
                out["cpu_percent"] = round(
                    100.0 * (cpu_s - prev["_cpu_s"]) / (now - prev["sampled_at"]), 1
                )
        try:
            gs: GuestStats = await agent_for(svc, vm).stats(timeout=3.0)
            out.update(
                guest_mem_used=gs.mem_used,
                guest_mem_total=gs.mem_total,
                uptime_s=round(gs.uptime_s, 1),
                last_activity_age_s=gs.last_activity_age_s,
                _guest=gs,
            )
            if prev and isinstance(prev.get("_guest"), GuestStats):
                pc = cpu_percent(prev["_guest"], gs)
                if pc is not None:
                    out["guest_cpu_percent"] = round(pc, 1)
        except AgentError as e:
            out["agent_error"] = e.message
    svc.last_samples[vm.id] = out
    return out


def rfc3339(t: Any) -> Any:
    """A Unix time as the one time format of --json output (see docs/json-output.md)."""
    if isinstance(t, int | float) and not isinstance(t, bool):
        from datetime import UTC, datetime

        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return t


def public(s: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in s.items() if not k.startswith("_")}
    if "sampled_at" in out:
        out["sampled_at"] = rfc3339(out["sampled_at"])
    return out


async def stats(svc: VMService, refs: list[str]) -> list[dict[str, Any]]:
    """`vm stats`: a fresh sample per VM (all VMs when refs is empty)."""
    if not refs:
        refs = [v.id for v in svc.store.list_vms()]

    async def one(vm_id: str) -> dict[str, Any]:
        vm = svc.resolve(vm_id)
        if vm.state != VMState.RUNNING:
            # Not running: the last sample taken while it ran (persisted, so it survives a
            # daemon restart), with the current state and disk use.
            last = svc.store.get_stats(vm.id) or {}
            cur = public(await sample(svc, vm))
            return {
                **cur,
                **{k: v for k, v in last.items() if cur.get(k) is None},
                "state": str(vm.state),
                "last_sampled_at": rfc3339(last.get("sampled_at")),
            }
        if vm.id not in svc.last_samples:
            await sample(svc, vm)  # a baseline so CPU % has something to compare with
            await asyncio.sleep(0.3)
        s = await sample(svc, vm)
        svc.store.put_stats(vm.id, public(s))
        return public(s)

    return await svc.fan_out(refs, one)


async def poll_stats(svc: VMService) -> None:
    """The background ticker: sample every running VM concurrently, persist the sample,
    and stop VMs idle longer than auto_stop_stale_after."""
    vms = [v for v in svc.store.list_vms() if v.state == VMState.RUNNING]

    async def one(vm: VMRecord) -> None:
        try:
            s = await sample(svc, vm)
        except Exception as e:  # one VM's trouble never stops the others
            svc.log.debug("stats for %s failed: %s", vm.name, e)
            return
        svc.store.put_stats(vm.id, public(s))
        limit = svc.config.auto_stop_stale_after
        idle = s.get("last_activity_age_s")
        if limit and idle is not None and idle > limit:
            svc.log.info("%s idle for %.0fs (> %ss): stopping", vm.name, idle, limit)
            with contextlib.suppress(StokerError):
                await svc.stop_vm(vm.id)
                cur = svc.store.get_vm(vm.id)
                if cur is not None:
                    cur.last_error = f"stopped after {idle:.0f}s idle (auto_stop_stale_after)"
                    svc.store.update_vm(cur)

    await asyncio.gather(*(one(v) for v in vms))


# --- ports -------------------------------------------------------------------------------


async def _probe(host: str, port: int) -> str | None:
    """'http' or 'https' when a request from the host answers like a web server."""
    for scheme in ("http", "https"):
        try:
            ssl_ctx: Any = None
            if scheme == "https":
                import ssl

                ssl_ctx = ssl.create_default_context()
                ssl_ctx.check_hostname = False
                ssl_ctx.verify_mode = ssl.CERT_NONE
            r, w = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl_ctx), PROBE_TIMEOUT
            )
            try:
                w.write(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                await w.drain()
                line = await asyncio.wait_for(r.readline(), PROBE_TIMEOUT)
            finally:
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            if line.startswith(b"HTTP/"):
                return scheme
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            continue
        except Exception:
            continue
    return None


async def ports(svc: VMService, refs: list[str]) -> list[dict[str, Any]]:
    """`vm ports`: listeners per VM as NAME.vm:PORT, with http(s) links where a probe
    from the host answers. Concurrent across VMs; a stopped VM fails alone."""
    if not refs:
        refs = [v.id for v in svc.store.list_vms() if v.state == VMState.RUNNING]

    async def one(vm_id: str) -> list[dict[str, Any]]:
        vm = svc.resolve(vm_id)
        if vm.state != VMState.RUNNING:
            raise Conflict(f"VM {vm.name} is {vm.state}: start it to list its ports")
        try:
            socks = await agent_for(svc, vm).ports(timeout=5.0)
        except AgentError as e:
            raise Conflict(f"VM {vm.name}: the guest agent does not answer ({e.message})") from e
        seen: dict[tuple[str, int], dict[str, Any]] = {}
        for s in socks:
            key = (s.proto, s.port)
            if key in seen:
                continue
            seen[key] = {
                "proto": s.proto,
                "port": s.port,
                "addr": s.addr,
                "process": s.process,
                "pid": s.pid,
                "endpoint": f"{vm.dns_name}:{s.port}",
                "loopback_only": s.loopback_only,
                "url": None,
            }
        tcp = [e for e in seen.values() if e["proto"] == "tcp" and not e["loopback_only"]]
        schemes = await asyncio.gather(*(_probe(vm.guest_ip, e["port"]) for e in tcp))
        for entry, scheme in zip(tcp, schemes, strict=True):
            if scheme:
                entry["url"] = f"{scheme}://{vm.dns_name}:{entry['port']}/"
        return sorted(seen.values(), key=lambda e: (e["proto"], e["port"]))

    return await svc.fan_out(refs, one)
