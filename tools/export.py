"""Export stored images: OCI image layouts, OCI archives and ``docker save`` archives.

Layers are written uncompressed, as ``docker save`` (25+) writes them, so a
layer's blob digest is its diff_id.  A layer imported by this version of
layerfs has a skeleton and comes out byte for byte as it went in: its diff_id,
and with it the config and the image id, survive import -> save -> import.  A
layer without one (stored by an older layerfs) is regenerated from its entry
table with the deterministic tar writer; its diff_id then changes, and the
config is rewritten to match (a new image id, said on stderr).

The manifest is kept as imported when it is an OCI manifest that already names
uncompressed layers (our own saves, Docker 25+ saves), so a second round trip
is a fixed point; otherwise a new OCI manifest names the uncompressed layers
(an OCI layout needs OCI media types: umoci and skopeo find tags only on OCI
manifests).

The default format is one tar that is both an OCI image layout and a
``docker save`` archive (``index.json``, ``oci-layout``, ``blobs/``,
``manifest.json``, ``repositories``): the shape Docker 25 writes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from layerfs.store import Entry, Store, StoreError, skeleton
from layerfs.store import entries as E
from layerfs.tar import writer as T
from layerfs.tar.whiteouts import opaque_member, whiteout_member
from layerfs.tools import refs
from layerfs.tools.sources import MT_OCI_CONFIG, MT_OCI_INDEX, MT_OCI_LAYER, MT_OCI_MANIFEST

FORMATS = ("docker", "oci-archive", "oci-dir")
_UNCOMPRESSED = (MT_OCI_LAYER, "application/vnd.docker.image.rootfs.diff.tar")


class ExportError(ValueError):
    """The export is refused or failed; no output file was left behind."""


@dataclass
class Blob:
    digest: str
    size: int
    media_type: str
    data: Callable[[], Iterable[bytes]]


@dataclass
class ImageExport:
    image_id: str  # of the exported config (differs from the stored one only if layers were regenerated)
    names: list[str]
    config: Blob
    manifest: Blob
    layers: list[Blob]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def bytes_blob(data: bytes, media_type: str) -> Blob:
    return Blob(_sha(data), len(data), media_type, lambda: (data,))


# -- layers --------------------------------------------------------------------------------
def entry_members(store: Store, entries: list[Entry]) -> Iterator[tuple[T.Member, Iterable[bytes]]]:
    """A layer's tar members, regenerated from its entry table (OCI whiteouts and opaque markers).

    Members are in path order, so a hardlink group's file is written under the group's first
    path in that order and the other names link to it (a link must follow its target)."""
    ordered = sorted(entries, key=lambda e: e.path.split(b"/"))
    by_path = {e.path: e for e in ordered}

    def group(e: Entry) -> bytes:  # a hardlink group is named by its file's stored path
        return e.link if e.kind == E.HARDLINK and e.link in by_path else e.path

    linked = {group(e) for e in ordered if e.kind == E.HARDLINK}
    first: dict[bytes, bytes] = {}  # group -> its first name in member order
    for e in ordered:
        if group(e) in linked:
            first.setdefault(group(e), e.path)
    for e in ordered:
        if not e.path:
            continue  # the root's metadata is not part of a layer
        if e.kind == E.WHITEOUT:
            yield whiteout_member(e.path), ()
            continue
        if group(e) in first:
            head = first[group(e)]
            if e.path != head:
                yield _member(e)._replace(type=T.HARDLINK, linkname=head), ()
                continue
            e = by_path[group(e)]._replace(path=e.path)  # the group's file, under its first name
        if e.kind == E.REG:
            yield _member(e)._replace(size=e.size), (_contents(store, e.content, e.size) if e.content else ())
        elif e.kind == E.HARDLINK:  # its target is not in this layer: cannot happen after import
            raise ExportError(f"{e.path!r} links to {e.link!r}, which the layer does not have")
        elif e.kind == E.DIR:
            if not e.flags & E.IMPLICIT:
                yield _member(e)._replace(type=T.DIR), ()
            if e.flags & E.OPAQUE:
                yield opaque_member(e.path), ()
        else:
            typ = {E.SYMLINK: T.SYMLINK, E.CHR: T.CHR, E.BLK: T.BLK, E.FIFO: T.FIFO}[e.kind]
            yield _member(e)._replace(type=typ, linkname=e.link, devmajor=e.devmajor, devminor=e.devminor), ()


def _contents(store: Store, sha: bytes, size: int) -> Iterator[bytes]:
    n = 0
    for piece in store.iter_object(sha):
        n += len(piece)
        yield piece
    if n != size:
        raise ExportError(
            f"object {sha.hex()} has {n} bytes, its file {size}: the store is corrupt (run layerfs verify)"
        )


def _member(e: Entry) -> T.Member:
    return T.Member(e.path, T.REG, e.mode, e.uid, e.gid, 0, e.mtime_ns // 1_000_000_000, xattrs=e.xattrs)


def _layer_blob(store: Store, layer_id: bytes, spool: list[IO[bytes]]) -> Blob:
    layer = store.get_layer(layer_id)
    if layer is None:
        raise ExportError(f"layer sha256:{layer_id.hex()} is missing from the store (run layerfs verify)")
    if layer.skeleton is not None and layer.tar_size is not None:
        skel = layer.skeleton
        return Blob(
            "sha256:" + layer_id.hex(), layer.tar_size, MT_OCI_LAYER, lambda: skeleton.stream(store, skel)
        )
    # stored before skeletons existed: regenerate once into a spool file to learn digest and size
    f = tempfile.TemporaryFile()
    spool.append(f)
    h = hashlib.sha256()
    try:
        for piece in T.write(entry_members(store, store.layer_entries(layer_id))):
            h.update(piece)
            f.write(piece)
    except T.ContentsChanged as exc:
        raise ExportError(
            f"layer sha256:{layer_id.hex()}: {exc}: the store is corrupt (run layerfs verify)"
        ) from None
    size = f.tell()

    def data() -> Iterator[bytes]:
        f.seek(0)
        while piece := f.read(1 << 20):
            yield piece

    return Blob("sha256:" + h.hexdigest(), size, MT_OCI_LAYER, data)


def plan(store: Store, image_id: bytes, names: list[str], spool: list[IO[bytes]]) -> ImageExport:
    """What exporting one image writes: its config, manifest and layer blobs."""
    rec = store.get_image(image_id)
    if rec is None:
        raise ExportError(f"image sha256:{image_id.hex()} is not in the store")
    config_bytes = store.read_object(rec.config)
    layers = [_layer_blob(store, layer_id, spool) for layer_id in rec.layers]
    diff_ids = ["sha256:" + layer_id.hex() for layer_id in rec.layers]
    if [b.digest for b in layers] != diff_ids:
        config = json.loads(config_bytes)
        config.setdefault("rootfs", {})["diff_ids"] = [b.digest for b in layers]
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        print(
            f"warning: image sha256:{image_id.hex()[:12]} has layers stored before layerfs kept their "
            f"exact bytes; they were regenerated, so the exported image id is {_sha(config_bytes)[:19]}",
            file=sys.stderr,
        )
    config = bytes_blob(config_bytes, MT_OCI_CONFIG)
    stored = rec.layer_descriptors
    manifest_bytes = store.read_object(rec.manifest)
    keep = (
        rec.manifest_media_type == MT_OCI_MANIFEST  # an OCI layout needs an OCI manifest
        and config.digest == "sha256:" + image_id.hex()
        and len(stored) == len(layers)
        and all(d["digest"] == b.digest and d["mediaType"] in _UNCOMPRESSED for d, b in zip(stored, layers))
    )
    if keep:
        manifest_type = MT_OCI_MANIFEST
        config.media_type = json.loads(manifest_bytes)["config"]["mediaType"]
        for d, b in zip(stored, layers):
            b.media_type = d["mediaType"]
    else:
        manifest_type = MT_OCI_MANIFEST
        manifest_bytes = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MT_OCI_MANIFEST,
                "config": {"mediaType": MT_OCI_CONFIG, "digest": config.digest, "size": config.size},
                "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b in layers],
            },
            separators=(",", ":"),
        ).encode()
    manifest = bytes_blob(manifest_bytes, manifest_type)
    return ImageExport(config.digest, names, config, manifest, layers)


# -- writing ---------------------------------------------------------------------------------
def qualified(name: str) -> str:
    """``busybox:latest`` -> ``docker.io/library/busybox:latest``, as Docker names images in archives."""
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"docker.io/{name}" if rest else f"docker.io/library/{name}"


class _Sink:
    """Where a layout goes: members of a tar stream, or files under a directory."""

    def __init__(self, out: IO[bytes] | None, root: str | None, progress: Callable[[int], None]) -> None:
        self.out, self.root, self.progress = out, root, progress
        self.dirs: set[str] = set()

    def add(self, name: str, size: int, data: Iterable[bytes], digest: str | None = None) -> None:
        h = hashlib.sha256() if digest else None
        if self.root is not None:
            path = os.path.join(self.root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f: IO[bytes] = open(path, "wb")
        else:
            assert self.out is not None
            for d in _parents(name):
                if d not in self.dirs:
                    self.dirs.add(d)
                    self.out.write(T.header(T.Member(d.encode(), T.DIR, 0o755)))
            self.out.write(T.header(T.Member(name.encode(), T.REG, 0o644, size=size)))
            f = self.out
        n = 0
        for piece in data:
            n += len(piece)
            if h is not None:
                h.update(piece)
            f.write(piece)
            self.progress(len(piece))
        if self.root is not None:
            f.close()
        else:
            f.write(T.padding(size))
        if n != size:
            raise ExportError(f"{name}: {n} bytes written, {size} expected (the store changed underneath?)")
        if h is not None and "sha256:" + h.hexdigest() != digest:
            raise ExportError(
                f"{digest} does not rebuild to its digest: the store is corrupt (run layerfs verify)"
            )


def _parents(name: str) -> list[str]:
    parts = name.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def write_layout(sink: _Sink, images: list[ImageExport], docker: bool) -> None:
    written: set[str] = set()
    for img in images:
        for blob in [*img.layers, img.config, img.manifest]:
            if blob.digest not in written:
                written.add(blob.digest)
                sink.add("blobs/sha256/" + blob.digest[7:], blob.size, blob.data(), blob.digest)
    manifests = []
    for img in images:
        desc = {
            "mediaType": img.manifest.media_type,
            "digest": img.manifest.digest,
            "size": img.manifest.size,
        }
        if not img.names:
            manifests.append(desc)
        for name in img.names:
            ann = {
                "io.containerd.image.name": qualified(name),
                "org.opencontainers.image.ref.name": refs.split(name)[1],
            }
            manifests.append(dict(desc, annotations=ann))
    index = _json({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests})
    sink.add("index.json", len(index), (index,))
    if docker:
        manifest = _json(
            [
                {
                    "Config": "blobs/sha256/" + img.config.digest[7:],
                    "RepoTags": img.names,
                    "Layers": ["blobs/sha256/" + b.digest[7:] for b in img.layers],
                }
                for img in images
            ]
        )
        sink.add("manifest.json", len(manifest), (manifest,))
    layout = _json({"imageLayoutVersion": "1.0.0"})
    sink.add("oci-layout", len(layout), (layout,))
    if docker:
        repos: dict[str, dict[str, str]] = {}
        for img in images:
            for name in img.names:
                repo, tag = refs.split(name)
                repos.setdefault(repo, {})[tag] = img.layers[-1].digest[7:] if img.layers else ""
        data = _json(repos)
        sink.add("repositories", len(data), (data,))


def write_oci_dir(path: str, images: list[ImageExport]) -> None:
    """An OCI image layout at ``path`` (created or merged into), names annotated as ``save`` does."""
    write_layout(_Sink(None, path, lambda n: None), images, docker=False)


@dataclass
class SaveResult:
    images: list[ImageExport]
    bytes: int


def save(
    store: Store,
    references: list[str],
    output: str,
    fmt: str = "docker",
    progress: Callable[[int], None] = lambda n: None,
) -> SaveResult:
    """Write the images ``references`` name to ``output`` ("-": stdout) in format ``fmt``.

    A file or directory output appears only when complete, and a killed save leaves nothing
    lasting beside it (see ``_write``)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    chosen: dict[bytes, list[str]] = {}
    tags = store.tags()
    for ref in references:
        image_id = refs.resolve(store, ref)
        names = chosen.setdefault(image_id, [])
        if refs.id_part(ref) is None:
            name = refs.normalize(ref)
            if name not in names:
                names.append(name)
        elif not names:  # by id: every tag of the image, as docker save does
            names.extend(sorted(n for n, i in tags.items() if i == image_id))
    spool: list[IO[bytes]] = []
    total = 0

    def count(n: int) -> None:
        nonlocal total
        total += n
        progress(n)

    layer_ids: list[bytes] = []
    for image_id in chosen:
        rec = store.get_image(image_id)
        layer_ids += rec.layers if rec else ()
    try:
        # pinned: an rmi + gc meanwhile must not pull layers out from under a half-written archive
        with store.pinned(layer_ids, "save"):
            images = [plan(store, image_id, names, spool) for image_id, names in chosen.items()]
            _write(images, output, fmt, count)
    except StoreError as exc:
        raise ExportError(f"{exc}: the store is damaged (run layerfs verify)") from None
    finally:
        for spooled in spool:
            spooled.close()
    return SaveResult(images, total)


