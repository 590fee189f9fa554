"""Leaf: workspace helpers. Git inspection on the host, the prepare transfer (plan, payload,
guest import script), the guest state probe, and the guest export script.

Nothing here talks SSH: each guest step is a bash script plus a parser for what it prints,
so the service owns the connection, the locks and the timeouts, and tests run the scripts
against a local directory standing in for the guest. Run a script in the guest as the SSH
command `remote_command(script)` (it needs bash, git, coreutils, findutils, GNU tar there).

prepare (two round trips)::

    info = await inspect_repo(runner, path)                 # refusals: InvalidArgument
    files = await list_files(runner, info.root, include_untracked)
    r = ssh(remote_command(guest_state_script(guest_path)))  # stdin: none
    state = parse_guest_state(r.exit_status, r.stdout, r.stderr)
    plan = await plan_transfer(runner, info, files, state, branch=..., from_ref=...)
    r = ssh(remote_command(guest_import_script(guest_path, plan)),
            stdin=build_payload(runner, plan, tmp_dir=...))  # stream; close it on failure
    base = check_import_result(r.exit_status, r.stdout, r.stderr)   # record as the head

export (one round trip)::

    r = ssh(remote_command(guest_export_script(guest_path, base or EMPTY_TREE)))
    result = parse_export_output(r.exit_status, r.stdout, r.stderr)  # .patch, .files
"""

from stoker.daemon.workspace.export import ExportResult, guest_export_script, parse_export_output
from stoker.daemon.workspace.framing import remote_command
from stoker.daemon.workspace.gitcmd import EMPTY_TREE
from stoker.daemon.workspace.importer import (
    BASE_REF,
    SHIPPED_REF,
    check_import_result,
    guest_import_script,
)
from stoker.daemon.workspace.inspect import RepoInfo, inspect_repo, list_files
from stoker.daemon.workspace.payload import build_payload
from stoker.daemon.workspace.plan import DEFAULT_DEPTH, Plan, ShipItem, plan_transfer
from stoker.daemon.workspace.state import (
    GuestState,
    check_guest_path,
    guest_state_script,
    parse_guest_state,
)

__all__ = [
    "BASE_REF",
    "DEFAULT_DEPTH",
    "EMPTY_TREE",
    "SHIPPED_REF",
    "ExportResult",
    "GuestState",
    "Plan",
    "RepoInfo",
    "ShipItem",
    "build_payload",
    "check_guest_path",
    "check_import_result",
    "guest_export_script",
    "guest_import_script",
    "guest_state_script",
    "inspect_repo",
    "list_files",
    "parse_export_output",
    "parse_guest_state",
    "plan_transfer",
    "remote_command",
]
