"""Import images from a source into the store, verifying every digest.

For each image: the manifest and config are checked against their descriptors
(digest and size), every new layer blob against its descriptor while it
streams, and every layer's uncompressed digest against the config's
``rootfs.diff_ids``.  Layers the store already has are skipped without reading
their blobs.  Everything is written in one ``WriteSession``: on any error the
session is aborted and a gc removes what it had written, so a refused import
stores nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from layerfs.progress import byte_bar
from layerfs.store import Entry, Store, StoreError, WriteSession, collect
from layerfs.store import entries as E
from layerfs.store.records import ImageRecord, LayerRecord
from layerfs.tools import refs
from layerfs.tools.layer import LayerError, LayerResult, hash_blob, import_layer
from layerfs.tools.sources import (
    LAYER_TYPES,
    MANIFEST_TYPES,
    MT_DOCKER_CONFIG,
    MT_DOCKER_LAYER,
    MT_DOCKER_MANIFEST,
    Descriptor,
    ImageRef,
    Source,
    SourceError,
    open_source,
    platform_matches,
    platform_string,
)
from layerfs.union.index import merge


class ImportError_(ValueError):
    """The image is refused; nothing of it was stored."""


@dataclass
class ImportResult:
    image_id: str
    names: list[str]
    layers_new: int = 0
    layers_known: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0
    platform: str = ""
    layer_ids: list[str] = field(default_factory=list)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _check_blob(desc: Descriptor, data: bytes, what: str) -> None:
    if len(data) != desc.size:
        raise ImportError_(f"{what} {desc.digest}: size is {len(data)}, descriptor says {desc.size}")
    if _sha(data) != desc.digest:
        raise ImportError_(f"{what} {desc.digest}: content hashes to {_sha(data)}")


class _LowerView:
    """The merged lower layers of a chain, built only if a hardlink needs it."""

    def __init__(self, tables: list[Callable[[], list[Entry]]]) -> None:
        self._tables = tables
        self._merged: dict[bytes, Entry] | None = None

    def lookup(self, path: bytes) -> Entry | None:
        if self._merged is None:
            # the union's own merge: whiteouts, opaque directories and replacements applied
            self._merged = {p: e for p, (e, _) in merge([load() for load in self._tables]).items()}
        found = self._merged.get(path)
        if found is not None and found.kind == E.HARDLINK:
            found = self._merged.get(found.link, found)
        return found


def import_path(
    store: Store, path: str, *, platform: str | None = None, tag: str | None = None, progress: bool = False
) -> list[ImportResult]:
    try:
        source = open_source(path)
    except SourceError as exc:
        raise ImportError_(str(exc)) from None
    try:
        images = _one_per_manifest(source.images(platform))
        if tag is not None and len(images) != 1:
            raise ImportError_(f"{path} holds {len(images)} images; --tag needs exactly one")
        results = []
        for ref in images:
            names = [refs.normalize(tag)] if tag is not None else [refs.normalize(n) for n in ref.names]
            results.append(_import_one(store, source, ref, names, platform, progress))
        return results
    except (SourceError, LayerError) as exc:
        raise ImportError_(str(exc)) from None
    finally:
        source.close()


def _one_per_manifest(images: list[ImageRef]) -> list[ImageRef]:
    """An image named by several index entries (one per tag) is imported once, with every name."""
    out: list[ImageRef] = []
    seen: dict[str, ImageRef] = {}
    for ref in images:
        key = ref.manifest.digest if ref.manifest is not None else None
        if key is not None and key in seen:
            first = seen[key]
            first.names = [*first.names, *(n for n in ref.names if n not in first.names)]
            continue
        if key is not None:
            seen[key] = ref
        out.append(ref)
    return out


def _import_one(
    store: Store, source: Source, ref: ImageRef, names: list[str], platform: str | None, progress: bool
) -> ImportResult:
    if ref.legacy is not None:
        cfg_path, layer_paths = ref.legacy
        with source.open_blob(Descriptor("", "sha256:" + "0" * 64, 0, path=cfg_path)) as f:
            config_bytes = f.read(16 << 20)
        stem = os.path.basename(cfg_path).split(".")[0]
        if len(stem) == 64 and _sha(config_bytes)[7:] != stem:
            raise ImportError_(f"config {cfg_path}: content hashes to {_sha(config_bytes)}")
        manifest_bytes = None
        manifest_type = MT_DOCKER_MANIFEST
        layer_descs = [Descriptor(MT_DOCKER_LAYER, "", -1, path=p) for p in layer_paths]
    else:
        assert ref.manifest is not None
        manifest_bytes, manifest = source.read_json_blob(ref.manifest)
        _check_blob(ref.manifest, manifest_bytes, "manifest")
        manifest_type = manifest.get("mediaType") or ref.manifest.media_type or MANIFEST_TYPES[0]
        if manifest_type not in MANIFEST_TYPES:
            raise ImportError_(f"manifest {ref.manifest.digest} has unsupported media type {manifest_type}")
        try:
            cfg_desc = Descriptor.parse(manifest["config"])
            layer_descs = [Descriptor.parse(d) for d in manifest["layers"]]
        except (KeyError, TypeError):
            raise ImportError_(f"manifest {ref.manifest.digest} is malformed") from None
        config_bytes, _ = source.read_json_blob(cfg_desc)
        _check_blob(cfg_desc, config_bytes, "config")
        for d in layer_descs:
            if d.media_type and d.media_type not in LAYER_TYPES:
                raise ImportError_(f"layer {d.digest} has unsupported media type {d.media_type}")
    try:
        config = json.loads(config_bytes)
        diff_ids = list(config["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError):
        raise ImportError_("image config is malformed (no rootfs.diff_ids)") from None
    if len(diff_ids) != len(layer_descs):
        raise ImportError_(f"config lists {len(diff_ids)} layers, manifest {len(layer_descs)}")
    cfg_platform = platform_string(
        {"os": config.get("os"), "architecture": config.get("architecture"), "variant": config.get("variant")}
    )
    if platform and not platform_matches(platform, cfg_platform):
        raise ImportError_(f"image is for {cfg_platform}, not {platform}")
    image_id = _sha(config_bytes)

    # a layer stored before skeletons existed is read again, to gain its exact bytes
    todo = [i for i, d in enumerate(diff_ids) if _without_skeleton(store.get_layer(_raw(d)))]
    total = sum(max(d.size, 0) for d in layer_descs)  # known layers are read to be checked
    bar = byte_bar(total, "importing", enabled=progress)
    result = ImportResult(image_id, names, platform=ref.platform or cfg_platform, layer_ids=diff_ids)
    session = store.session("import")
    try:
        with session:
            done: dict[str, LayerResult] = {}
            tables: list[Callable[[], list[Entry]]] = []
            for i, desc in enumerate(layer_descs):
                diff_id = diff_ids[i]
                if i in todo and diff_id not in done:
                    lower = _LowerView(list(tables))
                    with source.open_blob(desc) as blob:
                        res = import_layer(
                            session, blob, lower=lower.lookup, progress=bar.update if bar else None
                        )
                    _check_layer(desc, res, diff_id)
                    store_layer(session, res, replace=True)  # a record without a skeleton gains one
                    done[diff_id] = res
                    result.layers_new += 1
                    result.bytes_read += res.blob_size
                    tables.append(lambda r=res: r.entries)  # type: ignore[misc]
                else:
                    if diff_id in done:
                        tables.append(lambda r=done[diff_id]: r.entries)  # type: ignore[misc]
                    else:
                        # stored already: not imported again, but what the archive holds is
                        # still checked (a corrupt archive is refused, not "Loaded")
                        with source.open_blob(desc) as blob:
                            _check_known_layer(desc, blob, diff_id, bar.update if bar else None)
                        tables.append(lambda d=diff_id: store.layer_entries(_raw(d)))  # type: ignore[misc]
                        result.layers_known += 1
            if manifest_bytes is None:
                # legacy archives carry no manifest: describe every layer as the uncompressed
                # tar it is identified by, the same on a first and on a repeated import
                for desc, diff_id in zip(layer_descs, diff_ids):
                    desc.digest, desc.size = diff_id, _tar_size(store, done, diff_id)
                manifest_bytes = _docker_manifest(config_bytes, layer_descs)
            store_image(
                session,
                config=config_bytes,
                manifest=manifest_bytes,
                manifest_media_type=manifest_type,
                layers=[_raw(d) for d in diff_ids],
                layer_descriptors=[
                    {"mediaType": d.media_type, "digest": d.digest, "size": d.size} for d in layer_descs
                ],
                platform=cfg_platform,
                created=config.get("created", ""),
                size=sum(_layer_size(store, done, d) for d in diff_ids),
                source=source.name,
                names=names,
            )
    except BaseException:
        # the session aborted; what it wrote is unreachable: sweep it now so nothing stays
        try:
            collect(store)
        except StoreError:
            pass
        raise
    finally:
        if bar is not None:
            bar.close()
    result.bytes_stored = session.new_bytes
    return result


def store_layer(
    session: WriteSession, res: LayerResult, *, compression: str | None = None, replace: bool = False
) -> LayerRecord:
    """Record the layer ``import_layer`` just stored (visible when the session commits): its
    entry table and its record.  ``compression`` overrides what the blob was compressed with
    (a commit says "none": its layer never was a blob); ``replace``: see ``put_layer``."""
    record = LayerRecord(
        diff_id=res.diff_id,
        table=session.add_table(res.entries),
        entries=len(res.entries),
        size=res.size,
        files=res.files,
        blob_digest=res.blob_digest,
        blob_size=res.blob_size,
        compression=compression or res.compression,
        created=time.time(),
        tar_size=res.tar_size,
        skeleton=res.skeleton,
    )
    session.put_layer(_raw(res.diff_id), record, replace=replace)
    return record


def store_image(
    session: WriteSession,
    *,
    config: bytes,
    manifest: bytes,
    manifest_media_type: str,
    layers: list[bytes],
    layer_descriptors: list[dict[str, Any]],
    platform: str,
    created: str,
    size: int,
    source: str,
    names: list[str],
) -> bytes:
    """Record an image whose layers are stored (or recorded in ``session``), with its config
    and manifest blobs and its names; returns the image id (the config's SHA-256)."""
    image_id = session.add_blob(config)
    manifest_id = session.add_blob(manifest)
    record = ImageRecord(
        config=image_id,
        manifest=manifest_id,
        manifest_media_type=manifest_media_type,
        layers=tuple(layers),
        blobs=(image_id, manifest_id),
        layer_descriptors=tuple(layer_descriptors),
        platform=platform,
        created=created,
        size=size,
        imported=time.time(),
        source=source,
    )
    session.put_image(image_id, record)
    for name in names:
        session.set_tag(name, image_id)
    return image_id


def _raw(digest: str) -> bytes:
    return bytes.fromhex(digest[7:])


def _without_skeleton(layer: LayerRecord | None) -> bool:
    """Not stored, or stored before skeletons existed: read again, to gain its exact bytes."""
    return layer is None or layer.skeleton is None


def _tar_size(store: Store, done: dict[str, LayerResult], diff_id: str) -> int:
    if diff_id in done:
        return done[diff_id].tar_size
    layer = store.get_layer(_raw(diff_id))
    return (layer.tar_size or 0) if layer else 0


def _layer_size(store: Store, done: dict[str, LayerResult], diff_id: str) -> int:
    if diff_id in done:
        return done[diff_id].size
    layer = store.get_layer(_raw(diff_id))
    return layer.size if layer else 0


def _check_known_layer(
    desc: Descriptor, blob: Any, diff_id: str, progress: Callable[[int], None] | None
) -> None:
    """A blob the manifest gives a digest for is hashed as it is (the stored layer was checked
    against the config's diff_id when it was imported); one without (a docker save archive's
    layer.tar) is decompressed and hashed against the diff_id."""
    try:
        digest, size, inner = hash_blob(blob, decompress=not desc.digest, progress=progress)
    except LayerError as exc:
        raise ImportError_(f"layer {desc.digest or desc.path}: {exc}") from None
    if desc.digest:
        if desc.size >= 0 and size != desc.size:
            raise ImportError_(f"layer {desc.digest}: size is {size}, descriptor says {desc.size}")
        if digest != desc.digest:
            raise ImportError_(f"layer {desc.digest}: content hashes to {digest}")
    elif inner != diff_id:
        raise ImportError_(
            f"layer {desc.path}: uncompressed content hashes to {inner}, config says {diff_id}"
        )


def _check_layer(desc: Descriptor, res: LayerResult, diff_id: str) -> None:
    if desc.size >= 0:
        if res.blob_size != desc.size:
            raise ImportError_(f"layer {desc.digest}: size is {res.blob_size}, descriptor says {desc.size}")
        if res.blob_digest != desc.digest:
            raise ImportError_(f"layer {desc.digest}: content hashes to {res.blob_digest}")
    if res.diff_id != diff_id:
        raise ImportError_(
            f"layer {desc.digest or desc.path}: uncompressed content hashes to {res.diff_id}, "
            f"config says {diff_id}"
        )


def _docker_manifest(config: bytes, layers: list[Descriptor]) -> bytes:
    """The schema2 manifest a legacy ``docker save`` archive implies (it carries none)."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_DOCKER_MANIFEST,
        "config": {"mediaType": MT_DOCKER_CONFIG, "size": len(config), "digest": _sha(config)},
        "layers": [{"mediaType": MT_DOCKER_LAYER, "size": d.size, "digest": d.digest} for d in layers],
    }
    return json.dumps(manifest, indent=3).encode()


__all__ = ["ImportError_", "ImportResult", "import_path", "store_image", "store_layer"]