TEMP_PREFIX = ".layerfs-save-"


def _write(images: list[ImageExport], output: str, fmt: str, count: Callable[[int], None]) -> None:
    """Write the layout; a file or directory appears only when complete.

    A file is written to an unnamed O_TMPFILE in the output's directory and linked in when
    complete, so a killed save leaves nothing.  A directory, or a file where the filesystem has
    no O_TMPFILE, is written under a ``.layerfs-save-*`` name beside the output, locked
    (flock) while its save runs; a killed save leaves it behind, and the next save into the
    same directory removes every such temporary no running save holds."""
    if fmt == "oci-dir":
        if output == "-":
            raise ExportError("the oci-dir format needs a directory: -o DIR")
        if os.path.exists(output) and os.listdir(output):
            raise ExportError(f"{output} exists and is not empty")
        parent = os.path.dirname(os.path.abspath(output))
        _remove_stale_temporaries(parent)
        tmp, lock = _locked_temporary(
            lambda: tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent), os.O_RDONLY | os.O_DIRECTORY
        )
        try:
            write_layout(_Sink(None, tmp, count), images, docker=False)
            os.chmod(tmp, 0o755)
            if os.path.exists(output):
                os.rmdir(output)
            os.rename(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.close(lock)
    elif output == "-":
        out = sys.stdout.buffer
        write_layout(_Sink(out, None, count), images, docker=fmt == "docker")
        out.write(T.END)
        out.flush()
    else:
        parent = os.path.dirname(os.path.abspath(output))
        _remove_stale_temporaries(parent)
        fd, name = _temporary_file(parent)  # name None: an unnamed file
        try:
            with os.fdopen(fd, "wb") as f:
                write_layout(_Sink(f, None, count), images, docker=fmt == "docker")
                f.write(T.END)
                f.flush()
                os.fchmod(fd, 0o644)
                if name is None:
                    name = _link_in(fd, parent, output)  # None: linked in as the output itself
                if name is not None:
                    os.rename(name, output)
                    name = None
        except BaseException:
            if name is not None:
                os.unlink(name)
            raise


def _temporary_file(parent: str) -> tuple[int, str | None]:
    """A file to write the archive to, locked: unnamed (O_TMPFILE) where the filesystem can,
    else ``.layerfs-save-*`` in ``parent`` (its name is returned)."""
    try:
        fd = os.open(parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        # EOPNOTSUPP: not on this filesystem; EISDIR: a kernel without O_TMPFILE
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, None

    def create() -> str:
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=parent)
        os.close(fd)
        return path

    path, fd = _locked_temporary(create, os.O_WRONLY)
    return fd, path


def _link_in(fd: int, parent: str, output: str) -> str | None:
    """Give the unnamed file ``fd`` its name: ``output`` when that is free, else a temporary
    name to rename over it (returned; the file stays locked until ``fd`` closes)."""
    # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N, as open(2) shows for O_TMPFILE; a directory
    # descriptor makes Python call linkat (with none it calls link(), which follows nothing)
    source = f"/proc/self/fd/{fd}"
    dir_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.link(source, os.path.basename(os.path.abspath(output)), dst_dir_fd=dir_fd)
            return None
        except FileExistsError:
            pass
        while True:
            name = TEMP_PREFIX + secrets.token_hex(6)
            try:
                os.link(source, name, dst_dir_fd=dir_fd)
                return os.path.join(parent, name)
            except FileExistsError:
                continue
    finally:
        os.close(dir_fd)


def _locked_temporary(create: Callable[[], str], flags: int) -> tuple[str, int]:
    """``create()`` a temporary file or directory, open it with ``flags`` and lock it (flock,
    held by the returned descriptor).  A concurrent ``_remove_stale_temporaries`` may remove
    it between the two: then it is created again."""
    while True:
        path = create()
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return path, fd
        os.close(fd)


def _remove_stale_temporaries(parent: str) -> None:
    """Remove the ``.layerfs-save-*`` files and directories in ``parent`` that no running save
    holds locked: what killed saves left."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(TEMP_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except OSError:
            pass  # held by a running save (or already gone)
        finally:
            os.close(fd)
