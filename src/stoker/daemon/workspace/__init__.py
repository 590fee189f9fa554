"""Leaf: workspace helpers. Git inspection on the host, the prepare transfer (plan, payload,
guest import script), the guest state probe, and the guest export script.

Nothing here talks SSH: each guest step is a bash script (run in the guest with `bash -c`)
plus a parser for what it prints, so the service layer owns the connection, the locks and
the timeouts, and tests run the scripts against a local directory standing in for the guest.
A prepare is two guest round trips: `guest_state_script` (parsed by `parse_guest_state`),
then `guest_import_script` with `build_payload`'s stream on stdin (checked by
`check_import_result`). An export is one: `guest_export_script` -> `parse_export_output`.
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
