"""What the guest already has: the first, small round trip of a (re-)prepare.

The guest reports its HEAD, the host commits it last imported (`refs/stoker/base`, the commit
it checked out, and `refs/stoker/host-head`), its shallow boundary, and its work tree relative
to the base: every path whose content or mode differs, with the blob id. That diff is computed
in a temporary index seeded from a copy of the real one (so only files whose stat data changed
are hashed) and with a temporary object directory, so the probe changes nothing in the guest.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass, field

from stoker.daemon.workspace.framing import BASH_PRELUDE, FrameReader
from stoker.daemon.workspace.gitcmd import EMPTY_TREE, MODE_GITLINK, Entry, parse_raw_diff
from stoker.errors import CommandFailed, InvalidArgument

STATE_MAGIC = "STOKER-STATE 1"

# Statuses: absent (nothing at the path), empty (an empty directory), notdir (a file is in the
# way), foreign (a directory stoker did not create), incomplete (an import was cut short), ok.
_STATE_BODY = r"""
printf '%s\n' "$MAGIC"
if [ ! -e "$P" ] && [ ! -L "$P" ]; then printf 'status absent\nend\n'; exit 0; fi
if [ ! -d "$P" ] || [ -L "$P" ]; then printf 'status notdir\nend\n'; exit 0; fi
cd -- "$P" || die 1 "cannot enter $P"
gitdir=$P/.git
if [ ! -e "$gitdir/stoker-workspace" ] && [ ! -e "$gitdir/stoker-importing" ]; then
    for f in ./* ./.[!.]* ./..?*; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf 'status foreign\nend\n'; exit 0; fi
    done
    printf 'status empty\nend\n'; exit 0
fi
st=ok
[ -e "$gitdir/stoker-importing" ] && st=incomplete
head= base= hosthead=
while read -r sha ref; do
    case $ref in
    HEAD) head=$sha ;;
    refs/stoker/base) base=$sha ;;
    refs/stoker/host-head) hosthead=$sha ;;
    esac
done < <(git show-ref --head refs/stoker/base refs/stoker/host-head 2>/dev/null)
T=$(mktemp -d) || die 1 "mktemp failed"
trap 'rm -rf -- "$T"' EXIT
: > "$T/shallow"
: > "$T/dirty"
[ -f "$gitdir/shallow" ] && cp -- "$gitdir/shallow" "$T/shallow"
if [ "$st" = ok ]; then
    [ -f "$gitdir/index" ] && cp -- "$gitdir/index" "$T/index"
    mkdir -- "$T/objects"
    export GIT_INDEX_FILE="$T/index" GIT_OBJECT_DIRECTORY="$T/objects"
    export GIT_ALTERNATE_OBJECT_DIRECTORIES="\"$gitdir/objects\""
    git -c core.loosecompression=0 add -A 2>"$T/err" ||
        die 1 "git add -A failed: $(tail -c 2000 "$T/err")"
    git diff-index --cached --raw -z --no-renames "${base:-$EMPTY}" > "$T/dirty" ||
        die 1 "git diff-index failed"
fi
printf 'status %s\nhead %s\nbase %s\nhosthead %s\n' "$st" "${head:--}" "${base:--}" "${hosthead:--}"
emit shallow "$T/shallow"
emit dirty "$T/dirty"
printf 'end\n'
"""


@dataclass(frozen=True)
class GuestState:
    """The guest side of a workspace, as `guest_state_script` reported it."""

    status: str
    head: str | None = None
    base: str | None = None
    host_head: str | None = None
    shallow: tuple[str, ...] = ()
    # path -> content relative to `base` (None: deleted); gitlinks are left out
    dirty: dict[str, Entry | None] = field(default_factory=dict)

    @property
    def has_workspace(self) -> bool:
        """True when there is a stoker checkout at the path (possibly half-imported)."""
        return self.status in ("ok", "incomplete")


def check_guest_path(guest_path: str) -> str:
    """Validate a guest destination: absolute, normalised, not the root or a system dir, and
    free of newlines, NULs, double quotes and backslashes (which git's alternates list and
    the scripts would have to escape)."""
    norm = posixpath.normpath(guest_path) if guest_path else ""
    if (
        not guest_path.startswith("/")
        or norm != guest_path.rstrip("/")
        or any(c in guest_path for c in '\0\n"\\')
        or norm in ("/", "/root", "/home", "/etc", "/usr", "/var", "/tmp", "/bin", "/sbin")
    ):
        raise InvalidArgument(
            f"guest path {guest_path!r} is not usable: give an absolute, normalised directory "
            "below / other than a system directory (default /root/repo)"
        )
    return norm


def guest_state_script(guest_path: str) -> str:
    """A bash script that prints the guest's workspace state (changes nothing)."""
    p = check_guest_path(guest_path)
    head = f"P={shlex.quote(p)}\nMAGIC={shlex.quote(STATE_MAGIC)}\nEMPTY={EMPTY_TREE}\n"
    return BASH_PRELUDE + head + _STATE_BODY


def _sha_or_none(v: str) -> str | None:
    return None if v in ("", "-") else v


def parse_guest_state(exit_status: int, stdout: bytes, stderr: bytes) -> GuestState:
    """Parse what `guest_state_script` printed; raise CommandFailed when it failed."""
    if exit_status != 0:
        raise CommandFailed(
            f"reading the guest workspace failed (exit {exit_status}): "
            f"{stderr.decode(errors='replace').strip()[-2000:] or 'no output'}"
        )
    r = FrameReader(stdout, "workspace state")
    if r.line() != STATE_MAGIC:
        raise r.bad("missing header")
    status = r.keyword("status")
    if status not in ("ok", "incomplete"):
        r.line()
        return GuestState(status=status)
    head = _sha_or_none(r.keyword("head"))
    base = _sha_or_none(r.keyword("base"))
    host_head = _sha_or_none(r.keyword("hosthead"))
    shallow = tuple(s for s in r.body("shallow").decode("ascii").split() if s)
    dirty: dict[str, Entry | None] = {}
    for path, (old, new, _st) in parse_raw_diff(r.body("dirty")).items():
        if any(e is not None and e.mode == MODE_GITLINK for e in (old, new)):
            continue  # a repository nested in the guest checkout is never touched
        dirty[path] = new
    if r.line() != "end":
        raise r.bad("missing end")
    return GuestState(status, head, base, host_head, shallow, dirty)
