"""RPC over the unix socket, in process: framing, validation, limits, cancellation, progress.

The server runs in the test's event loop; every blocking socket call runs in a thread
(`asyncio.to_thread`) so it never blocks the loop serving it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from stoker import errors
from stoker.daemon import api
from stoker.daemon.daemon import Daemon, Method
from stoker.daemon.opstate.registry import OpState
from stoker.model.records import Image, VMRecord, VMSpec, VMState
from stoker.rpc.client import Client, DaemonNotRunning
from stoker.rpc.jsonable import to_jsonable
from stoker.rpc.protocol import MAX_REQUEST_BYTES, encode
from stoker.rpc.server import RequestContext, RPCServer
from stoker.store.db import now

pytestmark = pytest.mark.unit

IO_TIMEOUT = 5.0


# --- helpers ---------------------------------------------------------------------------


class Raw:
    """A blocking raw connection; use only from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; pending {self.buf[:200]!r}")
            self.buf += chunk
        ln, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(ln)
        return msg

    def at_eof(self) -> bool:
        if self.buf:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


async def raw(path: Path) -> Raw:
    return await asyncio.to_thread(Raw, path)


async def call(path: Path, method: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
    def go() -> Any:
        with Client(path, timeout=IO_TIMEOUT) as c:
            return c.call(method, params, **kw)

    return await asyncio.to_thread(go)


async def exchange(r: Raw, data: bytes) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        r.send(data)
        return r.line()

    return await asyncio.to_thread(go)


@dataclasses.dataclass
class Probe:
    """What the test methods record."""

    started: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    finished: bool = False


class ProbeDaemon(Daemon):
    """A Daemon with extra test methods added to its dispatch table."""

    probe: Probe

    def methods(self) -> dict[str, Method]:
        t = super().methods()
        probe = self.probe

        async def sleep(p: api.NoParams, ctx: RequestContext) -> Any:
            probe.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                probe.cancelled.set()
                raise
            probe.finished = True
            return "slept"

        async def progress(p: api.NoParams, ctx: RequestContext) -> Any:
            ctx.progress("one", "first stage")
            await asyncio.sleep(0.01)
            ctx.progress("two", "second stage", pct=50)
            return {"done": True}

        async def nap(p: api.NoParams, ctx: RequestContext) -> Any:
            await asyncio.sleep(1.0)  # streams nothing, and outlasts the idle timeout
            return "napped"

        async def boom(p: api.NoParams, ctx: RequestContext) -> Any:
            raise RuntimeError("kaboom")

        async def unserialisable(p: api.NoParams, ctx: RequestContext) -> Any:
            return {"x": object()}

        t["test.sleep"] = Method(api.NoParams, sleep)
        t["test.progress"] = Method(api.NoParams, progress)
        t["test.nap"] = Method(api.NoParams, nap)
        t["test.boom"] = Method(api.NoParams, boom)
        t["test.unserialisable"] = Method(api.NoParams, unserialisable)
        return t


@pytest.fixture
async def probe_served(daemon_factory: Any, serve: Any) -> Any:
    d = daemon_factory(cls=ProbeDaemon)
    d.probe = Probe()
    return await serve(d)


# --- wire format and error codes -------------------------------------------------------


def test_to_jsonable_and_encode() -> None:
    class Color(enum.Enum):
        RED = "red"

    @dataclasses.dataclass
    class Rec:
        p: Path
        c: Color
        s: tuple[int, ...]

    assert to_jsonable(Rec(Path("/x"), Color.RED, (1, 2))) == {"p": "/x", "c": "red", "s": [1, 2]}
    line = encode({"id": 1, "result": {"a": [1]}})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"id": 1, "result": {"a": [1]}}


def test_every_error_code_round_trips() -> None:
    for code, cls in errors.ERROR_CLASSES.items():
        e = errors.error_from_code(code, "msg", "detail")
        assert type(e) is cls and e.code == code and str(e) == "msg" and e.detail == "detail"
    assert type(errors.error_from_code("no-such-code", "m")) is errors.StokerError
    # codes are unique per class
    assert len({c.code for c in errors.ERROR_CLASSES.values()}) == len(errors.ERROR_CLASSES)


