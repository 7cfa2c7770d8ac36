"""The layer store: content objects, layer entry tables, images and tags in LMDB.

The modules behind these names load when a name is first used: a union mount of host
directories alone (``layerfs-overlay``) never uses them, and its daemon stays about 10 MB
smaller without them (and their LMDB, compression and network imports).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from layerfs.store.entries import Entry

if TYPE_CHECKING:
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

_WHERE = {
    "GCResult": "gc",
    "VerifyResult": "gc",
    "collect": "gc",
    "verify": "gc",
    "CHUNK_SIZE": "store",
    "CorruptionError": "store",
    "MapLimitError": "store",
    "Store": "store",
    "StoreDamaged": "store",
    "StoreError": "store",
    "WriteSession": "store",
    "default_path": "store",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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
