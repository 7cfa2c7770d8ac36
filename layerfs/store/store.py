"""The content-addressed layer store: an LMDB environment plus packed chunks.

See ``docs/FORMAT.md`` for the key schema.  In short: file contents are
*objects* keyed by their SHA-256; an object is a list of chunks (at most
``CHUNK_SIZE`` bytes each, zstd-compressed unless that does not pay, each with
an XXH3-64 checksum of the raw bytes verified on every read) placed in packs.
Layers are entry tables (themselves objects) keyed by the layer's id (the
SHA-256 of its uncompressed tar stream); images and tags are small records.

Writes go through a ``WriteSession``: it holds a *lease* (so ``gc`` keeps what
it has written so far), compresses on a thread pool, and commits in large
batches.  Layers, images and tags are written only in the session's final
transaction, so a crash leaves nothing half-visible, only a lease that ``gc``
reclaims once its process is gone.

Thread-safety: a ``Store`` may be shared by threads for reading (each call
opens its own short read transaction).  A ``WriteSession`` belongs to one
thread.  Several processes may use one store; LMDB serialises the writers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import secrets
import shutil
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import lmdb
import xxhash
import zstandard

from layerfs import procfs
from layerfs.store.entries import Entry, decode_table, encode_table
from layerfs.store.payload import (
    FILES,
    KINDS,
    LMDB,
    PACK_DIR,
    PACK_TARGET,
    FilePayload,
    LmdbPayload,
    MissingPack,
    PackWriteError,
    Payload,
)
from layerfs.store.records import ImageRecord, LayerRecord

SCHEMA_VERSION = 1
CHUNK_SIZE = 64 * 1024
ZSTD_LEVEL = 3
# Chunks up to this size are compressed at a negative level, which leaves their literals raw:
# decoding a small chunk is mostly building its Huffman tables, a fixed cost a cold read of a
# small file pays every time (1 KiB text chunks decode at 256 MB/s at level 3, 976 MB/s at -1;
# 8 KiB: 415 -> 953 MB/s), for about 1.7 % more stored bytes on a Debian
# rootfs (docs/ARCHITECTURE.md, "Small chunks").
SMALL_CHUNK = 8 << 10
SMALL_LEVEL = -1
# A batch is committed once this much compressed data is pending (docs/ARCHITECTURE.md:
# 64 MiB batches write ~800 MB/s; one put per commit ~1,100/s).
BATCH_BYTES = 64 << 20
# Files up to this size are held raw until their digest is known, so a file the
# store already has is never compressed.  Larger ones are compressed as they
# stream; if they turn out to be duplicates their chunks become garbage for gc.
HOLD_BYTES = 8 << 20
SPILL_BYTES = 32 << 20  # raw bytes of one file waiting in memory before they go to packs
# Chunks are compressed in groups of about this much, one call into zstd per group
# that runs on all cores without the GIL: per-chunk tasks on a thread pool spent
# their time handing the GIL back and forth with the parsing thread.
COMPRESS_GROUP = 4 << 20
# The LMDB map: address space reserved for data.mdb, grown on MapFullError.  A 64-bit process
# has address space to spare; a 32-bit one (armhf) can map about 1 GiB in all, and a store with
# file packs keeps only metadata in the map, so it starts small there (several stores can be open
# in one process) and an existing file is mapped with a little room, not twice its size.
ADDRESS_32 = sys.maxsize <= 2**32
INITIAL_MAP = (32 << 20) if ADDRESS_32 else (1 << 30)
# private knob (tests): the largest map this process asks for; None is as large as mmap allows
MAP_LIMIT: int | None = None
# where a new store keeps its payload (docs/FORMAT.md, meta/payload): LAYERFS_STORE_PAYLOAD, else
# pack files where the LMDB map cannot hold it (a 32-bit address space), else LMDB
PAYLOAD_ENV = "LAYERFS_STORE_PAYLOAD"

RAW, ZSTD = 0, 1
_OBJ_HEAD = struct.Struct("<BQI")  # record version, size, chunk count
_OBJ_CHUNK = struct.Struct("<QIIIQB")  # pack id, offset, stored len, raw len, xxh3_64(raw), codec
_U64 = struct.Struct(">Q")

T = TypeVar("T")


class StoreError(Exception):
    """The store cannot do what was asked; the message is for the user."""


class CorruptionError(StoreError):
    """Stored bytes do not match their checksum or digest."""


class MissingPackError(CorruptionError, LookupError):
    """A chunk's pack (or the part of it the chunk names) is missing: a pack file deleted or cut
    short, a pack record gone."""


class MapLimitError(StoreError):
    """The store's LMDB map cannot grow in this process's address space (a 32-bit system)."""


class StoreDamaged(CorruptionError):
    """The store's LMDB pages are damaged: LMDB cannot read its B-trees or meta pages.
    ``cause`` says what failed; the message adds the store's path and what to do."""

    def __init__(self, path: str, cause: str) -> None:
        super().__init__(f"the store at {path} is damaged ({cause}); run 'layerfs verify'")
        self.path = path
        self.cause = cause


# what LMDB says when a page or a meta page is not what it should be (BadTxnError: a
# transaction that met one of these is unusable, and says so at its next step)
DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.BadTxnError)


@dataclass(frozen=True)
class Chunk:
    pack: int
    offset: int
    stored: int
    raw: int
    xxh: int
    codec: int


def encode_object(size: int, chunks: list[Chunk]) -> bytes:
    parts = [_OBJ_HEAD.pack(1, size, len(chunks))]
    parts += [_OBJ_CHUNK.pack(c.pack, c.offset, c.stored, c.raw, c.xxh, c.codec) for c in chunks]
    return b"".join(parts)


def decode_object(rec: bytes | memoryview) -> tuple[int, list[Chunk]]:
    version, size, count = _OBJ_HEAD.unpack_from(rec, 0)
    if version != 1 or len(rec) != _OBJ_HEAD.size + count * _OBJ_CHUNK.size:
        raise CorruptionError("object record is malformed")
    chunks = [Chunk(*_OBJ_CHUNK.unpack_from(rec, _OBJ_HEAD.size + i * _OBJ_CHUNK.size)) for i in range(count)]
    return size, chunks


