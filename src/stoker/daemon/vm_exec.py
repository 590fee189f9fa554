"""VMService's exec side: commands run by the guest agent, streamed to the RPC caller.

`vm.exec` starts a process through the agent (`stoker.daemon.agent.execchan`) and streams
its output to the caller as progress events, waiting for the caller's socket to take each
one before acknowledging it to the agent: output flows end to end at the pace of the
slowest reader, in bounded memory (one flow-control window per exec). The caller sends
stdin (`vm.exec.input`) and signals (`vm.exec.signal`) on a second connection, naming the
exec by the token of the `exec.started` event. A caller that disconnects cancels the
request, which kills the guest process group. docs/protocol.md has the wire format.

Functions take the VMService as their first argument, as in vm_stats.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import time
from typing import TYPE_CHECKING

from stoker.daemon.agent import (
    AgentError,
    ExecSession,
    ExecSpec,
)
from stoker.daemon.imagemgr.workload import WorkloadConfig, exec_defaults
from stoker.daemon.vm_stats import agent_for
from stoker.errors import Cancelled, Conflict, InvalidArgument, NotFound
from stoker.model.records import VMRecord, VMState
from stoker.model.wire import ExecDone, ExecInputTaken, ExecSignalled

if TYPE_CHECKING:
    from stoker.daemon.vm_service import VMService
    from stoker.rpc.server import RequestContext

AGENT_PROBE_TIMEOUT = 3.0  # seconds a running VM's agent gets to answer before SSH is used
START_TIMEOUT = 30.0  # seconds for the agent to fork the process
SIGNALS = ("INT", "TERM", "HUP", "QUIT", "KILL", "USR1", "USR2")


def default_workdir(vm: VMRecord) -> str:
    """The workspace when one is prepared, else /root."""
    return vm.workspace.guest_path if vm.workspace else "/root"


async def agent_can_exec(svc: VMService, vm: VMRecord, timeout: float) -> str | None:
    """None when the VM's agent runs commands, else why not (the caller falls back to
    SSH). A positive answer is remembered until the agent client is dropped."""
    client = agent_for(svc, vm)
    if svc.exec_capable.get(vm.id):
        return None
    try:
        h = await client.healthz(timeout)
    except AgentError as e:
        return e.message
    if not h.can_exec:
        return f"the guest agent ({h.agent_version}) in image {vm.image} cannot run commands"
    svc.exec_capable[vm.id] = True
    return None


async def wait_agent_exec(svc: VMService, vm: VMRecord, deadline: float) -> float | None:
    """Poll until the agent answers and can exec; seconds waited, None at the deadline or
    when the agent answers without exec (an old image: SSH is the way in)."""
    t0 = time.monotonic()
    client = agent_for(svc, vm)
    while time.monotonic() < deadline:
        try:
            h = await client.healthz(1.0)
        except AgentError:
            await asyncio.sleep(0.1)
            continue
        if not h.can_exec:
            return None
        svc.exec_capable[vm.id] = True
        return time.monotonic() - t0
    return None


async def exec_stream(
    svc: VMService,
    ref: str,
    spec: ExecSpec,
    ctx: RequestContext,
    probe_timeout: float = AGENT_PROBE_TIMEOUT,
) -> ExecDone:
    """Run `spec` in the VM through its agent, streaming output to `ctx`.

    Returns {"transport": "agent", "exit_code", "code", "signal", "timed_out"}, or
    {"transport": None, "fallback": "ssh", "reason"} when the agent cannot run commands
    (nothing ran: the caller uses SSH).
    """
    vm = svc.resolve(ref)
    if vm.state != VMState.RUNNING or not await svc.is_alive(vm):
        state = vm.state if vm.state != VMState.RUNNING else "not running (its VMM exited)"
        raise Conflict(f"VM {vm.name} is {state}: start it with `stoker vm start {vm.name}`")
    why = await agent_can_exec(svc, vm, probe_timeout)
    if why is not None:
        return ExecDone(None, fallback="ssh", reason=why)
    if vm.system_image is not None:
        spec = workload_spec(svc, vm, spec)
    elif spec.cwd is None:
        spec = dataclasses.replace(spec, cwd=default_workdir(vm))
    session = await agent_for(svc, vm).exec(spec, START_TIMEOUT)
    svc.execs[session.id] = session
    try:
        await ctx.stream(
            {"stage": "exec.started", "exec": session.id, "pid": session.pid, "transport": "agent"}
        )
        async for fd, data in session.output():
            event = {"stage": "exec.output", "fd": fd, "data": base64.b64encode(data).decode()}
            if not await ctx.stream(event):
                raise Cancelled("the caller went away")
        st = session.status
        assert st is not None
        return ExecDone("agent", st.exit_code, st.code, st.signal, st.timed_out)
    except AgentError as e:
        raise type(e)(f"VM {vm.name}: {e.message}") from None
    finally:
        svc.execs.pop(session.id, None)
        session.kill()  # a no-op once the process ended; else its group is killed


def workload_spec(svc: VMService, vm: VMRecord, spec: ExecSpec) -> ExecSpec:
    """An exec on a VM with a workload root runs inside it, with the image config's
    environment under the caller's, and the caller's directory, else the workspace, else
    the image's WorkingDir, and the caller's user, else the image's."""
    image = svc.store.get_image(vm.image)
    cfg = WorkloadConfig.from_meta(image.meta if image is not None else {})
    env, cwd, user = exec_defaults(
        cfg, spec.env, spec.cwd, spec.user, vm.workspace.guest_path if vm.workspace else None
    )
    return dataclasses.replace(spec, env=env, cwd=cwd, user=user, root="workload")


