"""Where compressed chunk bytes live: packs behind a small interface.

Chunks are appended to *packs* of about ``PACK_TARGET`` bytes; an object record
names (pack id, offset, length) for each of its chunks.  Packing keeps small
compressed files from wasting most of an LMDB page each (a 1 KiB value that
spills to an overflow page costs 4 KiB) and lets a pack-file backend serve the
same interface where the LMDB map cannot hold the payload (32-bit boards).

``LmdbPayload`` keeps each pack as one value of the ``packs`` database; reads
slice the memory map without copying the pack.  Thread-safe as LMDB is: each
call runs in the caller's transaction.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Protocol

import lmdb

PACK_TARGET = 4 << 20
_ID = struct.Struct(">Q")


class Payload(Protocol):
    def put_pack(self, txn: lmdb.Transaction, pack_id: int, data: bytes) -> None: ...
    def read(self, txn: lmdb.Transaction, pack_id: int, offset: int, length: int) -> memoryview: ...
    def delete_pack(self, txn: lmdb.Transaction, pack_id: int) -> None: ...
    def pack_ids(self, txn: lmdb.Transaction) -> Iterator[tuple[int, int]]: ...


class MissingPack(LookupError):
    pass


class LmdbPayload:
    def __init__(self, db: lmdb._Database) -> None:
        self._db = db

    def put_pack(self, txn: lmdb.Transaction, pack_id: int, data: bytes) -> None:
        txn.put(_ID.pack(pack_id), data, db=self._db)

    def read(self, txn: lmdb.Transaction, pack_id: int, offset: int, length: int) -> memoryview:
        # the transaction is opened with buffers=True: this slices the map, no copy;
        # the view is valid until the transaction ends
        buf = txn.get(_ID.pack(pack_id), db=self._db)
        if buf is None or offset + length > len(buf):
            raise MissingPack(f"pack {pack_id} is missing or shorter than its index says")
        return memoryview(buf)[offset : offset + length]

    def delete_pack(self, txn: lmdb.Transaction, pack_id: int) -> None:
        txn.delete(_ID.pack(pack_id), db=self._db)

    def pack_ids(self, txn: lmdb.Transaction) -> Iterator[tuple[int, int]]:
        """(pack id, stored length) of every pack."""
        with txn.cursor(db=self._db) as cur:
            for key, value in cur:
                yield _ID.unpack(key)[0], len(value)