# --- basic serving ---------------------------------------------------------------------


async def test_status_and_socket_mode(served: Any) -> None:
    mode = stat.S_IMODE(os.stat(served.socket_path).st_mode)
    assert mode == 0o600
    assert stat.S_ISSOCK(os.stat(served.socket_path).st_mode)
    st = await call(served.socket_path, "daemon.status")
    assert st["pid"] == os.getpid()
    assert st["socket"] == str(served.socket_path)
    assert st["protocol"] >= 1


async def test_list_methods_start_empty_then_show_records(served: Any) -> None:
    p = served.socket_path
    for m in ("vm.list", "image.list", "kernel.list", "daemon.operations.list"):
        assert await call(p, m) == [], m
    d = served.daemon
    d.store.upsert_image(Image("img", True, "/r", None, None, "test", 1, now()))
    d.store.insert_vm(
        VMRecord(
            id="0123456789abcdef",
            name="web",
            state=VMState.STOPPED,
            image="img",
            spec=VMSpec(1, 512, 1 << 30, 1 << 30),
            guest_ip="172.30.0.2",
            dns_name="web.vm",
            vm_dir="/nonexistent",
            created_at=now(),
            updated_at=now(),
        )
    )
    op = d.vm.create_ops.add(OpState(kind="create", target="web"))
    vms = await call(p, "vm.list")
    assert [(v["name"], v["state"]) for v in vms] == [("web", "stopped")]
    assert [i["name"] for i in await call(p, "image.list")] == ["img"]
    shown = await call(p, "vm.show", {"ref": "0123"})
    assert shown["name"] == "web" and shown["spec"]["vcpu"] == 1
    ops = await call(p, "daemon.operations.list")
    assert [(o["id"], o["state"]) for o in ops] == [(op.id, "running")]
    with pytest.raises(errors.NotFound, match="nope"):
        await call(p, "vm.show", {"ref": "nope"})


async def test_request_id_is_echoed_and_requests_pipeline(served: Any) -> None:
    r = await raw(served.socket_path)
    try:

        def go() -> list[dict[str, Any]]:
            # two requests in one write: answered in order on the one connection
            r.send(
                encode({"id": "a", "method": "vm.list"})
                + encode({"id": 7, "method": "daemon.status", "params": None})
            )
            return [r.line(), r.line()]

        first, second = await asyncio.to_thread(go)
        assert first == {"id": "a", "result": []}
        assert second["id"] == 7 and second["result"]["pid"] == os.getpid()
    finally:
        r.close()


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json\n", "not valid JSON"),
        (b"\n", "not valid JSON"),
        (b"\xff\xfe\x00garbage\n", "not valid JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'"vm.list"\n', "JSON object"),
        (b'{"id": 1}\n', '"method"'),
        (b'{"id": 1, "method": 5}\n', '"method"'),
        (b'{"id": 1, "method": "vm.list", "params": [1]}\n', '"params"'),
    ],
)
async def test_malformed_request_then_connection_still_serves(
    served: Any, payload: bytes, fragment: str
) -> None:
    r = await raw(served.socket_path)
    try:
        msg = await exchange(r, payload)
        assert msg["error"]["code"] == "invalid_request"
        assert fragment in msg["error"]["message"]
        ok = await exchange(r, encode({"id": 2, "method": "vm.list"}))
        assert ok == {"id": 2, "result": []}
    finally:
        r.close()


