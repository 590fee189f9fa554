"""Exec protocol pieces without processes: guest frame parsing and validation, the host
demultiplexer against a hostile guest, exit-status rules and the CLI's command-line helpers."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stoker.cli.vm import command_line, parse_duration, ssh_command
from stoker.daemon.agent import AgentProtocolError, ExitStatus, UnixTransport, execchan
from stoker.daemon.agent.execchan import ExecSpec
from stoker.guest.agent import stoker_agent as sa

pytestmark = pytest.mark.unit


# --- guest: frames in the request parser ----------------------------------------------------


def test_frames_are_told_apart_from_requests() -> None:
    p = sa.RequestParser()
    out = p.feed(b'\n{"t":"ping","seq":1}\nGET /healthz HTTP/1.1\r\n\r\n{"t":"x"}\n')
    assert [type(o).__name__ for o in out] == ["Frame", "Request", "Frame"]
    assert isinstance(out[0], sa.Frame) and json.loads(out[0].raw) == {"t": "ping", "seq": 1}


def test_a_frame_may_exceed_max_line_but_not_max_frame() -> None:
    p = sa.RequestParser()
    big = b'{"t":"stdin","d":"' + b"A" * (sa.MAX_LINE * 4) + b'"}\n'
    out = p.feed(big)
    assert len(out) == 1 and isinstance(out[0], sa.Frame)
    huge = b"{" + b"A" * (sa.MAX_FRAME + 10)
    out = p.feed(huge)
    assert out == [] and len(p._buf) <= sa.MAX_FRAME + 1
    out = p.feed(b"tail\nGET /x HTTP/1.1\n\n")
    assert isinstance(out[0], sa.BadRequest) and "too long" in out[0].reason
    assert isinstance(out[1], sa.Request)


def test_a_brace_inside_a_request_is_a_bad_header_not_a_frame() -> None:
    p = sa.RequestParser()
    out = p.feed(b'GET /healthz HTTP/1.1\r\n{"t":"ping"}\r\n\r\n')
    assert isinstance(out[0], sa.BadRequest)


class Recorder:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def write(self, data: bytes) -> bool:
        assert data.startswith(b"\n") and data.endswith(b"\n") and data.count(b"\n") == 2
        self.frames.append(json.loads(data))
        return True


def handle(raw: bytes) -> list[dict[str, Any]]:
    rec = Recorder()
    sa.Agent().handle_frame(sa.Session(rec.write), sa.Frame(raw))
    return rec.frames


def test_ping_pong_and_bad_frames_get_answers_not_crashes() -> None:
    pong = handle(b'{"t":"ping","seq":4}')[0]
    assert pong["t"] == "pong" and pong["seq"] == 4 and pong["execs"] == [] and pong["agent"]
    assert handle(b"{not json")[0]["t"] == "error"
    assert handle(b"[1,2]")[0]["t"] == "error"
    assert "valid id" in handle(b'{"t":"ack","id":"../../x"}')[0]["error"]
    assert handle(b'{"t":"ack","id":"abc","n":5}') == [{"t": "gone", "id": "abc"}]
    assert handle(b'{"t":"kill","id":"abc"}') == []  # nothing to kill, nothing to say
    assert "unknown frame type" in handle(b'{"t":"frob","id":"abc"}')[0]["error"]


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        ({}, "give argv"),
        ({"argv": []}, "give argv"),
        ({"argv": ["a\0b"]}, "give argv"),
        ({"argv": "ls"}, "give argv"),
        ({"shell": ""}, "shell must be"),
        ({"argv": ["true"], "cwd": "relative"}, "absolute"),
        ({"argv": ["true"], "env": {"A=B": "1"}}, "bad environment"),
        ({"argv": ["true"], "env": {"A": 1}}, "bad environment"),
        ({"argv": ["true"], "env": []}, "env must be"),
        ({"argv": ["true"], "timeout": 0}, "timeout"),
        ({"argv": ["true"], "timeout": True}, "timeout"),
        ({"argv": ["true"], "user": "no-such-user-xyz"}, "no user"),
    ],
)
def test_invalid_exec_requests_are_refused_with_a_reason(msg: dict[str, Any], why: str) -> None:
    frame = json.dumps({"t": "exec", "id": "e1", **msg}).encode()
    out = handle(frame)
    assert len(out) == 1 and out[0]["t"] == "exit" and out[0]["kind"] == "invalid"
    assert why in out[0]["error"] and out[0]["code"] is None


def test_shell_lines_use_bash_login_when_present() -> None:
    spec = sa.ExecSpec({"shell": "echo hi"})
    assert spec.argv[1:] == ["-lc", "echo hi"] or spec.argv[1:] == ["-c", "echo hi"]
    assert spec.env["LANG"] == "C.UTF-8" and spec.env["TERM"] == "dumb"
    assert spec.env["PATH"] == sa.DEFAULT_PATH


# --- host: exit status ------------------------------------------------------------------------


def test_exit_status_convention() -> None:
    assert ExitStatus(7, None).exit_code == 7
    assert ExitStatus(None, 9).exit_code == 137
    assert ExitStatus(None, 15, timed_out=True).exit_code == 124


# --- host: a hostile guest ---------------------------------------------------------------------


class FakeGuest:
    """A unix server that answers an exec frame with whatever the test scripts."""

    def __init__(self, script: list[dict[str, Any] | bytes]) -> None:
        self.script = script
        self.received: list[dict[str, Any]] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while line := await r.readline():
            if not line.strip():
                continue
            msg = json.loads(line)
            self.received.append(msg)
            if msg.get("t") == "exec":
                for item in self.script:
                    if isinstance(item, bytes):
                        w.write(item)
                    else:
                        w.write(b"\n" + json.dumps({"id": msg["id"], **item}).encode() + b"\n")
                await w.drain()


@pytest.fixture
async def sock(tmp_path: Path) -> AsyncIterator[Path]:
    yield Path("/tmp") / f"stkfg{abs(hash(tmp_path)) % 10**8}.sock"


async def run_against(path: Path, script: list[dict[str, Any] | bytes]) -> Any:
    guest = FakeGuest(script)
    server = await asyncio.start_unix_server(guest.handle, str(path))
    try:
        t = UnixTransport(path)
        ch = await t.exec_channel()
        s = await ch.open_exec(ExecSpec(argv=["x"]))
        try:
            out = b""
            async with asyncio.timeout(5):
                await s.wait_started()
                async for _, data in s.output():
                    out += data
            return out, s.status, guest.received
        finally:
            await t.close()
    finally:
        server.close()
        path.unlink(missing_ok=True)


def out(fd: int, off: int, data: bytes) -> dict[str, Any]:
    return {"t": "out", "fd": fd, "o": off, "d": base64.b64encode(data).decode()}


async def test_well_behaved_guest(sock: Path) -> None:
    data, st, _ = await run_against(
        sock,
        [
            {"t": "started", "pid": 1, "agent": "a"},
            out(1, 0, b"hi"),
            out(1, 2, b"!"),
            {"t": "exit", "code": 3},
        ],
    )
    assert data == b"hi!" and st.exit_code == 3


async def test_lost_output_is_detected_not_passed_on(sock: Path) -> None:
    with pytest.raises(AgentProtocolError, match="lost"):
        await run_against(sock, [{"t": "started"}, out(1, 0, b"ab"), out(1, 5, b"cd")])


async def test_window_overrun_cuts_the_session(sock: Path) -> None:
    chunk = b"x" * 32768
    script: list[dict[str, Any] | bytes] = [{"t": "started"}]
    script += [out(1, i * len(chunk), chunk) for i in range(12)]  # 384 KiB, never acked
    guest = FakeGuest(script)
    server = await asyncio.start_unix_server(guest.handle, str(sock))
    try:
        t = UnixTransport(sock)
        s = await (await t.exec_channel()).open_exec(ExecSpec(argv=["x"]))
        await asyncio.sleep(0.5)  # the consumer reads nothing: no acks go out
        with pytest.raises(AgentProtocolError, match="flow-control window"):
            async with asyncio.timeout(5):
                async for _ in s.output():
                    pass
        await asyncio.sleep(0.1)
        assert {"t": "kill", "id": s.id} in guest.received
        await t.close()
    finally:
        server.close()
        sock.unlink(missing_ok=True)


async def test_garbage_and_bad_base64_from_the_guest(sock: Path) -> None:
    with pytest.raises(AgentProtocolError, match="base64"):
        await run_against(
            sock,
            [
                b"\x00\xffjunk\n{broken json\n",
                {"t": "started"},
                {"t": "out", "fd": 1, "o": 0, "d": "!!"},
            ],
        )
    with pytest.raises(AgentProtocolError, match="malformed"):
        await run_against(sock, [{"t": "started"}, {"t": "out", "fd": 7, "o": 0, "d": ""}])


async def test_a_refusal_is_an_error_with_the_reason(sock: Path) -> None:
    with pytest.raises(execchan.ExecRefused, match="working directory /x does not exist"):
        await run_against(
            sock,
            [
                {
                    "t": "exit",
                    "code": None,
                    "kind": "cwd",
                    "error": "working directory /x does not exist",
                }
            ],
        )


# --- CLI helpers ------------------------------------------------------------------------------


def test_command_line_rule() -> None:
    assert command_line(["echo hi > /root/f"]) == "echo hi > /root/f"
    assert command_line(["ls", "my file"]) == "ls 'my file'"
    assert command_line(["exit", "7"]) == "exit 7"


def test_parse_duration() -> None:
    assert parse_duration("30", "--timeout") == 30
    assert parse_duration("1.5s", "--timeout") == 1.5
    assert parse_duration("5m", "--timeout") == 300
    assert parse_duration("2h", "--ttl") == 7200
    assert parse_duration("1d", "--ttl") == 86400
    for bad in ("", "0", "-1", "abc", "5x", "nan", "inf", "m"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad, "--timeout")


def test_ssh_command_runs_the_line_like_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    monkeypatch.delenv("TERM", raising=False)
    remote = ssh_command('echo "$LANG $TERM $X"; pwd; exit 4', "/tmp", {"X": "a b"})
    r = subprocess.run(["sh", "-c", remote], capture_output=True, text=True)
    assert r.returncode == 4 and r.stdout == "C.UTF-8 dumb a b\n/tmp\n"
    r = subprocess.run(["sh", "-c", ssh_command("true", "/no/such/dir", {})], capture_output=True)
    assert r.returncode == 125
