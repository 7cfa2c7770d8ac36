"""Reading stored objects: the one way code outside the store gets a file's bytes back.

An object is a list of chunks (zstd or raw, each with its XXH3 checksum: ``decode_object``);
``ObjectReader`` hands out

* ``open(sha)``: an object's size and chunk list, then ``read(obj, offset, size)`` at any offset
  through a bounded LRU of decompressed chunks, with read-ahead on helper threads for a
  sequential reader (what the union view's lower files are read through);
and ``Store.iter_object`` / ``read_object`` give a whole object in order (export, copy-up:
nothing there to cache).  Every chunk is verified as it is read; a damaged one raises ``CorruptionError`` (the store
stays as it is; ``layerfs verify`` names it).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass

from layerfs.store.store import Chunk, Store, StoreError, decode_object

CACHE_BYTES = 32 << 20  # decompressed chunks kept for re-reads
READ_AHEAD = 16  # chunks (1 MiB) decompressed ahead of a sequential reader
READ_AHEAD_WORKERS = 2  # zstd releases the GIL: the reader mostly waits, so use both cores


@dataclass
class StoredObject:
    sha: bytes
    size: int
    chunks: list[Chunk]
    last_end: int = 0  # where the last read ended: the next one from there is sequential


class ObjectReader:
    def __init__(self, store: Store, limit: int = CACHE_BYTES) -> None:
        self.store = store
        self.limit = limit
        self._data: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._inflight: dict[tuple[int, int], threading.Event] = {}
        self._queue: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []

    def open(self, sha: bytes) -> StoredObject:
        """StoreError if the object is not in the store."""
        with self.store.read() as txn:
            rec = txn.get(sha, db=self.store.db("objects"))
            if rec is None:
                raise StoreError(f"object {sha.hex()} is not in the store")
            size, chunks = decode_object(rec)
        return StoredObject(sha, size, chunks)

    def read(self, obj: StoredObject, offset: int, size: int) -> bytes:
        end = min(offset + size, obj.size)
        if offset >= end:
            return b""
        # chunks are CHUNK_SIZE except the last, so the chunk index is a division
        csize = obj.chunks[0].raw if obj.chunks else 1
        first, last = offset // csize, (end - 1) // csize
        out = []
        for i in range(first, last + 1):
            base = i * csize
            out.append(self._chunk(obj.chunks[i])[max(0, offset - base) : end - base])
        if offset == obj.last_end and last + 1 < len(obj.chunks):
            self._prefetch(obj.chunks[last + 1 : last + 1 + READ_AHEAD])
        obj.last_end = end
        return out[0] if len(out) == 1 else b"".join(out)

    def _chunk(self, c: Chunk) -> bytes:
        key = (c.pack, c.offset)
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
                return data
            pending = self._inflight.get(key)
        if pending is not None:  # the read-ahead worker is on it: wait rather than redo it
            pending.wait()
            with self._lock:
                data = self._data.get(key)
            if data is not None:
                return data
        with self.store.read() as txn:
            data = self.store.chunk_bytes(txn, c)
        self._put(key, data)
        return data

    def _put(self, key: tuple[int, int], data: bytes) -> None:
        with self._lock:
            if key in self._data:
                return
            self._data[key] = data
            self._bytes += len(data)
            while self._bytes > self.limit and self._data:
                _, old = self._data.popitem(last=False)
                self._bytes -= len(old)

    def _prefetch(self, chunks: list[Chunk]) -> None:
        """Queue ``chunks`` for the read-ahead workers (zstd releases the GIL while it works)."""
        todo = []
        with self._lock:
            for c in chunks:
                key = (c.pack, c.offset)
                if key not in self._data and key not in self._inflight:
                    self._inflight[key] = threading.Event()
                    todo.append(c)
        if not todo:
            return
        if not self._workers:
            for _ in range(READ_AHEAD_WORKERS):
                worker = threading.Thread(target=self._work, name="layerfs-readahead", daemon=True)
                worker.start()
                self._workers.append(worker)
        for c in todo:  # one chunk a task, so the workers share a read-ahead window
            self._queue.put(c)

    def _work(self) -> None:
        """Long-lived workers: a thread per read-ahead cost more than it saved."""
        while True:
            c = self._queue.get()
            key = (c.pack, c.offset)
            try:
                with self.store.read() as txn:
                    self._put(key, self.store.chunk_bytes(txn, c))
            except Exception:  # noqa: BLE001 - read-ahead is a hint; the real read reports errors
                pass
            finally:
                with self._lock:
                    done = self._inflight.pop(key, None)
                if done is not None:
                    done.set()