async def test_unknown_method_lists_methods(served: Any) -> None:
    with pytest.raises(errors.MethodNotFound) as ei:
        await call(served.socket_path, "vm.explode")
    msg = ei.value.message
    assert "'vm.explode'" in msg
    for m in (
        "daemon.status",
        "daemon.operations.list",
        "vm.list",
        "vm.show",
        "image.list",
        "kernel.list",
    ):
        assert m in msg


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("vm.show", {"ref": 5}, "ref"),
        ("vm.show", {"ref": None}, "ref"),
        ("vm.show", {"ref": ["web"]}, "ref"),
        ("vm.show", {}, "ref"),
        ("vm.show", {"ref": "web", "force": True}, "force"),
        ("vm.list", {"bogus": 1}, "bogus"),
        ("daemon.status", {"verbose": True}, "verbose"),
    ],
)
async def test_invalid_params_name_the_field(
    served: Any, method: str, params: dict[str, Any], field: str
) -> None:
    r = await raw(served.socket_path)
    try:
        msg = await exchange(r, encode({"id": 1, "method": method, "params": params}))
        assert msg["error"]["code"] == "invalid_params"
        assert field in msg["error"]["message"]
        assert method in msg["error"]["message"]
        # same connection, next request fine
        assert (await exchange(r, encode({"id": 2, "method": "vm.list"})))["result"] == []
    finally:
        r.close()
    # and the typed error reaches a Client caller
    with pytest.raises(errors.InvalidParams):
        await call(served.socket_path, method, params)


async def test_oversize_request_is_refused_and_daemon_keeps_serving(served: Any) -> None:
    big = b'{"id": 1, "method": "vm.list", "params": {"x": "' + b"a" * (2 * MAX_REQUEST_BYTES)
    big += b'"}}\n'

    def go() -> tuple[dict[str, Any], bool]:
        r = Raw(served.socket_path)
        try:
            try:
                r.send(big)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server hung up before reading it all: expected
            return r.line(), r.at_eof()
        finally:
            r.close()

    msg, eof = await asyncio.to_thread(go)
    assert msg["error"]["code"] == "request_too_large"
    assert str(MAX_REQUEST_BYTES) in msg["error"]["message"]
    assert eof  # the out-of-sync connection is dropped
    # new connections are served
    assert await call(served.socket_path, "vm.list") == []
    await asyncio.sleep(0.05)
    assert not served.server._conns  # no connection task left behind


async def test_request_just_under_the_limit_is_accepted(served: Any) -> None:
    filler = "a" * (MAX_REQUEST_BYTES - 200)
    with pytest.raises(errors.InvalidParams, match="filler"):
        await call(served.socket_path, "vm.list", {"filler": filler})


async def test_handler_crash_is_internal_error_and_connection_survives(
    probe_served: Any,
) -> None:
    r = await raw(probe_served.socket_path)
    try:
        msg = await exchange(r, encode({"id": 1, "method": "test.boom"}))
        assert msg["error"]["code"] == "internal"
        assert "kaboom" in msg["error"]["message"]
        msg = await exchange(r, encode({"id": 2, "method": "test.unserialisable"}))
        assert msg["id"] == 2 and msg["error"]["code"] == "internal"
        assert (await exchange(r, encode({"id": 3, "method": "vm.list"})))["result"] == []
    finally:
        r.close()


async def test_peer_with_other_uid_is_refused(daemon_factory: Any) -> None:
    """The SO_PEERCRED check, without root: this process's uid is not in the allowed set."""
    d = daemon_factory()
    path = d.layout.runtime_dir / "other.sock"
    server = RPCServer(path, d.dispatch, allowed_uids={os.getuid() + 4242})
    await server.start()
    try:

        def go() -> tuple[dict[str, Any], bool]:
            r = Raw(path)
            try:
                try:
                    r.send(encode({"id": 1, "method": "vm.list"}))
                except BrokenPipeError:
                    pass  # refused before the server read anything: the error line is there
                return r.line(), r.at_eof()
            finally:
                r.close()

        msg, eof = await asyncio.to_thread(go)
        assert msg["error"]["code"] == "permission_denied"
        assert f"uid {os.getuid()}" in msg["error"]["message"]
        assert eof
        # the Client surfaces the refusal as a typed error, however the race went
        for _ in range(20):
            with pytest.raises(errors.PermissionDenied):
                await call(path, "vm.list")
    finally:
        await server.close()
    assert not path.exists()