def _session(svc: VMService, token: str) -> ExecSession:
    s = svc.execs.get(token)
    if s is None:
        raise NotFound(f"no running exec {token!r}: it has ended (or never started)")
    return s


async def exec_signal(svc: VMService, token: str, sig: str) -> ExecSignalled:
    """Deliver a signal to a running exec's process group."""
    name = sig.upper().removeprefix("SIG")
    if name not in SIGNALS:
        raise InvalidArgument(f"signal {sig!r} is not one of {', '.join(SIGNALS)}")
    s = _session(svc, token)
    try:
        s.signal(name)
        await s.channel.drain()
    except AgentError as e:
        raise type(e)(e.message) from None
    return ExecSignalled(token, name)


async def exec_input(svc: VMService, token: str, data: str, eof: bool) -> ExecInputTaken:
    """Feed stdin to a running exec (base64 `data`); returns once the agent took it, so
    the caller's next chunk waits for the window. `open` False: the process closed its
    stdin or ended (stop sending)."""
    s = _session(svc, token)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("exec input data is not base64") from None
    try:
        ok = await s.write_stdin(raw) if raw else not s.done
        if eof and ok:
            await s.close_stdin()
    except AgentError as e:
        raise type(e)(e.message) from None
    return ExecInputTaken(token, ok and not eof)


async def run_collect(
    svc: VMService, vm: VMRecord, spec: ExecSpec, timeout: float, limit: int = 64 * 1024
) -> tuple[int, bytes, bytes]:
    """Run `spec` through the VM's agent to its end (daemon-internal: the pool's identity
    step). Exit code, stdout and stderr, each kept to
    `limit` bytes. The exit code is the shell convention (128+N for signal N). Raises
    AgentTimeout when it does not end within `timeout` seconds."""
    from stoker.daemon.agent import AgentTimeout

    out = {1: bytearray(), 2: bytearray()}
    session = await agent_for(svc, vm).exec(spec, min(timeout, START_TIMEOUT))
    try:
        async with asyncio.timeout(timeout):
            async for fd, data in session.output():
                buf = out[fd]
                if len(buf) < limit:
                    buf += data[: limit - len(buf)]
    except TimeoutError:
        raise AgentTimeout(
            f"VM {vm.name}: the command did not end within {timeout:g}s through the guest agent"
        ) from None
    finally:
        session.kill()
    st = session.status
    return (st.exit_code if st is not None else 255), bytes(out[1]), bytes(out[2])
