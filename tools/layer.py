"""Import one layer: a (compressed) tar stream -> verified entry table in the store.

The OCI changeset rules are applied here, at import time, so the store only
ever holds clean entries:

* paths are normalised lexically (``./a//b/`` -> ``a/b``); absolute paths are
  clamped to the layer root (as docker and tar do); a path whose ``..``
  climbs above the root is refused, never clamped silently;
* ``.wh.<name>`` becomes a WHITEOUT entry for ``<name>``, ``.wh..wh..opq``
  marks its directory OPAQUE; a bare ``.wh.`` is refused; other ``.wh..wh.``
  names (aufs bookkeeping) are dropped, as docker does.  A whiteout only hides
  lower layers: a path the same layer also creates keeps that entry (a
  directory becomes opaque);
* duplicates: the last member wins;
* hardlinks are resolved against the same layer (and share a group) or, if the
  target is not in it, against the lower layers (becoming a copy of the file);
* nothing is ever resolved through the layer's own symlinks: an entry below a
  member of the same layer that is not a directory is refused.

The blob digest (compressed bytes), its size and the diff_id (uncompressed
bytes) are computed while streaming and checked before anything is recorded.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import zstandard

from layerfs.store import CHUNK_SIZE, Entry, WriteSession
from layerfs.store import entries as E
from layerfs.store.skeleton import SkeletonRecorder
from layerfs.tar.reader import EV_DATA, EV_END, EV_ENTRY, TarError, TarParser
from layerfs.tar.whiteouts import OPAQUE_MARKER, WHITEOUT_PREFIX

READ_SIZE = 1 << 20

_inflate_lib: Any
try:  # ISA-L inflates gzip 2-3x faster than zlib; same API; not built for every board
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover - depends on the platform
    _inflate_lib = zlib
_INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, _inflate_lib.error)
_KINDS = {
    ord("0"): E.REG,
    ord("2"): E.SYMLINK,
    ord("3"): E.CHR,
    ord("4"): E.BLK,
    ord("5"): E.DIR,
    ord("6"): E.FIFO,
}


class LayerError(ValueError):
    """The layer is refused; the message names the layer problem."""


def normalize(name: bytes) -> bytes:
    parts: list[bytes] = []
    for p in name.split(b"/"):
        if p in (b"", b"."):
            continue
        if p == b"..":
            if not parts:
                raise LayerError(f"path {name.decode(errors='replace')!r} escapes the layer root")
            parts.pop()
        else:
            parts.append(p)
    return b"/".join(parts)


class _HashingReader:
    """Counts and hashes what passes through ``read``."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self.sha = hashlib.sha256()
        self.size = 0
        self.hashing = True

    def read(self, n: int = READ_SIZE) -> bytes:
        data = self._read(n)
        if self.hashing:
            self.sha.update(data)
        self.size += len(data)
        return data


