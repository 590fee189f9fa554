"""The guest agent program in pieces: its parser, /proc readers, responses, packaging."""

from __future__ import annotations

import ast
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from stoker.guest.agent import GUEST_PATH, UNIT_NAME, agent_script
from stoker.guest.agent import stoker_agent as sa

pytestmark = pytest.mark.unit

FILES = Path(agent_script()).parents[3]  # .../stoker/guest/files


# --- request parser ---------------------------------------------------------------------


def test_parses_request_with_id_and_leading_blank_lines() -> None:
    p = sa.RequestParser()
    out = p.feed(b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nX-Stoker-Id: abc123\r\n\r\n")
    assert len(out) == 1
    req = out[0]
    assert isinstance(req, sa.Request)
    assert (req.method, req.path, req.request_id) == ("GET", "/healthz", "abc123")


def test_parser_handles_bytes_split_anywhere() -> None:
    data = b"GET /ports HTTP/1.1\nX-Stoker-Id: q1\n\nGET /stats HTTP/1.1\r\n\r\n"
    p = sa.RequestParser()
    out: list[sa.Request | sa.BadRequest] = []
    for i in range(len(data)):
        out += p.feed(data[i : i + 1])
    assert [(r.path, r.request_id) for r in out if isinstance(r, sa.Request)] == [
        ("/ports", "q1"),
        ("/stats", None),
    ]
    assert len(out) == 2


def test_garbage_line_is_an_error_and_the_next_request_still_parses() -> None:
    p = sa.RequestParser()
    out = p.feed(b"\x00\xff garbage here\r\nGET /healthz HTTP/1.1\r\nX-Stoker-Id: z\r\n\r\n")
    assert isinstance(out[0], sa.BadRequest)
    assert out[0].request_id is None
    assert isinstance(out[1], sa.Request) and out[1].request_id == "z"


def test_echoed_response_lines_are_ignored_silently() -> None:
    # A channel that echoes would otherwise make every 400 answer provoke another one.
    p = sa.RequestParser()
    assert p.feed(b"HTTP/1.1 400 Bad Request\r\n") == []


def test_overlong_line_is_dropped_without_buffering_it() -> None:
    p = sa.RequestParser()
    out: list[sa.Request | sa.BadRequest] = []
    for _ in range(200):  # 200 * 64 KiB without a newline
        out += p.feed(b"A" * 65536)
        assert len(p._buf) <= sa.MAX_LINE + 65536
    out += p.feed(b"tail\nGET /healthz HTTP/1.1\n\n")
    assert isinstance(out[0], sa.BadRequest) and "too long" in out[0].reason
    assert isinstance(out[1], sa.Request)


def test_truncated_request_is_reported_and_the_new_one_wins() -> None:
    p = sa.RequestParser()
    out = p.feed(b"GET /ports HTTP/1.1\r\nX-Stoker-Id: old\r\nGET /healthz HTTP/1.1\r\n\r\n")
    assert isinstance(out[0], sa.BadRequest) and out[0].request_id == "old"
    assert isinstance(out[1], sa.Request) and out[1].path == "/healthz"


def test_too_many_headers_and_bad_header_lines_are_errors() -> None:
    p = sa.RequestParser()
    many = b"".join(b"H%d: v\r\n" % i for i in range(sa.MAX_HEADERS + 1))
    out = p.feed(b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n")
    assert isinstance(out[0], sa.BadRequest) and "too many" in out[0].reason
    out = p.feed(b"GET /healthz HTTP/1.1\r\nno colon here\r\n")
    assert isinstance(out[0], sa.BadRequest)


def test_reset_forgets_partial_input() -> None:
    p = sa.RequestParser()
    assert p.feed(b"GET /healthz HTTP/1.1\r\nX-Sto") == []
    p.reset()
    out = p.feed(b"GET /stats HTTP/1.1\r\n\r\n")
    assert len(out) == 1 and isinstance(out[0], sa.Request) and out[0].path == "/stats"


def test_request_id_must_be_a_safe_token() -> None:
    p = sa.RequestParser()
    out = p.feed(b"GET /healthz HTTP/1.1\r\nX-Stoker-Id: a b\r\n\r\n")
    assert isinstance(out[0], sa.Request) and out[0].request_id is None


# --- responses --------------------------------------------------------------------------


def test_response_body_is_one_line_whatever_the_strings_hold() -> None:
    payload = {"hostname": "evil\nHTTP/1.1 200 OK\r\n\u2028é", "x": [1, 2.5]}
    data = sa.render_response(200, payload, "id1", lead=True)
    assert data.startswith(b"\r\nHTTP/1.1 200 OK\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"X-Stoker-Id: id1" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert length == len(body)
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and b"\r" not in body
    assert json.loads(body) == payload


def test_agent_routes() -> None:
    agent = sa.Agent()
    assert agent.handle(sa.Request("GET", "/nope"))[0] == 404
    assert agent.handle(sa.Request("POST", "/healthz"))[0] == 405
    status, health = agent.handle(sa.Request("GET", "/healthz?x=1"))
    assert status == 200 and health["ok"] is True
    assert health["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_a_failing_endpoint_answers_500_not_a_crash(tmp_path: Path) -> None:
    agent = sa.Agent(proc=str(tmp_path))  # no /proc files there at all
    status, payload = agent.handle(sa.Request("GET", "/stats"))
    assert status == 500 and "error" in payload


# --- /proc readers ----------------------------------------------------------------------


def test_decode_address() -> None:
    assert sa.decode_address("0100007F:1F90", False) == ("127.0.0.1", 8080)
    assert sa.decode_address("00000000:0016", False) == ("0.0.0.0", 22)
    assert sa.decode_address("00000000000000000000000000000000:0050", True) == ("::", 80)
    assert sa.decode_address("00000000000000000000000001000000:0035", True) == ("::1", 53)
    with pytest.raises(ValueError):
        sa.decode_address("0100:0016", False)


TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2222 1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3333 1
   3: garbage
"""
UDP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
  10: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4444 2
  11: 0100007F:D431 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 5555 2
"""


def test_parse_net_table_keeps_listeners_only() -> None:
    tcp = sa.parse_net_table(TCP, "tcp", False)
    assert [(s.addr, s.port, s.inode) for s in tcp] == [
        ("127.0.0.1", 8080, 1111),
        ("0.0.0.0", 22, 3333),
    ]
    udp = sa.parse_net_table(UDP, "udp", False)
    assert [(s.addr, s.port, s.inode) for s in udp] == [("0.0.0.0", 53, 4444)]


def _fake_proc(root: Path) -> None:
    (root / "net").mkdir(parents=True)
    (root / "net" / "tcp").write_text(TCP)
    (root / "net" / "udp").write_text(UDP)
    # no tcp6/udp6: a kernel without IPv6
    for pid, comm, links in (
        (42, "nginx", ["socket:[3333]", "/dev/null"]),
        (77, "dnsmasq", ["socket:[4444]", "pipe:[9]"]),
        (99, "self", ["socket:[1111]"]),
        (120, "nginx-worker", ["socket:[3333]"]),
    ):
        fd = root / str(pid) / "fd"
        fd.mkdir(parents=True)
        for i, target in enumerate(links):
            os.symlink(target, fd / str(i))
        (root / str(pid) / "comm").write_text(comm + "\n")
        (root / str(pid) / "cmdline").write_bytes(comm.encode() + b"\0--flag\0")


def test_listening_ports_maps_processes_and_excludes_the_agent(tmp_path: Path) -> None:
    _fake_proc(tmp_path)
    ports = sa.listening_ports(str(tmp_path), exclude_pid=99)
    assert ports == [
        {"proto": "tcp", "addr": "0.0.0.0", "port": 22, "pid": 42, "process": "nginx",
         "cmdline": "nginx --flag"},
        {"proto": "udp", "addr": "0.0.0.0", "port": 53, "pid": 77, "process": "dnsmasq",
         "cmdline": "dnsmasq --flag"},
    ]  # fmt: skip
    with_agent = sa.listening_ports(str(tmp_path))
    assert {(p["port"], p["pid"]) for p in with_agent} == {(22, 42), (53, 77), (8080, 99)}


def test_meminfo_loadavg_cpu(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(
        "MemTotal:  1000 kB\nMemAvailable: 600 kB\nHugePages_Total: 0\n"
    )
    (tmp_path / "loadavg").write_text("0.50 0.25 0.10 3/123 4567\n")
    (tmp_path / "stat").write_text("cpu  10 1 5 100 2 0 1 0 0 0\ncpu0 10 1 5 100 2 0 1 0 0 0\n")
    assert sa.meminfo(str(tmp_path)) == {
        "MemTotal": 1024000,
        "MemAvailable": 614400,
        "HugePages_Total": 0,
    }
    assert sa.loadavg(str(tmp_path)) == ([0.5, 0.25, 0.1], 3, 123)
    assert sa.cpu_times(str(tmp_path))["system"] == 5


def test_activity_tracker_marks_busy_only_above_threshold(tmp_path: Path) -> None:
    stat_file = tmp_path / "stat"
    tr = sa.ActivityTracker(str(tmp_path))
    tr._ncpu = 1

    def put(busy: int, idle: int) -> None:
        stat_file.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0\n")

    put(0, 1000)
    tr.sample()
    put(1, 2000)  # 0.1% busy
    tr.sample()
    assert tr.busy_age() is None
    put(501, 2500)  # 50% busy
    tr.sample()
    age = tr.busy_age()
    assert age is not None and age < 1.0


def test_newest_login_time(tmp_path: Path) -> None:
    a, b = tmp_path / "utmp", tmp_path / "wtmp"
    a.write_text("")
    b.write_text("")
    os.utime(a, (1000, 1000))
    os.utime(b, (2000, 2000))
    pts = tmp_path / "pts"
    pts.mkdir()
    (pts / "0").write_text("")
    os.utime(pts / "0", (3000, 1500))
    (pts / "ptmx").write_text("")
    assert sa.newest_login_time([str(a), str(b)], str(pts)) == 3000
    assert sa.newest_login_time([str(tmp_path / "missing")], str(tmp_path / "nopts")) is None


def test_find_serial_device_falls_back_to_sysfs(tmp_path: Path) -> None:
    sysdir = tmp_path / "virtio-ports"
    (sysdir / "vport0p1").mkdir(parents=True)
    (sysdir / "vport0p1" / "name").write_text("org.qemu.guest_agent.0\n")
    (sysdir / "vport0p2").mkdir()
    (sysdir / "vport0p2" / "name").write_text("org.stoker.agent\n")
    # /dev/vport0p2 does not exist on this host, so nothing usable is found
    assert sa.find_serial_device(str(sysdir)) is None
    assert sa.find_serial_device(str(tmp_path / "none")) is None


# --- packaging --------------------------------------------------------------------------


def test_shipped_agent_is_an_executable_stdlib_only_python3_script() -> None:
    path = agent_script()
    assert path.is_file() and str(path).endswith(GUEST_PATH)
    assert path.stat().st_mode & stat.S_IXUSR
    text = path.read_text()
    assert text.startswith("#!/usr/bin/python3\n")
    tree = ast.parse(text)
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots - sys.stdlib_module_names == {"__future__"} - sys.stdlib_module_names
    assert "stoker" not in roots


def test_the_module_is_the_shipped_file() -> None:
    # stoker_agent.py is a symlink, so what mypy/ruff/tests check is what ships.
    assert Path(sa.__file__).resolve() == agent_script().resolve()


def test_unit_and_its_enablement_ship() -> None:
    unit = (FILES / "usr/lib/systemd/system" / UNIT_NAME).read_text()
    assert f"ExecStart=/usr/bin/python3 -I -S {GUEST_PATH}" in unit
    assert "ConditionPathExists=/usr/bin/python3" in unit
    assert "Restart=always" in unit
    dropin = (FILES / "usr/lib/systemd/system/sysinit.target.d/stoker-agent.conf").read_text()
    assert f"Wants={UNIT_NAME}" in dropin


def test_sshd_running_reads_the_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "sshd.pid"
    assert sa.sshd_running(pidfile=str(pidfile)) is False
    pidfile.write_text(f"{os.getpid()}\n")
    assert sa.sshd_running(pidfile=str(pidfile)) is True
    pidfile.write_text("999999999\n")  # above pid_max: never a live process
    assert sa.sshd_running(pidfile=str(pidfile)) is False
    pidfile.write_text("garbage")
    assert sa.sshd_running(pidfile=str(pidfile)) is False
