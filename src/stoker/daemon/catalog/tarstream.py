"""A strict, forward-only tar reader for bundles.

`tarfile` is lenient where a bundle reader must not be: after the first member it stops
silently at a bad header checksum or a truncated header, and it does not say whether the
end-of-archive marker was there. This reader reads ustar, GNU (long names, base-256
sizes) and pax (`path`, `linkpath`, `size`) headers from any `read(n)` callable and
raises `TarFormatError` for everything else: a bad checksum, an archive that ends
before its end marker, non-zero bytes after it, malformed extended headers.

It only reports entries; deciding which ones are acceptable is the caller's job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

BLOCK = 512
MAX_META = 1 << 20  # pax / GNU long-name payloads: names, not data
MAX_TRAILER = 1 << 20  # zero padding after the end marker (tar pads to 10 KiB records)
_ZERO = bytes(BLOCK)
_USTAR_POSIX = b"ustar\x0000"
_USTAR_GNU = b"ustar  \x00"

# Type flag -> kind. Types 1-6 carry no data blocks; regular, contiguous, sparse and
# unknown types do (what GNU tar and tarfile assume).
_KINDS = {
    b"0": "file",
    b"\x00": "file",
    b"7": "file",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "fifo",
    b"S": "sparse file",
}
_NO_DATA = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})


class TarFormatError(Exception):
    """The stream is not a well-formed tar archive."""


@dataclass(frozen=True)
class TarEntry:
    """One archive member, with pax / GNU long names already applied."""

    name: str
    kind: str  # file, directory, symlink, hardlink, fifo, ..., or "type 'X'"
    size: int
    mode: int
    linkname: str


def _num(field: bytes, what: str) -> int:
    """An octal (or GNU base-256) numeric header field."""
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            raise TarFormatError(f"negative {what} in a tar header")
        n = field[0] & 0x7F
        for b in field[1:]:
            n = (n << 8) | b
        return n
    s = field.split(b"\x00", 1)[0].strip(b" ")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise TarFormatError(f"malformed {what} field {s!r} in a tar header") from None


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TarFormatError(f"{what} {raw!r} is not UTF-8") from None


def _checksum_ok(hdr: bytes) -> bool:
    stored = _num(hdr[148:156], "checksum")
    blanked = hdr[:148] + b" " * 8 + hdr[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


def parse_pax(data: bytes) -> dict[str, str]:
    """Records `"<len> <key>=<value>\\n"` of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if not data[pos:].strip(b"\x00"):
            break
        sp = data.find(b" ", pos)
        digits = data[pos:sp] if sp > pos else b""
        if not digits.isdigit():
            raise TarFormatError("malformed pax extended header (bad record length)")
        length = int(digits)
        rec = data[pos : pos + length]
        if length <= len(digits) + 1 or len(rec) != length or not rec.endswith(b"\n"):
            raise TarFormatError("malformed pax extended header (bad record)")
        key, eq, value = rec[len(digits) + 1 : -1].partition(b"=")
        if not eq or not key:
            raise TarFormatError("malformed pax extended header (record without '=')")
        out[_text(key, "pax key")] = _text(value, "pax value")
        pos += length
    return out