# --- cancellation and progress ---------------------------------------------------------


async def test_client_disconnect_cancels_the_request(probe_served: Any) -> None:
    probe = probe_served.daemon.probe
    r = await raw(probe_served.socket_path)
    await asyncio.to_thread(r.send, encode({"id": 1, "method": "test.sleep"}))
    await asyncio.wait_for(probe.started.wait(), IO_TIMEOUT)
    r.close()
    await asyncio.wait_for(probe.cancelled.wait(), IO_TIMEOUT)
    assert not probe.finished
    # the server keeps serving, and dropped the dead connection
    assert await call(probe_served.socket_path, "vm.list") == []
    for _ in range(50):
        if not probe_served.server._conns:
            break
        await asyncio.sleep(0.01)
    assert not probe_served.server._conns


async def test_half_close_also_cancels(probe_served: Any) -> None:
    """EOF from the client (shutdown of its write side) counts as going away."""
    probe = probe_served.daemon.probe
    r = await raw(probe_served.socket_path)
    try:
        await asyncio.to_thread(r.send, encode({"id": 1, "method": "test.sleep"}))
        await asyncio.wait_for(probe.started.wait(), IO_TIMEOUT)
        r.sock.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(probe.cancelled.wait(), IO_TIMEOUT)
        assert await asyncio.to_thread(r.at_eof)
    finally:
        r.close()


async def test_server_close_cancels_inflight_requests(
    daemon_factory: Any,
) -> None:
    d = daemon_factory(cls=ProbeDaemon)
    d.probe = Probe()
    server = RPCServer(d.layout.socket_path, d.dispatch)
    await server.start()
    r = await raw(d.layout.socket_path)
    try:
        await asyncio.to_thread(r.send, encode({"id": 1, "method": "test.sleep"}))
        await asyncio.wait_for(d.probe.started.wait(), IO_TIMEOUT)
        await asyncio.wait_for(server.close(), IO_TIMEOUT)
        assert d.probe.cancelled.is_set()
        assert not d.layout.socket_path.exists()
    finally:
        r.close()


async def test_progress_streams_before_result(probe_served: Any) -> None:
    r = await raw(probe_served.socket_path)
    try:

        def go() -> list[dict[str, Any]]:
            r.send(encode({"id": 9, "method": "test.progress"}))
            return [r.line(), r.line(), r.line()]

        lines = await asyncio.to_thread(go)
    finally:
        r.close()
    assert lines[0] == {"id": 9, "progress": {"stage": "one", "message": "first stage"}}
    assert lines[1] == {"id": 9, "progress": {"stage": "two", "message": "second stage", "pct": 50}}
    assert lines[2] == {"id": 9, "result": {"done": True}}

    seen: list[dict[str, Any]] = []
    result = await call(probe_served.socket_path, "test.progress", progress=seen.append)
    assert [e["stage"] for e in seen] == ["one", "two"]
    assert result == {"done": True}


# --- client ----------------------------------------------------------------------------


def test_client_reports_daemon_not_running(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning):
        Client(tmp_path / "missing.sock")
    # a stale socket file nobody listens on
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    with pytest.raises(DaemonNotRunning, match="not running"):
        Client(stale)


async def test_server_replaces_stale_socket_file(daemon_factory: Any) -> None:
    d = daemon_factory()
    path = d.layout.socket_path
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    server = RPCServer(path, d.dispatch)
    await server.start()
    try:
        assert await call(path, "vm.list") == []
    finally:
        await server.close()


# --- issue 9 item 9: every bad frame gets an error line; idle and connection caps --------


def _strict_json(line: bytes) -> dict[str, Any]:
    """Parse as a strict peer would: NaN and Infinity are not JSON."""

    def no_constant(name: str) -> Any:
        raise AssertionError(f"server sent {name}, which is not JSON: {line[:200]!r}")

    msg: dict[str, Any] = json.loads(line, parse_constant=no_constant)
    return msg


