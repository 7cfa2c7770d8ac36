"""A container's changes: ``diff`` lines and ``commit`` as a new OCI layer and image.

The changes are the container's upper directory, in the kernel overlay format
the union view writes: char 0/0 devices (or ``.wh.<name>`` files where mknod
was refused) are whiteouts, ``trusted.overlay.opaque=y`` (``user.overlay.``,
or a ``.wh..wh..opq`` file) marks an opaque directory.  A commit turns them
into an OCI changeset layer:

* a whiteout becomes an empty ``.wh.<name>`` member, an opaque directory its
  directory member followed by ``.wh..wh..opq``;
* files sharing an inode become one file and hardlink members to it;
* xattrs are PAX ``SCHILY.xattr.*`` records, except overlayfs's and our own
  bookkeeping (``*.overlay.*``, ``*.layerfs.*``);
* members are in path order with whole-second times and no user names, so the
  same tree gives the same bytes (and the same diff_id).

The layer is then imported like any other (deduplicated, with its skeleton),
so ``save`` exports exactly the bytes the commit produced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

from layerfs.store import Store, StoreError, collect
from layerfs.tar import writer as T
from layerfs.tar.whiteouts import WHITEOUT_PREFIX, opaque_member, whiteout_member
from layerfs.tools.image import store_image, store_layer
from layerfs.tools.layer import LayerError, import_layer
from layerfs.tools.sources import MT_OCI_CONFIG, MT_OCI_LAYER, MT_OCI_MANIFEST
from layerfs.union.index import ChainIndex, build
from layerfs.union.lower import ChainLayer, host_xattrs
from layerfs.union.overlayfmt import scan

READ_SIZE = 1 << 20


class CommitError(ValueError):
    """The commit is refused; nothing was stored."""


# -- diff ----------------------------------------------------------------------------------
class Change(NamedTuple):
    kind: str  # "A" added, "C" changed, "D" deleted (docker diff's letters)
    path: str  # absolute, as docker diff prints it


def _lower(store: Store, layer_ids: list[bytes]) -> ChainLayer:
    return ChainLayer(store, ChainIndex(store, build(store, layer_ids)))


def changes(store: Store, layer_ids: list[bytes], upper: str, skip: Iterable[bytes] = ()) -> list[Change]:
    """``docker diff``: what the upper directory adds, changes and deletes in the image."""
    lower = _lower(store, layer_ids)
    out: list[Change] = []

    def show(p: bytes) -> str:
        return "/" + os.fsdecode(p)

    for item in scan(upper, skip):
        existed = lower.lookup(item.path) is not None
        if item.whiteout:
            if existed:
                out.append(Change("D", show(item.path)))
            continue
        out.append(Change("C" if existed else "A", show(item.path)))
        if item.opaque and existed:
            # what the image had below a replaced directory is gone, unless the upper has it again
            present = set(os.listdir(os.path.join(os.fsencode(upper), item.path)))
            for name, _, _ in lower.readdir(item.path):
                if name not in present and WHITEOUT_PREFIX + name not in present:
                    out.append(Change("D", show(item.path + b"/" + name)))
    return sorted(out, key=lambda c: c.path.split("/"))


# -- the layer -------------------------------------------------------------------------------
def _contents(path: bytes) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(READ_SIZE):
            yield piece


def layer_members(upper: str, skip: Iterable[bytes] = ()) -> Iterator[tuple[T.Member, Iterable[bytes]]]:
    """The OCI changeset layer of an upper directory, member by member."""
    root = os.fsencode(upper)
    first_name: dict[tuple[int, int], bytes] = {}
    items = list(scan(upper, skip))
    # siblings in member-name order: a whiteout is named .wh.<name>
    items.sort(key=lambda i: (whiteout_member(i.path).name if i.whiteout else i.path).split(b"/"))
    for item in items:
        if item.whiteout:
            yield whiteout_member(item.path), ()
            continue
        name = item.path
        st = item.st
        host = os.path.join(root, item.path)
        m = T.Member(
            name,
            T.REG,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            0,
            st.st_mtime_ns // 1_000_000_000,
            xattrs=host_xattrs(host),
        )
        if stat.S_ISDIR(st.st_mode):
            yield m._replace(type=T.DIR), ()
            if item.opaque:
                yield opaque_member(name), ()
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            # only regular files become link members: importers refuse links to anything else
            key = (st.st_dev, st.st_ino)
            if key in first_name:
                yield m._replace(type=T.HARDLINK, linkname=first_name[key]), ()
                continue
            first_name[key] = name
        if stat.S_ISREG(st.st_mode):
            yield m._replace(size=st.st_size), _contents(host)
        elif stat.S_ISLNK(st.st_mode):
            yield m._replace(type=T.SYMLINK, linkname=os.readlink(host)), ()
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            typ = T.CHR if stat.S_ISCHR(st.st_mode) else T.BLK
            yield m._replace(type=typ, devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev)), ()
        elif stat.S_ISFIFO(st.st_mode):
            yield m._replace(type=T.FIFO), ()
        # sockets have no tar form: left out, as docker and tar do


class _IterReader:
    """A file-like ``read`` over an iterator of byte strings."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._left = b""

    def read(self, n: int) -> bytes:
        while not self._left:
            piece = next(self._pieces, None)
            if piece is None:
                return b""
            self._left = piece
        out, self._left = self._left[:n], self._left[n:]
        return out


