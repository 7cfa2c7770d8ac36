"""Where compressed chunk bytes live: packs behind a small interface.

Chunks are appended to *packs* of about ``PACK_TARGET`` bytes; an object record
names (pack id, offset, length) for each of its chunks.  Packing keeps small
compressed files from wasting most of an LMDB page each (a 1 KiB value that
spills to an overflow page costs 4 KiB) and lets a pack-file backend serve the
same interface where the LMDB map cannot hold the payload (32-bit boards).

Two backends, recorded in the store's ``meta/payload`` when it is created
(``docs/FORMAT.md``):

``LmdbPayload`` keeps each pack as one value of the ``packs`` database; reads
slice the memory map without copying the pack.

``FilePayload`` keeps each pack as one append-once file ``packs/<16 hex digits
of the id>`` beside ``data.mdb``, and in the ``packs`` database only its length.
Metadata stays in LMDB, so the LMDB map holds no payload (a 32-bit process can
map about 1 GiB).  Crash safety is an order: a pack file is written and synced
(and the directory that names it) before the write transaction that records it
commits, and deleted only after the transaction that drops its record commits.
A killed writer leaves at worst files no record names; they are removed in a
write transaction (``remove_orphans``: when the store is opened for writing,
and by ``gc``), where no other writer can be half-way through its own files.

A reader holding an older snapshot may still read a pack whose record a newer
transaction deleted (an LMDB pack's pages outlive the deletion the same way), so
the file of a deleted pack is removed only once no reader of the environment
holds a snapshot older than the last commit (``readers_behind``; a mount daemon
renews the snapshot it pins about once a second, and the C reader's snapshots
are never older than that pin); until then it is left as an orphan.

Thread-safety: reads are safe from any thread (each call runs in the caller's
transaction; pack files are read with ``pread`` on shared descriptors).  The
write hooks (``put_pack``, ``delete_pack``, ``before_commit``, ``after_commit``,
``after_abort``) belong to the one write transaction a process can have open.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

import lmdb

PACK_TARGET = 4 << 20
_ID = struct.Struct(">Q")
_LEN = struct.Struct("<Q")  # a pack file's length, the value of its record in ``packs``

LMDB, FILES = "lmdb", "files"
KINDS = (LMDB, FILES)
PACK_DIR = "packs"
OPEN_FILES = 64  # pack file descriptors a process keeps open for reading
SYNC_BATCH = 64  # files written in one transaction are synced in groups of this many
READER_WAIT = 2.0  # seconds to wait for readers of older snapshots before deleting pack files


class Payload(Protocol):
    kind: str

    def put_pack(self, txn: lmdb.Transaction, pack_id: int, data: bytes) -> None: ...
    def read(self, txn: lmdb.Transaction, pack_id: int, offset: int, length: int) -> memoryview: ...
    def delete_pack(self, txn: lmdb.Transaction, pack_id: int) -> None: ...
    def pack_ids(self, txn: lmdb.Transaction) -> Iterator[tuple[int, int]]: ...
    def before_commit(self) -> None: ...
    def after_commit(self) -> None: ...
    def after_abort(self) -> None: ...
    def remove_orphans(self, txn: lmdb.Transaction) -> tuple[int, int]: ...
    def check(self, txn: lmdb.Transaction) -> list[str]: ...
    def close(self) -> None: ...


class MissingPack(LookupError):
    """A pack (or the part of it a chunk names) is not there: the store says
    ``CorruptionError`` with this message."""


class PackWriteError(OSError):
    """A pack file could not be written or synced (a full disk, say); the transaction that
    would have recorded it is aborted.  The message names the file and the reason."""


def _write_error(what: str, path: str, exc: OSError) -> PackWriteError:
    return PackWriteError(exc.errno, f"cannot {what} pack file {path}: {exc.strerror}")


class LmdbPayload:
    kind = LMDB

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

    # the pack is the transaction's own value: LMDB's commit is all there is
    def before_commit(self) -> None:
        pass

    def after_commit(self) -> None:
        pass

    def after_abort(self) -> None:
        pass

    def remove_orphans(self, txn: lmdb.Transaction) -> tuple[int, int]:
        return 0, 0

    def check(self, txn: lmdb.Transaction) -> list[str]:
        return []  # the pages are checked with every other database's (pages.py)

    def close(self) -> None:
        pass


def pack_name(pack_id: int) -> str:
    """A pack file's name: the id in 16 hex digits (so a listing sorts by id)."""
    return f"{pack_id:016x}"


def _pack_id(name: str) -> int | None:
    if len(name) != 16:
        return None
    try:
        return int(name, 16)
    except ValueError:
        return None


