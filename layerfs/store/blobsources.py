"""Blob sources: which compressed registry blob each stored layer came from (or was pushed as).

A layer is stored by its diff_id (the digest of its uncompressed tar); registries name it by the
digest of a compressed blob.  Knowing that blob lets ``push`` upload nothing when the registry
already has it (a HEAD request), or mount it from another repository of the same registry.

Records live in the LMDB named database ``blobsources`` (see docs/FORMAT.md), made on first use:
a store written before it existed opens as before, and reads as one without records.

    key    diff_id (32 bytes) + registry + "/" + repository + NUL + blob digest ("sha256:...")
    value  JSON: {"size", "mediaType", "seen"}

Records are hints: whoever uses one checks the registry still has the blob.  ``gc`` drops the
records of layers that are gone (``drop_gone``).

Thread-safe as the store is: every call runs in a transaction of its own (or the caller's).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import lmdb

from layerfs.store.store import Store

DB_NAME = b"blobsources"


@dataclass(frozen=True)
class BlobSource:
    registry: str  # host[:port] as references name it (docker.io for Docker Hub)
    repository: str  # library/busybox
    digest: str  # sha256:... of the compressed blob
    size: int
    media_type: str
    seen: float = 0.0


def _db(store: Store, *, create: bool) -> Any:
    """The database handle, or None when the store has none yet (and ``create`` is false or the
    store is read-only).  Opened in a transaction of its own and cached per environment (a
    reopened environment gets a new handle)."""
    cached = getattr(store, "_blobsources_db", None)
    if cached is not None and cached[0] is store.env:
        return cached[1]
    try:
        handle = store.env.open_db(DB_NAME, create=create and not store.readonly)
    except (lmdb.NotFoundError, lmdb.ReadonlyError):
        return None
    store._blobsources_db = (store.env, handle)  # type: ignore[attr-defined]
    return handle


def _key(diff_id: bytes, registry: str, repository: str, digest: str) -> bytes:
    return diff_id + f"{registry}/{repository}".encode() + b"\0" + digest.encode()


def record(store: Store, entries: list[tuple[bytes, BlobSource]]) -> None:
    """Remember that layer ``diff_id`` (raw 32 bytes) is the blob ``source``, for each pair."""
    if not entries:
        return
    db = _db(store, create=True)
    now = time.time()

    def put(txn: lmdb.Transaction) -> None:
        for diff_id, s in entries:
            value = json.dumps({"size": s.size, "mediaType": s.media_type, "seen": now}, sort_keys=True)
            txn.put(_key(diff_id, s.registry, s.repository, s.digest), value.encode(), db=db)

    store.write(put)


def lookup(store: Store, diff_id: bytes) -> list[BlobSource]:
    """Every blob this layer is known as, most recently seen first."""
    db = _db(store, create=False)
    if db is None:
        return []
    out = []
    with store.read() as txn, txn.cursor(db=db) as cur:
        if cur.set_range(diff_id):
            for k, v in cur:
                k = bytes(k)
                if k[:32] != diff_id:
                    break
                where, _, digest = k[32:].decode(errors="replace").partition("\0")
                registry, _, repository = where.partition("/")
                try:
                    rec = json.loads(bytes(v))
                    out.append(
                        BlobSource(
                            registry, repository, digest, int(rec["size"]), str(rec["mediaType"]), rec["seen"]
                        )
                    )
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged hint is no hint
    out.sort(key=lambda s: -s.seen)
    return out


def forget(store: Store, diff_id: bytes, source: BlobSource) -> None:
    """Drop one record (the registry no longer has that blob)."""
    db = _db(store, create=False)
    if db is None:
        return
    store.write(
        lambda txn: txn.delete(_key(diff_id, source.registry, source.repository, source.digest), db=db)
    )


def drop_gone(store: Store, txn: lmdb.Transaction, live_layers: set[bytes]) -> int:
    """In ``gc``'s transaction: delete the records of layers not in ``live_layers``; the count."""
    cached = getattr(store, "_blobsources_db", None)
    if cached is not None and cached[0] is store.env:
        db = cached[1]
    else:
        # opened in the caller's transaction (another one would wait for it forever), and not
        # cached: a handle opened in a transaction that aborts is closed with it
        try:
            db = store.env.open_db(DB_NAME, txn=txn, create=False)
        except lmdb.NotFoundError:
            return 0
    dropped = 0
    with txn.cursor(db=db) as cur:
        if not cur.first():
            return 0
        while True:
            if bytes(cur.key()[:32]) in live_layers:
                if not cur.next():
                    break
            else:
                dropped += 1
                if not cur.delete():  # moves to the next record; False at the end
                    break
    return dropped


def count(store: Store) -> int:
    db = _db(store, create=False)
    if db is None:
        return 0
    with store.read() as txn:
        return int(txn.stat(db)["entries"])