# -- the image ---------------------------------------------------------------------------------
_CHANGE_KEYS = {
    "CMD": "Cmd",
    "ENTRYPOINT": "Entrypoint",
    "ENV": "Env",
    "WORKDIR": "WorkingDir",
    "USER": "User",
    "LABEL": "Labels",
    "EXPOSE": "ExposedPorts",
    "VOLUME": "Volumes",
    "STOPSIGNAL": "StopSignal",
}


def apply_change(config: dict[str, Any], change: str) -> None:
    """One Dockerfile instruction of ``--change``, as docker commit accepts them; on a bad one,
    CommitError and ``config`` unchanged."""
    trial = json.loads(json.dumps(config))
    try:
        _apply(trial, change)
    except CommitError:
        raise
    except (ValueError, TypeError) as exc:
        raise CommitError(f"cannot apply change {change!r}: {exc}") from None
    config.clear()
    config.update(trial)


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CommitError(f"{what}: not a JSON array of strings")
    return value


def _apply(config: dict[str, Any], change: str) -> None:
    word, _, rest = change.strip().partition(" ")
    key = word.upper()
    rest = rest.strip()
    if key not in _CHANGE_KEYS:
        raise CommitError(f"{word} is not a valid change command (use one of {', '.join(_CHANGE_KEYS)})")
    if not rest:
        raise CommitError(f"{key} needs an argument")
    field = _CHANGE_KEYS[key]
    if key in ("CMD", "ENTRYPOINT"):
        if rest.startswith("["):
            try:
                value = _strings(json.loads(rest), key)
            except ValueError:
                raise CommitError(f"{key}: not a JSON array of strings: {rest}") from None
        else:
            value = ["/bin/sh", "-c", rest]
        config[field] = value
    elif key == "ENV":
        if "=" in rest.split(" ", 1)[0]:
            pairs = _pairs(rest, key)
        else:
            name_value = rest.split(None, 1)
            if len(name_value) != 2:
                raise CommitError(f"ENV needs a value: ENV {rest} VALUE, or ENV {rest}=VALUE")
            pairs = [(name_value[0], name_value[1])]
        env = [e for e in config.get("Env") or [] if e.split("=", 1)[0] not in {k for k, _ in pairs}]
        config["Env"] = env + [f"{k}={v}" for k, v in pairs]
    elif key == "LABEL":
        config["Labels"] = dict(config.get("Labels") or {}, **dict(_pairs(rest, key)))
    elif key in ("EXPOSE", "VOLUME"):
        items = _strings(json.loads(rest), key) if rest.startswith("[") else rest.split()
        for item in items:
            if key == "EXPOSE" and "/" not in item:
                item += "/tcp"
            config.setdefault(field, {})
            config[field][item] = {}
    else:
        config[field] = rest


