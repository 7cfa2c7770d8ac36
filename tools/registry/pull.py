"""``layerfs pull``: an image from a registry into the store, through the importer's own path.

1. The manifest (or index, then the platform's manifest) and the config are fetched and checked
   against their digests; media types, layer count and platform are checked as ``import`` checks
   them.
2. Layers the store has are not downloaded.  The others stream, a few at a time (``JOBS``), from
   the registry straight into ``tools.layer.import_layer`` (decompress, parse, store): the
   blob's size is enforced as it streams, its digest and diff_id are checked at its end, and
   nothing of it is written to disk outside the store.  A dropped download resumes with a range
   request (``client.BlobStream``).
3. Each layer commits on its own once verified (its own ``WriteSession``), so an interrupted or
   killed pull keeps the layers it finished and the next pull downloads only the rest; a lease
   of the pull pins the image's layers against ``gc`` meanwhile.  The image record and its tag are
   written last, in one transaction, exactly as ``import`` writes them (same image id, diff_ids,
   record shape), so a pulled image is the image ``layerfs import`` makes of the same image.
4. Which registry blob each layer came from is remembered (``layerfs.store.blobsources``) for push.

A failed pull sweeps what its unfinished layers wrote (``gc`` with the pull's lease still held,
so the finished layers stay for the next try); no image or tag of it is visible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, cast

from layerfs.progress import byte_bar
from layerfs.store import Entry, Store, StoreError, blobsources, collect
from layerfs.tools.image import ImportError_, _check_layer, _LowerView, _raw, store_image, store_layer
from layerfs.tools.layer import LayerError, import_layer
from layerfs.tools.registry.client import BlobStream, Cancelled, Registry, RegistryError
from layerfs.tools.registry.reference import DOCKER_HUB, Reference, mirror, parse
from layerfs.tools.sources import (
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_JSON,
    Descriptor,
    SourceError,
    _is_attestation,
    choose_platform,
    no_platform,
    platform_matches,
    platform_string,
)

JOBS = int(os.environ.get("LAYERFS_PULL_JOBS", "3"))  # docker's max-concurrent-downloads
_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)


class PullError(Exception):
    """The pull failed; the message is one line.  Nothing of the image is visible."""


@dataclass
class PullResult:
    image_id: str
    names: list[str]
    digest: str  # of the manifest pulled
    reference: str
    platform: str = ""
    layers_new: int = 0
    layers_known: int = 0
    bytes_downloaded: int = 0
    resumes: int = 0
    up_to_date: bool = False
    layer_ids: list[str] = field(default_factory=list)


@dataclass
class _Resolved:
    registry: Registry
    ref: Reference
    manifest: bytes
    manifest_type: str
    digest: str
    config: bytes
    layers: list[Descriptor]
    diff_ids: list[str]
    platform: str
    cfg_platform: str
    created: str


def _media_type(body: Any, header: str) -> str:
    if isinstance(body, dict) and isinstance(body.get("mediaType"), str) and body["mediaType"]:
        return str(body["mediaType"])
    if header and header not in ("application/json", "application/octet-stream", "text/plain"):
        return header
    if isinstance(body, dict) and body.get("schemaVersion") == 1:
        return _SCHEMA1[0]
    if isinstance(body, dict) and "manifests" in body:
        return INDEX_TYPES[0]
    return MANIFEST_TYPES[0]


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise PullError(f"{what} is not valid JSON") from None


def _pick(reg: Registry, ref: Reference, index: Any, platform: str | None, depth: int = 0) -> Descriptor:
    """The manifest of the platform asked for (the host's by default), as ``import`` picks it."""
    try:
        candidates = [Descriptor.parse(m) for m in (index.get("manifests") or [])]
    except SourceError as exc:
        raise PullError(f"index of {ref}: {exc}") from None
    candidates = [c for c in candidates if not _is_attestation(c)]
    nested = [c for c in candidates if c.media_type in INDEX_TYPES]
    if nested and depth == 0:
        for n in nested:
            body, _, _ = reg.get_manifest(ref.repository, n.digest)
            with contextlib.suppress(PullError):
                return _pick(reg, ref, _json(body, f"index {n.digest}"), platform, 1)
    candidates = [c for c in candidates if c.media_type not in INDEX_TYPES]
    best = choose_platform(candidates, platform)
    if best is None:
        raise PullError(no_platform(candidates, platform, str(ref)))
    return best


def resolve(reg: Registry, ref: Reference, platform: str | None) -> _Resolved:
    """Manifest, config and layer descriptors of ``ref`` for ``platform``, all verified."""
    body, header_type, digest = reg.get_manifest(ref.repository, ref.manifest_ref)
    doc = _json(body, f"the manifest of {ref}")
    media_type = _media_type(doc, header_type)
    chosen_platform = ""
    if media_type in INDEX_TYPES:
        desc = _pick(reg, ref, doc, platform)
        chosen_platform = platform_string(desc.platform)
        body, header_type, digest = reg.get_manifest(ref.repository, desc.digest)
        doc = _json(body, f"manifest {desc.digest}")
        media_type = _media_type(doc, header_type or desc.media_type)
    if media_type in _SCHEMA1:
        raise PullError(
            f"{ref} is a Docker schema 1 image, which layerfs does not read (docker 20.10+ neither)"
        )
    if media_type not in MANIFEST_TYPES:
        raise PullError(f"the manifest of {ref} has unsupported media type {media_type!r}")
    try:
        cfg_desc = Descriptor.parse(doc["config"])
        layers = [Descriptor.parse(d) for d in doc["layers"]]
    except (KeyError, TypeError, SourceError):
        raise PullError(f"manifest {digest} of {ref} is malformed") from None
    for d in layers:
        if d.media_type and d.media_type not in LAYER_TYPES:
            raise PullError(f"layer {d.digest} of {ref} has unsupported media type {d.media_type!r}")
    config = reg.get_blob_bytes(ref.repository, cfg_desc.digest, cfg_desc.size, MAX_JSON)
    if len(config) != cfg_desc.size:
        raise PullError(f"config {cfg_desc.digest}: size is {len(config)}, descriptor says {cfg_desc.size}")
    cfg = _json(config, f"config {cfg_desc.digest}")
    try:
        diff_ids = [str(d) for d in cfg["rootfs"]["diff_ids"]]
    except (KeyError, TypeError):
        raise PullError("image config is malformed (no rootfs.diff_ids)") from None
    if len(diff_ids) != len(layers):
        raise PullError(f"config lists {len(diff_ids)} layers, manifest {len(layers)}")
    for diff_id in diff_ids:
        if not (diff_id.startswith("sha256:") and len(diff_id) == 71):
            raise PullError(f"image config has a malformed diff_id {diff_id[:80]!r}")
    cfg_platform = platform_string(
        {"os": cfg.get("os"), "architecture": cfg.get("architecture"), "variant": cfg.get("variant")}
    )
    if platform and not platform_matches(platform, cfg_platform):
        raise PullError(f"{ref} is for {cfg_platform}, not {platform}")
    return _Resolved(
        reg,
        ref,
        body,
        media_type,
        digest,
        config,
        layers,
        diff_ids,
        chosen_platform,
        cfg_platform,
        str(cfg.get("created", "")),
    )


def open_registry(
    host: str, *, tls_verify: bool = True, cert_dir: str | None = None, plain_http: bool = False
) -> Registry:
    return Registry(host, insecure=not tls_verify, cert_dir=cert_dir, plain_http=plain_http)


def pull(
    store: Store,
    reference: str,
    *,
    platform: str | None = None,
    tls_verify: bool = True,
    cert_dir: str | None = None,
    progress: bool = False,
    jobs: int = JOBS,
) -> PullResult:
    ref = parse(reference)
    candidates: list[Registry] = []
    if ref.registry == DOCKER_HUB and (m := mirror()) is not None:
        candidates.append(Registry(m[0], insecure=not tls_verify or m[1], cert_dir=cert_dir, plain_http=m[1]))
    candidates.append(open_registry(ref.registry, tls_verify=tls_verify, cert_dir=cert_dir))
    try:
        resolved = None
        for i, reg in enumerate(candidates):
            try:
                resolved = resolve(reg, ref, platform)
                break
            except RegistryError:
                if i == len(candidates) - 1:
                    raise
        assert resolved is not None
        return _pull(store, resolved, progress, jobs)
    except RegistryError as exc:
        raise PullError(str(exc)) from None
    finally:
        for reg in candidates:
            reg.close()


class _Layer:
    """One layer to download, and what became of it."""

    def __init__(self, index: int, desc: Descriptor, diff_id: str) -> None:
        self.index = index
        self.desc = desc
        self.diff_id = diff_id
        self.done = threading.Event()
        self.entries: list[Entry] | None = None
        self.error: BaseException | None = None
        self.downloaded = 0
        self.resumes = 0


def _pull(store: Store, r: _Resolved, show: bool, jobs: int) -> PullResult:
    image_id = "sha256:" + hashlib.sha256(r.config).hexdigest()
    ref = r.ref
    names = [ref.name] if ref.name else []
    before = {n: store.get_tag(n) for n in names}
    result = PullResult(
        image_id, names, r.digest, str(ref), platform=r.platform or r.cfg_platform, layer_ids=r.diff_ids
    )
    todo: dict[str, _Layer] = {}
    for i, (desc, diff_id) in enumerate(zip(r.layers, r.diff_ids)):
        if diff_id in todo:
            continue
        known = store.get_layer(_raw(diff_id))
        if known is not None and known.skeleton is not None:
            result.layers_known += 1
            continue
        todo[diff_id] = _Layer(i, desc, diff_id)
    lease = store.add_lease("pull", [_raw(d) for d in r.diff_ids])
    bars = _Progress(list(todo.values()), show)
    cancel = threading.Event()
    try:
        _download(store, r, list(todo.values()), cancel, bars, jobs)
        result.layers_new = len(todo)
        result.bytes_downloaded = sum(layer.downloaded for layer in todo.values())
        result.resumes = sum(layer.resumes for layer in todo.values())
        _write_image(store, r, image_id, names)
        blobsources.record(
            store,
            [
                (
                    _raw(diff_id),
                    blobsources.BlobSource(r.registry.host, ref.repository, d.digest, d.size, d.media_type),
                )
                for d, diff_id in zip(r.layers, r.diff_ids)
            ],
        )
        result.up_to_date = (
            not todo
            and all(before[n] == _raw(image_id) for n in names)
            and store.get_image(_raw(image_id)) is not None
        )
    except BaseException:
        cancel.set()
        # what unfinished layers wrote goes now; finished ones are pinned by the lease and stay
        with contextlib.suppress(StoreError):
            collect(store)
        raise
    finally:
        bars.close()
        with contextlib.suppress(StoreError):
            store.write(lambda txn: store.drop_lease(txn, lease))
    return result


def _download(
    store: Store, r: _Resolved, layers: list[_Layer], cancel: threading.Event, bars: _Progress, jobs: int
) -> None:
    """Download and import ``layers``, ``jobs`` at a time, in order (a layer's hardlinks may
    name files of a lower one, which is then waited for); the first failure cancels the rest."""
    by_index = {layer.index: layer for layer in layers}
    queue = list(layers)
    lock = threading.Lock()

    def entries_of(i: int) -> Callable[[], list[Entry]]:
        diff_id = r.diff_ids[i]
        layer = next((x for x in layers if x.diff_id == diff_id), None)

        def load() -> list[Entry]:
            if layer is None:
                return store.layer_entries(_raw(diff_id))
            while not layer.done.wait(0.2):
                if cancel.is_set():
                    raise Cancelled()
            if layer.entries is None:
                raise Cancelled()
            return layer.entries

        return load

    def work() -> None:
        while not cancel.is_set():
            with lock:
                if not queue:
                    return
                layer = queue.pop(0)
            try:
                _one_layer(
                    store, r, layer, _LowerView([entries_of(j) for j in range(layer.index)]), cancel, bars
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                layer.error = exc
                cancel.set()
            finally:
                layer.done.set()

    threads = [
        threading.Thread(target=work, name=f"layerfs-pull-{n}", daemon=True)
        for n in range(max(1, min(jobs, len(layers))))
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException:
        cancel.set()  # Ctrl-C: the downloads stop at their next read
        for t in threads:
            t.join(5)
        raise
    errors = [x.error for x in sorted(by_index.values(), key=lambda x: x.index) if x.error is not None]
    real = [e for e in errors if not isinstance(e, Cancelled)]
    if real:
        exc = real[0]
        if isinstance(exc, (RegistryError, PullError)):
            raise exc
        if isinstance(exc, (ImportError_, LayerError, SourceError)):
            raise PullError(str(exc))
        raise exc
    if errors:
        raise PullError("the pull was cancelled")


def _one_layer(
    store: Store, r: _Resolved, layer: _Layer, lower: _LowerView, cancel: threading.Event, bars: _Progress
) -> None:
    desc, diff_id = layer.desc, layer.diff_id
    bars.start(layer)

    def count(n: int) -> None:
        layer.downloaded += n
        bars.update(layer, n)

    session = store.session("pull")
    with session:
        blob = BlobStream(r.registry, r.ref.repository, desc.digest, desc.size, cancel=cancel, progress=count)
        try:
            try:
                res = import_layer(session, cast(IO[bytes], blob), lower=lower.lookup)
            except LayerError as exc:
                raise PullError(f"layer {desc.digest}: {exc}") from None
        finally:
            blob.close()
            layer.resumes = blob.resumes
        try:
            _check_layer(desc, res, diff_id)
        except ImportError_ as exc:
            raise PullError(str(exc)) from None
        store_layer(session, res, replace=True)
    layer.entries = res.entries
    bars.finish(layer)


def _write_image(store: Store, r: _Resolved, image_id: str, names: list[str]) -> None:
    """The image record and tags, as ``tools.image`` writes them for an import."""
    size = 0
    for diff_id in r.diff_ids:
        rec = store.get_layer(_raw(diff_id))
        if rec is None:
            raise PullError(
                f"layer {diff_id} went missing during the pull (a concurrent rmi/gc?); pull again"
            )
        size += rec.size
    with store.session("pull") as session:
        stored = store_image(
            session,
            config=r.config,
            manifest=r.manifest,
            manifest_media_type=r.manifest_type,
            layers=[_raw(d) for d in r.diff_ids],
            layer_descriptors=[
                {"mediaType": d.media_type, "digest": d.digest, "size": d.size} for d in r.layers
            ],
            platform=r.cfg_platform,
            created=r.created,
            size=size,
            source=f"{r.registry.host}/{r.ref.repository}@{r.digest}",
            names=names,
        )
        assert stored == _raw(image_id)


class _Progress:
    """One display for a pull on a terminal: a bar per layer being downloaded and a total."""

    def __init__(self, layers: list[_Layer], enabled: bool) -> None:
        self._bars: dict[int, Any] = {}
        self._total: Any = None
        self._lock = threading.Lock()
        self._total = byte_bar(sum(x.desc.size for x in layers), "total", enabled=enabled, position=0)
        self._positions = {x.index: n + 1 for n, x in enumerate(layers)}

    def start(self, layer: _Layer) -> None:
        if self._total is None:
            return
        with self._lock:
            self._bars[layer.index] = byte_bar(
                layer.desc.size, layer.desc.digest[7:19], position=self._positions[layer.index]
            )

    def update(self, layer: _Layer, n: int) -> None:
        if self._total is None:
            return
        with self._lock:
            bar = self._bars.get(layer.index)
            if bar is not None:
                bar.update(n)
            self._total.update(n)

    def finish(self, layer: _Layer) -> None:
        if self._total is None:
            return
        with self._lock:
            bar = self._bars.get(layer.index)
            if bar is not None:
                bar.set_description_str(layer.desc.digest[7:19] + " done")

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                if bar is not None:
                    bar.close()
            if self._total is not None:
                self._total.close()
            self._bars.clear()
            self._total = None