class _Open:
    __slots__ = ("fd", "users", "evicted")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.evicted = False


class FilePayload:
    """Packs as files in ``<store>/packs``, their lengths in the ``packs`` database.

    One file per pack, each written once and never appended to later: gc deletes a
    file whose chunks are all dead and rewrites one less than half alive (a file
    per pack makes both a plain unlink, the same rule as the LMDB packs), and the
    object record's u32 offset stays an offset in a file of about 4 MiB.  Nothing
    here reads a pack whole: chunks are read with ``pread`` (64-bit offsets)."""

    kind = FILES

    def __init__(
        self,
        store_path: str,
        db: lmdb._Database,
        meta: lmdb._Database,
        readers_behind: Callable[[], bool],
        *,
        readonly: bool = False,
    ) -> None:
        self._db = db
        self._meta = meta
        # does a reader hold a snapshot older than the last commit?  (it may read deleted packs)
        self._readers_behind = readers_behind
        self.dir = os.path.join(store_path, PACK_DIR)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._open: OrderedDict[int, _Open] = OrderedDict()
        self._written: list[tuple[int, int]] = []  # (pack id, fd) of this transaction, not synced
        self._synced: list[int] = []  # pack ids of this transaction, already synced
        self._doomed: list[int] = []  # pack ids whose records this transaction deletes

    def path(self, pack_id: int) -> str:
        return os.path.join(self.dir, pack_name(pack_id))

    # -- writing (inside the one write transaction) --------------------------------------
    def put_pack(self, txn: lmdb.Transaction, pack_id: int, data: bytes) -> None:
        path = self.path(pack_id)
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            # O_TRUNC: a file of this id can only be the leftover of a transaction that never
            # committed (ids are allocated in the write transaction from meta/next_pack)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _write_error("create", path, exc) from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            if isinstance(exc, OSError):
                raise _write_error("write", path, exc) from None
            raise
        self._written.append((pack_id, fd))
        if len(self._written) >= SYNC_BATCH:
            self._sync_written()
        txn.put(_ID.pack(pack_id), _LEN.pack(len(data)), db=self._db)

    def _sync_written(self) -> None:
        written, self._written = self._written, []
        self._synced += [pack_id for pack_id, _ in written]  # after_abort deletes them either way
        try:
            for pack_id, fd in written:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    raise _write_error("sync", self.path(pack_id), exc) from None
        finally:
            for _, fd in written:
                os.close(fd)

    def delete_pack(self, txn: lmdb.Transaction, pack_id: int) -> None:
        txn.delete(_ID.pack(pack_id), db=self._db)
        self._doomed.append(pack_id)  # the file goes once the deletion is committed

    def before_commit(self) -> None:
        """Make every pack file this transaction wrote durable, and its name: the commit
        that follows may point at them."""
        if not self._written and not self._synced:
            return
        self._sync_written()
        try:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _write_error("sync the directory of", self.dir, exc) from None

    def after_commit(self) -> None:
        """The transaction committed: the files of the packs it deleted can go, once no
        reader holds a snapshot from before it (else they stay, orphans for later)."""
        self._synced = []
        doomed, self._doomed = self._doomed, []
        if not doomed or not self._caught_up(READER_WAIT):
            return
        for pack_id in doomed:
            self._forget(pack_id)
            with contextlib.suppress(OSError):  # (one left behind is an orphan: removed later)
                os.unlink(self.path(pack_id))

    def after_abort(self) -> None:
        """The transaction did not commit: the files it wrote are nobody's."""
        written, self._written = self._written, []
        for _, fd in written:
            os.close(fd)
        ids = [pack_id for pack_id, _ in written] + self._synced
        self._synced, self._doomed = [], []
        for pack_id in ids:
            self._forget(pack_id)
            with contextlib.suppress(OSError):
                os.unlink(self.path(pack_id))

    def _caught_up(self, wait: float) -> bool:
        """True once no reader holds a snapshot older than the last commit (waiting up to
        ``wait`` seconds for them to move on)."""
        deadline = time.monotonic() + wait
        while self._readers_behind():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def remove_orphans(self, txn: lmdb.Transaction) -> tuple[int, int]:
        """Delete pack files no record names (files, bytes): what a killed writer wrote (ids
        never committed: always), and files of packs deleted earlier (only when no reader
        holds an older snapshot, which may still name them).  Only in a write transaction:
        no writer in another process is then half-way through writing its own."""
        orphans = self.orphans(txn)
        value = txn.get(b"next_pack", db=self._meta)
        next_pack = _ID.unpack(value)[0] if value is not None else 1
        if any(pack_id < next_pack for pack_id in orphans) and self._readers_behind():
            orphans = [pack_id for pack_id in orphans if pack_id >= next_pack]
        freed = 0
        for pack_id in orphans:
            path = self.path(pack_id)
            with contextlib.suppress(OSError):
                freed += os.path.getsize(path)
                os.unlink(path)
        return len(orphans), freed

    def orphans(self, txn: lmdb.Transaction) -> list[int]:
        """Ids of pack files that no record of ``txn``'s snapshot names."""
        try:
            names = os.listdir(self.dir)
        except OSError:  # none yet, or not ours to list: nothing to remove from here
            return []
        found = []
        doomed = set(self._doomed)  # deleted by this transaction: removed once it commits
        for name in names:
            pack_id = _pack_id(name)
            if pack_id is None or pack_id in doomed:
                continue
            if txn.get(_ID.pack(pack_id), db=self._db) is None:
                found.append(pack_id)
        return sorted(found)

    # -- reading -----------------------------------------------------------------------
    def read(self, txn: lmdb.Transaction, pack_id: int, offset: int, length: int) -> memoryview:
        entry = self._acquire(pack_id)
        try:
            data = os.pread(entry.fd, length, offset)
        except OSError as exc:
            raise MissingPack(f"pack file {self.path(pack_id)} does not read: {exc.strerror}") from None
        finally:
            self._release(entry)
        if len(data) != length:
            raise MissingPack(
                f"pack file {self.path(pack_id)} is shorter than its index says "
                f"(a chunk at {offset} of {length} bytes; the file ends at {offset + len(data)})"
            )
        return memoryview(data)

    def _acquire(self, pack_id: int) -> _Open:
        with self._lock:
            entry = self._open.get(pack_id)
            if entry is not None:
                self._open.move_to_end(pack_id)
                entry.users += 1
                return entry
        try:
            fd = os.open(self.path(pack_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MissingPack(f"pack file {self.path(pack_id)} is missing") from None
        except OSError as exc:
            raise MissingPack(f"pack file {self.path(pack_id)} does not open: {exc.strerror}") from None
        with self._lock:
            entry = self._open.get(pack_id)
            if entry is not None:  # another thread opened it meanwhile
                os.close(fd)
            else:
                entry = self._open[pack_id] = _Open(fd)
                while len(self._open) > OPEN_FILES:
                    _, old = self._open.popitem(last=False)
                    old.evicted = True
                    if old.users == 0:
                        os.close(old.fd)
            entry.users += 1
            return entry

    def _release(self, entry: _Open) -> None:
        with self._lock:
            entry.users -= 1
            if entry.evicted and entry.users == 0:
                os.close(entry.fd)

    def _forget(self, pack_id: int) -> None:
        with self._lock:
            entry = self._open.pop(pack_id, None)
            if entry is not None:
                entry.evicted = True
                if entry.users == 0:
                    os.close(entry.fd)

    def pack_ids(self, txn: lmdb.Transaction) -> Iterator[tuple[int, int]]:
        """(pack id, stored length) of every pack, as the records say."""
        with txn.cursor(db=self._db) as cur:
            for key, value in cur:
                yield _ID.unpack(key)[0], _LEN.unpack(value)[0] if len(value) == _LEN.size else 0

    def check(self, txn: lmdb.Transaction) -> list[str]:
        """What is wrong with the pack files (for ``verify``): a recorded pack whose file is
        missing or not as long as its record says, a record that is not a length."""
        errors = []
        with txn.cursor(db=self._db) as cur:
            for key, value in cur:
                pack_id = _ID.unpack(key)[0]
                if len(value) != _LEN.size:
                    errors.append(f"pack {pack_id}: its record is not a length ({len(value)} bytes)")
                    continue
                want = _LEN.unpack(value)[0]
                try:
                    size = os.stat(self.path(pack_id)).st_size
                except FileNotFoundError:
                    errors.append(f"pack {pack_id}: file {self.path(pack_id)} is missing")
                    continue
                except OSError as exc:
                    errors.append(f"pack {pack_id}: file {self.path(pack_id)}: {exc.strerror}")
                    continue
                if size != want:
                    errors.append(
                        f"pack {pack_id}: file {self.path(pack_id)} holds {size} bytes, its record says {want}"
                    )
        return errors

    def close(self) -> None:
        with self._lock:
            for entry in self._open.values():
                entry.evicted = True
                if entry.users == 0:
                    os.close(entry.fd)
            self._open.clear()
