"""The typed records of the ``layers`` and ``images`` databases, each with its one decode and
encode.

The stored form is JSON with sorted keys and ids in hex (``docs/FORMAT.md``); here ids are raw
bytes.  ``encode(decode(data)) == data`` for every record layerfs has written, including
layers stored before ``tar_size`` and ``skeleton`` existed (those fields are None and stay
absent).  Records are immutable values: safe to share between threads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


def _raw(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


@dataclass(frozen=True)
class LayerRecord:
    """A stored layer, keyed by its id (the SHA-256 of its uncompressed tar stream)."""

    diff_id: str  # "sha256:<hex>": the layer id as OCI names it
    table: bytes  # object id of the entry table
    entries: int  # entries in the table
    size: int  # bytes of regular-file data
    files: int
    blob_digest: str  # the blob as it came in (compressed or not)
    blob_size: int
    compression: str  # of that blob: gzip, zstd, tar (none); "none" for a layer commit made
    created: float  # when it was stored (seconds since the epoch)
    tar_size: int | None = None  # bytes of the uncompressed tar; None in the oldest stores
    skeleton: bytes | None = None  # object that rebuilds the exact tar; None in older stores

    def as_json(self) -> dict[str, Any]:
        """The record as it is stored (and as ``layers --json`` shows it)."""
        out: dict[str, Any] = {
            "diff_id": self.diff_id,
            "table": self.table.hex(),
            "entries": self.entries,
            "size": self.size,
            "files": self.files,
            "blob_digest": self.blob_digest,
            "blob_size": self.blob_size,
            "compression": self.compression,
            "created": self.created,
        }
        if self.tar_size is not None:
            out["tar_size"] = self.tar_size
        if self.skeleton is not None:
            out["skeleton"] = self.skeleton.hex()
        return out

    def encode(self) -> bytes:
        return json.dumps(self.as_json(), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> LayerRecord:
        d = json.loads(bytes(data))
        return cls(
            diff_id=d.get("diff_id", ""),
            table=bytes.fromhex(d["table"]),
            entries=int(d.get("entries", 0)),
            size=int(d.get("size", 0)),
            files=int(d.get("files", 0)),
            blob_digest=d.get("blob_digest", ""),
            blob_size=int(d.get("blob_size", 0)),
            compression=d.get("compression", ""),
            created=d.get("created", 0.0),
            tar_size=d.get("tar_size"),
            skeleton=_raw(d.get("skeleton")),
        )


@dataclass(frozen=True)
class ImageRecord:
    """A stored image, keyed by its id (the SHA-256 of its config blob)."""

    config: bytes  # object id of the config blob
    manifest: bytes  # object id of the manifest blob
    manifest_media_type: str
    layers: tuple[bytes, ...]  # layer ids, bottom first
    blobs: tuple[bytes, ...] = ()  # object ids the image pins (config, manifest)
    # the OCI descriptors of its layers as imported (mediaType, digest, size)
    layer_descriptors: tuple[dict[str, Any], ...] = ()
    platform: str = ""  # os/architecture[/variant]
    created: str = ""  # the config's creation time (RFC 3339), "" if it has none
    size: int = 0  # bytes of regular-file data in all its layers
    imported: float = 0.0  # when it was stored (seconds since the epoch)
    source: str = ""  # the path it was imported from, or "commit"

    def as_json(self) -> dict[str, Any]:
        """The record as it is stored."""
        return {
            "config": self.config.hex(),
            "manifest": self.manifest.hex(),
            "manifest_media_type": self.manifest_media_type,
            "layers": [h.hex() for h in self.layers],
            "blobs": [h.hex() for h in self.blobs],
            "layer_descriptors": [dict(d) for d in self.layer_descriptors],
            "platform": self.platform,
            "created": self.created,
            "size": self.size,
            "imported": self.imported,
            "source": self.source,
        }

    def encode(self) -> bytes:
        return json.dumps(self.as_json(), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ImageRecord:
        d = json.loads(bytes(data))
        return cls(
            config=bytes.fromhex(d["config"]),
            manifest=bytes.fromhex(d["manifest"]),
            manifest_media_type=d.get("manifest_media_type", ""),
            layers=tuple(bytes.fromhex(h) for h in d["layers"]),
            blobs=tuple(bytes.fromhex(h) for h in d.get("blobs", [])),
            layer_descriptors=tuple(d.get("layer_descriptors", [])),
            platform=d.get("platform", ""),
            created=d.get("created", ""),
            size=int(d.get("size", 0)),
            imported=d.get("imported", 0.0),
            source=d.get("source", ""),
        )