def default_path() -> str:
    if os.environ.get("LAYERFS_STORE"):
        return os.environ["LAYERFS_STORE"]
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "layerfs")


def chain_id(layer_ids: list[bytes]) -> bytes:
    """Identity of a layer chain (bottom first): what a merged index is cached under."""
    return hashlib.sha256(b"".join(layer_ids)).digest()


def chain_prefix(chain: bytes) -> bytes:
    """The key prefix of a chain's records in the ``union`` database (kept short: every
    index key carries it)."""
    return chain[:8]


def _payload_choice(asked: str | None) -> str:
    """Where a store created now keeps its payload: ``asked``, else $LAYERFS_STORE_PAYLOAD,
    else pack files where the address space is 32-bit (the LMDB map cannot hold a large
    store there), else LMDB."""
    kind = asked or os.environ.get(PAYLOAD_ENV) or (FILES if ADDRESS_32 else LMDB)
    if kind not in KINDS:
        where = "payload" if asked else PAYLOAD_ENV
        raise StoreError(f"{where} must be one of {', '.join(KINDS)}, not {kind!r}")
    return kind


def _address_space_for(size: int) -> bool:
    """Can this process map ``size`` more bytes?  (A reservation with no access (PROT_NONE),
    undone at once.)"""
    try:
        probe = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=0)
    except (OSError, OverflowError, ValueError):
        return False
    probe.close()
    return True


_tls = threading.local()


def _compressor(small: bool = False) -> zstandard.ZstdCompressor:
    """This thread's compressor for chunks of more than SMALL_CHUNK bytes (``small``: for the others)."""
    name = "small_cctx" if small else "cctx"
    c = getattr(_tls, name, None)
    if c is None:
        c = zstandard.ZstdCompressor(
            level=SMALL_LEVEL if small else ZSTD_LEVEL, write_content_size=False, write_checksum=False
        )
        setattr(_tls, name, c)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


def compress_chunk(raw: bytes) -> tuple[bytes, int, int, int]:
    """(stored bytes, codec, xxh3 of raw, raw length); stored raw if zstd does not pay."""
    return _stored_form(raw, _compressor(len(raw) <= SMALL_CHUNK).compress(raw))


def _stored_form(raw: bytes, packed: bytes) -> tuple[bytes, int, int, int]:
    if len(packed) >= len(raw):
        return raw, RAW, xxhash.xxh3_64_intdigest(raw), len(raw)
    return packed, ZSTD, xxhash.xxh3_64_intdigest(raw), len(raw)


def compress_group(raws: list[bytes]) -> list[tuple[bytes, int, int, int]]:
    """``compress_chunk`` of many chunks in one zstd call per level across all cores (GIL
    released)."""
    if len(raws) == 1 or not hasattr(_compressor(), "multi_compress_to_buffer"):
        # zstandard built on the system's libzstd (Debian's python3-zstandard, which a venv with
        # --system-site-packages uses on boards without wheels) has no multi_compress_to_buffer:
        # one call per chunk, still in this pool thread with the GIL released
        return [compress_chunk(raw) for raw in raws]
    out: list[tuple[bytes, int, int, int]] = [(b"", 0, 0, 0)] * len(raws)
    for small in (False, True):
        which = [i for i, raw in enumerate(raws) if (len(raw) <= SMALL_CHUNK) == small]
        if not which:
            continue
        inputs: Any = [raws[i] for i in which]  # zstandard's stubs want a BufferWithSegments
        packed = _compressor(small).multi_compress_to_buffer(inputs, threads=os.cpu_count() or 2)
        for j, i in enumerate(which):
            out[i] = _stored_form(raws[i], packed[j].tobytes())
    return out


class _Group:
    """Chunks waiting to be compressed together; ``future`` is set once submitted."""

    __slots__ = ("raws", "size", "future")

    def __init__(self) -> None:
        self.raws: list[bytes] = []
        self.size = 0
        self.future: Future[list[tuple[bytes, int, int, int]]] | None = None


class _Slot:
    """One chunk's place in a group: its compressed form once the group is done."""

    __slots__ = ("group", "index")

    def __init__(self, group: _Group, index: int) -> None:
        self.group = group
        self.index = index

    def result(self) -> tuple[bytes, int, int, int]:
        assert self.group.future is not None
        return self.group.future.result()[self.index]


# what a store directory holds besides data.mdb: LMDB's lock file (made before data.mdb), and
# the directories of mounts, containers, the file cache and pack files
_OWN_FILES = {"lock.mdb", "mounts", "containers", "filecache", PACK_DIR}


