"""Mark-and-sweep garbage collection and verification of a store.

``collect`` runs in one write transaction, which is also one consistent
snapshot: marking and sweeping see the same store, and no import can pin or
write objects in between (LMDB has one writer).  Roots are images (their
layers and pinned blobs) and the leases of live processes (imports pin
objects, mounts pin their image's layers); a lease whose
process is gone (killed mid-import) is reclaimed first.  Layers no image uses
are removed, then unreferenced objects, then packs: empty packs are deleted and
packs less than half alive are compacted into new ones.  With file packs, the files of
deleted packs are removed once the transaction has committed (``payload.py``), and pack
files no record names (a writer killed before its commit) in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import lmdb

from layerfs.store import blobsources, filecache
from layerfs.store.entries import decode_table
from layerfs.store.payload import PACK_TARGET, MissingPack
from layerfs.store.records import ImageRecord, LayerRecord
from layerfs.store.skeleton import splices
from layerfs.store.store import (
    Chunk,
    CorruptionError,
    Store,
    StoreError,
    chain_id,
    decode_object,
    encode_object,
)

_U64 = struct.Struct(">Q")
COMPACT_BELOW = 0.5  # rewrite a pack once less than half of its bytes are alive
COMPACT_FILE_MIN = 16 << 20  # rewrite data.mdb once this much of it is free pages ...
COMPACT_FILE_SHARE = 0.1  # ... and at least this share of it


@dataclass
class GCResult:
    leases_reclaimed: int = 0
    layers_removed: int = 0
    objects_removed: int = 0
    packs_removed: int = 0
    packs_compacted: int = 0
    bytes_reclaimed: int = 0
    cached_files_removed: int = 0  # file cache copies of objects that are gone
    file_bytes_returned: int = 0  # data.mdb shrunk by this much (free pages given back)
    file_in_use: bool = False  # worth compacting, but other processes have the store open
    file_error: str = ""  # compacting failed (the copy needs room for the live data)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _table(store: Store, txn: lmdb.Transaction, layer: LayerRecord) -> list[Any]:
    rec = txn.get(layer.table, db=store.db("objects"))
    if rec is None:
        raise CorruptionError(f"entry table {layer.table.hex()} of a layer is missing")
    _, chunks = decode_object(rec)
    return decode_table(b"".join(store.chunk_bytes(txn, c) for c in chunks))


def _spliced(store: Store, txn: lmdb.Transaction, skel: bytes) -> list[bytes]:
    rec = txn.get(skel, db=store.db("objects"))
    if rec is None:
        raise CorruptionError(f"skeleton {skel.hex()} of a layer is missing")
    size, chunks = decode_object(rec)
    data = b"".join(store.chunk_bytes(txn, c) for c in chunks)
    return [sha for _, _, sha in splices(lambda off, n: data[off : off + n], size)[1]]


def collect(store: Store) -> GCResult:
    res = store.write(lambda txn: _collect(store, txn))
    store.orphans_removed = (0, 0)  # counted once
    with store.read() as txn:
        objects = store.db("objects")
        files, size = filecache.prune(store.path, lambda oid: txn.get(oid, db=objects) is not None)
    res.cached_files_removed = files
    res.bytes_reclaimed += size
    # LMDB reuses free pages but never gives them back: a failed or removed import leaves
    # data.mdb as large as it once was, so rewrite it when enough of it is free
    with contextlib.suppress(StoreError, OSError, lmdb.Error):  # (a full disk: see trim_file)
        res.file_bytes_returned = store.trim_file()  # what failed commits wrote past the end
    free = store.free_file_bytes()
    size_now = os.path.getsize(os.path.join(store.path, "data.mdb"))
    if free >= COMPACT_FILE_MIN and free >= size_now * COMPACT_FILE_SHARE:
        try:
            returned = store.compact_file()
        except (OSError, lmdb.Error) as exc:
            res.file_error = str(exc)
        else:
            if returned is None:
                res.file_in_use = True
            else:
                res.file_bytes_returned += returned
    return res


def _collect(store: Store, txn: lmdb.Transaction) -> GCResult:
    res = GCResult()
    db = store.db
    # 1. leases of processes that are gone
    live_leases: list[bytes] = []
    with txn.cursor(db=db("leases")) as cur:
        leases = [(bytes(k), json.loads(bytes(v))) for k, v in cur]
    live_objects: set[bytes] = set()
    live_layers: set[bytes] = set()
    live_chains: set[bytes] = set()
    for lease_id, lease in leases:
        if store.lease_alive(lease):
            live_leases.append(lease_id)
            if lease.get("layers"):  # a mount pins its image's layers and merged index
                layer_ids = [bytes.fromhex(h) for h in lease["layers"]]
                live_layers.update(layer_ids)
                live_chains.add(chain_id(layer_ids))
        else:
            store.drop_lease(txn, lease_id)
            res.leases_reclaimed += 1

    # 2. mark
    with txn.cursor(db=db("images")) as cur:
        for _, v in cur:
            image = ImageRecord.decode(v)
            live_layers.update(image.layers)
            live_objects.update(image.blobs)
            live_chains.add(chain_id(list(image.layers)))
    _drop_dead_chains(store, txn, live_chains)
    with txn.cursor(db=db("layers")) as cur:
        layers = [(bytes(k), LayerRecord.decode(v)) for k, v in cur]
    for layer_id, layer in layers:
        if layer_id not in live_layers:
            txn.delete(layer_id, db=db("layers"))
            res.layers_removed += 1
            continue
        live_objects.add(layer.table)
        for e in _table(store, txn, layer):
            if e.content is not None:
                live_objects.add(e.content)
        if layer.skeleton is not None:
            live_objects.add(layer.skeleton)
            live_objects.update(_spliced(store, txn, layer.skeleton))
    blobsources.drop_gone(store, txn, live_layers)  # which registry blob a removed layer was
    pinned_packs: set[int] = set()
    for lease_id in live_leases:
        with txn.cursor(db=db("lease_objs")) as cur:
            if cur.set_range(lease_id):
                for k in cur.iternext(values=False):
                    if bytes(k[:8]) != lease_id:
                        break
                    live_objects.add(bytes(k[8:]))
        with txn.cursor(db=db("lease_packs")) as cur:
            if cur.set_range(lease_id):
                for k in cur.iternext(values=False):
                    if bytes(k[:8]) != lease_id:
                        break
                    pinned_packs.add(_U64.unpack(k[8:])[0])

    # 3. sweep objects, counting the live bytes of every pack
    live_bytes: dict[int, int] = defaultdict(int)
    dead: list[bytes] = []
    with txn.cursor(db=db("objects")) as cur:
        for k, v in cur:
            key = bytes(k)
            if key not in live_objects:
                dead.append(key)
                continue
            for c in decode_object(v)[1]:
                live_bytes[c.pack] += c.stored
    for key in dead:
        txn.delete(key, db=db("objects"))
    res.objects_removed = len(dead)

    # 4. packs: delete the empty, compact the mostly dead
    to_compact: set[int] = set()
    for pack_id, size in list(store.payload.pack_ids(txn)):
        if pack_id in pinned_packs:
            continue
        alive = live_bytes.get(pack_id, 0)
        if alive == 0:
            store.payload.delete_pack(txn, pack_id)
            res.packs_removed += 1
            res.bytes_reclaimed += size
        elif alive < size * COMPACT_BELOW:
            to_compact.add(pack_id)
            res.bytes_reclaimed += size - alive
    if to_compact:
        _compact(store, txn, to_compact)
        res.packs_compacted = len(to_compact)
    # pack files no record names: what writers killed before their commit left (file packs)
    files, size = store.payload.remove_orphans(txn)
    res.packs_removed += files + store.orphans_removed[0]  # (and those the open removed)
    res.bytes_reclaimed += size + store.orphans_removed[1]
    return res


def _drop_dead_chains(store: Store, txn: lmdb.Transaction, live: set[bytes]) -> None:
    """Merged indexes are derived data: drop those of chains no image uses."""
    with txn.cursor(db=store.db("chains")) as cur:
        dead = [bytes(k) for k in cur.iternext(values=False) if bytes(k) not in live]
    for chain in dead:
        store.drop_chain(txn, chain)


def _compact(store: Store, txn: lmdb.Transaction, packs: set[int]) -> None:
    meta = store.db("meta")
    next_pack = txn.get(b"next_pack", db=meta)
    assert next_pack is not None  # packs exist, so a pack id was allocated
    pack_id = _U64.unpack(next_pack)[0]
    buf = bytearray()
    moves: list[tuple[bytes, int, list[Chunk]]] = []
    with txn.cursor(db=store.db("objects")) as cur:
        for k, v in cur:
            size, chunks = decode_object(v)
            if any(c.pack in packs for c in chunks):
                moves.append((bytes(k), size, chunks))
    for key, size, chunks in moves:
        new = []
        for c in chunks:
            if c.pack not in packs:
                new.append(c)
                continue
            if len(buf) + c.stored > PACK_TARGET:
                store.payload.put_pack(txn, pack_id, bytes(buf))
                pack_id += 1
                buf = bytearray()
            new.append(Chunk(pack_id, len(buf), c.stored, c.raw, c.xxh, c.codec))
            try:
                buf += store.payload.read(txn, c.pack, c.offset, c.stored)
            except MissingPack as exc:
                raise CorruptionError(f"cannot compact pack {c.pack}: {exc}; run 'layerfs verify'") from None
        txn.put(key, encode_object(size, new), db=store.db("objects"))
    if buf:
        store.payload.put_pack(txn, pack_id, bytes(buf))
        pack_id += 1
    for p in packs:
        store.payload.delete_pack(txn, p)
    txn.put(b"next_pack", _U64.pack(pack_id), db=meta)


@dataclass
class VerifyResult:
    objects: int = 0
    bytes: int = 0
    layers: int = 0
    images: int = 0
    errors: list[str] = field(default_factory=list)
    bad_objects: list[str] = field(default_factory=list)  # ids (hex) of the damaged objects


def verify(store: Store, progress: Any = None) -> VerifyResult:
    """Read every page, re-hash every object and check every reference; never raises for
    corruption.  Each pass has its own read transaction: a damaged page makes the transaction
    that met it unusable, and the other passes still run."""
    from layerfs.store.pages import check

    res = VerifyResult()
    res.errors += check(store)
    for what, step in (("objects", _verify_objects), ("layers", _verify_layers), ("images", _verify_images)):
        try:
            with store.read() as txn:
                step(store, txn, res, progress)
        except lmdb.Error as exc:
            if not any(e.startswith(("database ", "freelist: ")) for e in res.errors):
                res.errors.append(f"database {what}: {exc}")  # damage the page check did not see
    try:
        with store.read() as txn:
            res.errors += store.payload.check(txn)  # pack files missing or not their length
    except lmdb.Error as exc:
        if not any(e.startswith(("database ", "freelist: ")) for e in res.errors):
            res.errors.append(f"database packs: {exc}")
    return res


def _verify_objects(store: Store, txn: lmdb.Transaction, res: VerifyResult, progress: Any) -> None:
    objects = store.db("objects")
    with txn.cursor(db=objects) as cur:
        for k, v in cur:
            sha = bytes(k)
            try:
                size, chunks = decode_object(v)
                h = hashlib.sha256()
                total = 0
                for c in chunks:
                    raw = store.chunk_bytes(txn, c)
                    h.update(raw)
                    total += len(raw)
                if total != size:
                    res.errors.append(f"object {sha.hex()}: {total} bytes, record says {size}")
                    res.bad_objects.append(sha.hex())
                elif h.digest() != sha:
                    res.errors.append(f"object {sha.hex()}: content hashes to {h.hexdigest()}")
                    res.bad_objects.append(sha.hex())
                res.bytes += total
            except (StoreError, LookupError, ValueError) as exc:
                res.errors.append(f"object {sha.hex()}: {exc}")
                res.bad_objects.append(sha.hex())
            res.objects += 1
            if progress is not None:
                progress(res.objects)


def _verify_layers(store: Store, txn: lmdb.Transaction, res: VerifyResult, progress: Any) -> None:
    objects = store.db("objects")
    names = _image_names(store, txn)
    bad = {bytes.fromhex(h) for h in res.bad_objects}
    with txn.cursor(db=store.db("layers")) as cur:
        for k, v in cur:
            res.layers += 1
            layer = LayerRecord.decode(v)
            try:
                for e in _table(store, txn, layer):
                    if e.content is not None and txn.get(e.content, db=objects) is None:
                        res.errors.append(f"layer sha256:{bytes(k).hex()}: {e.path!r} has no content object")
                    elif e.content in bad:  # say which files a damaged object is
                        path = "/" + e.path.decode(errors="replace")
                        where = ", ".join(names.get(bytes(k).hex(), [])) or "no image"
                        res.errors.append(
                            f"object {e.content.hex()} is {path} in layer sha256:{bytes(k).hex()[:12]} ({where})"
                        )
                if layer.skeleton is not None:
                    for sha in _spliced(store, txn, layer.skeleton):
                        if txn.get(sha, db=objects) is None:
                            res.errors.append(
                                f"layer sha256:{bytes(k).hex()}: spliced object {sha.hex()} is missing"
                            )
            except (StoreError, LookupError, ValueError) as exc:
                res.errors.append(f"layer sha256:{bytes(k).hex()}: {exc}")


def _image_names(store: Store, txn: lmdb.Transaction) -> dict[str, list[str]]:
    """layer id (hex) -> the images using it, by tag (or short id when untagged)."""
    tags: dict[bytes, list[str]] = defaultdict(list)
    with txn.cursor(db=store.db("tags")) as cur:
        for name, image_id in cur:
            tags[bytes(image_id)].append(bytes(name).decode(errors="replace"))
    out: dict[str, list[str]] = defaultdict(list)
    with txn.cursor(db=store.db("images")) as cur:
        for k, v in cur:
            label = ", ".join(sorted(tags.get(bytes(k), []))) or "image " + bytes(k).hex()[:12]
            for layer_id in ImageRecord.decode(v).layers:
                out[layer_id.hex()].append(label)
    return out


def _verify_images(store: Store, txn: lmdb.Transaction, res: VerifyResult, progress: Any) -> None:
    objects, layers_db = store.db("objects"), store.db("layers")
    with txn.cursor(db=store.db("images")) as cur:
        for k, v in cur:
            res.images += 1
            image = ImageRecord.decode(v)
            for layer_id in image.layers:
                if txn.get(layer_id, db=layers_db) is None:
                    res.errors.append(f"image sha256:{bytes(k).hex()}: layer sha256:{layer_id.hex()} missing")
            for blob in image.blobs:
                if txn.get(blob, db=objects) is None:
                    res.errors.append(f"image sha256:{bytes(k).hex()}: blob sha256:{blob.hex()} missing")
