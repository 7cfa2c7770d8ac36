"""Filesystem entries of a layer and their compact on-disk table.

An ``Entry`` is one path of one layer as the store keeps it: the tar member
after the import rules have been applied (normalised path, whiteouts and opaque
markers as entry kinds, hardlinks resolved).  A layer's entries are serialised
into one *entry table*, stored as an ordinary content object (so it is
deduplicated, compressed and checksummed like file data).  The union view reads
it whole; nothing here scans file contents.

Table format (version 1), little-endian::

    magic b"LFET" | u8 version | u32 count | count * entry
    entry := u8 kind | u8 flags | u32 mode | u32 uid | u32 gid | u64 size
           | i64 mtime_ns | u32 devmajor | u32 devminor
           | u16 path_len | u16 link_len | u16 xattr_count
           | [32-byte content sha256 if flags & HAS_CONTENT]
           | path | link | xattr_count * (u16 name_len | u32 value_len | name | value)

Immutable values; thread-safe.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# Entry kinds.  WHITEOUT hides the same path in lower layers.
REG, DIR, SYMLINK, HARDLINK, CHR, BLK, FIFO, WHITEOUT = range(8)

# Flags.
HAS_CONTENT = 0x01  # content sha256 follows (regular files and hardlinks with data)
OPAQUE = 0x02  # directory hides everything below it in lower layers
IMPLICIT = 0x04  # directory synthesised for an opaque marker that had no dir entry

_MAGIC = b"LFET"
_VERSION = 1
_HEAD = struct.Struct("<4sBI")
_FIXED = struct.Struct("<BBIIIQqIIHHH")
_XATTR = struct.Struct("<HI")


class TableError(ValueError):
    """An entry table does not decode: the store is corrupt or from the future."""


class Entry(NamedTuple):
    path: bytes  # normalised, relative, no leading "./" or "/"; b"" is the root
    kind: int
    mode: int  # permission bits including setuid/setgid/sticky (07777)
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    content: bytes | None = None  # sha256 of the data (32 bytes) for files with data
    link: bytes = b""  # symlink target as archived, or hardlink target path (normalised)
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    flags: int = 0

    @property
    def opaque(self) -> bool:
        return bool(self.flags & OPAQUE)


def encode_xattrs(xattrs: tuple[tuple[bytes, bytes], ...]) -> list[bytes]:
    """``count * (u16 name_len | u32 value_len | name | value)``, as pieces to join."""
    parts = []
    for name, value in xattrs:
        parts += [_XATTR.pack(len(name), len(value)), name, value]
    return parts


def decode_xattrs(
    data: bytes | memoryview, pos: int, count: int
) -> tuple[tuple[tuple[bytes, bytes], ...], int]:
    """``count`` xattrs from ``pos``; returns them and the position after them."""
    out = []
    for _ in range(count):
        nlen, vlen = _XATTR.unpack_from(data, pos)
        pos += _XATTR.size
        out.append((bytes(data[pos : pos + nlen]), bytes(data[pos + nlen : pos + nlen + vlen])))
        pos += nlen + vlen
    return tuple(out), pos


def encode_table(entries: list[Entry]) -> bytes:
    parts = [_HEAD.pack(_MAGIC, _VERSION, len(entries))]
    for e in entries:
        flags = e.flags & ~HAS_CONTENT
        if e.content is not None:
            flags |= HAS_CONTENT
        parts.append(
            _FIXED.pack(
                e.kind,
                flags,
                e.mode,
                e.uid,
                e.gid,
                e.size,
                e.mtime_ns,
                e.devmajor,
                e.devminor,
                len(e.path),
                len(e.link),
                len(e.xattrs),
            )
        )
        if e.content is not None:
            parts.append(e.content)
        parts.append(e.path)
        parts.append(e.link)
        parts += encode_xattrs(e.xattrs)
    return b"".join(parts)


def decode_table(data: bytes) -> list[Entry]:
    try:
        magic, version, count = _HEAD.unpack_from(data, 0)
        if magic != _MAGIC:
            raise TableError("not an entry table")
        if version != _VERSION:
            raise TableError(f"entry table version {version} is not supported")
        pos = _HEAD.size
        out: list[Entry] = []
        fixed = _FIXED.unpack_from
        for _ in range(count):
            kind, flags, mode, uid, gid, size, mtime, dmaj, dmin, plen, llen, nx = fixed(data, pos)
            pos += _FIXED.size
            content = None
            if flags & HAS_CONTENT:
                content = bytes(data[pos : pos + 32])
                pos += 32
            path = bytes(data[pos : pos + plen])
            pos += plen
            link = bytes(data[pos : pos + llen])
            pos += llen
            xattrs, pos = decode_xattrs(data, pos, nx)
            if pos > len(data):
                raise TableError("entry table is truncated")
            out.append(
                Entry(
                    path,
                    kind,
                    mode,
                    uid,
                    gid,
                    size,
                    mtime,
                    content,
                    link,
                    dmaj,
                    dmin,
                    xattrs,
                    flags & ~HAS_CONTENT,
                )
            )
        return out
    except struct.error as exc:
        raise TableError(f"entry table is truncated: {exc}") from None
