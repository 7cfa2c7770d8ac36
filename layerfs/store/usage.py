"""Space accounting of a store: logical, unique and stored bytes (read-only, one snapshot)."""

from __future__ import annotations

import json
import os
from typing import Any

from layerfs.store.store import Store, decode_object


def usage(store: Store) -> dict[str, Any]:
    with store.read() as txn:
        logical = layers = 0
        with txn.cursor(db=store.db("layers")) as cur:
            for _, v in cur:
                logical += int(json.loads(bytes(v)).get("size", 0))
                layers += 1
        unique = objects = 0
        with txn.cursor(db=store.db("objects")) as cur:
            for _, v in cur:
                unique += decode_object(v)[0]
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
    data_file = os.path.join(store.path, "data.mdb")
    stored = payload + metadata
    return {
        "path": store.path,
        "images": images,
        "tags": tags,
        "layers": layers,
        "objects": objects,
        "logical_bytes": logical,
        "unique_bytes": unique,
        "payload_bytes": payload,
        "metadata_bytes": metadata,
        "stored_bytes": stored,
        "file_bytes": os.path.getsize(data_file) if os.path.exists(data_file) else 0,
        "dedup_ratio": logical / unique if unique else 1.0,
        "compression_ratio": unique / payload if payload else 1.0,
    }
