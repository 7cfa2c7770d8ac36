"""``layerfs push``: a stored image to a registry, through the exporter's own layer streams.

Per layer, the first of these that works:

1. a blob this layer is known as in the target repository (``blobsources``; the registry is
   asked with HEAD): nothing is uploaded;
2. one known in another repository of the same registry: a cross-repository mount;
3. one known anywhere else, if the target already has that digest (HEAD);
4. otherwise the layer's exact tar (``tools.export``: the bytes it was imported from, so its
   diff_id holds) compressed as it streams to the registry: gzip (zlib level 6, no name, mtime 0)
   or zstd (level 3, one thread) on request: the same layer always gives the same blob, so
   pushing an image twice, from any store, gives the same digests.

What was uploaded is remembered as a blob source of the layer.  The config is uploaded unless
the registry has it (the image id does not change).  The manifest is the one the image was
pulled or imported with when every blob it names is the one pushed (the digest of an image
pushed back where it came from does not change); otherwise a new one, Docker schema 2 for an
image that came with one (and gzip layers), else OCI.

Not thread-safe (one push at a time per ``Registry``).
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import zstandard

from layerfs.progress import byte_bar
from layerfs.store import Store, StoreError, blobsources
from layerfs.store.records import ImageRecord
from layerfs.tools import refs
from layerfs.tools.export import Blob, ExportError, ImageExport, plan
from layerfs.tools.registry.client import Registry, RegistryError
from layerfs.tools.registry.reference import Reference, parse
from layerfs.tools.sources import (
    MT_DOCKER_CONFIG,
    MT_DOCKER_LAYER_GZIP,
    MT_DOCKER_MANIFEST,
    MT_OCI_CONFIG,
    MT_OCI_LAYER,
    MT_OCI_MANIFEST,
)

COMPRESSIONS = ("gzip", "zstd")
GZIP_LEVEL = 6  # gzip's and Go's default
ZSTD_LEVEL = 3
PIECE = 1 << 20  # compressed bytes sent per write


class PushError(Exception):
    """The push failed; the message is one line."""


@dataclass
class PushResult:
    image_id: str
    reference: str
    digest: str  # of the manifest pushed
    size: int
    layers_uploaded: int = 0
    layers_mounted: int = 0
    layers_existing: int = 0
    bytes_uploaded: int = 0
    config_uploaded: bool = False
    layers: list[dict[str, Any]] = field(default_factory=list)


def _compression_of(media_type: str) -> str:
    if media_type.endswith(("+gzip", ".gzip")):
        return "gzip"
    if media_type.endswith(("+zstd", ".zstd")):
        return "zstd"
    return "none"


def compressed(chunks: Iterable[bytes], how: str) -> Iterator[bytes]:
    """The deterministic compression of a stream, in pieces of about ``PIECE`` bytes."""
    out = bytearray()
    if how == "gzip":
        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # gzip wrapper: mtime 0, no name
        for chunk in chunks:
            out += z.compress(chunk)
            if len(out) >= PIECE:
                yield bytes(out)
                out.clear()
        out += z.flush()
    else:
        writer = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0).compressobj()
        for chunk in chunks:
            out += writer.compress(chunk)
            if len(out) >= PIECE:
                yield bytes(out)
                out.clear()
        out += writer.flush()
    if out:
        yield bytes(out)


def push(
    store: Store,
    image: str,
    destination: str | None = None,
    *,
    compression: str | None = None,
    tls_verify: bool = True,
    cert_dir: str | None = None,
    progress: bool = False,
) -> PushResult:
    """Push ``image`` (a stored name or id) to ``destination`` (default: its own name)."""
    image_id = refs.resolve(store, image)
    if destination is None and refs.id_part(image) is not None:
        raise PushError(
            f"{image} is an image id: say where to push it (layerfs push IMAGE REGISTRY/NAME[:TAG])"
        )
    ref = parse(destination or image)
    if ref.digest is not None:
        raise PushError(f"cannot push to a digest ({ref}): name a tag")
    rec = store.get_image(image_id)
    if rec is None:
        raise PushError(f"no such image: {image}")
    layer_ids = list(rec.layers)
    spool: list[IO[bytes]] = []
    try:
        with (
            store.pinned(layer_ids, "push"),
            Registry(ref.registry, insecure=not tls_verify, cert_dir=cert_dir) as reg,
        ):
            exp = plan(store, image_id, [], spool)
            return _push(
                store, reg, ref, rec, "sha256:" + image_id.hex(), exp, layer_ids, compression, progress
            )
    except RegistryError as exc:
        raise PushError(str(exc)) from None
    except ExportError as exc:
        raise PushError(str(exc)) from None
    finally:
        for f in spool:
            f.close()


def _push(
    store: Store,
    reg: Registry,
    ref: Reference,
    rec: ImageRecord,
    image_id: str,
    exp: ImageExport,
    layer_ids: list[bytes],
    compression: str | None,
    show: bool,
) -> PushResult:
    repo = ref.repository
    config, layers = exp.config, exp.layers
    docker = rec.manifest_media_type == MT_DOCKER_MANIFEST and compression != "zstd"
    result = PushResult(config.digest, str(ref), "", 0)
    bar = byte_bar(sum(b.size for b in layers), "pushing", enabled=show)
    pushed: dict[str, dict[str, Any]] = {}
    try:
        for blob, layer_id in zip(layers, layer_ids):
            if blob.digest in pushed:
                continue
            exact = blob.digest == "sha256:" + layer_id.hex()  # else regenerated: no record of it holds
            desc, how = _existing(store, reg, repo, layer_id, compression) if exact else (None, "")
            if desc is None:
                how = compression or "gzip"
                digest, size = reg.upload_blob(repo, _stream(blob, how, bar))
                media = MT_DOCKER_LAYER_GZIP if docker and how == "gzip" else f"{MT_OCI_LAYER}+{how}"
                desc = {"mediaType": media, "digest": digest, "size": size}
                result.layers_uploaded += 1
                result.bytes_uploaded += size
                if exact:
                    blobsources.record(
                        store, [(layer_id, blobsources.BlobSource(reg.host, repo, digest, size, media))]
                    )
            elif how == "mount":
                result.layers_mounted += 1
            else:
                result.layers_existing += 1
            if bar is not None and how in ("mount", "exists"):
                bar.update(blob.size)
            pushed[blob.digest] = desc
            result.layers.append(dict(desc, how=how if how in ("mount", "exists") else "upload"))
    finally:
        if bar is not None:
            bar.close()
    source = rec.source
    src_host, _, src_repo = source.partition("@")[0].partition("/")
    if src_host == reg.host and src_repo and src_repo != repo and "@sha256:" in source:
        with contextlib.suppress(RegistryError):
            reg.mount_blob(repo, config.digest, src_repo)  # the config where the image came from
    if not reg.blob_exists(repo, config.digest):
        data = b"".join(config.data())
        reg.upload_blob(repo, lambda: (data,))
        result.config_uploaded = True
        result.bytes_uploaded += len(data)
    descs = [pushed[b.digest] for b in layers]
    body, media_type = _manifest(store, rec, image_id, config, descs, docker)
    result.digest = reg.put_manifest(repo, ref.tag or "latest", body, media_type)
    result.size = len(body)
    return result


def _stream(blob: Blob, how: str, bar: Any) -> Callable[[], Iterator[bytes]]:
    """What an upload reads (again, if it has to start over): the layer's tar, compressed."""

    def counted() -> Iterator[bytes]:
        for chunk in blob.data():
            if bar is not None:
                bar.update(len(chunk))
            yield chunk

    return lambda: compressed(counted(), how)


