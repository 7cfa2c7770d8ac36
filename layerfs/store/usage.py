"""Space accounting of a store: logical, unique and stored bytes (read-only, one snapshot)."""

from __future__ import annotations

import os
from typing import Any

import lmdb

from layerfs.store.entries import Entry, decode_table
from layerfs.store.payload import PACK_DIR
from layerfs.store.records import LayerRecord
from layerfs.store.store import Store, decode_object


def usage(store: Store) -> dict[str, Any]:
    """Logical and unique bytes count the same thing, file contents, so that their ratio is the
    deduplication: ``logical_bytes`` every file of every layer (as its entry table lists it),
    ``unique_bytes`` each distinct content once.  ``object_bytes`` is everything stored before
    compression: those contents, and also entry tables, skeletons (tar headers), manifests,
    configs and contents a layer drops."""
    with store.read() as txn:
        logical = layers = 0
        contents: dict[bytes, int] = {}
        with txn.cursor(db=store.db("layers")) as cur:
            for _, v in cur:
                layers += 1
                for e in _table(store, txn, LayerRecord.decode(v)):
                    if e.content is not None:
                        logical += e.size
                        contents[e.content] = e.size
        object_bytes = objects = 0
        with txn.cursor(db=store.db("objects")) as cur:
            for _, v in cur:
                object_bytes += decode_object(v)[0]
                objects += 1
        payload = sum(size for _, size in store.payload.pack_ids(txn))
        psize = store.env.stat()["psize"]
        metadata = 0
        for name in store.DBS:
            if name == "packs":
                continue
            st = txn.stat(store.db(name))
            metadata += (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * psize
        images = txn.stat(store.db("images"))["entries"]
        tags = txn.stat(store.db("tags"))["entries"]
    unique = sum(contents.values())
    data_file = os.path.join(store.path, "data.mdb")
    on_disk = os.path.getsize(data_file) if os.path.exists(data_file) else 0
    packs = os.path.join(store.path, PACK_DIR)  # a store whose payload is in pack files
    if os.path.isdir(packs):
        with os.scandir(packs) as it:
            on_disk += sum(e.stat().st_size for e in it if e.is_file(follow_symlinks=False))
    stored = payload + metadata
    return {
        "path": store.path,
        "payload": store.payload_kind,  # where chunks live: "lmdb" (data.mdb) or "files" (packs/)
        "images": images,
        "tags": tags,
        "layers": layers,
        "objects": objects,
        "unique_files": len(contents),
        "logical_bytes": logical,
        "unique_bytes": unique,
        "object_bytes": object_bytes,
        "payload_bytes": payload,
        "metadata_bytes": metadata,
        "stored_bytes": stored,
        "file_bytes": on_disk,  # data.mdb, and the pack files of a store that has them
        "dedup_ratio": logical / unique if unique else 1.0,
        "compression_ratio": object_bytes / payload if payload else 1.0,
    }


def _table(store: Store, txn: lmdb.Transaction, layer: LayerRecord) -> list[Entry]:
    """A layer's entries, read in ``txn`` (empty if its table is missing: verify reports that)."""
    rec = txn.get(layer.table, db=store.db("objects"))
    if rec is None:
        return []
    return decode_table(b"".join(store.chunk_bytes(txn, c) for c in decode_object(rec)[1]))
