"""Lower layers of a union view: where the read-only tree comes from.

Two kinds of layer source, one interface:

* ``ChainLayer``: an image's layer chain from the store, already merged into a
  cached index (``layerfs.union.index``); its whiteouts are applied, so it only
  ever answers "here is an entry" or "nothing";
* ``DirLayer``: a plain host directory in the kernel overlay format (0/0
  character-device whiteouts, ``.wh.<name>`` files, ``trusted.overlay.opaque`` /
  ``user.overlay.opaque`` xattrs or a ``.wh..wh..opq`` file), as fuse-overlayfs
  and the kernel take as ``lowerdir``.

``Stack`` merges several layers, topmost first, with overlayfs's lookup rules: a
whiteout hides what is below; a non-directory hides everything below; directories
merge until an opaque one.  A view over a single ``ChainLayer`` uses it directly.

Each layer offers ``probe(path)`` and ``entries(path)`` (what this layer alone has);
every lower (a ``ChainLayer`` or a ``Stack``) offers ``lookup``, ``readdir``,
``link_group`` and ``statfs`` to the view.  Inode numbers: a chain's are its
index's (small, stable); a directory layer's are the host inode with the layer's
position in the top bits, so hardlinks inside one layer keep sharing an inode.

Not thread-safe (lookup caches); the FUSE adapter is single-threaded.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol

from layerfs import hosttree
from layerfs.store import entries as E
from layerfs.union.index import ROOT_INO, ChainIndex, Node
from layerfs.union.overlayfmt import (
    OPAQUE_FILE,
    PRIVATE_XATTR_PREFIXES,
    WH_PREFIX,
    is_opaque_dir,
)

if TYPE_CHECKING:
    from layerfs.store import Store

MISSING, WHITEOUT, FOUND = range(3)
DIR_LAYER_SHIFT = 48  # a directory layer's inodes: (position + 1) << 48 | host inode
ACTIVE_CACHE = 8192

_KIND_OF_MODE = {
    stat.S_IFREG: E.REG,
    stat.S_IFDIR: E.DIR,
    stat.S_IFLNK: E.SYMLINK,
    stat.S_IFCHR: E.CHR,
    stat.S_IFBLK: E.BLK,
    stat.S_IFIFO: E.FIFO,
}


class Probe(NamedTuple):
    state: int  # MISSING, WHITEOUT or FOUND
    node: Node | None = None
    opaque: bool = False


class Lower(Protocol):
    def lookup(self, path: bytes) -> Node | None: ...
    def readdir(self, path: bytes) -> list[tuple[bytes, int, int]]: ...
    def link_group(self, node: Node) -> list[bytes]: ...
    def statfs(self) -> dict[str, int]: ...


class Layer(Protocol):
    def probe(self, path: bytes) -> Probe: ...
    def entries(self, path: bytes) -> Iterator[tuple[bytes, int, int, bool]]: ...
    def link_group(self, node: Node) -> list[bytes]: ...


# paths are relative, "/"-separated bytes; b"" is the root
def parent_path(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def base_name(path: bytes) -> bytes:
    return path.rpartition(b"/")[2]


def join_path(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class ChainLayer:
    """A stored image's merged layers."""

    def __init__(self, store: Store, index: ChainIndex) -> None:
        self.store = store
        self.index = index

    def lookup(self, path: bytes) -> Node | None:
        with self.store.read() as txn:
            return self.index.lookup_node(txn, path)

    def probe(self, path: bytes) -> Probe:
        node = self.lookup(path)
        return Probe(MISSING) if node is None else Probe(FOUND, node)

    def readdir(self, path: bytes) -> list[tuple[bytes, int, int]]:
        with self.store.read() as txn:
            ino = self.index.lookup(txn, path)
            if ino is None or not self.index.node(txn, ino).is_dir:
                return []
            return list(self.index.children(txn, ino))

    def entries(self, path: bytes) -> Iterator[tuple[bytes, int, int, bool]]:
        for name, ino, mode in self.readdir(path):
            yield name, ino, mode, False

    def link_group(self, node: Node) -> list[bytes]:
        with self.store.read() as txn:
            return self.index.link_group(txn, node.ino)

    def statfs(self) -> dict[str, int]:
        s = self.index.summary
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": (s["bytes"] + 4095) // 4096,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": s["inodes"],
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }


