"""The CLI in process: parsing, rendering, errors, and talking to an in-process daemon.

No stokerd process is started here: `start_daemon` is replaced by a failure, and the
commands that need a daemon talk to a hand-built one served from a thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stoker import __version__
from stoker.cli import completion
from stoker.cli.main import build_parser, main
from stoker.layout import Layout

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def no_autostart(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **kw: Any) -> None:
        raise AssertionError("a unit test tried to start stokerd")

    monkeypatch.setattr("stoker.cli.connect.start_daemon", refuse)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def insert_vm(td: Any, name: str = "web") -> None:
    from stoker.model.records import Image, VMRecord, VMSpec, VMState
    from stoker.store.db import now

    store = td.daemon.store
    if store.get_image("img") is None:
        store.upsert_image(Image("img", True, "/r", None, None, "test", 5 << 30, now()))
    store.insert_vm(
        VMRecord(
            id=f"{name}0123456789abcdef",
            name=name,
            state=VMState.STOPPED,
            image="img",
            spec=VMSpec(2, 2048, 8 << 30, 8 << 30),
            guest_ip="172.30.0.2",
            dns_name=f"{name}.vm",
            vm_dir=f"/nonexistent/{name}",
            created_at=now(),
            updated_at=now(),
            last_error="it broke",
        )
    )


# --- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["version"],
        ["version", "--json"],
        ["daemon", "status"],
        ["daemon", "status", "--json"],
        ["daemon", "stop"],
        ["doctor"],
        ["doctor", "--json"],
        ["vm", "list"],
        ["vm", "list", "--json"],
        ["vm", "ls"],
        ["ps"],
        ["ps", "--json"],
        ["vm", "show", "web"],
        ["image", "list", "--json"],
        ["image", "ls"],
        ["kernel", "list", "--json"],
        ["completion", "bash"],
        ["completion", "zsh"],
        ["completion", "fish"],
        ["--config", "/x.toml", "vm", "list"],
        ["--system", "daemon", "status"],
    ],
)
def test_documented_commands_parse(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys)
    assert rc == 2
    assert "usage: stoker" in err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_ps_and_vm_list_share_the_handler() -> None:
    ap = build_parser()
    assert ap.parse_args(["ps"]).func is ap.parse_args(["vm", "list"]).func


# --- without a daemon (never started by these commands) --------------------------------


def test_daemon_status_when_not_running(
    isolated_env: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "daemon", "status", "--json")
    assert rc == 1
    st = json.loads(out)
    assert st == {"running": False, "socket": str(isolated_env.socket_path)}
    rc, out, _ = run(capsys, "daemon", "status")
    assert rc == 1 and "not running" in out
    assert not isolated_env.socket_path.exists()


def test_daemon_stop_when_not_running(
    isolated_env: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "daemon", "stop")
    assert rc == 0 and "not running" in out


def test_version_without_daemon(isolated_env: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "version", "--json")
    assert rc == 0
    assert json.loads(out) == {"cli": __version__, "daemon": None}
    rc, out, _ = run(capsys, "version")
    assert f"stoker {__version__}" in out and "not running" in out


def test_names_helper_is_quiet_without_daemon(
    isolated_env: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    for kind in ("vm", "image", "kernel"):
        rc, out, err = run(capsys, "__names", kind)
        assert (rc, out, err) == (0, "", "")


def test_vm_list_system_mode_does_not_autostart(
    isolated_env: Layout, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A system install's daemon belongs to systemd: the CLI says so instead of spawning."""
    from stoker.cli import connect

    e = isolated_env
    system_layout = Layout(e.config_dir, e.state_dir, e.cache_dir, e.runtime_dir, system=True)
    monkeypatch.setattr(connect, "layout_for", lambda a: system_layout)
    rc, _, err = run(capsys, "--system", "vm", "list")
    assert rc == 1
    assert err.count("\n") == 1 and "systemctl start stokerd" in err


# --- config errors surface as one line naming the key ----------------------------------