class Store:
    """An open layer store.  Use as a context manager or call ``close()``."""

    DBS = (
        "meta",
        "objects",
        "packs",
        "layers",
        "images",
        "tags",
        "leases",
        "lease_objs",
        "lease_packs",
        "chains",
        "union",
    )

    def __init__(
        self,
        path: str | None = None,
        *,
        readonly: bool = False,
        create: bool = True,
        payload: str | None = None,
    ) -> None:
        """Open the store at ``path`` (default: ``default_path()``), creating it unless
        ``readonly`` or not ``create``.  ``payload`` chooses where a store created now keeps
        its chunks (``"files"``: pack files, ``"lmdb"``: the ``packs`` database; default
        ``$LAYERFS_STORE_PAYLOAD``, else pack files on a 32-bit system and LMDB elsewhere); an
        existing store keeps the one it was created with (``payload_kind``)."""
        if path == "":
            raise StoreError("an empty store path names no directory")
        # absolute: mount daemons change directory to / and reopen the store by this path
        self.path = os.path.abspath(path or default_path())
        self.readonly = readonly
        self._wanted_payload = _payload_choice(payload)
        self.payload_kind = ""  # LMDB or FILES once the store's meta is read (_check_schema)
        self.orphans_removed = (0, 0)  # pack files (and bytes) removed when opened: gc reports them
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise StoreError(f"{self.path} is not a directory, so not a layerfs store")
        if not os.path.isdir(self.path):
            if readonly or not create:
                raise StoreError(f"no layerfs store at {self.path}")
            try:
                # private: image contents are readable in data.mdb (parents as umask makes them)
                os.makedirs(self.path, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the store directory {self.path}: {exc.strerror}") from None
        self._recognise()
        self._open()
        if not readonly:
            self._make_private()
        self._check_schema()
        if not readonly:
            self._remove_orphan_packs()

    def _make_private(self) -> None:
        """A store of ours that others can read (made before stores were private, or by hand)
        becomes private: the directory 0700, LMDB's files 0600.  Stores of other users are left
        as they are (root using someone's store must not take it from them)."""
        try:
            if os.stat(self.path).st_uid != os.geteuid():
                return
            for name, private in (("", 0o700), ("data.mdb", 0o600), ("lock.mdb", 0o600), (PACK_DIR, 0o700)):
                path = os.path.join(self.path, name)
                if name == PACK_DIR and not os.path.isdir(path):
                    continue  # a store with its payload in LMDB
                st = os.stat(path)
                if stat.S_IMODE(st.st_mode) & ~private & 0o777 and st.st_uid == os.geteuid():
                    os.chmod(path, stat.S_IMODE(st.st_mode) & private)
        except OSError:
            pass  # a read-only filesystem, say: the store works as it is

    def _recognise(self) -> None:
        """Refuse a directory that holds something other than a layerfs store, before anything
        is written to it: LMDB adopts any environment, and ``_open`` would add our databases
        to it.  A store is a directory whose ``data.mdb`` is an LMDB environment with a
        ``meta`` database holding ``schema``, or (its creation interrupted) whose main database
        names only databases of ours; an empty directory becomes a new store."""
        try:
            names = set(os.listdir(self.path))
        except OSError as exc:
            raise StoreError(f"cannot read the store directory {self.path}: {exc.strerror}") from None
        if "data.mdb" not in names:
            other = sorted(names - _OWN_FILES)
            if other:
                raise StoreError(
                    f"{self.path} is not a layerfs store: it holds {other[0]!r} but no data.mdb "
                    "(give an empty or new directory)"
                )
            return
        for attempt in (1, 2, 3):
            try:
                found = self._probe()
            except lmdb.Error as exc:
                if attempt == 3:
                    raise self._error_of(exc, "cannot open store") from None
                continue
            if found is None:
                return
        raise StoreError(
            f"{self.path} is an LMDB environment but not a layerfs store (it holds {str(found)[:60]!r})"
        )

    def _probe(self) -> str | None:
        """A name in the environment's main database that no layerfs store has, or None.

        Read without writing anything: read-only, and without the lock file (which would be
        created or reset).  Such a reader takes no reader slot, so a writer in another process
        may reuse a page under it: a strange answer is asked again (``_recognise``)."""
        env = lmdb.open(self.path, readonly=True, lock=False, max_dbs=1, create=False)
        try:
            with env.begin() as txn:
                keys = [bytes(k) for k in txn.cursor().iternext(values=False)]
                if b"meta" in keys:
                    try:
                        meta = env.open_db(b"meta", txn=txn, create=False)
                    except lmdb.Error:
                        return "meta"  # a plain key, not a database
                    if txn.get(b"schema", db=meta) is not None:
                        return None
                for k in keys:
                    if k.decode(errors="replace") not in self.DBS:
                        return k.decode(errors="replace")
                return None
        finally:
            env.close()

    def _error_of(self, exc: lmdb.Error, what: str) -> StoreError:
        if isinstance(exc, DAMAGE):
            return self.damaged(exc)
        if what == "cannot open store" and os.path.exists(os.path.join(self.path, "data.mdb")):
            from layerfs.store.pages import meta_problem

            problem = meta_problem(self.path)
            if problem is not None:
                return self.damaged(f"{problem}; LMDB says: {self._unprefixed(exc)}")
        return StoreError(f"{what} {self.path}: {exc}")

    def damaged(self, cause: object) -> StoreDamaged:
        """The error for a store whose pages LMDB cannot read (``cause``: what failed)."""
        return StoreDamaged(self.path, self._unprefixed(cause))

    def _unprefixed(self, exc: object) -> str:
        """An LMDB message without the path that lmdb.open puts first."""
        text = str(exc)
        return text[len(self.path) + 2 :] if text.startswith(self.path + ": ") else text

    def refuse_if_damaged(self) -> None:
        """StoreDamaged if any page of the store does not read (``pages.check``): verbs that
        delete (gc, rmi) must not decide what is unused on a store they cannot read whole."""
        from layerfs.store.pages import check

        found = check(self)
        if found:
            raise self.damaged(found[0] + (f"; and {len(found) - 1} more" if len(found) > 1 else ""))

    def _open(self) -> None:
        readonly = self.readonly
        data_file = os.path.join(self.path, "data.mdb")
        used = os.path.getsize(data_file) if os.path.exists(data_file) else 0
        # 64-bit: twice the file, so a growing store seldom remaps.  32-bit: the file and an
        # eighth more (mapping twice a 1.05 GB file is what failed there); if even that does
        # not fit, the file alone (LMDB never maps less than the pages in use)
        sizes = [max(INITIAL_MAP, used + used // 8), used] if ADDRESS_32 else [max(INITIAL_MAP, used * 2)]
        if MAP_LIMIT is not None:
            sizes = [min(size, max(MAP_LIMIT, used)) for size in sizes]
        for i, size in enumerate(sizes):
            try:
                self.env = lmdb.open(
                    self.path,
                    map_size=size,
                    max_dbs=len(self.DBS) + 2,
                    readonly=readonly,
                    # keep the OS read-ahead: chunks of a file and files of a layer sit together in packs
                    readahead=True,
                    max_readers=256,
                    mode=0o600,  # data.mdb and lock.mdb: private to the store's owner
                )
                break
            except lmdb.MemoryError:
                if i + 1 < len(sizes):
                    continue
                raise self._map_error(size, opening=True) from None
            except lmdb.Error as exc:
                raise self._error_of(exc, "cannot open store") from None
        try:
            self._db = {name: self.env.open_db(name.encode(), create=not readonly) for name in self.DBS}
        except lmdb.NotFoundError:
            self.env.close()
            raise StoreError(f"{self.path} is not an initialised layerfs store") from None
        except lmdb.Error as exc:
            self.env.close()
            raise self._error_of(exc, "cannot open store") from None
        old = getattr(self, "payload", None)
        if old is not None:
            old.close()
        self.payload: Payload = self._new_payload()

    def _new_payload(self) -> Payload:
        if self.payload_kind == FILES:
            return FilePayload(
                self.path, self._db["packs"], self._db["meta"], self.readers_behind, readonly=self.readonly
            )
        return LmdbPayload(self._db["packs"])  # (also before the kind is known: nothing reads it)

    def _remove_orphan_packs(self) -> None:
        """Pack files no record names (a writer killed before its commit) are removed when
        the store is opened for writing: looked for in a read transaction, removed in a write
        transaction (where no other writer can be writing its own)."""
        if not isinstance(self.payload, FilePayload):
            return
        payload = self.payload
        with self.read() as txn:
            orphans = payload.orphans(txn)
            value = txn.get(b"next_pack", db=self._db["meta"])
            next_pack = _U64.unpack(value)[0] if value is not None else 1
        # (files of deleted packs wait for readers of older snapshots: no write to find that out)
        if not orphans or (max(orphans) < next_pack and self.readers_behind()):
            return
        with contextlib.suppress(StoreError):  # a read-only filesystem, say: gc will
            files, size = self.write(payload.remove_orphans)
            self.orphans_removed = (self.orphans_removed[0] + files, self.orphans_removed[1] + size)

    def readers_behind(self) -> bool:
        """Does a reader of the environment (in any process) hold a snapshot older than the
        last commit?  Such a reader may still read packs deleted since.  Slots of processes
        that are gone are cleared first; the C reader has no slot of its own, but never reads
        a snapshot older than the one its daemon pins (docs/FORMAT.md)."""
        try:
            self.env.reader_check()
            table = self.env.readers()
            last = self.env.info()["last_txnid"]
        except lmdb.Error:
            return True
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) == 3 and fields[2].isdigit() and int(fields[2]) < last:
                return True
        return False

    def _map_error(self, size: int, *, opening: bool = False) -> MapLimitError:
        """The error for a map of ``size`` bytes that this process cannot reserve."""
        hint = (
            "; its chunks are in the database: a new store made with LAYERFS_STORE_PAYLOAD=files "
            "keeps them in pack files and only metadata in the map"
            if self.payload_kind != FILES
            else ""
        )
        if opening:
            used = os.path.getsize(os.path.join(self.path, "data.mdb")) >> 20
            what = f"cannot open the store at {self.path}: its database ({used} MiB) needs a map of {size >> 20} MiB"
        else:
            what = f"cannot grow the store at {self.path}: its database needs a map of more than {size >> 20} MiB"
        return MapLimitError(f"{what}, more address space than this process can reserve{hint}")

    def _grow_map(self) -> None:
        """A larger map after MapFullError: twice the size, else a quarter more; MapLimitError
        when neither fits (MAP_LIMIT, or mmap refuses: a 32-bit address space)."""
        size = self.env.info()["map_size"]
        wanted = [size * 2, size + size // 4]
        if MAP_LIMIT is not None:
            wanted = [min(new, MAP_LIMIT) for new in wanted if min(new, MAP_LIMIT) > size]
        for new in wanted:
            # LMDB unmaps the old map before it maps the new one, and a failed mmap leaves the
            # environment with no map at all (reopening it would strand the database handles
            # callers hold), so first see whether the new size fits beside the old
            if not _address_space_for(new):
                continue
            try:
                self.env.set_mapsize(new)
                return
            except lmdb.Error:
                # lost a race for the address space: open the environment again as it was
                self._reopen_after_failed_map()
                break
        raise self._map_error(size)

    def _adopt_map(self) -> None:
        """Another process grew the map: adopt its size (MapLimitError if it does not fit)."""
        try:
            self.env.set_mapsize(0)
        except lmdb.Error:
            self._reopen_after_failed_map()
            raise self._map_error(self.env.info()["map_size"]) from None

    def _reopen_after_failed_map(self) -> None:
        with contextlib.suppress(lmdb.Error):
            self.env.close()
        self._open()

    # -- plumbing -----------------------------------------------------------
    def db(self, name: str) -> Any:
        return self._db[name]

    def close(self) -> None:
        self.env.close()
        self.payload.close()

    def free_file_bytes(self) -> int:
        """Bytes of data.mdb that hold no page of any database (free pages LMDB keeps for reuse:
        what compaction would return to the filesystem), estimated from the page counts."""
        psize = self.env.stat()["psize"]
        used = 2  # the meta pages
        with self.env.begin() as txn:
            for st in [txn.stat()] + [txn.stat(db) for db in self._db.values()]:
                used += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        size = os.path.getsize(os.path.join(self.path, "data.mdb"))
        return max(0, size - used * psize)

    def trim_file(self) -> int:
        """Cut data.mdb after its last page: bytes given back.  A commit that failed (a full
        disk) can leave written pages past the end of the database; no snapshot reads past
        its own last page, so this is safe beside readers, and holding the write transaction
        keeps any writer from committing meanwhile."""
        data = os.path.join(self.path, "data.mdb")
        psize = self.env.stat()["psize"]

        def trim(txn: lmdb.Transaction) -> int:
            end = (self.env.info()["last_pgno"] + 1) * psize
            size = os.path.getsize(data)
            if size <= end:
                return 0
            os.truncate(data, end)
            return size - end

        return self.write(trim)

    def compact_file(self) -> int | None:
        """Rewrite data.mdb without its free pages, returning them to the filesystem (LMDB
        itself never shrinks its file): the bytes returned, or None when another process has
        the store open (a mount, a container, an import), which a copy swapped in under it
        would lose.

        Every process with the environment open holds a shared lock on lock.mdb's first byte
        for as long as it does (LMDB's own protocol); an open-file-description write lock
        there succeeds only when no one else holds it, and makes a process opening the store
        meanwhile wait in LMDB's open until the new file is in place."""
        import fcntl

        data = os.path.join(self.path, "data.mdb")
        before = os.path.getsize(data)
        self.env.close()  # our own shared lock goes with it
        try:
            lock = os.open(os.path.join(self.path, "lock.mdb"), os.O_RDWR | os.O_CLOEXEC)
            try:
                try:
                    fcntl.fcntl(lock, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 1, 0))
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EACCES):
                        return None
                    raise
                self._copy_compacted(data)
            finally:
                os.close(lock)  # releases the write lock
        finally:
            self._open()
        return before - os.path.getsize(data)

    def _copy_compacted(self, data: str) -> None:
        tmp = os.path.join(self.path, f".compact-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp, 0o700)
        try:
            # no lock file: the caller holds the store exclusively
            env = lmdb.open(
                self.path,
                lock=False,
                readonly=True,
                max_dbs=len(self.DBS) + 2,
                map_size=os.path.getsize(data),  # (LMDB maps no less than the pages in use)
            )
            try:
                env.copy(tmp, compact=True)
            finally:
                env.close()
            new = os.path.join(tmp, "data.mdb")
            fd = os.open(new, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(new, os.stat(data).st_mode & 0o7777)
            os.rename(new, data)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def reopen(self) -> None:
        """Open the environment again after ``close`` (a process may not open one LMDB
        environment twice, so a forked child that needs the store gets it this way)."""
        self.env.close()
        self._open()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_schema(self) -> None:
        try:
            with self.read() as txn:
                found = txn.get(b"schema", db=self._db["meta"])
                found = None if found is None else bytes(found)
        except lmdb.Error as exc:
            self.env.close()
            raise self._error_of(exc, "cannot read store") from None
        if found is None:
            if self.readonly:
                raise StoreError(f"{self.path} is not an initialised layerfs store")
            self.payload_kind = self._create_meta()
        elif bytes(found) != str(SCHEMA_VERSION).encode():
            raise StoreError(
                f"store {self.path} has schema version {bytes(found).decode(errors='replace')}; "
                f"this layerfs reads version {SCHEMA_VERSION}"
            )
        else:
            with self.read() as txn:
                value = txn.get(b"payload", db=self._db["meta"])
                kind = LMDB if value is None else bytes(value).decode(errors="replace")  # (made before it)
            if kind not in KINDS:
                self.env.close()
                raise StoreError(
                    f"store {self.path} keeps its payload in {kind!r}, which this layerfs cannot read"
                )
            self.payload_kind = kind
        self.payload.close()
        self.payload = self._new_payload()

    def _create_meta(self) -> str:
        """A new store: its schema and where it keeps its payload (the pack directory first,
        so a store that says ``files`` has one)."""
        kind = self._wanted_payload
        if kind == FILES:
            try:
                os.makedirs(os.path.join(self.path, PACK_DIR), mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the pack directory of {self.path}: {exc.strerror}") from None

        def put(txn: lmdb.Transaction) -> str:
            meta = self._db["meta"]
            if txn.get(b"schema", db=meta) is not None:  # another process created it meanwhile
                value = txn.get(b"payload", db=meta)
                return LMDB if value is None else bytes(value).decode(errors="replace")
            txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=meta)
            txn.put(b"payload", kind.encode(), db=meta)
            return kind

        return self.write(put)

    def read(self) -> lmdb.Transaction:
        """A short read transaction (values are memoryviews valid until it ends)."""
        try:
            return self.env.begin(buffers=True)
        except lmdb.MapResizedError:
            # another process grew the map: adopt its size and try again
            self._adopt_map()
            return self.env.begin(buffers=True)

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in a write transaction, growing the map and retrying when full.

        ``fn`` must be safe to run again from scratch (the failed try is aborted).  Pack files
        the transaction wrote are synced before it commits; those of packs it deleted are
        removed once it has (``payload.py``)."""
        if self.readonly:
            raise StoreError("store is open read-only")
        while True:
            try:
                try:
                    with self.env.begin(write=True, buffers=True) as txn:
                        result = fn(txn)
                        self.payload.before_commit()
                except BaseException:
                    self.payload.after_abort()
                    raise
                self.payload.after_commit()
                return result
            except lmdb.MapFullError:
                self._grow_map()
            except lmdb.MapResizedError:
                self._adopt_map()
            except PackWriteError as exc:
                raise StoreError(
                    f"cannot write to the store at {self.path}: {exc.strerror}{self._space_hint()}"
                ) from None
            except DAMAGE as exc:
                raise self.damaged(f"{exc}; nothing was written") from None
            except lmdb.Error as exc:
                # the transaction was aborted: the store is as it was before it
                raise StoreError(
                    f"cannot write to the store at {self.path}: {exc}{self._space_hint()}"
                ) from None

    def trim_map_above(self, limit: int) -> None:
        """``trim_map`` once this process has more than ``limit`` bytes of files mapped."""
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssFile:"):
                    if int(line.split()[1]) * 1024 > limit:
                        self.trim_map()
                    return

    def trim_map(self) -> None:
        """Drop this process's mappings of the store's pages (MADV_DONTNEED).

        A long-running reader (a mount daemon walking a large tree) touches many B-tree
        pages; they stay in the page cache, but would also count in its resident memory
        for as long as the map lives.  Safe at any time: LMDB maps the file read-only
        and shared, so a page touched again is simply faulted back from the page cache."""
        data_file = os.path.realpath(os.path.join(self.path, "data.mdb"))
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if line.rstrip("\n").endswith(" " + data_file):
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED

    def _space_hint(self) -> str:
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            return ""
        return f" (only {free} bytes free on its filesystem)" if free < 64 << 20 else ""

    # -- objects ------------------------------------------------------------
    def has_object(self, sha: bytes) -> bool:
        with self.read() as txn:
            return txn.get(sha, db=self._db["objects"]) is not None

    def object_size(self, sha: bytes) -> int:
        with self.read() as txn:
            rec = txn.get(sha, db=self._db["objects"])
            if rec is None:
                raise StoreError(f"object {sha.hex()} is not in the store")
            return int(_OBJ_HEAD.unpack_from(rec, 0)[1])

    def chunk_bytes(self, txn: lmdb.Transaction, c: Chunk) -> bytes:
        """One chunk decompressed and verified (CorruptionError if it is damaged)."""
        try:
            stored = self.payload.read(txn, c.pack, c.offset, c.stored)
        except MissingPack as exc:
            raise MissingPackError(f"chunk in pack {c.pack} at {c.offset}: {exc}") from None
        if c.codec == ZSTD:
            try:
                raw = _decompressor().decompress(stored, max_output_size=c.raw)
            except zstandard.ZstdError as exc:
                raise CorruptionError(
                    f"chunk in pack {c.pack} at {c.offset} does not decompress: {exc}"
                ) from None
        else:
            raw = bytes(stored)
        if len(raw) != c.raw or xxhash.xxh3_64_intdigest(raw) != c.xxh:
            raise CorruptionError(f"chunk in pack {c.pack} at {c.offset} fails its checksum")
        return raw

    def iter_object(self, sha: bytes) -> Iterator[bytes]:
        """The object's bytes chunk by chunk, each checksum-verified."""
        with self.read() as txn:
            rec = txn.get(sha, db=self._db["objects"])
            if rec is None:
                raise StoreError(f"object {sha.hex()} is not in the store")
            _, chunks = decode_object(rec)
            for c in chunks:
                yield self.chunk_bytes(txn, c)

    def read_object(self, sha: bytes) -> bytes:
        return b"".join(self.iter_object(sha))

    def read_at(self, sha: bytes, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of an object (random access by chunk)."""
        with self.read() as txn:
            rec = txn.get(sha, db=self._db["objects"])
            if rec is None:
                raise StoreError(f"object {sha.hex()} is not in the store")
            size, chunks = decode_object(rec)
            out = []
            pos = 0
            end = min(offset + length, size)
            for c in chunks:
                if pos >= end:
                    break
                if pos + c.raw > offset:
                    raw = self.chunk_bytes(txn, c)
                    out.append(raw[max(0, offset - pos) : end - pos])
                pos += c.raw
            return b"".join(out)

    # -- layers, images, tags ---------------------------------------------------
    def get_layer(self, layer_id: bytes) -> LayerRecord | None:
        with self.read() as txn:
            rec = txn.get(layer_id, db=self._db["layers"])
            return None if rec is None else LayerRecord.decode(rec)

    def layer_entries(self, layer_id: bytes) -> list[Entry]:
        layer = self.get_layer(layer_id)
        if layer is None:
            raise StoreError(f"layer sha256:{layer_id.hex()} is not in the store")
        return decode_table(self.read_object(layer.table))

    def layers(self) -> list[tuple[bytes, LayerRecord]]:
        with self.read() as txn, txn.cursor(db=self._db["layers"]) as cur:
            return [(bytes(k), LayerRecord.decode(v)) for k, v in cur]

    def get_image(self, image_id: bytes) -> ImageRecord | None:
        with self.read() as txn:
            rec = txn.get(image_id, db=self._db["images"])
            return None if rec is None else ImageRecord.decode(rec)

    def images(self) -> list[tuple[bytes, ImageRecord]]:
        with self.read() as txn, txn.cursor(db=self._db["images"]) as cur:
            return [(bytes(k), ImageRecord.decode(v)) for k, v in cur]

    def tags(self) -> dict[str, bytes]:
        with self.read() as txn, txn.cursor(db=self._db["tags"]) as cur:
            return {bytes(k).decode(): bytes(v) for k, v in cur}

    def get_tag(self, name: str) -> bytes | None:
        with self.read() as txn:
            v = txn.get(name.encode(), db=self._db["tags"])
            return None if v is None else bytes(v)

    def set_tag(self, name: str, image_id: bytes) -> None:
        def fn(txn: lmdb.Transaction) -> None:
            if txn.get(image_id, db=self._db["images"]) is None:
                raise StoreError(f"image sha256:{image_id.hex()} is not in the store")
            txn.put(name.encode(), image_id, db=self._db["tags"])

        self.write(fn)

    def remove_tag(self, name: str) -> bool:
        return self.write(lambda txn: txn.delete(name.encode(), db=self._db["tags"]))

    def remove_image(self, image_id: bytes) -> list[str]:
        """Delete an image record and every tag naming it; returns the tags removed.

        Its layers and contents stay until ``gc`` finds nothing else uses them."""

        def fn(txn: lmdb.Transaction) -> list[str]:
            removed = []
            with txn.cursor(db=self._db["tags"]) as cur:
                for k, v in cur:
                    if bytes(v) == image_id:
                        removed.append(bytes(k).decode())
            for name in removed:
                txn.delete(name.encode(), db=self._db["tags"])
            if not txn.delete(image_id, db=self._db["images"]):
                raise StoreError(f"image sha256:{image_id.hex()} is not in the store")
            return removed

        return self.write(fn)

    # -- writing --------------------------------------------------------------
    def session(self, purpose: str = "import") -> WriteSession:
        return WriteSession(self, purpose)

    def leases(self) -> list[tuple[bytes, dict[str, Any]]]:
        with self.read() as txn, txn.cursor(db=self._db["leases"]) as cur:
            return [(bytes(k), json.loads(bytes(v))) for k, v in cur]

    @staticmethod
    def lease_alive(lease: dict[str, Any]) -> bool:
        """Is the process that took the lease still running?"""
        return procfs.is_alive(lease)

    def add_lease(
        self,
        purpose: str,
        layer_ids: list[bytes] | None = None,
        lease_id: bytes | None = None,
        *,
        image_id: bytes | None = None,
    ) -> bytes:
        """A lease of this process (gc reclaims it once the process is gone); ``layer_ids``
        pins those layers and everything they reference.  With ``image_id``, the image and
        every one of the layers must still exist when the lease is taken (in the same
        transaction: a concurrent rmi + gc either finds the lease or removed them first,
        and then this raises StoreError)."""
        lease_id = lease_id or secrets.token_bytes(8)
        lease: dict[str, Any] = {
            **procfs.identity(os.getpid()),
            "created": time.time(),
            "purpose": purpose,
        }
        if layer_ids is not None:
            lease["layers"] = [lid.hex() for lid in layer_ids]
        data = json.dumps(lease).encode()

        def put(txn: lmdb.Transaction) -> None:
            if image_id is not None:
                gone = txn.get(image_id, db=self._db["images"]) is None or any(
                    txn.get(lid, db=self._db["layers"]) is None for lid in layer_ids or []
                )
                if gone:
                    raise StoreError(f"image {image_id.hex()[:12]} was removed")
            txn.put(lease_id, data, db=self._db["leases"])

        self.write(put)
        return lease_id

    @contextlib.contextmanager
    def pinned(self, layer_ids: list[bytes], purpose: str) -> Iterator[None]:
        """Keep these layers (and all they reference) from gc while the block runs, as a mount
        does: a lease naming them, dropped at the end (or reclaimed by gc if we die)."""
        lease_id = self.add_lease(purpose, layer_ids)
        try:
            yield
        finally:
            with contextlib.suppress(StoreError):
                self.write(lambda txn: self.drop_lease(txn, lease_id))

    def drop_chain(self, txn: lmdb.Transaction, chain: bytes) -> None:
        """Delete a chain's merged index (summary and records)."""
        txn.delete(chain, db=self._db["chains"])
        prefix = chain_prefix(chain)
        with txn.cursor(db=self._db["union"]) as cur:
            if cur.set_range(prefix):
                while cur.key()[: len(prefix)] == prefix:
                    if not cur.delete():
                        break

    def drop_lease(self, txn: lmdb.Transaction, lease_id: bytes) -> None:
        txn.delete(lease_id, db=self._db["leases"])
        for db in (self._db["lease_objs"], self._db["lease_packs"]):
            with txn.cursor(db=db) as cur:
                if cur.set_range(lease_id):
                    while cur.key()[:8] == lease_id:
                        if not cur.delete():
                            break


class _PendingObject:
    __slots__ = ("sha", "size", "written", "chunks")

    def __init__(self, sha: bytes, size: int, written: list[Chunk], chunks: list[_Slot]) -> None:
        self.sha = sha
        self.size = size
        self.written = written  # its first chunks, already in packs (a large file: _spill)
        self.chunks = chunks


class _Packer:
    """Appends stored chunks to new packs inside one write transaction, pinned by a lease."""

    def __init__(self, store: Store, txn: lmdb.Transaction, lease_id: bytes) -> None:
        self.store, self.txn, self.lease_id = store, txn, lease_id
        next_pack = txn.get(b"next_pack", db=store.db("meta"))
        self.pack_id = _U64.unpack(next_pack)[0] if next_pack is not None else 1
        self.pack = bytearray()
        self.bytes = 0

    def add(self, parts: list[tuple[bytes, int, int, int]]) -> list[Chunk]:
        chunks = []
        for stored, codec, xxh, raw_len in parts:
            if len(self.pack) + len(stored) > PACK_TARGET:
                self._seal()
            chunks.append(Chunk(self.pack_id, len(self.pack), len(stored), raw_len, xxh, codec))
            self.pack += stored
            self.bytes += len(stored)
        return chunks

    def _seal(self) -> None:
        if self.pack:
            self.store.payload.put_pack(self.txn, self.pack_id, bytes(self.pack))
            self.txn.put(self.lease_id + _U64.pack(self.pack_id), b"", db=self.store.db("lease_packs"))
            self.pack_id += 1
            self.pack = bytearray()

    def close(self) -> None:
        self._seal()
        self.txn.put(b"next_pack", _U64.pack(self.pack_id), db=self.store.db("meta"))


class FileWriter:
    """Receives one file's data chunk by chunk; ``finish`` names it by its digest."""

    __slots__ = ("_session", "_held", "_held_bytes", "_futures", "_waiting", "_written", "size")

    def __init__(self, session: WriteSession) -> None:
        self._session = session
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._futures: list[_Slot] | None = None
        self._waiting = 0  # raw bytes behind self._futures
        self._written: list[Chunk] = []
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._futures is not None:
            self._futures.append(self._session._compress(data))
            self._waiting += len(data)
            if self._waiting >= SPILL_BYTES:
                # memory stays bounded whatever one file holds: its chunks so far go to packs
                # now (pinned by the lease), its record follows at finish
                self._written += self._session._spill(self._futures)
                self._futures, self._waiting = [], 0
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > HOLD_BYTES:
            self._futures = [self._session._compress(d) for d in self._held]
            self._waiting = self._held_bytes
            self._held = []

    def finish(self, sha: bytes) -> bytes:
        """Record the file as object ``sha`` (computed by the caller while streaming)."""
        s = self._session
        if s._seen(sha):
            return sha  # a spilled duplicate's chunks are compressed for nothing: rare
        chunks = self._futures if self._futures is not None else [s._compress(d) for d in self._held]
        s._add_pending(_PendingObject(sha, self.size, self._written, chunks))
        return sha


class WriteSession:
    """A lease-protected batch writer.  Use as a context manager: leaving the
    block normally commits, an exception aborts (and nothing new stays visible)."""

    def __init__(self, store: Store, purpose: str) -> None:
        self.store = store
        self.lease_id = secrets.token_bytes(8)
        # one worker: each group's zstd call already uses every core
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerfs-zstd")
        self._group = _Group()
        self._pending: list[_PendingObject] = []
        self._pending_bytes = 0
        self._batch_seen: set[bytes] = set()  # new or referenced objects of the current batch
        self._recorded: set[bytes] = set()  # objects already pinned by this lease in the store
        self._final: list[Callable[[lmdb.Transaction], None]] = []
        self.new_objects = 0
        self.new_bytes = 0
        self._closed = False
        store.add_lease(purpose, lease_id=self.lease_id)

    def __enter__(self) -> WriteSession:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    # -- objects ---------------------------------------------------------------
    def _compress(self, data: bytes) -> _Slot:
        g = self._group
        slot = _Slot(g, len(g.raws))
        g.raws.append(data)
        g.size += len(data)
        if g.size >= COMPRESS_GROUP:
            self._submit_group()
        return slot

    def _submit_group(self) -> None:
        g = self._group
        if g.raws:
            g.future = self._pool.submit(compress_group, g.raws)
            # the slots want only the results: the raw bytes go once compressed (a file of
            # zeros compresses to nothing, and used to be held raw until its batch was written)
            g.raws = []
            self._group = _Group()

    def _spill(self, slots: list[_Slot]) -> list[Chunk]:
        """Write these chunks of a file still being read to packs, in a transaction of their
        own: what the file's record will point to once it is finished."""
        self._submit_group()
        parts = [c.result() for c in slots]

        def fn(txn: lmdb.Transaction) -> list[Chunk]:
            packer = _Packer(self.store, txn, self.lease_id)
            chunks = packer.add(parts)
            packer.close()
            return chunks

        chunks = self.store.write(fn)
        self.new_bytes += sum(c.stored for c in chunks)
        return chunks

    def _seen(self, sha: bytes) -> bool:
        """True if the object is already stored or pending; pins it in the lease."""
        if sha in self._batch_seen or sha in self._recorded:
            return True
        if self.store.has_object(sha):
            self._batch_seen.add(sha)
            return True
        return False

    def _add_pending(self, obj: _PendingObject) -> None:
        self._batch_seen.add(obj.sha)
        self._pending.append(obj)
        self._pending_bytes += obj.size
        if self._pending_bytes >= BATCH_BYTES:
            self.flush()

    def new_file(self) -> FileWriter:
        return FileWriter(self)

    def add_blob(self, data: bytes) -> bytes:
        """Store a whole in-memory blob; returns its SHA-256."""
        sha = hashlib.sha256(data).digest()
        w = FileWriter(self)
        for i in range(0, len(data), CHUNK_SIZE):
            w.write(data[i : i + CHUNK_SIZE])
        return w.finish(sha)

    # -- deferred records --------------------------------------------------------
    def add_table(self, entries: list[Entry]) -> bytes:
        """Store a layer's entry table; returns its object id (``LayerRecord.table``)."""
        return self.add_blob(encode_table(entries))

    def put_layer(self, layer_id: bytes, record: LayerRecord, *, replace: bool = False) -> None:
        """Record a layer; it becomes visible when the session commits.  An existing record of
        the same layer is kept unless ``replace`` (a richer record of the same bytes)."""
        data = record.encode()
        self._final.append(lambda txn: self._put(txn, "layers", layer_id, data, overwrite=replace))

    def put_image(self, image_id: bytes, record: ImageRecord) -> None:
        data = record.encode()
        self._final.append(lambda txn: self._put(txn, "images", image_id, data))

    def set_tag(self, name: str, image_id: bytes) -> None:
        self._final.append(lambda txn: self._put(txn, "tags", name.encode(), image_id))

    def _put(self, txn: lmdb.Transaction, db: str, key: bytes, value: bytes, overwrite: bool = True) -> None:
        txn.put(key, value, db=self.store.db(db), overwrite=overwrite)

    # -- committing ----------------------------------------------------------------
    def flush(self, final: Callable[[lmdb.Transaction], None] | None = None) -> None:
        """Write the pending batch (packs, object records, lease pins) in one transaction."""
        self._submit_group()
        resolved = []
        for obj in self._pending:
            parts = [c.result() for c in obj.chunks]
            resolved.append((obj.sha, obj.size, obj.written, parts))
        refs = self._batch_seen - {obj.sha for obj in self._pending}
        st = self.store
        objects_db, lease_objs = st.db("objects"), st.db("lease_objs")

        def fn(txn: lmdb.Transaction) -> tuple[int, int]:
            packer = _Packer(st, txn, self.lease_id)
            written = 0
            for sha, size, spilled, parts in resolved:
                if txn.get(sha, db=objects_db) is not None:
                    # written meanwhile by another session: keep theirs, pin it
                    txn.put(self.lease_id + sha, b"", db=lease_objs)
                    continue
                chunks = spilled + packer.add(parts)
                txn.put(sha, encode_object(size, chunks), db=objects_db)
                txn.put(self.lease_id + sha, b"", db=lease_objs)
                written += 1
            packer.close()
            written_bytes = packer.bytes
            for sha in refs:
                if txn.get(sha, db=objects_db) is None:
                    raise StoreError(
                        "an object this import relies on was removed by a concurrent gc; run the import again"
                    )
                txn.put(self.lease_id + sha, b"", db=lease_objs)
            if final is not None:
                final(txn)
            return written, written_bytes

        written, written_bytes = st.write(fn)
        self.new_objects += written
        self.new_bytes += written_bytes
        self._recorded |= self._batch_seen
        self._pending = []
        self._pending_bytes = 0
        self._batch_seen = set()

    def commit(self) -> None:
        """Flush, then make layers, images and tags visible and drop the lease, atomically."""
        if self._closed:
            return
        try:
            final = list(self._final)

            def finish(txn: lmdb.Transaction) -> None:
                for fn in final:
                    fn(txn)
                self.store.drop_lease(txn, self.lease_id)

            self.flush(finish)
        except BaseException:
            self.abort()
            raise
        self._close()

    def abort(self) -> None:
        """Drop the lease; what only this session wrote is garbage for the next gc."""
        if self._closed:
            return
        self._close()
        try:
            self.store.write(lambda txn: self.store.drop_lease(txn, self.lease_id))
        except StoreError:
            pass  # e.g. the disk is full: the lease outlives this process, and gc reclaims it

    def _close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