class _Decompressor:
    """Sniffs gzip / zstd / plain tar and reads the decompressed stream."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._raw = read
        head = read(READ_SIZE)
        self._first: bytes | None = head
        self._gz: Any = None  # a zlib or ISA-L decompress object
        self._zst: zstandard.ZstdDecompressionReader | None = None
        self.kind = "tar"
        if head[:2] == b"\x1f\x8b":
            self.kind = "gzip"
            self._gz = _inflate_lib.decompressobj(31)
        elif head[:4] == b"\x28\xb5\x2f\xfd":
            self.kind = "zstd"
            source: Any = _RawSource(self)  # anything with read(n) will do
            self._zst = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)

    def read_raw(self, n: int) -> bytes:
        if self._first is not None:
            data, self._first = self._first, None
            return data
        return self._raw(n)

    def read(self, n: int = READ_SIZE) -> bytes:
        if self._zst is not None:
            return self._zst.read(n)
        if self._gz is None:
            return self.read_raw(n)
        gz = self._gz
        while True:
            data = gz.unconsumed_tail
            if not data:
                data = self.read_raw(READ_SIZE)
                if not data:
                    if not gz.eof:
                        raise LayerError("compressed layer is truncated")
                    if not gz.unused_data.strip(b"\0"):
                        return b""
                    # else: another gzip member, already read, follows
                if gz.eof:  # another gzip member follows (or zero padding, tolerated)
                    data = gz.unused_data + data
                    if not data.strip(b"\0"):
                        continue
                    gz = self._gz = _inflate_lib.decompressobj(31)
            try:
                out = gz.decompress(data, n)
            except _INFLATE_ERRORS as exc:
                raise LayerError(f"corrupt gzip layer: {exc}") from None
            if out:
                return out


class _RawSource:
    """What the zstd stream reader pulls compressed input from."""

    def __init__(self, dec: _Decompressor) -> None:
        self._dec = dec

    def read(self, n: int) -> bytes:
        return self._dec.read_raw(n)


class _Prefetcher:
    """Reads, decompresses and hashes on a thread of its own, ahead of the parser.

    Inflate and SHA-256 release the GIL, so this puts the second core to work while the
    main thread parses and stores (the import was bound by its one thread).  The queue
    is bounded: at most ``DEPTH`` blocks are read ahead.  Errors of the reading side are
    raised to the parser's caller at the point the stream reaches them."""

    DEPTH = 8

    def __init__(self, read: Callable[[int], bytes], progress: Callable[[], None] | None = None) -> None:
        self._read = read
        self._progress = progress
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(self.DEPTH)
        self._stop = threading.Event()
        self._left = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._run, name="layerfs-inflate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._read(READ_SIZE)
                if self._progress is not None:
                    self._progress()
                self._put(data if data else None)
                if not data:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, n: int = READ_SIZE) -> bytes:
        if not self._left:
            if self._done:
                return b""
            item = self._queue.get()
            if item is None:
                self._done = True
                return b""
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._left = memoryview(item)
        out, self._left = self._left[:n], self._left[n:]
        return bytes(out)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class LayerResult:
    diff_id: str
    blob_digest: str
    blob_size: int
    tar_size: int  # uncompressed
    entries: list[Entry]
    size: int  # logical bytes of regular-file data
    files: int
    compression: str
    skeleton: bytes  # SHA-256 of the object that rebuilds the exact tar stream


class _LayerBuilder:
    def __init__(self, lower: Callable[[bytes], Entry | None]) -> None:
        self.entries: dict[bytes, Entry] = {}
        self.whiteouts: set[bytes] = set()
        self.opaque: set[bytes] = set()
        self.links_to: dict[bytes, list[bytes]] = {}
        self._lower = lower

    def put(self, e: Entry) -> None:
        old = self.entries.get(e.path)
        if old is not None and e.path in self.links_to:
            self._promote(e.path)
        if old is not None and old.kind == E.HARDLINK:
            group = self.links_to.get(old.link)
            if group and e.path in group:
                group.remove(e.path)
        self.entries[e.path] = e

    def _promote(self, target: bytes) -> None:
        """``target`` is being replaced: its first hardlink becomes the group's root."""
        links = [p for p in self.links_to.pop(target) if self.entries.get(p, None) is not None]
        if not links:
            return
        old = self.entries[target]
        root = links[0]
        self.entries[root] = old._replace(path=root, kind=E.REG, link=b"")
        for p in links[1:]:
            self.entries[p] = self.entries[p]._replace(link=root)
        if links[1:]:
            self.links_to[root] = links[1:]

    def hardlink(self, path: bytes, target: bytes, raw_name: bytes) -> Entry:
        t = self.entries.get(target)
        if t is not None:
            if t.kind == E.HARDLINK:
                target, t = t.link, self.entries[t.link]
            if t.kind != E.REG:
                raise LayerError(f"hardlink {raw_name!r} points to a non-regular file")
            if target == path:
                raise LayerError(f"hardlink {raw_name!r} points to itself")
            self.links_to.setdefault(target, []).append(path)
            return t._replace(path=path, kind=E.HARDLINK, link=target)
        t = self._lower(target)
        if t is None or t.kind not in (E.REG, E.HARDLINK):
            raise LayerError(
                f"hardlink {raw_name!r} points to {target!r}, which is not a file of this or a lower layer"
            )
        return t._replace(path=path, kind=E.REG, link=b"")

    def finish(self) -> list[Entry]:
        for path in self.whiteouts:
            e = self.entries.get(path)
            if e is None:
                self.entries[path] = Entry(path, E.WHITEOUT, 0)
            elif e.kind == E.DIR:
                # deleted and re-created in one layer: nothing of the lower dir shows
                self.opaque.add(path)
        for path in self.opaque:
            e = self.entries.get(path)
            if e is None:
                e = Entry(path, E.DIR, 0o755, flags=E.IMPLICIT)
            elif e.kind != E.DIR:
                raise LayerError(f"opaque marker in {path!r}, which this layer makes a non-directory")
            self.entries[path] = e._replace(flags=e.flags | E.OPAQUE)
        for path in self.entries:
            parent = path.rpartition(b"/")[0]
            while parent:
                p = self.entries.get(parent)
                if p is not None and p.kind != E.DIR:
                    raise LayerError(
                        f"{path.decode(errors='replace')!r} lies below {parent.decode(errors='replace')!r}, "
                        "which this layer makes a non-directory (refusing to resolve through it)"
                    )
                parent = parent.rpartition(b"/")[0]
        return sorted(self.entries.values(), key=lambda e: e.path)


