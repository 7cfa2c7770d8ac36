"""A deterministic tar writer: the same members give the same bytes, on any machine.

Headers are POSIX ustar; a PAX extended header is added only where ustar cannot
say it (long or non-ASCII names, large numbers, xattrs as ``SCHILY.xattr.*``),
which is also what Go's archive/tar (docker, containerd) does.  Times are whole
seconds, user and group names are left empty, and there is no global header,
so nothing about the writing machine or moment reaches the bytes.  The archive
ends with two zero blocks, without padding to a record size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

BLOCK = 512
END = bytes(2 * BLOCK)
_MAX_OCTAL = {8: 0o7777777, 12: 0o77777777777}

REG, HARDLINK, SYMLINK, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"


class ContentsChanged(ValueError):
    """A member cannot be written as announced: contents that do not add up to its size, or
    values no tar header can hold."""


class Member(NamedTuple):
    name: bytes  # relative, without "./"; directories without the trailing slash
    type: bytes  # one of REG ... FIFO
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0  # seconds
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _fits(value: int, width: int) -> bool:
    return 0 <= value <= _MAX_OCTAL[width]


def _block(name: bytes, typ: bytes, m: Member, size: int, linkname: bytes) -> bytes:
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    h[100:108] = _octal(m.mode & 0o7777, 8)
    h[108:116] = _octal(m.uid if _fits(m.uid, 8) else 0, 8)
    h[116:124] = _octal(m.gid if _fits(m.gid, 8) else 0, 8)
    h[124:136] = _octal(size if _fits(size, 12) else 0, 12)
    h[136:148] = _octal(m.mtime if _fits(m.mtime, 12) else 0, 12)
    h[148:156] = b" " * 8
    h[156:157] = typ
    h[157 : 157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    if typ in (CHR, BLK):
        if not (_fits(m.devmajor, 8) and _fits(m.devminor, 8)):
            raise ContentsChanged(f"{name!r}: device {m.devmajor}:{m.devminor} does not fit a tar header")
        h[329:337] = _octal(m.devmajor, 8)
        h[337:345] = _octal(m.devminor, 8)
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _ascii_fits(value: bytes, limit: int) -> bool:
    return len(value) <= limit and value.isascii()


def header(m: Member) -> bytes:
    """The header block(s) of a member: an optional PAX header, then the ustar block."""
    name = m.name + b"/" if m.type == DIR and m.name else m.name
    records = []
    if not _ascii_fits(name, 100):
        records.append(_pax_record(b"path", name))
    if not _ascii_fits(m.linkname, 100):
        records.append(_pax_record(b"linkpath", m.linkname))
    for key, value, width in (
        (b"uid", m.uid, 8),
        (b"gid", m.gid, 8),
        (b"size", m.size, 12),
        (b"mtime", m.mtime, 12),
    ):
        if not _fits(value, width):
            records.append(_pax_record(key, str(value).encode()))
    for xname, xvalue in sorted(m.xattrs):
        records.append(_pax_record(b"SCHILY.xattr." + xname, xvalue))
    out = b""
    if records:
        data = b"".join(records)
        pax_name = (b"PaxHeaders.0/" + name.rstrip(b"/").rpartition(b"/")[2])[:99]
        pax_member = Member(pax_name if pax_name.isascii() else b"PaxHeaders.0/member", b"x", 0o644)
        out = _block(pax_member.name, b"x", pax_member, len(data), b"") + data + padding(len(data))
    short_name = (
        name if _ascii_fits(name, 100) else name[:99].decode("ascii", "replace").encode("ascii", "replace")
    )
    short_link = m.linkname if _ascii_fits(m.linkname, 100) else b""
    return out + _block(short_name, m.type, m, m.size, short_link)


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def write(members: Iterable[tuple[Member, Iterable[bytes]]]) -> Iterator[bytes]:
    """The archive's bytes for ``(member, contents)`` pairs; contents must add up to ``size``."""
    for m, contents in members:
        yield header(m)
        if m.type == REG:
            n = 0
            for piece in contents:
                n += len(piece)
                yield piece
            if n != m.size:
                raise ContentsChanged(f"{m.name!r}: {n} bytes of contents, the header says {m.size}")
            yield padding(m.size)
    yield END
