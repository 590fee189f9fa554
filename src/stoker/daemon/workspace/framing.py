"""The framed byte format between host and guest scripts, and its bash half.

A frame is a header line `NAME LENGTH [ARG]\\n` followed by exactly LENGTH bytes. The guest
reads headers with bash's `read` (byte-at-a-time on a pipe, so it never consumes past the
newline) and bodies with `head -c LENGTH` (GNU head reads no further than asked). LENGTH -1
means "the rest of the stream" and is only ever used for the last frame.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from stoker.errors import CommandFailed

# Shared bash helpers. `die CODE MSG` reports on stderr and exits with CODE; `emit NAME FILE`
# writes one frame to stdout; `readhdr NAME` and `take FILE` consume one frame from fd 3.
BASH_PRELUDE = r"""
set -u -o pipefail
umask 022
export LC_ALL=C GIT_TERMINAL_PROMPT=0 GIT_OPTIONAL_LOCKS=0
die() { local code=$1; shift; printf 'stoker: %s\n' "$*" >&2; exit "$code"; }
emit() { printf '%s %s\n' "$1" "$(stat -c %s -- "$2")" && cat -- "$2"; }
readhdr() {
    H_NAME= H_LEN= H_ARG=
    IFS=' ' read -r H_NAME H_LEN H_ARG <&3 || die 4 "the payload ended early (before $1)"
    [ "$H_NAME" = "$1" ] || die 4 "payload out of order: expected $1, got ${H_NAME:-nothing}"
    case $H_LEN in ''|*[!0-9-]*) die 4 "payload frame $1 has a bad length" ;; esac
}
take() {
    if [ "$H_LEN" = 0 ]; then : > "$1" || die 4 "cannot write $1"; return; fi
    head -c "$H_LEN" <&3 > "$1" || die 4 "cannot store payload frame $H_NAME in $1"
    [ "$(stat -c %s -- "$1")" = "$H_LEN" ] || die 4 "the payload ended early (in $H_NAME)"
}
"""


def remote_command(script: str) -> str:
    """The command line that runs a guest script over SSH, whatever the login shell is."""
    return "exec bash -c " + shlex.quote(script)


def frame(name: str, body: bytes, arg: str = "") -> bytes:
    """One complete frame."""
    return frame_header(name, len(body), arg) + body


def frame_header(name: str, length: int, arg: str = "") -> bytes:
    """A frame's header line (LENGTH -1: the body runs to the end of the stream)."""
    return (f"{name} {length} {arg}".rstrip() + "\n").encode("ascii")


@dataclass
class FrameReader:
    """Reads the frames a guest script printed, strictly in the expected order."""

    data: bytes
    what: str
    pos: int = 0

    def line(self) -> str:
        """The next header or keyword line."""
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise self.bad("output ended early")
        text = self.data[self.pos : end].decode("utf-8", "replace")
        self.pos = end + 1
        return text

    def keyword(self, name: str) -> str:
        """Consume `NAME VALUE`; return VALUE ("" when absent)."""
        key, _, value = self.line().partition(" ")
        if key != name:
            raise self.bad(f"expected {name!r}, got {key!r}")
        return value

    def body(self, name: str) -> bytes:
        """Consume frame NAME and return its body."""
        parts = self.line().split(" ")
        if len(parts) < 2 or parts[0] != name or not parts[1].isdigit():
            raise self.bad(f"expected frame {name!r}")
        n = int(parts[1])
        if self.pos + n > len(self.data):
            raise self.bad(f"frame {name!r} is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def bad(self, why: str) -> CommandFailed:
        """The error for output that does not follow the format."""
        return CommandFailed(
            f"unexpected output from the guest's {self.what} script ({why}): is git "
            "installed in the guest image, and is its shell bash?"
        )
