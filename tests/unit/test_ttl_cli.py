"""`--ttl` through the CLI against an in-process daemon: set, shown in `vm list`, refused
when unparsable or not in the future."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stoker.cli.main import main
from stoker.cli.vm import time_left

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def no_autostart(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **kw: Any) -> None:
        raise AssertionError("a unit test tried to start stokerd")

    monkeypatch.setattr("stoker.cli.connect.start_daemon", refuse)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def add_vm(td: Any) -> None:
    from stoker.model.records import Image, VMRecord, VMSpec, VMState
    from stoker.store.db import now

    store = td.daemon.store
    store.upsert_image(Image("img", True, "/r", None, None, "test", 5 << 30, now()))
    store.insert_vm(
        VMRecord(
            id="web0123456789abcdef",
            name="web",
            state=VMState.STOPPED,
            image="img",
            spec=VMSpec(2, 2048, 8 << 30, 8 << 30),
            guest_ip="172.30.0.2",
            dns_name="web.vm",
            vm_dir="/nonexistent/web",
            created_at=now(),
            updated_at=now(),
        )
    )


def test_set_ttl_shows_in_list_and_clears(
    threaded_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    add_vm(threaded_daemon)
    rc, out, _ = run(capsys, "vm", "list")
    assert rc == 0 and out.splitlines()[1].split()[-1] == "-"
    rc, out, err = run(capsys, "vm", "set", "web", "--ttl", "2h")
    assert rc == 0, err
    assert out.startswith("web: TTL 1h59m") or out.startswith("web: TTL 2h00m")
    rc, out, _ = run(capsys, "vm", "list")
    assert out.splitlines()[1].split()[-1] in ("1h59m", "2h00m")
    rc, out, _ = run(capsys, "vm", "list", "--json")
    assert json.loads(out)[0]["expires_at"].endswith("Z")
    rc, out, _ = run(capsys, "vm", "set", "web", "--ttl", "none")
    assert rc == 0 and "TTL -" in out
    rc, out, _ = run(capsys, "vm", "list", "--json")
    assert json.loads(out)[0]["expires_at"] is None


def test_bad_ttls_are_refused(threaded_daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    add_vm(threaded_daemon)
    for bad in ("soon", "-5m", "0", "1y"):
        rc, _, err = run(capsys, "vm", "set", "web", f"--ttl={bad}")
        assert rc == 2 and "not a duration" in err, (bad, err)
    rc, _, err = run(capsys, "vm", "set", "web", "--ttl", "400d")
    assert rc == 1 and "at most 365 days" in err
    rc, _, err = run(capsys, "vm", "create", "--ttl", "later")
    assert rc == 2 and "not a duration" in err
    rc, _, err = run(capsys, "vm", "run", "--rm", "--ttl", "x", "--", "true")
    assert rc == 125 and "not a duration" in err


def test_time_left_format() -> None:
    from datetime import UTC, datetime, timedelta

    def at(s: float) -> str:
        return (datetime.now(UTC) + timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    assert time_left(None) == "-"
    assert time_left(at(-1)) == "expired"
    assert time_left(at(90.5)) == "1m30s"
    assert time_left(at(3 * 86400 + 5)) == "3d00h"