def _existing(
    store: Store, reg: Registry, repo: str, layer_id: bytes, compression: str | None
) -> tuple[dict[str, Any] | None, str]:
    """A blob of this layer the target has or can mount: (descriptor, "exists" | "mount")."""
    sources = [
        s
        for s in blobsources.lookup(store, layer_id)
        if compression is None or _compression_of(s.media_type) == compression
    ]
    here = [s for s in sources if s.registry == reg.host and s.repository == repo]
    near = [s for s in sources if s.registry == reg.host and s.repository != repo]
    far = [s for s in sources if s.registry != reg.host]
    tried: set[str] = set()
    for s in here:
        if reg.blob_exists(repo, s.digest):
            return _desc(s), "exists"
        blobsources.forget(store, layer_id, s)
        tried.add(s.digest)
    for s in near:
        if s.digest in tried:
            continue
        with contextlib.suppress(RegistryError):  # no pull access there: upload instead
            if reg.mount_blob(repo, s.digest, s.repository):
                blobsources.record(
                    store,
                    [(layer_id, blobsources.BlobSource(reg.host, repo, s.digest, s.size, s.media_type))],
                )
                return _desc(s), "mount"
        tried.add(s.digest)
    for s in far[:4]:
        if s.digest not in tried and reg.blob_exists(repo, s.digest):
            blobsources.record(
                store, [(layer_id, blobsources.BlobSource(reg.host, repo, s.digest, s.size, s.media_type))]
            )
            return _desc(s), "exists"
        tried.add(s.digest)
    return None, ""


def _desc(s: blobsources.BlobSource) -> dict[str, Any]:
    return {"mediaType": s.media_type, "digest": s.digest, "size": s.size}


def _manifest(
    store: Store, rec: ImageRecord, image_id: str, config: Blob, layers: list[dict[str, Any]], docker: bool
) -> tuple[bytes, str]:
    """The stored manifest when it names exactly these blobs, else a new one."""
    stored = [{k: d.get(k) for k in ("mediaType", "digest", "size")} for d in rec.layer_descriptors]
    if stored == layers and rec.manifest_media_type and config.digest == image_id:
        try:
            return store.read_object(rec.manifest), rec.manifest_media_type
        except StoreError:
            pass
    try:
        cfg_type = json.loads(store.read_object(rec.manifest))["config"]["mediaType"]
    except (StoreError, ValueError, KeyError, TypeError):
        cfg_type = ""
    if cfg_type not in (MT_OCI_CONFIG, MT_DOCKER_CONFIG):
        cfg_type = MT_DOCKER_CONFIG if docker else MT_OCI_CONFIG
    media_type = MT_DOCKER_MANIFEST if docker else MT_OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": cfg_type, "digest": config.digest, "size": config.size},
        "layers": layers,
    }
    return json.dumps(manifest, indent=3).encode(), media_type


__all__ = ["COMPRESSIONS", "PushError", "PushResult", "compressed", "push"]
