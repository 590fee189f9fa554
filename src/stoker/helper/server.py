"""The root side: accept, check the peer, validate, do the one operation, answer.

Every request is checked against the caller's entry in the helper's config (`Caller`):
- the peer's uid (SO_PEERCRED) must be a configured caller, else refused;
- requests carry no bridge, table or namespace: those come from the config;
- a tap must have the caller's prefix, and an existing tap is the caller's only when the
  kernel records the caller's uid as its owner (the helper creates taps owned by the
  caller, so this survives helper and daemon restarts without a file of its own);
- policy rules are checked (`VMRules.check`), their tap must be the caller's and their
  guest address inside the caller's network.
Anything else is refused with `permission_denied` (or `invalid_argument`) and logged with
the caller's pid and uid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.daemon.hostnet.links import Links, check_ifname
from stoker.daemon.hostnet.nat import Firewall, VMRules
from stoker.errors import InvalidArgument, PermissionDenied, StokerError
from stoker.helper import protocol
from stoker.helper.config import DEFAULT_CONFIG, Caller, HelperConfig, load
from stoker.runner import Runner

log = logging.getLogger("stoker.helper")

_TAP_SUFFIX = re.compile(r"^[A-Za-z0-9]{1,14}$")
_RULE_FIELDS = {"vm_id", "guest_ip", "tap", "mac", "mode", "allow_out", "host_ports", "peers"}
GUEST_DNS_PORT = 53


@dataclass
class Request:
    caller: Caller
    pid: int
    method: str
    params: dict[str, Any]
    fds: list[int] = field(default_factory=list)


Handler = Callable[["Helper", Request], Awaitable[Any]]
METHODS: dict[str, tuple[frozenset[str], Handler]] = {}


def method(name: str, *params: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        METHODS[name] = (frozenset(params), fn)
        return fn

    return deco


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Helper:
    """Serves the callers of one `HelperConfig`."""

    def __init__(self, config: HelperConfig, runner: Runner | None = None) -> None:
        self.config = config
        self.runner = runner or Runner()
        self._links: dict[int, Links] = {}
        self._fw: dict[int, Firewall] = {}
        self._mu: dict[int, asyncio.Lock] = {}
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    # --- per-caller tools ----------------------------------------------------------------

    def links(self, c: Caller) -> Links:
        if c.uid not in self._links:
            self._links[c.uid] = Links(c.netns)
        return self._links[c.uid]

    def firewall(self, c: Caller) -> Firewall:
        if c.uid not in self._fw:
            self._fw[c.uid] = Firewall(
                self.runner,
                c.bridge,
                c.gateway,
                log.getChild("nft"),
                netns=c.netns,
                table=c.table,
            )
        return self._fw[c.uid]

    def lock(self, c: Caller) -> asyncio.Lock:
        return self._mu.setdefault(c.uid, asyncio.Lock())

    def tap_name(self, c: Caller, name: Any) -> str:
        if not isinstance(name, str):
            raise InvalidArgument("name must be a string")
        check_ifname(name)
        if not name.startswith(c.tap_prefix) or not _TAP_SUFFIX.match(name[len(c.tap_prefix) :]):
            raise PermissionDenied(
                f"tap {name!r} is not yours: uid {c.uid} may only use taps named "
                f"{c.tap_prefix}<letters/digits>"
            )
        return name

    async def owned_tap(self, c: Caller, name: Any, *, missing_ok: bool = False) -> str | None:
        """The tap's name when it exists and the kernel says `c` owns it."""
        tap = self.tap_name(c, name)
        owner = await self.links(c).tun_owner(tap)
        if owner is None:
            if missing_ok and not await self.links(c).exists(tap):
                return None
            if await self.links(c).exists(tap):
                raise PermissionDenied(f"{tap} is not a tap device: uid {c.uid} may not use it")
            raise InvalidArgument(f"tap {tap} does not exist")
        if owner != c.uid:
            who = "no owner" if owner == -1 else f"owner uid {owner}"
            raise PermissionDenied(f"tap {tap} is not yours ({who}, you are uid {c.uid})")
        return tap

    # --- serving -------------------------------------------------------------------------

    async def start(self) -> None:
        path = self.config.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        # Anyone may connect; the peer check decides (and logs who was refused).
        os.chmod(path, 0o666)
        s.listen(64)
        s.setblocking(False)
        self._sock = s
        log.info(
            "stoker-helper serving %s for uid(s) %s",
            path,
            ", ".join(str(u) for u in sorted(self.config.callers)),
        )

    async def serve_forever(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(self._accept_loop(loop))
        await self._stopping.wait()
        accept.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accept
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)

    async def _accept_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            t = asyncio.ensure_future(self._serve(conn))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.config.socket.unlink()

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(True)
            conn.settimeout(30)
            pid, uid, _gid = peer_credentials(conn)
            try:
                line, fds = await asyncio.to_thread(protocol.read_line, conn, protocol.MAX_REQUEST)
                for fd in fds:
                    os.close(fd)  # callers pass none
                if not line:
                    return
                answer, out_fds = await self._answer(pid, uid, line)
                try:
                    await asyncio.to_thread(protocol.send, conn, answer, out_fds)
                finally:
                    for fd in out_fds:
                        os.close(fd)
            except (OSError, ValueError) as e:
                log.warning("connection from pid %d uid %d: %s", pid, uid, e)

    async def _answer(self, pid: int, uid: int, line: bytes) -> tuple[dict[str, Any], list[int]]:
        import json

        method_name = "?"
        try:
            caller = self.config.callers.get(uid)
            if caller is None:
                raise PermissionDenied(
                    f"uid {uid} is not a caller of this stoker-helper: only the stokerd "
                    "users listed in its config may use it (stoker system install writes it)"
                )
            try:
                req = json.loads(line)
            except ValueError:
                raise InvalidArgument("request is not JSON") from None
            if not isinstance(req, dict) or not isinstance(req.get("method"), str):
                raise InvalidArgument('request must be {"method": NAME, "params": {...}}')
            method_name = req["method"]
            params = req.get("params") or {}
            if not isinstance(params, dict):
                raise InvalidArgument("params must be an object")
            spec = METHODS.get(method_name)
            if spec is None:
                raise InvalidArgument(f"unknown method {method_name!r}")
            allowed, fn = spec
            extra = set(params) - allowed
            if extra:
                raise PermissionDenied(
                    f"{method_name} takes no parameter {', '.join(sorted(extra))}: the bridge, "
                    "tables and namespace a caller may use come from the helper's config"
                )
            r = Request(caller, pid, method_name, params)
            result = await fn(self, r)
            fds = list(r.fds)
            log.info("uid %d pid %d: %s %s: ok", uid, pid, method_name, _brief(params))
            return {"result": result}, fds
        except StokerError as e:
            level = logging.WARNING if isinstance(e, PermissionDenied) else logging.INFO
            log.log(level, "refused uid %d pid %d: %s: %s", uid, pid, method_name, e.message)
            return {"error": {"code": e.code, "message": e.message}}, []
        except Exception as e:  # never let one request kill the helper
            log.exception("uid %d pid %d: %s failed", uid, pid, method_name)
            return {"error": {"code": "internal", "message": f"{method_name} failed: {e}"}}, []