def test_invalid_config_names_the_key(
    isolated_env: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    isolated_env.config_dir.mkdir(parents=True)
    isolated_env.config_file.write_text('[vm_defaults]\nvcpu = "many"\n')
    rc, out, err = run(capsys, "doctor")
    assert rc == 1 and out == ""
    assert err.startswith("stoker: ") and err.count("\n") == 1
    assert "'vm_defaults.vcpu'" in err and str(isolated_env.config_file) in err


def test_explicit_missing_config_is_an_error(
    isolated_env: Layout, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, _, err = run(capsys, "--config", "/nonexistent/stoker.toml", "doctor")
    assert rc == 1 and "/nonexistent/stoker.toml does not exist" in err
    monkeypatch.setenv("STOKER_CONFIG", "/nonexistent/env.toml")
    rc, _, err = run(capsys, "doctor")
    assert rc == 1 and "/nonexistent/env.toml does not exist" in err


# --- with an (in-process) daemon -------------------------------------------------------


def test_vm_list_json_and_table(threaded_daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "vm", "list", "--json")
    assert rc == 0 and json.loads(out) == []
    rc, out, _ = run(capsys, "vm", "list")
    assert rc == 0 and "no VMs" in out

    insert_vm(threaded_daemon)
    rc, out, _ = run(capsys, "vm", "list", "--json")
    vms = json.loads(out)
    assert [v["name"] for v in vms] == ["web"]
    rc2, out2, _ = run(capsys, "ps", "--json")
    assert rc2 == 0 and json.loads(out2) == vms

    rc, out, _ = run(capsys, "ps")
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "STATE",
        "IMAGE",
        "IP",
        "VCPU/MEM",
        "WORKSPACE",
        "AGE",
        "TTL",
    ]
    assert lines[1].split()[:5] == ["web", "stopped", "img", "172.30.0.2", "2/2048M"]


def test_vm_show(threaded_daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    insert_vm(threaded_daemon)
    rc, out, _ = run(capsys, "vm", "show", "web")
    assert rc == 0
    assert "name:       web" in out
    assert "2 vcpu · 2048 MiB · 8G disk" in out
    assert "last error: it broke" in out
    rc, out, _ = run(capsys, "vm", "show", "web0123", "--json")
    assert json.loads(out)["id"] == "web0123456789abcdef"


def test_errors_are_one_line_on_stderr(
    threaded_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, "vm", "show", "nope")
    assert rc == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("stoker: VM 'nope' not found")


def test_image_and_kernel_lists(threaded_daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    for group in ("image", "kernel"):
        rc, out, _ = run(capsys, group, "list", "--json")
        assert rc == 0 and json.loads(out) == []
        rc, out, _ = run(capsys, group, "list")
        assert rc == 0 and f"no {group}s" in out
    insert_vm(threaded_daemon)  # adds image "img"
    rc, out, _ = run(capsys, "image", "list")
    assert out.splitlines()[0].split()[:3] == ["NAME", "KERNEL", "SIZE"]
    assert out.splitlines()[1].split()[:3] == ["img", "-", "5G"]


def test_daemon_status_and_version(
    threaded_daemon: Any, isolated_env: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "daemon", "status", "--json")
    st = json.loads(out)
    assert rc == 0 and st["running"] is True
    assert st["pid"] == os.getpid()  # the in-process daemon
    assert st["socket"] == str(isolated_env.socket_path)
    rc, out, _ = run(capsys, "daemon", "status")
    assert rc == 0 and f"pid {os.getpid()}" in out and "socket:" in out
    rc, out, _ = run(capsys, "version", "--json")
    assert json.loads(out) == {"cli": __version__, "daemon": __version__}


def test_names_helper_lists_live_names(
    threaded_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    insert_vm(threaded_daemon)
    assert run(capsys, "__names", "vm") == (0, "web\n", "")
    assert run(capsys, "__names", "image") == (0, "img\n", "")


def test_doctor_sees_the_daemon(threaded_daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert checks["daemon"]["status"] == "PASS"
    assert str(os.getpid()) in checks["daemon"]["message"]
    assert rc == (1 if any(c["status"] == "FAIL" for c in checks.values()) else 0)


# --- completion ------------------------------------------------------------------------


def test_completion_scripts_use_the_parser_backend() -> None:
    # The shells ask `stoker __complete` (driven through each shell in
    # test_completion_shells.py); the scripts themselves hold no command lists to go stale.
    for shell in ("bash", "zsh", "fish"):
        script = completion.script(shell)
        assert "stoker __complete " + shell in script
        assert "__names" not in script


def test_completion_command_prints_script(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "completion", "bash")
    assert rc == 0 and out == completion.script("bash")


# --- import weight ---------------------------------------------------------------------


def test_cli_import_stays_light() -> None:
    """`stoker vm list` runs on every keystroke of a loop: no daemon-side imports."""
    code = (
        "import sys; import stoker.cli.main as m; m.build_parser(); "
        "import stoker.cli.connect, stoker.rpc.client; "
        "print(' '.join(sorted(sys.modules)))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    mods = set(r.stdout.split())
    heavy = {"pydantic", "asyncio", "sqlite3", "aiohttp", "asyncssh", "pyroute2", "stoker.daemon"}
    assert not heavy & mods, heavy & mods


def test_vm_list_start_up_imports_no_typing_shutil_or_datetime(tmp_path: Path) -> None:
    """The start-up budget (issue 15: < 3x a bare interpreter): `typing`, `shutil` (with
    zlib, bz2, lzma: argparse's terminal width) and `datetime` stay off `vm list`'s path."""
    code = (
        "import sys; import stoker.cli.main as m\n"
        "try:\n    m.main(['vm', 'list', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)"
    )
    env = {**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "s")}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )
    assert "usage: stoker vm list" in r.stdout, r.stderr
    mods = set(r.stderr.split())
    assert not {"typing", "shutil", "datetime", "zlib"} & mods, r.stderr