class StrictRaw(Raw):
    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed with no error line; pending {self.buf[:200]!r}")
            self.buf += chunk
        ln, _, self.buf = self.buf.partition(b"\n")
        return _strict_json(ln)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        # Old: ValueError (int digit limit) escaped, the connection dropped, no error line.
        pytest.param(
            b'{"id": ' + b"1" * 4400 + b', "method": "vm.list"}\n',
            "not valid JSON",
            id="4400-digit id",
        ),
        # Old: echoed back; an id no 64-bit peer can hold.
        pytest.param(
            b'{"id": ' + b"1" * 4000 + b', "method": "vm.list"}\n',
            '"id" must be',
            id="4000-digit id",
        ),
        # Old: RecursionError, the connection dropped with no error line.
        pytest.param(b"[" * 100_000 + b"\n", "nests deeper", id="100k-deep list"),
        pytest.param(
            b'{"id": 1, "method": "vm.list", "params": {"a": ' + b"[" * 100_000 + b"}\n",
            "nests deeper",
            id="100k-deep params",
        ),
        pytest.param(
            b'{"id": 1, "method": "vm.list", "params": {"a": ' + b"[" * 200 + b"]" * 200 + b"}}\n",
            "nests deeper",
            id="200-deep params",
        ),
        # Old: `NaN` echoed as the id: the error line itself was not JSON.
        pytest.param(b'{"id": NaN, "method": "vm.list"}\n', "not valid JSON", id="NaN id"),
        pytest.param(
            b'{"id": -Infinity, "method": "vm.list"}\n', "not valid JSON", id="-Infinity id"
        ),
        pytest.param(b'{"id": [1], "method": "vm.list"}\n', '"id" must be', id="list id"),
        pytest.param(b'{"id": true, "method": "vm.list"}\n', '"id" must be', id="bool id"),
        pytest.param(b'{"id": 1.5, "method": "vm.list"}\n', '"id" must be', id="float id"),
        pytest.param(
            b'{"id": "' + b"x" * 300 + b'", "method": "vm.list"}\n',
            '"id" must be',
            id="long string id",
        ),
    ],
)
async def test_every_bad_frame_gets_an_error_line(
    served: Any, payload: bytes, fragment: str
) -> None:
    r = await asyncio.to_thread(StrictRaw, served.socket_path)
    try:
        msg = await exchange(r, payload)
        assert msg["id"] in (None, 1)  # null where no usable id could be read
        assert msg["error"]["code"] == "invalid_request"
        assert fragment in msg["error"]["message"], msg
        ok = await exchange(r, encode({"id": 2, "method": "vm.list"}))
        assert ok == {"id": 2, "result": []}
    finally:
        r.close()


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode({"id": 1, "result": float("nan")})


@pytest.fixture
async def short_idle(daemon_factory: Any) -> Any:
    d = daemon_factory(cls=ProbeDaemon)
    d.probe = Probe()
    server = RPCServer(d.layout.socket_path, d.dispatch, idle_timeout=0.3, max_connections=3)
    await server.start()
    yield server
    await server.close()


async def test_idle_connection_gets_an_error_line_and_is_closed(short_idle: RPCServer) -> None:
    """Old behaviour: no idle timeout, a silent client held its connection forever."""
    r = await asyncio.to_thread(StrictRaw, short_idle.socket_path)
    try:
        t0 = asyncio.get_running_loop().time()
        msg = await asyncio.to_thread(r.line)
        assert msg["id"] is None and msg["error"]["code"] == "timeout"
        assert "idle" in msg["error"]["message"]
        assert await asyncio.to_thread(r.at_eof)
        assert asyncio.get_running_loop().time() - t0 < 3.0
    finally:
        r.close()