STATFS_FIELDS = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_namemax",
)


def host_statfs(path: bytes) -> dict[str, int]:
    """statvfs(2) of a host directory, as the FUSE adapter passes it on."""
    v = os.statvfs(path)
    return {k: getattr(v, k) for k in STATFS_FIELDS}


def host_xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        name = os.fsencode(n)
        if name.startswith(PRIVATE_XATTR_PREFIXES):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(out)


class DirLayer:
    """One host directory in the kernel overlay format."""

    def __init__(self, root: str | bytes, position: int) -> None:
        """``root`` as resolved by the caller (podman passes lowerdirs as short symlinks,
        l/ABC -> ../<id>/diff; a private mount's ``/proc/self/fd/N`` must not be resolved)."""
        self.root = os.fsencode(root)
        self.ino_base = (position + 1) << DIR_LAYER_SHIFT
        self._by_ino: dict[int, list[bytes]] | None = None

    def _host(self, path: bytes) -> bytes:
        return os.path.join(self.root, path) if path else self.root

    def probe(self, path: bytes) -> Probe:
        host = self._host(path)
        try:
            st = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            if path and os.path.lexists(
                self._host(join_path(parent_path(path), WH_PREFIX + base_name(path)))
            ):
                return Probe(WHITEOUT)
            return Probe(MISSING)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return Probe(WHITEOUT)
        if path and base_name(path).startswith(WH_PREFIX):
            return Probe(MISSING)  # bookkeeping of the format, never an entry
        return Probe(FOUND, self._node(host, st), stat.S_ISDIR(st.st_mode) and is_opaque_dir(host))

    def _node(self, host: bytes, st: os.stat_result) -> Node:
        kind = _KIND_OF_MODE.get(stat.S_IFMT(st.st_mode), E.REG)
        link = os.readlink(host) if kind == E.SYMLINK else b""
        size = st.st_size if kind in (E.REG, E.DIR) else 0
        return Node(
            self.ino_base | st.st_ino,
            kind,
            0,
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_nlink,
            size,
            st.st_mtime_ns,
            st.st_rdev,
            None,
            link,
            host_xattrs(host),
            host,
            st.st_atime_ns,
            st.st_ctime_ns,
        )

    def entries(self, path: bytes) -> Iterator[tuple[bytes, int, int, bool]]:
        try:
            it = os.scandir(self._host(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        with it:
            for d in it:
                name = d.name
                if name.startswith(WH_PREFIX):
                    if name != OPAQUE_FILE:
                        yield name[len(WH_PREFIX) :], 0, 0, True
                    continue
                st = d.stat(follow_symlinks=False)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    yield name, 0, 0, True
                else:
                    yield name, self.ino_base | st.st_ino, stat.S_IFMT(st.st_mode), False

    def link_group(self, node: Node) -> list[bytes]:
        """Every path of this layer with the node's host inode (scanned once, on demand)."""
        if self._by_ino is None:
            by_ino: dict[int, list[bytes]] = {}
            for dirpath, _dirs, files in hosttree.walk(self.root):
                for name in files:
                    full = os.path.join(dirpath, name)
                    try:
                        st = os.lstat(full)
                    except OSError:
                        continue
                    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                        by_ino.setdefault(st.st_ino, []).append(os.path.relpath(full, self.root))
            self._by_ino = by_ino
        return sorted(self._by_ino.get(node.ino & ((1 << DIR_LAYER_SHIFT) - 1), []))


class Stack:
    """Several layers merged at lookup time, topmost first."""

    def __init__(self, layers: list[ChainLayer | DirLayer]) -> None:
        if not layers:
            raise ValueError("a union needs at least one lower layer")
        self.layers = layers
        self._active: dict[bytes, list[int] | None] = {}

    def _layers_of_dir(self, path: bytes) -> list[int] | None:
        """Positions of the layers whose directory ``path`` contributes to the merged one;
        None if ``path`` is not a directory of the merged tree."""
        if path in self._active:
            return self._active[path]
        # climb to the nearest directory already known (a loop: images decide the depth),
        # then work out each one below it, top down
        pending = [path]
        while pending[-1] and parent_path(pending[-1]) not in self._active:
            pending.append(parent_path(pending[-1]))
        top = pending[-1]
        candidates = list(range(len(self.layers))) if not top else self._active[parent_path(top)]
        for here in reversed(pending):
            active = self._active_below(here, candidates)
            if len(self._active) >= ACTIVE_CACHE:
                self._active.clear()
            self._active[here] = candidates = active
        return candidates

    def _active_below(self, path: bytes, candidates: list[int] | None) -> list[int] | None:
        """Of the layers contributing to ``path``'s parent, those whose ``path`` is a directory
        that shows in the merged one."""
        if candidates is None:
            return None
        active: list[int] | None = []
        for i in candidates:
            p = self.layers[i].probe(path)
            if p.state == WHITEOUT:
                break
            if p.state == MISSING:
                continue
            assert p.node is not None
            if not p.node.is_dir:
                if not active:
                    active = None  # the topmost entry is not a directory
                break
            assert active is not None
            active.append(i)
            if p.opaque:
                break
        return active or None

    def lookup(self, path: bytes) -> Node | None:
        if not path:
            top = self._layers_of_dir(b"")
            node = self.layers[top[0]].probe(b"").node if top else None
            if node is None:
                return None
            return node._replace(ino=ROOT_INO, nlink=1 if len(top or ()) > 1 else node.nlink)
        parents = self._layers_of_dir(parent_path(path))
        if parents is None:
            return None
        for i in parents:
            p = self.layers[i].probe(path)
            if p.state == WHITEOUT:
                return None
            if p.state == FOUND:
                assert p.node is not None
                if p.node.is_dir and len(self._layers_of_dir(path) or ()) > 1:
                    return p.node._replace(nlink=1)  # merged: one link, as overlayfs
                return p.node
        return None

    def readdir(self, path: bytes) -> list[tuple[bytes, int, int]]:
        active = self._layers_of_dir(path)
        if active is None:
            return []
        seen: dict[bytes, tuple[int, int]] = {}
        hidden: set[bytes] = set()
        for i in active:
            whiteouts = []
            for name, ino, mode, is_whiteout in self.layers[i].entries(path):
                if name in seen or name in hidden:
                    continue
                if is_whiteout:
                    whiteouts.append(name)
                else:
                    seen[name] = (ino, mode)
            hidden.update(whiteouts)
        return [(name, ino, mode) for name, (ino, mode) in seen.items()]

    def link_group(self, node: Node) -> list[bytes]:
        for layer in self.layers:
            if (
                isinstance(layer, DirLayer)
                and node.host is not None
                and node.host.startswith(layer.root + b"/")
            ):
                return layer.link_group(node)
            if isinstance(layer, ChainLayer) and node.host is None:
                return layer.link_group(node)
        return []

    def layer_mask(self, path: bytes, ino: int, is_dir: bool) -> int:
        """Which layers lower node ``path`` (inode ``ino``) comes from, bit i for layer i: every
        layer whose directory merges into a directory, a file's own layer; 0 if unknown."""
        if is_dir:
            return sum(1 << i for i in self._layers_of_dir(path) or ())
        position = (ino >> DIR_LAYER_SHIFT) - 1
        return 1 << position if 0 <= position < len(self.layers) else 0

    def statfs(self) -> dict[str, int]:
        top = self.layers[0]
        if isinstance(top, ChainLayer):
            return top.statfs()
        return host_statfs(top.root)

    def invalidate(self) -> None:
        self._active.clear()
