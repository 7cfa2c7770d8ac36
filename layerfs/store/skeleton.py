"""Skeletons: what a layer's source stream holds besides its file contents.

A layer is stored as an entry table plus one object per file, which is all a
mount needs.  Exporting the layer with the very bytes it was imported from
(so its digest, and the image's, survive a round trip) also needs the rest of
the stream: headers, extended headers, padding, the trailer.  The skeleton
keeps exactly that, with a splice table saying where each file's contents go.

Object layout (one content-addressed object, like any other)::

    raw     the stream with every spliced range cut out
    table   n records of (u64 offset in raw, u64 size, 32-byte SHA-256)
    u64     n
    8 bytes MAGIC

The bytes are format-agnostic: the caller says which ranges are contents.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from layerfs.store.store import CHUNK_SIZE, StoreError

if TYPE_CHECKING:
    from layerfs.store.store import FileWriter, Store, WriteSession

MAGIC = b"LFSKEL1\0"
_REC = struct.Struct("<QQ32s")
_TAIL = struct.Struct("<Q8s")


class SkeletonRecorder:
    """Sits between a stream and its parser, keeping every byte but file contents.

    The parser calls ``read``; after it has announced that the next ``size``
    bytes from stream offset ``offset`` are a file's contents, the caller says
    so with ``contents(offset, size)`` and later ``digest(sha)``.  Contents
    are dropped as they pass; everything else goes to the skeleton object."""

    def __init__(self, session: WriteSession, read: Callable[[int], bytes]) -> None:
        self._read = read
        # stream bytes not yet classified are _held[_pos:]; _base is the stream offset of _held[_pos]
        # (an index, not deletions: many small files in one read would otherwise move the buffer
        # once per file)
        self._held = bytearray()
        self._pos = 0
        self._base = 0
        self._skip_to = 0  # stream bytes below this offset are file contents
        self._out = bytearray()  # skeleton bytes not yet handed to the writer
        self._raw_size = 0
        self._sha = hashlib.sha256()
        self._writer: FileWriter = session.new_file()
        self._table = bytearray()
        self._pending: tuple[int, int] | None = None
        self.splices = 0

    def read(self, n: int) -> bytes:
        data = self._read(n)
        if not data:
            return data
        if self._pos == len(self._held):
            self._held.clear()
            self._pos = 0
            # inside a large file: drop its bytes without copying them first
            drop = min(self._skip_to - self._base, len(data)) if self._base < self._skip_to else 0
            self._base += drop
            self._held += memoryview(data)[drop:]
        else:
            if self._pos > len(self._held) // 2:
                del self._held[: self._pos]
                self._pos = 0
            self._held += data
            self._drop_contents()
        return data

    def _drop_contents(self) -> None:
        if self._base < self._skip_to:
            n = min(self._skip_to - self._base, len(self._held) - self._pos)
            self._pos += n
            self._base += n

    def _keep(self, data: bytes | bytearray | memoryview) -> None:
        self._out += data
        self._raw_size += len(data)
        if len(self._out) >= CHUNK_SIZE:
            cut = len(self._out) - len(self._out) % CHUNK_SIZE
            for i in range(0, cut, CHUNK_SIZE):
                piece = bytes(self._out[i : i + CHUNK_SIZE])
                self._sha.update(piece)
                self._writer.write(piece)
            del self._out[:cut]

    def contents(self, offset: int, size: int) -> None:
        """Stream bytes [offset, offset + size) are a file's contents."""
        if offset < self._base or self._pending is not None:
            raise ValueError("skeleton ranges must be announced in stream order")
        k = offset - self._base
        self._keep(memoryview(self._held)[self._pos : self._pos + k])
        self._pos += k
        self._base = offset
        self._skip_to = offset + size
        self._pending = (self._raw_size, size)
        self._drop_contents()

    def digest(self, sha: bytes) -> None:
        """The SHA-256 of the contents announced last (the store must hold that object)."""
        assert self._pending is not None
        self._table += _REC.pack(self._pending[0], self._pending[1], sha)
        self._pending = None
        self.splices += 1

    def finish(self) -> bytes:
        """Everything read after the last contents is skeleton; returns the object's SHA-256."""
        if self._base < self._skip_to:
            raise ValueError("the stream ended inside a file's contents")
        self._keep(memoryview(self._held)[self._pos :])
        self._held = bytearray()
        self._pos = 0
        self._keep(bytes(self._table) + _TAIL.pack(self.splices, MAGIC))
        if self._out:
            piece = bytes(self._out)
            self._sha.update(piece)
            self._writer.write(piece)
            self._out = bytearray()
        return self._writer.finish(self._sha.digest())


def splices(read_at: Callable[[int, int], bytes], size: int) -> tuple[int, list[tuple[int, int, bytes]]]:
    """The raw length and the splice table of a skeleton object of ``size`` bytes."""
    if size < _TAIL.size:
        raise StoreError("skeleton object is too short")
    n, magic = _TAIL.unpack(read_at(size - _TAIL.size, _TAIL.size))
    table_len = n * _REC.size
    if magic != MAGIC or table_len > size - _TAIL.size:
        raise StoreError("not a skeleton object")
    raw_len = size - _TAIL.size - table_len
    table = read_at(raw_len, table_len)
    recs = [_REC.unpack_from(table, i * _REC.size) for i in range(n)]
    last = 0
    for off, _, _ in recs:
        if not last <= off <= raw_len:
            raise StoreError("skeleton splice table is out of order")
        last = off
    return raw_len, recs


def referenced(store: Store, sha: bytes) -> list[bytes]:
    """The content objects a skeleton splices in."""
    size = store.object_size(sha)
    return [s for _, _, s in splices(lambda o, n: store.read_at(sha, o, n), size)[1]]


def stream(store: Store, sha: bytes) -> Iterator[bytes]:
    """The original stream, rebuilt: skeleton bytes with every file's contents spliced back."""
    size = store.object_size(sha)
    raw_len, recs = splices(lambda o, n: store.read_at(sha, o, n), size)
    raw = store.iter_object(sha)
    buf = b""
    pos = 0  # offset in raw of buf[0]

    def take(n: int) -> Iterator[bytes]:
        nonlocal buf, pos
        while n:
            if not buf:
                buf = next(raw)
            piece = buf[:n]
            buf = buf[len(piece) :]
            pos += len(piece)
            n -= len(piece)
            yield piece

    for off, length, content in recs:
        yield from take(off - pos)
        got = 0
        for piece in store.iter_object(content):
            got += len(piece)
            yield piece
        if got != length:
            raise StoreError(f"object {content.hex()} has {got} bytes, the skeleton splices {length}")
    yield from take(raw_len - pos)