def _brief(params: dict[str, Any]) -> str:
    s = ",".join(f"{k}={v}" for k, v in params.items() if k != "rules")
    return s[:200]


# --- operations ----------------------------------------------------------------------------


@method("hello")
async def _hello(h: Helper, r: Request) -> Any:
    return r.caller.describe()


@method("bridge.ensure")
async def _bridge_ensure(h: Helper, r: Request) -> Any:
    c = r.caller
    async with h.lock(c):
        await h.links(c).ensure_bridge(c.bridge, c.gateway, c.network.prefixlen)
        await h.firewall(c).ensure_base()
    return {}


@method("bridge.delete")
async def _bridge_delete(h: Helper, r: Request) -> Any:
    c = r.caller
    async with h.lock(c):
        if await h.links(c).ports(c.bridge):
            from stoker.errors import Conflict

            raise Conflict(f"bridge {c.bridge} still has devices attached")
        if await h.links(c).kind(c.bridge) not in (None, "bridge"):
            raise PermissionDenied(f"{c.bridge} is not a bridge")
        return {"deleted": await h.links(c).delete(c.bridge)}


@method("tap.create", "name")
async def _tap_create(h: Helper, r: Request) -> Any:
    c = r.caller
    tap = h.tap_name(c, r.params.get("name"))
    owner = await h.links(c).tun_owner(tap)
    if owner == c.uid:
        return {"name": tap}  # a retry after the helper died mid-request: already made
    if await h.links(c).exists(tap):
        from stoker.errors import Conflict

        raise Conflict(f"a device named {tap} already exists and is not yours")
    await h.links(c).create_tap(tap, owner=c.uid)
    return {"name": tap}


@method("tap.attach", "name")
async def _tap_attach(h: Helper, r: Request) -> Any:
    c = r.caller
    tap = await h.owned_tap(c, r.params.get("name"))
    assert tap is not None
    await h.links(c).attach(tap, c.bridge)
    return {}


