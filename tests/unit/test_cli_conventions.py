"""Scripting conventions (issue 15): --version, -q, --format, --debug, usage errors exit 2
with the subcommand's own usage, hidden helpers kept out of messages, --help complete,
no escape sequences off a terminal, the man page, the systemd unit printer, doctor hints."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stoker import __version__
from stoker.cli.main import build_parser, main
from stoker.layout import Layout

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def no_autostart(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **kw: Any) -> None:
        raise AssertionError("a unit test tried to start stokerd")

    monkeypatch.setattr("stoker.cli.connect.start_daemon", refuse)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def filled(threaded_daemon: Any) -> Any:
    """Two VMs, an image and a kernel in an in-process daemon."""
    from stoker.model.records import Image, Kernel, VMRecord, VMSpec, VMState, Workspace
    from stoker.store.db import now

    store = threaded_daemon.daemon.store
    store.upsert_kernel(
        Kernel("kern", "6.1", "x86_64", "/k", None, "/k/bz", None, None, "test", now())
    )
    store.upsert_image(Image("img", True, "/r", None, "kern", "test", 5 << 30, now()))
    for i, name in enumerate(("web", "db")):
        store.insert_vm(
            VMRecord(
                id=f"{name}0123456789abcdef",
                name=name,
                state=VMState.STOPPED,
                image="img",
                spec=VMSpec(i + 1, 1024 * (i + 1), 8 << 30, 8 << 30),
                guest_ip=f"172.30.0.{i + 2}",
                dns_name=f"{name}.vm",
                vm_dir=f"/nonexistent/{name}",
                created_at=now(),
                updated_at=now(),
                workspace=Workspace("/root/repo", "/src", "abc") if name == "web" else None,
            )
        )
    return threaded_daemon


# --- --version, -q, --format -----------------------------------------------------------


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"stoker {__version__}\n", "")


def test_quiet_lists_names_only(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "vm", "list", "-q")
    assert rc == 0 and sorted(out.split("\n")) == ["", "db", "web"]
    assert run(capsys, "ps", "--quiet")[1] == out
    assert run(capsys, "image", "list", "-q")[1] == "img\n"
    assert run(capsys, "kernel", "ls", "-q")[1] == "kern\n"


def test_format_field_list_and_template(filled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "vm", "list", "--format", "name,spec.vcpu,workspace.head")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SPEC.VCPU", "WORKSPACE.HEAD"]
    assert {tuple(ln.split()) for ln in lines[1:]} == {("web", "1", "abc"), ("db", "2")}
    rc, out, _ = run(capsys, "vm", "list", "--format", "{{.name}}:{{.spec.memory_mib}}")
    assert rc == 0 and sorted(out.splitlines()) == ["db:2048", "web:1024"]
    rc, out, _ = run(capsys, "vm", "show", "web", "--format", "{{json .spec}}")
    assert rc == 0 and json.loads(out)["vcpu"] == 1
    assert run(capsys, "vm", "show", "web", "--format", "guest_ip")[1] == "172.30.0.2\n"
    assert run(capsys, "image", "show", "img", "--format", "{{.kernel}}\\t{{.size}}")[1] == (
        f"kern\t{5 << 30}\n"
    )
    assert run(capsys, "kernel", "show", "kern", "--format", "{{.version}}")[1] == "6.1\n"


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["vm", "list", "--format", "name,bogus"], "'bogus'"),
        (["vm", "list", "--format", "{{.nope}}"], "'nope'"),
        (["vm", "list", "--format", "spec.bogus"], "spec has: "),
        (["vm", "show", "web", "--format", "{{.name"], "cannot read the template"),
        (["image", "list", "--format", "colour"], "'colour'"),
        (["kernel", "show", "kern", "--format", "x"], "'x'"),
    ],
)
def test_format_unknown_field_is_a_usage_error(
    filled: Any, capsys: pytest.CaptureFixture[str], argv: list[str], names: str
) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert names in err and f"usage: stoker {argv[0]} {argv[1]}" in err


def test_format_unknown_field_refused_even_with_nothing_to_list(
    threaded_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(capsys, "vm", "list", "--format", "bogus")
    assert rc == 2 and "fields are: id, name, state" in err


def test_json_quiet_and_format_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "vm", "list", "--json", "-q")
    assert rc == 2 and "not allowed with" in err


def test_known_fields_match_the_records() -> None:
    from stoker.cli.render import FIELDS
    from stoker.daemon.catalog.catalog import CatalogKernel
    from stoker.model.records import Image, Kernel, VMRecord

    for kind, cls in (("vm", VMRecord), ("image", Image), ("kernel", Kernel)):
        assert FIELDS[kind] == tuple(f.name for f in dataclasses.fields(cls)), kind
    avail = (*(f.name for f in dataclasses.fields(CatalogKernel)), "installed")
    assert FIELDS["kernel-available"] == avail


# --- usage errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["vm", "show"], "usage: stoker vm show"),
        (["vm", "set", "web"], "usage: stoker vm set"),  # nothing to change
        (["vm", "list", "--", "x"], "usage: stoker vm list"),  # `--` where no command goes
        (["vm", "exec", "web", "--"], "usage: stoker vm exec"),  # a bare `--`
        (["vm", "ssh", "web", "--"], "usage: stoker vm ssh"),
        (["image", "cache", "prune", "--bogus"], "usage: stoker image cache prune"),
        (["kernel", "import", "k"], "usage: stoker kernel import"),
        (["vm", "workspace", "prepare", "w", ".", "--from", "x"], "usage: stoker vm workspace"),
        (["daemon", "frob"], "usage: stoker daemon"),
        (["completion", "tcsh"], "usage: stoker completion"),
        (["vm", "create", "--bogus"], "usage: stoker vm create"),
    ],
)
def test_usage_errors_exit_2_with_the_subcommands_usage(
    isolated_env: Layout, capsys: pytest.CaptureFixture[str], argv: list[str], usage: str
) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (out, err)
    assert err.startswith(usage), err
    assert f"(see `{usage.removeprefix('usage: ').split(' [')[0]}" in err


@pytest.mark.parametrize("argv", [["frob"], ["vm", "frob"], ["__nope"], ["image", "x"]])
def test_hidden_helpers_never_appear_in_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "invalid choice" in err
    choices = err.split("choose from", 1)[1]
    assert "__" not in choices and ("list" in choices or "vm" in choices), err


@pytest.mark.parametrize("group", ["vm", "image", "kernel", "daemon"])
def test_a_group_without_its_subcommand_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], group: str
) -> None:
    rc, out, err = run(capsys, group)
    assert rc == 2 and out == "" and err.startswith(f"usage: stoker {group}")


def test_hidden_helpers_not_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "__" not in out and "completion" in out


# --- --help: a line for every flag, an example for every command ------------------------


def _parsers(ap: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out, todo, seen = [], [ap], set()
    while todo:
        p = todo.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        out.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [c for n, c in a.choices.items() if not n.startswith("__")]
    return out


def test_every_flag_has_help_and_every_command_an_example() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) > 40
    for p in parsers:
        assert p.epilog and p.epilog.startswith("examples:\n  $ stoker"), p.prog
        text = p.format_help()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            assert a.help, f"{p.prog}: {a.option_strings or a.dest} has no help"
            for s in a.option_strings:
                assert s in text, (p.prog, s)


def test_lazy_build_documents_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    full = {p.prog: p.format_help() for p in _parsers(build_parser())}
    rc, out, _ = run(capsys, "vm", "list", "--help")
    assert rc == 0 and out == full["stoker vm list"]


# --- --debug -----------------------------------------------------------------------------


def test_debug_passes_the_log_level_to_an_autostarted_daemon(
    isolated_env: Layout, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stoker.errors import Unavailable

    seen: dict[str, str | None] = {}

    def fake_start(layout: Layout, config: str | None) -> None:
        seen["level"] = os.environ.get("STOKER_LOG_LEVEL")
        raise Unavailable("not really starting one")

    monkeypatch.setattr("stoker.cli.connect.start_daemon", fake_start)
    rc, _, err = run(capsys, "--debug", "vm", "list")
    assert rc == 1 and seen == {"level": "debug"}
    assert "Traceback" in err  # --debug shows where a failure came from
    monkeypatch.delenv("STOKER_LOG_LEVEL")
    rc, _, err = run(capsys, "vm", "list")
    assert seen == {"level": None} and "Traceback" not in err


# --- no escape sequences off a terminal --------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "term", "escapes"),
    [(FakeTTY, "xterm", True), (FakeTTY, "dumb", False), (io.StringIO, "xterm", False)],
)
def test_progress_escapes_only_on_a_capable_terminal(
    monkeypatch: pytest.MonkeyPatch, stream: type[io.StringIO], term: str, escapes: bool
) -> None:
    from stoker.cli.progress import ProgressPrinter

    monkeypatch.setenv("TERM", term)
    s = stream()
    pp = ProgressPrinter(stream=s)
    pp({"stage": "boot", "message": "starting"})
    pp({"stage": "ready", "message": "up"})
    pp.done()
    assert ("\x1b" in s.getvalue()) is escapes
    assert "boot" in s.getvalue() and "ready" in s.getvalue()


def test_cli_output_has_no_escapes_when_piped(filled: Any, short_tmp: Path) -> None:
    env = {**os.environ, "TERM": "dumb"}
    for argv in (["vm", "list"], ["vm", "show", "web"], ["--help"], ["vm", "create", "-h"]):
        r = subprocess.run(
            [sys.executable, "-m", "stoker.cli.main", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout + r.stderr, argv


# --- man page, systemd unit, doctor hints ------------------------------------------------


def test_man_page_builds_from_the_parser(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = short_tmp / "stoker.1"
    assert run(capsys, "__manpage", "-o", str(out))[0] == 0
    page = out.read_text()
    assert page.startswith(".TH STOKER 1") and __version__ in page
    for p in _parsers(build_parser())[1:]:
        assert f".SS {p.prog.replace('-', chr(92) + '-')}\n" in page, p.prog
    assert "\\-\\-format" in page and "Examples:" in page
    groff = shutil.which("groff")
    if groff:
        r = subprocess.run(
            [groff, "-man", "-Tutf8", "-ww", "-z", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0 and r.stderr == "", r.stderr


def test_daemon_unit_names_this_install(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stoker.cli.daemon_cmd import unit_text

    rc, out, _ = run(capsys, "daemon", "unit")
    assert rc == 0 and "[Service]" in out and "/usr/local/bin" not in out
    exec_line = next(ln for ln in out.splitlines() if ln.startswith("ExecStart="))
    assert exec_line.split("=", 1)[1].split()[0] in (
        str(Path(sys.executable).parent / "stokerd"),
        sys.executable,
    )
    # next to an interpreter without a stokerd script: `python -m stoker.daemon.main`
    py = short_tmp / "bin" / "python3"
    assert "ExecStart=" + str(py) + " -m stoker.daemon.main --system" in unit_text(
        "[Service]\nExecStart=/x/stokerd --system\n", str(py)
    )
    (short_tmp / "bin").mkdir()
    (short_tmp / "bin" / "stokerd").write_text("#!/bin/sh\n")
    assert f"ExecStart={short_tmp}/bin/stokerd --system" in unit_text(
        "ExecStart=/x/stokerd --system\n", str(py)
    )


def test_doctor_hints_name_only_what_a_user_has(
    isolated_env: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every tool missing, no fix points into this repository (scripts/, shared/...)."""
    from stoker.config import parse_config
    from stoker.hostprobe import doctor

    monkeypatch.setattr(doctor, "which", lambda name: None)
    checks = doctor.run_doctor_sync(isolated_env, parse_config({}), None)
    fixes = " ".join(c.fix for c in checks)
    assert "apt-get install iproute2 nftables e2fsprogs openssh-client git tar" in fixes
    for repo_path in ("scripts/", "shared/", "tests/", ".venv", "bench/"):
        assert repo_path not in fixes, [c.fix for c in checks if repo_path in c.fix]
