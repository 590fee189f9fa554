"""VMService's observation side: agent clients, health, stats polling, ports.

Functions here take the VMService as their first argument; VMService forwards to them
(the seed's vm_stats / ports files). Nothing here holds a VM lock across guest I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
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
from stoker.model.wire import AgentHealth, FanResult, GuestPort, VMHealth, VMStats

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


async def health(svc: VMService, ref: str) -> VMHealth:
    """Agent health for one VM, with the SSH fallback when the agent does not answer."""
    vm = svc.resolve(ref)
    state = str(vm.state)
    if vm.state != VMState.RUNNING or not await svc.is_alive(vm):
        return VMHealth(vm.name, state, running=False, healthy=False, agent=None)
    try:
        h = await agent_for(svc, vm).healthz(timeout=2.0)
        agent = AgentHealth(
            ok=h.ok,
            uptime_s=h.uptime_s,
            boot_id=h.boot_id,
            load=list(h.load),
            hostname=h.hostname,
            sshd_running=h.sshd_running,
            agent_version=h.agent_version,
        )
        return VMHealth(vm.name, state, running=True, healthy=h.ok, agent=agent)
    except AgentError as e:
        agent_error = e.message
    try:
        r = await svc.ssh.run(svc.ssh_target(vm), "true", timeout=5, connect_timeout=2)
        healthy = r.exit_status == 0
    except StokerError as se:
        return VMHealth(
            vm.name, state, True, False, None, agent_error=agent_error, ssh_error=se.message
        )
    return VMHealth(vm.name, state, True, healthy, None, agent_error=agent_error, via="ssh")


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


@dataclass(frozen=True)
class Sample:
    """One stats sample as VMService keeps it: the public `VMStats` plus what the next
    sample's CPU figures are measured against (never on the wire)."""

    stats: VMStats
    at: float  # Unix time of the sample
    vmm_cpu_s: float | None  # CPU seconds the VMM process had used
    guest: GuestStats | None  # the agent's /stats


async def sample(svc: VMService, vm: VMRecord) -> Sample:
    """One stats sample for a VM; CPU % is measured against the previous sample."""
    vm_dir = Path(vm.vm_dir)
    now = time.time()
    prev = svc.last_samples.get(vm.id)
    fig: dict[str, Any] = {}
    cpu_s: float | None = None
    guest: GuestStats | None = None
    pid = vm.teardown.vmm_pid
    if vm.state == VMState.RUNNING and pid:
        cr = _proc_cpu_rss(pid)
        if cr is not None:
            cpu_s, fig["vmm_rss_bytes"] = cr
            if prev and prev.vmm_cpu_s is not None and now > prev.at:
                fig["cpu_percent"] = round(100.0 * (cpu_s - prev.vmm_cpu_s) / (now - prev.at), 1)
        try:
            guest = await agent_for(svc, vm).stats(timeout=3.0)
            fig.update(
                guest_mem_used=guest.mem_used,
                guest_mem_total=guest.mem_total,
                uptime_s=round(guest.uptime_s, 1),
                last_activity_age_s=guest.last_activity_age_s,
            )
            if prev and prev.guest is not None:
                pc = cpu_percent(prev.guest, guest)
                if pc is not None:
                    fig["guest_cpu_percent"] = round(pc, 1)
        except AgentError as e:
            fig["agent_error"] = e.message
    stats = VMStats(
        name=vm.name,
        state=str(vm.state),
        sampled_at=rfc3339(now),
        overlay_bytes=_allocated(vm_dir / "overlay.ext4"),
        work_disk_bytes=_allocated(vm_dir / "work.ext4"),
        **fig,
    )
    out = Sample(stats, now, cpu_s, guest)
    svc.last_samples[vm.id] = out
    return out


def rfc3339(t: Any) -> Any:
    """A Unix time as the one time format of --json output (see docs/json-output.md)."""
    if isinstance(t, int | float) and not isinstance(t, bool):
        from datetime import UTC, datetime

        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return t


_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(VMStats))