@method("tap.delete", "name")
async def _tap_delete(h: Helper, r: Request) -> Any:
    c = r.caller
    tap = await h.owned_tap(c, r.params.get("name"), missing_ok=True)
    if tap is None:
        return {"deleted": False}
    return {"deleted": await h.links(c).delete(tap)}


@method("tap.open", "name")
async def _tap_open(h: Helper, r: Request) -> Any:
    c = r.caller
    tap = await h.owned_tap(c, r.params.get("name"))
    assert tap is not None
    from stoker.daemon.vmm.confine import open_tap_direct as open_tap

    fd = await asyncio.to_thread(open_tap, tap, c.netns)
    r.fds.append(fd)
    return {"fds": 1}


@method("dns.bind")
async def _dns_bind(h: Helper, r: Request) -> Any:
    """UDP + TCP sockets bound to the caller's gateway address, port 53 (a non-root daemon
    cannot bind a port below 1024)."""
    from stoker.daemon.netdns.netns import bind_udp_tcp

    c = r.caller
    udp, tcp = await bind_udp_tcp(c.gateway, GUEST_DNS_PORT, c.netns)
    r.fds += [os.dup(udp.fileno()), os.dup(tcp.fileno())]
    udp.close()
    tcp.close()
    return {"fds": 2}


@method("nft.ensure_base")
async def _nft_base(h: Helper, r: Request) -> Any:
    await h.firewall(r.caller).ensure_base()
    return {}


@method("nft.apply_vm", "rules")
async def _nft_apply(h: Helper, r: Request) -> Any:
    c = r.caller
    raw = r.params.get("rules")
    if (
        not isinstance(raw, dict)
        or set(raw) - _RULE_FIELDS
        or not {"vm_id", "guest_ip", "tap", "mac"} <= set(raw)
    ):
        raise InvalidArgument(f"rules must be an object with the keys {sorted(_RULE_FIELDS)}")
    try:
        rules = VMRules(
            vm_id=str(raw["vm_id"]),
            guest_ip=str(raw["guest_ip"]),
            tap=str(raw["tap"]),
            mac=str(raw["mac"]),
            mode=str(raw.get("mode", "host-only")),
            allow_out=tuple(
                (str(n), None if p is None else int(p)) for n, p in raw.get("allow_out", ())
            ),
            host_ports=tuple(int(p) for p in raw.get("host_ports", ())),
            peers=None if raw.get("peers") is None else str(raw["peers"]),
        )
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"rules: {e}") from None
    try:
        rules.check()
        for net, _port in rules.allow_out:
            ipaddress.IPv4Network(net)
    except ValueError as e:
        raise InvalidArgument(f"rules: {e}") from None
    ip = ipaddress.IPv4Address(rules.guest_ip)
    if (
        ip not in c.network
        or str(ip) == c.gateway
        or ip
        in (
            c.network.network_address,
            c.network.broadcast_address,
        )
    ):
        raise PermissionDenied(f"guest address {ip} is not a guest address of {c.network}")
    await h.owned_tap(c, rules.tap)
    await h.firewall(c).apply_vm(rules)
    return {}


@method("nft.remove_vm", "vm_id")
async def _nft_remove(h: Helper, r: Request) -> Any:
    vm_id = r.params.get("vm_id")
    if not isinstance(vm_id, str):
        raise InvalidArgument("vm_id must be a string")
    return {"removed": await h.firewall(r.caller).remove_vm(vm_id)}


@method("nft.vm_ids")
async def _nft_ids(h: Helper, r: Request) -> Any:
    return {"vm_ids": sorted(await h.firewall(r.caller).vm_ids())}


@method("nft.teardown")
async def _nft_teardown(h: Helper, r: Request) -> Any:
    return {"removed": await h.firewall(r.caller).teardown_all()}


# --- entry point -----------------------------------------------------------------------------


async def _amain(config: HelperConfig) -> int:
    h = Helper(config)
    await h.start()
    loop = asyncio.get_running_loop()
    me = os.getpid()

    def on_signal(signum: int, _frame: object) -> None:
        # Not loop.add_signal_handler: pyroute2 forks a child to work in a namespace, and
        # the SIGTERM that ends that child would arrive here through the inherited wakeup
        # fd. Only this process's own signals stop the helper.
        if os.getpid() == me:
            loop.call_soon_threadsafe(h.stop)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        await h.serve_forever()
    finally:
        h.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="stoker-helper", description="stoker's root helper (bridge, taps, nft rules)"
    )
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="helper config (TOML)")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if os.geteuid() != 0:
        print("stoker-helper: must run as root (it does what stokerd may not)", file=sys.stderr)
        return 1
    try:
        cfg = load(args.config)
    except StokerError as e:
        print(f"stoker-helper: {e.message}", file=sys.stderr)
        return 1
    return asyncio.run(_amain(cfg))