async def test_slowloris_partial_line_is_cut(short_idle: RPCServer) -> None:
    """A client dribbling one byte at a time never completes a line: closed all the same."""
    r = await asyncio.to_thread(StrictRaw, short_idle.socket_path)

    def dribble() -> dict[str, Any]:
        import time

        for b in b'{"id": 1, "method": "vm.list"':
            try:
                r.send(bytes([b]))
            except OSError:
                break
            time.sleep(0.05)
        return r.line()

    try:
        msg = await asyncio.to_thread(dribble)
        assert msg["error"]["code"] == "timeout"
    finally:
        r.close()


async def test_long_request_is_never_cut_by_the_idle_timeout(short_idle: RPCServer) -> None:
    """A request that streams nothing for longer than the idle timeout runs to its end;
    the idle clock starts again only once it has answered."""
    r = await asyncio.to_thread(StrictRaw, short_idle.socket_path)
    try:
        msg = await exchange(r, encode({"id": 7, "method": "test.nap"}))
        assert msg == {"id": 7, "result": "napped"}
        # Back to idle: the connection now closes after the idle timeout.
        msg = await asyncio.to_thread(r.line)
        assert msg["error"]["code"] == "timeout"
    finally:
        r.close()


async def test_connection_cap(short_idle: RPCServer) -> None:
    """Old behaviour: no cap, every connection was accepted and kept."""
    conns = [await asyncio.to_thread(StrictRaw, short_idle.socket_path) for _ in range(3)]
    try:
        for c in conns:  # make sure each is being served
            assert (await exchange(c, encode({"id": 1, "method": "vm.list"})))["result"] == []
        extra = await asyncio.to_thread(StrictRaw, short_idle.socket_path)
        try:
            msg = await asyncio.to_thread(extra.line)
            assert msg["id"] is None and msg["error"]["code"] == "too_many_connections"
            assert "connections" in msg["error"]["message"]
            assert await asyncio.to_thread(extra.at_eof)
        finally:
            extra.close()
        conns.pop().close()
        for _ in range(100):
            if len(short_idle._conns) < 3:
                break
            await asyncio.sleep(0.01)
        again = await asyncio.to_thread(StrictRaw, short_idle.socket_path)
        try:
            assert (await exchange(again, encode({"id": 1, "method": "vm.list"})))["result"] == []
        finally:
            again.close()
    finally:
        for c in conns:
            c.close()


async def test_client_resends_when_the_server_is_at_its_cap(short_idle: RPCServer) -> None:
    """Refused at the cap (before the server read anything), the client resends with
    backoff and gets through once a slot frees; with no slot, it says why."""
    conns = [await asyncio.to_thread(StrictRaw, short_idle.socket_path) for _ in range(3)]
    for c in conns:
        assert (await exchange(c, encode({"id": 1, "method": "vm.list"})))["result"] == []

    def blocked() -> None:
        with Client(short_idle.socket_path, timeout=IO_TIMEOUT, connect_timeout=0.3) as cl:
            cl.call("vm.list")

    with pytest.raises(errors.TooManyConnections, match="its limit"):
        await asyncio.to_thread(blocked)

    def through() -> Any:
        with Client(short_idle.socket_path, timeout=IO_TIMEOUT, connect_timeout=5.0) as cl:
            return cl.call("vm.list")

    fut = asyncio.ensure_future(asyncio.to_thread(through))
    await asyncio.sleep(0.3)
    conns.pop().close()
    assert await asyncio.wait_for(fut, IO_TIMEOUT) == []
    for c in conns:
        c.close()


async def test_client_reconnects_after_an_idle_close(short_idle: RPCServer) -> None:
    def go() -> list[Any]:
        import time

        with Client(short_idle.socket_path, timeout=IO_TIMEOUT) as c:
            first = c.call("vm.list")
            time.sleep(0.8)  # the server closes the idle connection meanwhile
            return [first, c.call("vm.list")]

    assert await asyncio.to_thread(go) == [[], []]


# --- issue 9 item 8: connecting retries, then says why -------------------------------------