class TarReader:
    """Reads entries and their data from `read(n)` (which may return fewer than n bytes)."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._remaining = 0
        self._pad = 0
        self.offset = 0  # bytes of archive consumed
        self.ended = False

    def _exact(self, n: int, what: str) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            b = self._read(n - got)
            if not b:
                raise TarFormatError(f"the archive ends early (in the middle of {what})")
            parts.append(b)
            got += len(b)
        self.offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _header(self) -> bytes | None:
        """The next 512-byte block, or None at a clean end of stream."""
        first = self._read(BLOCK)
        if not first:
            return None
        if len(first) < BLOCK:
            self.offset += len(first)
            first += self._exact(BLOCK - len(first), "a header")
            return first
        self.offset += BLOCK
        return first

    def _meta(self, size: int, what: str) -> bytes:
        if size > MAX_META:
            raise TarFormatError(f"{what} of {size} bytes is unreasonably large")
        data = self._exact(size, what)
        self._exact((-size) % BLOCK, what)
        return data

    def next(self) -> TarEntry | None:
        """The next entry (skipping unread data of the current one); None at the end marker."""
        self.skip_data()
        pax: dict[str, str] = {}
        longname: str | None = None
        longlink: str | None = None
        while True:
            hdr = self._header()
            if hdr is None:
                raise TarFormatError(
                    "the archive ends without its end-of-archive marker (truncated tar)"
                )
            if hdr == _ZERO:
                if pax or longname is not None or longlink is not None:
                    raise TarFormatError("the archive ends right after an extended header")
                self._trailer()
                return None
            if not _checksum_ok(hdr):
                raise TarFormatError(f"bad header checksum at offset {self.offset - BLOCK}")
            typ = hdr[156:157]
            size = _num(hdr[124:136], "size")
            if typ in (b"x", b"X"):
                pax.update(parse_pax(self._meta(size, "a pax header")))
                continue
            if typ == b"g":
                # git archive writes one with the commit id; nothing in it may change entries.
                glob = parse_pax(self._meta(size, "a pax global header"))
                risky = [k for k in glob if k in ("path", "linkpath", "size") or "sparse" in k]
                if risky:
                    raise TarFormatError(f"pax global header sets {', '.join(risky)}")
                continue
            if typ == b"L":
                longname = _text(self._meta(size, "a GNU long name").split(b"\x00", 1)[0], "name")
                continue
            if typ == b"K":
                longlink = _text(
                    self._meta(size, "a GNU long link").split(b"\x00", 1)[0], "link target"
                )
                continue
            return self._entry(hdr, typ, size, pax, longname, longlink)

    def _entry(
        self,
        hdr: bytes,
        typ: bytes,
        size: int,
        pax: dict[str, str],
        longname: str | None,
        longlink: str | None,
    ) -> TarEntry:
        name = _text(hdr[0:100].split(b"\x00", 1)[0], "entry name")
        if hdr[257:265] == _USTAR_POSIX:
            prefix = _text(hdr[345:500].split(b"\x00", 1)[0], "entry name prefix")
            if prefix:
                name = f"{prefix}/{name}"
        if longname is not None:
            name = longname
        if "path" in pax:
            name = pax["path"]
        link = _text(hdr[157:257].split(b"\x00", 1)[0], "link target")
        if longlink is not None:
            link = longlink
        if "linkpath" in pax:
            link = pax["linkpath"]
        if "size" in pax:
            if not pax["size"].isdigit():
                raise TarFormatError(f"pax size {pax['size']!r} of {name!r} is not a number")
            size = int(pax["size"])
        kind = _KINDS.get(typ, f"entry of type {typ.decode('latin-1')!r}")
        if typ == b"\x00" and name.endswith("/"):
            kind = "directory"  # old (v7) archives mark directories only by the slash
            typ = b"5"
        if any(k.startswith("GNU.sparse") for k in pax):
            kind = "sparse file"
        data = 0 if typ in _NO_DATA else size
        self._remaining = data
        self._pad = (-data) % BLOCK
        return TarEntry(
            name=name,
            kind=kind,
            size=data,
            mode=_num(hdr[100:108], "mode") & 0o7777,
            linkname=link,
        )

    def read_data(self, n: int) -> bytes:
        """Up to `n` bytes of the current entry's data; b"" once it is all read."""
        if self._remaining == 0:
            return b""
        b = self._exact(min(n, self._remaining), "a file's data")
        self._remaining -= len(b)
        if self._remaining == 0 and self._pad:
            self._exact(self._pad, "a file's padding")
            self._pad = 0
        return b

    def skip_data(self) -> None:
        """Discard whatever is left of the current entry's data."""
        while self.read_data(1 << 20):
            pass

    def _trailer(self) -> None:
        """After the first zero block only zero padding may follow, up to a bound."""
        seen = 0
        while True:
            b = self._read(64 << 10)
            if not b:
                break
            seen += len(b)
            self.offset += len(b)
            if b.count(0) != len(b):
                raise TarFormatError("there is data after the end-of-archive marker")
            if seen > MAX_TRAILER:
                raise TarFormatError("more than 1 MiB of padding after the end of the archive")
        self.ended = True
