"""The layer store: content objects, layer entry tables, images and tags in LMDB."""

from layerfs.store.entries import Entry
from layerfs.store.gc import GCResult, VerifyResult, collect, verify
from layerfs.store.store import (
    CHUNK_SIZE,
    CorruptionError,
    MapLimitError,
    Store,
    StoreDamaged,
    StoreError,
    WriteSession,
    default_path,
)

__all__ = [
    "CHUNK_SIZE",
    "CorruptionError",
    "Entry",
    "GCResult",
    "MapLimitError",
    "Store",
    "StoreDamaged",
    "StoreError",
    "VerifyResult",
    "WriteSession",
    "collect",
    "default_path",
    "verify",
]