def _full_backlog(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, with its queue filled until connect() is EAGAIN."""
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(0)
    fillers = []
    for _ in range(64):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(str(path))
        except BlockingIOError:
            c.close()
            return lst, fillers
        fillers.append(c)
    raise AssertionError("the listen queue never filled")


def test_client_full_backlog_is_a_clear_error(tmp_path: Path) -> None:
    """Old behaviour: the timeout set before connect() made a full queue a raw
    BlockingIOError traceback (14 of 500 CLI calls in a burst)."""
    lst, fillers = _full_backlog(tmp_path / "s.sock")
    try:
        with pytest.raises(errors.Unavailable, match="listen queue stayed full") as ei:
            Client(tmp_path / "s.sock", connect_timeout=0.3)
        assert not isinstance(ei.value, DaemonNotRunning)
    finally:
        for c in fillers:
            c.close()
        lst.close()


def test_client_retries_until_the_queue_drains(tmp_path: Path) -> None:
    import threading
    import time

    lst, fillers = _full_backlog(tmp_path / "s.sock")

    def drain() -> None:
        time.sleep(0.3)
        for _ in range(len(fillers) + 2):
            try:
                lst.settimeout(0.5)
                lst.accept()[0].close()
            except OSError:
                return

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        c = Client(tmp_path / "s.sock", connect_timeout=5.0, timeout=1.0)
        assert c._sock.gettimeout() == 1.0  # the caller's timeout applies after connect
        c.close()
    finally:
        t.join(5)
        for f in fillers:
            f.close()
        lst.close()


def test_client_waits_for_a_starting_daemon(tmp_path: Path) -> None:
    """ENOENT / ECONNREFUSED while a daemon holds its lock means "starting": retry."""
    import threading
    import time

    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # refuses until the daemon replaces it
    stale.close()

    def come_up() -> socket.socket:
        time.sleep(0.3)
        path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(8)
        return s

    box: list[socket.socket] = []
    t = threading.Thread(target=lambda: box.append(come_up()), daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        Client(path, connect_timeout=5.0, daemon_starting=lambda: True).close()
        assert 0.2 < time.monotonic() - t0 < 4.0
    finally:
        t.join(5)
        for s in box:
            s.close()
    # No daemon holding the lock: "not running" at once, no waiting.
    path.unlink()
    t0 = time.monotonic()
    with pytest.raises(DaemonNotRunning):
        Client(path, connect_timeout=5.0, daemon_starting=lambda: False)
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(errors.Unavailable, match="is starting but did not answer"):
        Client(path, connect_timeout=0.3, daemon_starting=lambda: True)


def test_daemon_starting_reads_the_lock_files_pid(tmp_path: Path) -> None:
    """The CLI waits for a starting daemon only when the pid in the lock file is a live
    stokerd; it never takes the lock to find out (that could fail a daemon starting at
    that very moment)."""
    import subprocess
    import sys
    import time

    from stoker.cli.connect import daemon_starting
    from stoker.layout import Layout

    layout = Layout(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "r")
    layout.runtime_dir.mkdir(parents=True)
    assert not daemon_starting(layout)  # no lock file
    layout.lock_path.write_text("garbage")
    assert not daemon_starting(layout)
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "/usr/local/bin/stokerd"]
    )
    try:
        layout.lock_path.write_text(str(fake.pid))
        for _ in range(200):  # until the child has exec'd (its cmdline is set)
            if daemon_starting(layout):
                break
            time.sleep(0.01)
        assert daemon_starting(layout)
    finally:
        fake.kill()
        fake.wait()
    assert not daemon_starting(layout)  # that pid is gone
    other = subprocess.Popen(["sleep", "30"])
    try:
        for _ in range(200):  # until the child has exec'd sleep
            if Path(f"/proc/{other.pid}/cmdline").read_bytes().startswith(b"sleep"):
                break
            time.sleep(0.01)
        layout.lock_path.write_text(str(other.pid))
        assert not daemon_starting(layout)  # alive, but not a stokerd
    finally:
        other.kill()
        other.wait()
