"""What the image verbs decide, apart from how they print it: docker's ``rmi`` rules, the shape
of ``inspect`` and ``history``, and how a stored image is mounted (where a temporary upper
directory goes).

Images are named as ``layerfs.tools.refs`` resolves them; their records are the store's
(``layerfs.store.records``).  Like the store, safe to use from several threads.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from layerfs.store import Store, StoreError
from layerfs.store.records import ImageRecord
from layerfs.tools.refs import RefError, normalize, resolve

if TYPE_CHECKING:
    from layerfs.mount import MountSpec


class RemoveRefused(ValueError):
    """``rmi`` leaves the image as it is; the message says why (docker's words)."""


def record(store: Store, image_id: bytes) -> ImageRecord:
    """The image's record; StoreError if it is gone (removed since it was resolved)."""
    rec = store.get_image(image_id)
    if rec is None:
        raise StoreError(f"image sha256:{image_id.hex()} is not in the store")
    return rec


def config(store: Store, image_id: bytes) -> dict[str, Any]:
    """The image's config blob, parsed (an OCI image config)."""
    return dict(json.loads(store.read_object(record(store, image_id).config)))


def tags_of(store: Store, image_id: bytes) -> list[str]:
    return sorted(name for name, i in store.tags().items() if i == image_id)


def inspect(store: Store, image_id: bytes) -> dict[str, Any]:
    """The image as ``docker image inspect`` shows it."""
    rec = record(store, image_id)
    cfg = json.loads(store.read_object(rec.config))
    os_, _, arch = rec.platform.partition("/")
    arch, _, variant = arch.partition("/")
    out = {
        "Id": "sha256:" + image_id.hex(),
        "RepoTags": tags_of(store, image_id),
        "RepoDigests": [],
        "Created": cfg.get("created", ""),
        "Author": cfg.get("author", ""),
        "Config": cfg.get("config", {}),
        "Architecture": cfg.get("architecture", arch),
        "Os": cfg.get("os", os_),
        "Size": rec.size,
        "RootFS": {"Type": "layers", "Layers": ["sha256:" + h.hex() for h in rec.layers]},
        "Manifest": {"Digest": "sha256:" + rec.manifest.hex(), "MediaType": rec.manifest_media_type},
        "Platform": rec.platform,
    }
    if cfg.get("variant"):
        out["Variant"] = cfg["variant"]
    return out


def history(store: Store, image_id: bytes) -> list[dict[str, Any]]:
    """The build history from the image config, newest first (as ``docker history``), each step
    with the size of the layer it made (0 for a step that made none)."""
    rec = record(store, image_id)
    cfg = json.loads(store.read_object(rec.config))
    layer_sizes = []
    for layer_id in rec.layers:
        stored = store.get_layer(layer_id)
        layer_sizes.append(stored.size if stored is not None else 0)
    steps = cfg.get("history") or [{} for _ in layer_sizes]
    items = []
    layer = 0  # the layer the next step that is not empty made
    for h in steps:
        size = 0
        if not h.get("empty_layer"):
            size = layer_sizes[layer] if layer < len(layer_sizes) else 0
            layer += 1
        items.append(
            {
                "created": h.get("created", ""),
                "created_by": h.get("created_by", ""),
                "size": size,
                "comment": h.get("comment", ""),
                "empty_layer": bool(h.get("empty_layer")),
            }
        )
    items.reverse()
    return items


def remove(store: Store, ref: str, *, force: bool = False) -> list[str]:
    """``docker rmi`` of one reference; the lines it reports (``Untagged: NAME``,
    ``Deleted: ID``).  A name removes that tag, and the image once no tag is left; an id
    removes an image with several tags only with ``force``; an image a container uses is
    only untagged, and only with ``force`` (docker keeps it dangling too).  RefError for a
    reference that names no image, RemoveRefused for what must be forced.  Layers and data
    stay for gc."""
    from layerfs.containers.model import users_of

    image_id = resolve(store, ref)
    tags = tags_of(store, image_id)
    by_name = _tag_named(ref, tags)
    if by_name and len(tags) > 1:
        store.remove_tag(by_name)
        return [f"Untagged: {by_name}"]
    if not by_name and len(tags) > 1 and not force:
        raise RemoveRefused(
            f"unable to delete {image_id.hex()[:12]} (must be forced) - image is referenced in multiple repositories"
        )
    users = users_of(store, image_id)
    if users and not force:
        raise RemoveRefused(
            f"conflict: unable to remove {ref} (must be forced) - container "
            f"{users[0].id[:12]} ({users[0].name}) is using its referenced image {image_id.hex()[:12]}"
        )
    if users:
        for t in tags:
            store.remove_tag(t)
        return [f"Untagged: {t}" for t in tags]
    return [*(f"Untagged: {t}" for t in store.remove_image(image_id)), f"Deleted: sha256:{image_id.hex()}"]


def _tag_named(ref: str, tags: list[str]) -> str | None:
    """The tag ``ref`` names, if it is a name and one of ``tags``."""
    try:
        name = normalize(ref)
    except RefError:
        return None
    return name if name in tags else None


def mount_spec(
    store: Store,
    image_id: bytes,
    mountpoint: str,
    *,
    name: str,
    writable: bool = False,
    upper: str | None = None,
    work: str | None = None,
    lower_dirs: list[str] | None = None,
    allow_other: bool = False,
    mount_options: dict[str, bool] | None = None,
) -> MountSpec:
    """How image ``image_id`` is mounted on ``mountpoint``.  Writable without an ``upper``
    directory of its own: a fresh one under the store's ``mounts/``, which ``umount`` deletes
    (the mount record says so); ``upper`` makes it writable too."""
    from layerfs.mount import MountSpec

    temporary = False
    if writable and upper is None:
        base = os.path.join(store.path, "mounts", os.urandom(8).hex())
        upper, work, temporary = os.path.join(base, "upper"), os.path.join(base, "work"), True
    return MountSpec(
        image_id,
        list(record(store, image_id).layers),
        mountpoint,
        upper=upper,
        work=work,
        name=name,
        allow_other=allow_other,
        temporary_upper=temporary,
        lower_dirs=list(lower_dirs or []),
        mount_options=dict(mount_options or {}),
    )