def _pairs(text: str, key: str) -> list[tuple[str, str]]:
    out = []
    for word in shlex.split(text):
        k, eq, v = word.partition("=")
        if not eq or not k:
            raise CommitError(f"{key}: expected KEY=VALUE, got {word!r}")
        out.append((k, v))
    return out


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class CommitResult:
    image_id: str
    layer: str | None  # diff_id of the new layer; None when the container changed nothing
    layer_new: bool
    bytes_stored: int


def commit(
    store: Store,
    parent_id: bytes,
    upper: str,
    name: str | None,
    *,
    message: str = "",
    author: str = "",
    created_by: str = "",
    changes: list[str] = (),  # type: ignore[assignment]
    skip: Iterable[bytes] = (),
) -> CommitResult:
    """Record ``upper`` as a new layer on top of image ``parent_id`` and a new image."""
    parent = store.get_image(parent_id)
    if parent is None:
        raise CommitError(f"image sha256:{parent_id.hex()} is no longer in the store")
    config = json.loads(store.read_object(parent.config))
    inner = config.setdefault("config", {})
    for change in changes:
        apply_change(inner, change)
    now = _now()
    layers = list(parent.layers)
    descriptors = []
    for layer_id in layers:
        rec = store.get_layer(layer_id)
        if rec is None or rec.tar_size is None:
            raise CommitError(
                f"layer sha256:{layer_id.hex()} of the image was stored by an older layerfs without its "
                "tar size: import the image again first"
            )
        descriptors.append(
            {"mediaType": MT_OCI_LAYER, "digest": "sha256:" + layer_id.hex(), "size": rec.tar_size}
        )
    history: dict[str, Any] = {"created": now, "created_by": created_by}
    if author:
        history["author"] = author
        config["author"] = author
    if message:
        history["comment"] = message
    skip = list(skip)
    has_changes = next(iter(scan(upper, skip)), None) is not None
    result = CommitResult("", None, False, 0)
    try:
        with store.session("commit") as session:
            if has_changes:
                tar = T.write(layer_members(upper, skip))
                try:
                    res = import_layer(session, _IterReader(iter(tar)))  # type: ignore[arg-type]
                except T.ContentsChanged as exc:
                    raise CommitError(
                        f"the container's files changed while committing ({exc}); stop it first"
                    ) from None
                except LayerError as exc:
                    raise CommitError(f"the changes do not make a valid layer: {exc}") from None
                layer_id = bytes.fromhex(res.diff_id[7:])
                result.layer = res.diff_id
                if store.get_layer(layer_id) is None:
                    result.layer_new = True
                    # an uncompressed stream: its blob digest and size are its diff_id and tar size
                    store_layer(session, res, compression="none")
                layers.append(layer_id)
                descriptors.append({"mediaType": MT_OCI_LAYER, "digest": res.diff_id, "size": res.tar_size})
                size_added = res.size
            else:
                history["empty_layer"] = True
                size_added = 0
            config["created"] = now
            config.setdefault("rootfs", {"type": "layers"})["diff_ids"] = [
                "sha256:" + h.hex() for h in layers
            ]
            config["history"] = [*config.get("history", []), history]
            config_bytes = json.dumps(config, separators=(",", ":")).encode()
            manifest_bytes = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": MT_OCI_MANIFEST,
                    "config": {
                        "mediaType": MT_OCI_CONFIG,
                        "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
                        "size": len(config_bytes),
                    },
                    "layers": descriptors,
                },
                separators=(",", ":"),
            ).encode()
            image_id = store_image(
                session,
                config=config_bytes,
                manifest=manifest_bytes,
                manifest_media_type=MT_OCI_MANIFEST,
                layers=layers,
                layer_descriptors=descriptors,
                platform=parent.platform,
                created=now,
                size=parent.size + size_added,
                source="commit",
                names=[] if name is None else [name],
            )
            result.image_id = "sha256:" + image_id.hex()
        result.bytes_stored = session.new_bytes
    except BaseException:
        with contextlib.suppress(StoreError):  # the commit's own error is the one to report
            collect(store)  # what the aborted session wrote is unreachable: sweep it now
        raise
    return result
