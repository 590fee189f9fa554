"""The guest half of `workspace export`: a binary-safe patch of the guest's work tree.

The diff is taken in a temporary index (a copy of the real one, so unchanged files are not
re-hashed) with a temporary object directory, then `git add -A` and a diff of that index
against the base. The real index, the work tree, refs and the object store are left exactly
as they were (lesson 8: an export that touched the real index changed the user's repo). The
patch covers guest commits past the base, uncommitted edits, new untracked non-ignored files,
deletions, binary files and mode changes; `git apply` takes it on the host. Patch and file
list come back framed in one stdout, so an export is one SSH round trip.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from stoker.daemon.workspace.framing import BASH_PRELUDE, FrameReader
from stoker.daemon.workspace.state import check_guest_path
from stoker.errors import CommandFailed, InvalidArgument, NotFound

EXPORT_MAGIC = "STOKER-EXPORT 1"
EXIT_NO_PATH = 10
EXIT_NOT_REPO = 11
EXIT_NO_BASE = 12

_EXPORT_BODY = r"""
exec 0</dev/null
[ -d "$P" ] || die 10 "the workspace $P does not exist in the VM"
cd -- "$P" || die 10 "cannot enter the workspace $P"
top=$(git rev-parse --show-toplevel 2>/dev/null) || die 11 "$P is not a git checkout any more"
[ "$top" = "$(pwd -P)" ] || die 11 "$P is not the top of a git checkout any more"
gitdir=$(git rev-parse --absolute-git-dir) || die 11 "cannot find the git directory of $P"
git rev-parse -q --verify "$BASE^{tree}" >/dev/null 2>&1 ||
    die 12 "base $BASE is not in the VM's repository at $P"
T=$(mktemp -d) || die 1 "mktemp failed"
trap 'rm -rf -- "$T"' EXIT
[ -f "$gitdir/index" ] && cp -- "$gitdir/index" "$T/index"
mkdir -- "$T/objects"
export GIT_INDEX_FILE="$T/index" GIT_OBJECT_DIRECTORY="$T/objects"
export GIT_ALTERNATE_OBJECT_DIRECTORIES="\"$gitdir/objects\""
git -c core.loosecompression=0 add -A 2>"$T/err" ||
    die 1 "git add -A failed: $(tail -c 2000 "$T/err")"
git diff-index --cached --name-status -z --no-renames "$BASE" > "$T/files" ||
    die 1 "git diff-index --name-status failed"
git -c core.compression=0 diff-index --cached -p --binary --no-renames --no-ext-diff \
    --no-textconv "$BASE" > "$T/patch" 2>"$T/err" ||
    die 1 "git diff failed: $(tail -c 2000 "$T/err")"
printf '%s\n' "$MAGIC"
emit files "$T/files"
emit patch "$T/patch"
printf 'end\n'
"""


@dataclass(frozen=True)
class ExportResult:
    """A guest work tree's changes: a patch for `git apply` and (status, path) pairs."""

    patch: bytes
    files: list[tuple[str, str]]


def guest_export_script(guest_path: str, base_commit: str) -> str:
    """A bash script printing the framed patch of `guest_path`'s work tree against
    `base_commit` (a commit id, or a ref in the guest such as `refs/stoker/shipped`)."""
    p = check_guest_path(guest_path)
    if not base_commit or base_commit.startswith("-") or any(c in base_commit for c in " \n\0"):
        raise InvalidArgument(f"base commit {base_commit!r} is not a commit id or ref name")
    head = f"P={shlex.quote(p)}\nBASE={shlex.quote(base_commit)}\n"
    head += f"MAGIC={shlex.quote(EXPORT_MAGIC)}\n"
    return BASH_PRELUDE + head + _EXPORT_BODY


def parse_export_output(exit_status: int, stdout: bytes, stderr: bytes) -> ExportResult:
    """Parse what `guest_export_script` printed; raise a clear error when it failed."""
    err = stderr.decode(errors="replace").strip()
    msg = err.removeprefix("stoker: ")[-2000:]
    if exit_status in (EXIT_NO_PATH, EXIT_NOT_REPO):
        raise NotFound(f"{msg}: run `stoker vm workspace prepare` to ship the repository again")
    if exit_status == EXIT_NO_BASE:
        raise InvalidArgument(
            f"{msg}: pass --base-commit with a commit the VM's checkout has "
            "(by default the commit it was prepared at)"
        )
    if exit_status != 0:
        raise CommandFailed(
            f"export in the guest failed (exit {exit_status}): {msg or 'no output'}"
        )
    r = FrameReader(stdout, "export")
    if r.line() != EXPORT_MAGIC:
        raise r.bad("missing header")
    names = r.body("files").split(b"\0")
    patch = r.body("patch")
    if r.line() != "end":
        raise r.bad("missing end")
    files: list[tuple[str, str]] = []
    for i in range(0, len(names) - 1, 2):
        if names[i]:
            files.append((names[i].decode("ascii"), os.fsdecode(names[i + 1])))
    return ExportResult(patch=patch, files=files)