async def stats(svc: VMService, refs: list[str]) -> list[FanResult[VMStats]]:
    """`vm stats`: a fresh sample per VM (all VMs when refs is empty)."""
    if not refs:
        refs = [v.id for v in svc.store.list_vms()]

    async def one(vm_id: str) -> VMStats:
        vm = svc.resolve(vm_id)
        if vm.state != VMState.RUNNING:
            # Not running: the last sample taken while it ran (persisted, so it survives a
            # daemon restart), with the current state and disk use.
            last = svc.store.get_stats(vm.id) or {}
            cur = (await sample(svc, vm)).stats.to_dict()
            merged = {k: cur.get(k) if cur.get(k) is not None else last.get(k) for k in cur}
            merged.update(
                {k: last[k] for k in _STATS_FIELDS if k not in merged and k in last},
                state=str(vm.state),
                last_sampled_at=rfc3339(last.get("sampled_at")),
            )
            kept: dict[str, Any] = {k: v for k, v in merged.items() if k in _STATS_FIELDS}
            return VMStats(**kept)
        if vm.id not in svc.last_samples:
            await sample(svc, vm)  # a baseline so CPU % has something to compare with
            await asyncio.sleep(0.3)
        s = (await sample(svc, vm)).stats
        svc.store.put_stats(vm.id, s.to_dict())
        return s

    return await svc.fan_out(refs, one)


async def poll_stats(svc: VMService) -> None:
    """The background ticker: sample every running VM concurrently, persist the sample,
    and stop VMs idle longer than auto_stop_stale_after."""
    vms = [v for v in svc.store.list_vms() if v.state == VMState.RUNNING]

    async def one(vm: VMRecord) -> None:
        try:
            s = (await sample(svc, vm)).stats
        except Exception as e:  # one VM's trouble never stops the others
            svc.log.debug("stats for %s failed: %s", vm.name, e)
            return
        svc.store.put_stats(vm.id, s.to_dict())
        limit = svc.config.auto_stop_stale_after
        idle = s.last_activity_age_s
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


async def ports(svc: VMService, refs: list[str]) -> list[FanResult[list[GuestPort]]]:
    """`vm ports`: listeners per VM as NAME.vm:PORT, with http(s) links where a probe
    from the host answers, and the host ports `vm port-forward` sends to each TCP port.
    Concurrent across VMs; a stopped VM fails alone."""
    if not refs:
        refs = [v.id for v in svc.store.list_vms() if v.state == VMState.RUNNING]

    async def one(vm_id: str) -> list[GuestPort]:
        vm = svc.resolve(vm_id)
        if vm.state != VMState.RUNNING:
            raise Conflict(f"VM {vm.name} is {vm.state}: start it to list its ports")
        try:
            socks = await agent_for(svc, vm).ports(timeout=5.0)
        except AgentError as e:
            raise Conflict(f"VM {vm.name}: the guest agent does not answer ({e.message})") from e
        seen: dict[tuple[str, int], GuestPort] = {}
        for s in socks:
            key = (s.proto, s.port)
            if key in seen:
                continue
            seen[key] = GuestPort(
                proto=s.proto,
                port=s.port,
                addr=s.addr,
                process=s.process,
                pid=s.pid,
                endpoint=f"{vm.dns_name}:{s.port}",
                loopback_only=s.loopback_only,
                url=None,
            )
        tcp = [e for e in seen.values() if e.proto == "tcp" and not e.loopback_only]
        schemes = await asyncio.gather(*(_probe(vm.guest_ip, e.port) for e in tcp))
        for entry, scheme in zip(tcp, schemes, strict=True):
            if scheme:
                entry.url = f"{scheme}://{vm.dns_name}:{entry.port}/"
        out = sorted(seen.values(), key=lambda e: (e.proto, e.port))
        # Each guest TCP port says which host ports forward to it; a forward to a port
        # nothing listens on yet is listed too.
        by_port: dict[int, list[str]] = {}
        for f in svc.forwards.for_vm(vm.id):
            by_port.setdefault(f.guest_port, []).append(f.listen)
        for entry in out:
            if entry.proto == "tcp":
                entry.forwarded_from = by_port.pop(entry.port, [])
        for port, listens in sorted(by_port.items()):
            out.append(
                GuestPort(
                    "tcp", port, None, None, None, f"{vm.dns_name}:{port}", False, None, listens
                )
            )
        return out

    return await svc.fan_out(refs, one)