def hash_blob(
    blob: IO[bytes], *, decompress: bool, progress: Callable[[int], None] | None = None
) -> tuple[str, int, str | None]:
    """The blob's digest and size, and with ``decompress`` the digest of what it decompresses
    to (a layer's diff_id): a layer the store already has is checked against what an archive
    says of it without being imported again."""
    raw = _HashingReader(blob.read)

    def counted(n: int) -> bytes:
        data = raw.read(n)
        if progress is not None:
            progress(len(data))
        return data

    if not decompress:
        while counted(READ_SIZE):
            pass
        return "sha256:" + raw.sha.hexdigest(), raw.size, None
    dec = _Decompressor(counted)
    inner = hashlib.sha256()
    while data := dec.read(READ_SIZE):
        inner.update(data)
    return "sha256:" + raw.sha.hexdigest(), raw.size, "sha256:" + inner.hexdigest()


def import_layer(
    session: WriteSession,
    blob: IO[bytes],
    *,
    lower: Callable[[bytes], Entry | None] = lambda path: None,
    progress: Callable[[int], None] | None = None,
) -> LayerResult:
    """Stream a layer blob into ``session``; digests are returned for the caller to check.

    ``lower`` looks a path up in the merged lower layers (for hardlinks to them)."""
    raw = _HashingReader(blob.read)
    dec = _Decompressor(raw.read)
    # an uncompressed blob is its own diff_id: hash its bytes once, not twice
    raw.hashing = dec.kind != "tar"
    plain = _HashingReader(dec.read)
    reported = 0

    def report() -> None:
        nonlocal reported
        assert progress is not None
        progress(raw.size - reported)
        reported = raw.size

    feed = _Prefetcher(plain.read, progress=report if progress else None)
    skeleton = SkeletonRecorder(session, feed.read)
    build = _LayerBuilder(lower)
    size = files = 0
    writer = None
    pending: Entry | None = None
    parser = TarParser(skeleton.read, CHUNK_SIZE)
    try:
        for ev, val in parser:
            if ev == EV_DATA:
                assert writer is not None
                writer.write(val)  # type: ignore[arg-type]
            elif ev == EV_END:
                content = None
                if writer is not None:
                    # stored even for a member the layer drops (a whiteout with data, a
                    # duplicate): the skeleton splices it back in on export
                    content = writer.finish(val)  # type: ignore[arg-type]
                    skeleton.digest(content)
                if pending is not None:
                    build.put(pending._replace(content=content if pending.size else None))
                    size += pending.size
                    files += 1
                pending = writer = None
            elif ev == EV_ENTRY:
                pending = _entry(build, val)  # type: ignore[arg-type]
                if val[6]:  # type: ignore[index]
                    skeleton.contents(parser.offset, val[6])  # type: ignore[index]
                    writer = session.new_file()
        while skeleton.read(READ_SIZE):  # trailing padding belongs to the diff_id too
            pass
        while raw.read(READ_SIZE):
            pass
        skeleton_sha = skeleton.finish()
    except TarError as exc:
        raise LayerError(f"bad tar stream: {exc}") from None
    except zstandard.ZstdError as exc:
        raise LayerError(f"corrupt zstd layer: {exc}") from None
    finally:
        feed.close()
    return LayerResult(
        diff_id="sha256:" + plain.sha.hexdigest(),
        blob_digest="sha256:" + (raw.sha if raw.hashing else plain.sha).hexdigest(),
        blob_size=raw.size,
        tar_size=plain.size,
        entries=build.finish(),
        size=size,
        files=files,
        compression=dec.kind,
        skeleton=skeleton_sha,
    )


def _make(path: bytes, kind: int, h: tuple) -> Entry:  # type: ignore[type-arg]
    _, link, _, mode, uid, gid, size, mtime_ns, dmaj, dmin, _, _, xattrs = h
    return Entry(path, kind, mode, uid, gid, size, mtime_ns, None, link, dmaj, dmin, tuple(xattrs.items()))


_U16, _U32, _I64 = (1 << 16) - 1, (1 << 32) - 1, 1 << 63


def _check(h: tuple) -> None:  # type: ignore[type-arg]
    """Refuse values no filesystem can name or the entry table cannot hold."""
    name, link, uid, gid, mtime_ns, dmaj, dmin, xattrs = h[0], h[1], h[4], h[5], h[7], h[8], h[9], h[12]
    shown = name[:100].decode(errors="replace")
    for what, value in (("path", name), ("link target", link)):
        if b"\0" in value:
            raise LayerError(f"{what} of {shown!r} contains a NUL byte")
        if len(value) > _U16:
            raise LayerError(f"{what} of {shown!r} is too long ({len(value)} bytes)")
    for what, num, lo, hi in (
        ("uid", uid, 0, _U32),
        ("gid", gid, 0, _U32),
        ("devmajor", dmaj, 0, _U32),
        ("devminor", dmin, 0, _U32),
        ("mtime", mtime_ns, -_I64, _I64 - 1),
    ):
        if not lo <= num <= hi:
            raise LayerError(f"{shown!r}: {what} {num} is out of range")
    if len(xattrs) > _U16 or any(len(k) > _U16 or b"\0" in k for k in xattrs):
        raise LayerError(f"{shown!r}: xattr names too many, too long or with a NUL byte")


def _entry(build: _LayerBuilder, h: tuple) -> Entry | None:  # type: ignore[type-arg]
    """Apply one member; returns the entry of a regular file, recorded once its data is read."""
    _check(h)
    name, link, typ = h[0], h[1], h[2]
    path = normalize(name)
    if any(p.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX) for p in path.split(b"/")[:-1]):
        return None  # below aufs bookkeeping (.wh..wh.plnk/...): dropped with it
    base = path.rpartition(b"/")[2]
    if base.startswith(WHITEOUT_PREFIX):
        parent = path.rpartition(b"/")[0]
        if base == OPAQUE_MARKER:
            build.opaque.add(parent)
        elif base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            pass  # aufs bookkeeping (.wh..wh.plnk and the like): dropped, as docker does
        elif base == WHITEOUT_PREFIX:
            raise LayerError(f"bare whiteout name {name!r}")
        else:
            target = base[len(WHITEOUT_PREFIX) :]
            if target in (b".", b".."):
                raise LayerError(f"whiteout {name!r} names no file")
            build.whiteouts.add(parent + b"/" + target if parent else target)
        return None
    if not path and typ != ord("5"):
        raise LayerError(f"the layer root {name!r} must be a directory")
    if typ == ord("0"):
        return _make(path, E.REG, h)
    if typ == ord("1"):
        build.put(build.hardlink(path, normalize(link), name))
    else:
        build.put(_make(path, _KINDS[typ], h))
    return None
