"""The merged index of an image's layer chain, built once and cached in the store.

Merging applies the OCI layer rules bottom-up: a WHITEOUT removes the path and
everything below it from the layers beneath; an OPAQUE directory hides
everything the layers beneath had below it; a non-directory replacing a
directory hides the directory's contents; a directory over a directory merges;
a path whose parent is missing (or not a directory) below it gets an implicit
directory.  Hardlink groups of one layer share an inode while both names
survive.

The result is written to the store's ``union`` database under an 8-byte prefix
of the chain id (SHA-256 of the layer ids, bottom first); records are kept
small because a walk of the tree maps their pages into the daemon:

* ``prefix | b"D" | u64 BE dir inode | name`` -> u64 inode, u32 type bits
  (directory listings, and path lookup one component at a time)
* ``prefix | b"I" | u64 BE inode``    -> inode record (attributes, content id, link, xattrs)
* ``prefix | b"L" | u64 BE inode``    -> NUL-separated paths of a hardlink group
* ``chains`` database: ``chain``       -> JSON summary (format, layers, entries, inodes, bytes)

Inode numbers are assigned in path order from 1 (the root), so they are the
same on every mount and every machine.  Building is idempotent; the index is
derived data that ``gc`` drops when no image uses the chain.

Not thread-safe while building; reading (``ChainIndex``) is thread-safe.
"""

from __future__ import annotations

import json
import stat
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from layerfs.store import entries as E
from layerfs.store.entries import Entry, decode_xattrs, encode_xattrs

if TYPE_CHECKING:  # (not loaded by a mount of host directories alone: see layerfs.store)
    import lmdb

    from layerfs.store import Store

_U64 = struct.Struct(">Q")
_INO = struct.Struct("<Q")
_DIRENT = struct.Struct("<QI")  # inode, file type bits (what readdir reports)
# kind, flags, mode (with S_IF bits), uid, gid, nlink, size, mtime_ns, rdev, link_len, xattr_count
_REC = struct.Struct("<BBIIIIQqQHH")
_HAS_CONTENT = 0x80  # record flag: a 32-byte content id follows the fixed part
DIR_CACHE = 8192  # directory path -> inode entries kept for lookups
ROOT_INO = 1
MERGED = 0x08  # node flag (entry flags use 0x01-0x04): a directory merged from several layers
INDEX_FORMAT = 3  # bump when the records change: older cached indexes are rebuilt

_S_IF = {
    E.REG: stat.S_IFREG,
    E.HARDLINK: stat.S_IFREG,
    E.DIR: stat.S_IFDIR,
    E.SYMLINK: stat.S_IFLNK,
    E.CHR: stat.S_IFCHR,
    E.BLK: stat.S_IFBLK,
    E.FIFO: stat.S_IFIFO,
}


class Node(NamedTuple):
    """One inode of the merged lower tree (a named tuple: one is built per lookup)."""

    ino: int
    kind: int
    flags: int
    mode: int  # including the S_IF file type bits
    uid: int
    gid: int
    nlink: int
    size: int
    mtime_ns: int
    rdev: int
    content: bytes | None
    link: bytes
    xattrs: tuple[tuple[bytes, bytes], ...]
    host: bytes | None = None  # the host file of a directory-backed lower layer
    # ... and its own access and change times (a stored entry has its mtime alone)
    atime_ns: int | None = None
    ctime_ns: int | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == E.DIR


def _encode_node(n: Node) -> bytes:
    parts = [
        _REC.pack(
            n.kind,
            n.flags | (_HAS_CONTENT if n.content is not None else 0),
            n.mode,
            n.uid,
            n.gid,
            n.nlink,
            n.size,
            n.mtime_ns,
            n.rdev,
            len(n.link),
            len(n.xattrs),
        ),
        n.content or b"",
        n.link,
    ]
    parts += encode_xattrs(n.xattrs)
    return b"".join(parts)


def decode_node(ino: int, rec: bytes | memoryview) -> Node:
    kind, flags, mode, uid, gid, nlink, size, mtime, rdev, llen, nx = _REC.unpack_from(rec, 0)
    pos = _REC.size
    content = None
    if flags & _HAS_CONTENT:
        content = bytes(rec[pos : pos + 32])
        pos += 32
    link = bytes(rec[pos : pos + llen])
    pos += llen
    xattrs, _ = decode_xattrs(rec, pos, nx)
    return Node(
        ino,
        kind,
        flags & ~_HAS_CONTENT,
        mode,
        uid,
        gid,
        nlink,
        size,
        mtime,
        rdev,
        content,
        link,
        xattrs,
    )


def merge(tables: list[list[Entry]]) -> dict[bytes, tuple[Entry, int]]:
    """Apply the layers bottom-up; returns path -> (entry, layer index) of what is visible."""
    merged: dict[bytes, tuple[Entry, int]] = {b"": (Entry(b"", E.DIR, 0o755), -1)}
    children: dict[bytes, set[bytes]] = {b"": set()}

    # loops, not recursion: an image decides how deep its paths go
    def drop_below(path: bytes) -> None:
        todo = [path]
        while todo:
            here = todo.pop()
            for name in children.pop(here, set()):
                child = here + b"/" + name if here else name
                todo.append(child)
                merged.pop(child, None)
        if path in merged and merged[path][0].kind == E.DIR:
            children[path] = set()

    def remove(path: bytes) -> None:
        drop_below(path)
        children.pop(path, None)
        if merged.pop(path, None) is not None:
            parent, _, name = path.rpartition(b"/")
            children.get(parent, set()).discard(name)

    def ensure_parent(path: bytes, layer: int) -> None:
        """Make every ancestor of ``path`` a directory (implicit where the layers have none)."""
        missing = []
        while path:
            path = path.rpartition(b"/")[0]
            have = merged.get(path)
            if have is not None and have[0].kind == E.DIR:
                break
            missing.append(path)
        for parent in reversed(missing):
            if parent in merged:
                remove(parent)
            merged[parent] = (Entry(parent, E.DIR, 0o755, flags=E.IMPLICIT), layer)
            children[parent] = set()
            if parent:
                gp, _, name = parent.rpartition(b"/")
                children[gp].add(name)

    for layer, table in enumerate(tables):
        # whiteouts and opaque markers act on the layers beneath: apply them first
        for e in table:
            if e.kind == E.WHITEOUT:
                remove(e.path)
            elif e.flags & E.OPAQUE:
                drop_below(e.path)
        for e in table:
            if e.kind == E.WHITEOUT:
                continue
            old = merged.get(e.path)
            if old is not None and (old[0].kind != E.DIR or e.kind != E.DIR):
                remove(e.path)
            if e.flags & E.IMPLICIT and old is not None and old[0].kind == E.DIR:
                e = old[0]._replace(
                    flags=old[0].flags | E.OPAQUE
                )  # an opaque marker alone keeps the dir's metadata
            if e.kind == E.DIR and old is not None and old[0].kind == E.DIR and not e.flags & E.OPAQUE:
                e = e._replace(flags=e.flags | MERGED)
            else:
                e = e._replace(flags=e.flags & ~MERGED)
            ensure_parent(e.path, layer)
            merged[e.path] = (e, layer)
            if e.path:
                parent, _, name = e.path.rpartition(b"/")
                children[parent].add(name)
            if e.kind == E.DIR:
                children.setdefault(e.path, set())
    return merged


def index_ready(store: Store, chain: bytes) -> bool:
    """Is a current-format index of ``chain`` cached?"""
    with store.read() as txn:
        found = txn.get(chain, db=store.db("chains"))
        return found is not None and json.loads(bytes(found)).get("format") == INDEX_FORMAT


def build(store: Store, layer_ids: list[bytes]) -> bytes:
    """Build (or find) the cached index of a layer chain; returns the chain id."""
    from layerfs.store.store import chain_id, chain_prefix

    chain = chain_id(layer_ids)
    if index_ready(store, chain):
        return chain
    merged = merge([store.layer_entries(lid) for lid in layer_ids])

    # hardlink groups: the HARDLINK entries of one layer naming one root, plus the root
    # itself if it survived from that layer
    groups: dict[tuple[int, bytes], list[bytes]] = {}
    for path, (e, layer) in merged.items():
        if e.kind == E.HARDLINK:
            groups.setdefault((layer, e.link), []).append(path)
    group_of: dict[bytes, tuple[int, bytes]] = {}
    for (layer, root), members in groups.items():
        r = merged.get(root)
        if r is not None and r[1] == layer and r[0].kind == E.REG:
            members.append(root)
        for m in members:
            group_of[m] = (layer, root)

    # inode numbers in path order; a group shares its first member's inode
    paths = sorted(merged)
    ino_of: dict[bytes, int] = {}
    group_ino: dict[tuple[int, bytes], int] = {}
    next_ino = ROOT_INO
    for path in paths:
        key = group_of.get(path)
        if key is not None and key in group_ino:
            ino_of[path] = group_ino[key]
            continue
        if key is not None:
            group_ino[key] = next_ino
        ino_of[path] = next_ino
        next_ino += 1

    subdirs: dict[bytes, int] = {}
    for path in paths:
        if path and merged[path][0].kind == E.DIR:
            parent = path.rpartition(b"/")[0]
            subdirs[parent] = subdirs.get(parent, 0) + 1

    prefix = chain_prefix(chain)
    records: list[tuple[bytes, bytes]] = []
    written: set[int] = set()
    total = 0
    for path in paths:
        e, _ = merged[path]
        ino = ino_of[path]
        if path:
            parent, _, name = path.rpartition(b"/")
            kind = E.REG if e.kind == E.HARDLINK else e.kind
            records.append((prefix + b"D" + _U64.pack(ino_of[parent]) + name, _DIRENT.pack(ino, _S_IF[kind])))
        if ino in written:
            continue
        written.add(ino)
        kind = E.REG if e.kind == E.HARDLINK else e.kind
        group = group_of.get(path)
        if kind == E.DIR:
            # as overlayfs: a directory merged from several layers reports one link
            nlink = 1 if e.flags & MERGED else 2 + subdirs.get(path, 0)
        else:
            nlink = len(groups[group]) if group else 1
        rdev = (
            (e.devmajor << 8 | (e.devminor & 0xFF) | (e.devminor & ~0xFF) << 12)
            if kind in (E.CHR, E.BLK)
            else 0
        )
        node = Node(
            ino,
            kind,
            e.flags,
            _S_IF[kind] | (e.mode & 0o7777),
            e.uid,
            e.gid,
            nlink,
            e.size,
            e.mtime_ns,
            rdev,
            e.content,
            e.link if kind == E.SYMLINK else b"",
            e.xattrs,
        )
        records.append((prefix + b"I" + _U64.pack(ino), _encode_node(node)))
        total += e.size if kind == E.REG else 0
    for (_, _), members in groups.items():
        if len(members) > 1:  # copy-up of one name must bring the whole group along
            ino = ino_of[members[0]]
            records.append((prefix + b"L" + _U64.pack(ino), b"\0".join(sorted(members))))
    summary = json.dumps(
        {
            "format": INDEX_FORMAT,
            "layers": [lid.hex() for lid in layer_ids],
            "entries": len(paths),
            "inodes": next_ino - 1,
            "bytes": total,
        }
    ).encode()
    records.sort()
    union_db = store.db("union")
    chains_db = store.db("chains")

    def fn(txn: lmdb.Transaction) -> None:
        store.drop_chain(txn, chain)  # an index of an older format, if any
        with txn.cursor(db=union_db) as cur:
            cur.putmulti(records, dupdata=False, overwrite=True)
        txn.put(chain, summary, db=chains_db)

    store.write(fn)
    return chain


class ChainIndex:
    """Read access to one built chain index.  Not thread-safe (a lookup cache is kept)."""

    def __init__(self, store: Store, chain: bytes) -> None:
        self.store = store
        self.chain = chain
        from layerfs.store.store import chain_prefix

        self._prefix = chain_prefix(chain)
        self._db = store.db("union")
        self._dirs: dict[bytes, int] = {}
        with store.read() as txn:
            summary = txn.get(chain, db=store.db("chains"))
            if summary is None:
                raise LookupError(f"chain {chain.hex()} has no index")
            self.summary = json.loads(bytes(summary))

    @property
    def prefix(self) -> bytes:
        """The key prefix of this chain's records (what a reader outside Python needs)."""
        return self._prefix

    def lookup(self, txn: lmdb.Transaction, path: bytes) -> int | None:
        """The inode at ``path``: one B-tree get per component not already cached (a loop, not
        recursion: an image decides how deep its paths go)."""
        if not path:
            return ROOT_INO
        ino = self._dirs.get(path)
        if ino is not None:
            return ino
        # up to the deepest directory already known, then down one component at a time
        cut, ino = len(path), ROOT_INO
        while True:
            cut = path.rfind(b"/", 0, cut)
            if cut < 0:
                break
            known = self._dirs.get(path[:cut])
            if known is not None:
                ino = known
                break
        start = cut + 1
        while True:
            end = path.find(b"/", start)
            name = path[start:] if end < 0 else path[start:end]
            v = txn.get(self._prefix + b"D" + _U64.pack(ino) + name, db=self._db)
            if v is None:
                return None
            child, mode = _DIRENT.unpack(v)
            if end < 0:
                if stat.S_ISDIR(mode):
                    self._remember(path, child)
                return int(child)
            if not stat.S_ISDIR(mode):
                return None
            ino = int(child)
            self._remember(path[:end], ino)
            start = end + 1

    def _remember(self, path: bytes, ino: int) -> None:
        if len(self._dirs) >= DIR_CACHE:
            self._dirs.clear()
        self._dirs[path] = ino

    def node(self, txn: lmdb.Transaction, ino: int) -> Node:
        rec = txn.get(self._prefix + b"I" + _U64.pack(ino), db=self._db)
        if rec is None:
            raise LookupError(f"inode {ino} is missing from the index")
        return decode_node(ino, rec)

    def lookup_node(self, txn: lmdb.Transaction, path: bytes) -> Node | None:
        ino = self.lookup(txn, path)
        return None if ino is None else self.node(txn, ino)

    def link_group(self, txn: lmdb.Transaction, ino: int) -> list[bytes]:
        """Every path of a hardlinked lower inode (empty if it has one name)."""
        v = txn.get(self._prefix + b"L" + _U64.pack(ino), db=self._db)
        return [] if v is None else bytes(v).split(b"\0")

    def children(self, txn: lmdb.Transaction, dir_ino: int) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode, file type bits) of a directory's entries, sorted by name."""
        prefix = self._prefix + b"D" + _U64.pack(dir_ino)
        n = len(prefix)
        with txn.cursor(db=self._db) as cur:
            if not cur.set_range(prefix):
                return
            for k, v in cur:
                if k[:n] != prefix:
                    break
                ino, mode = _DIRENT.unpack(v)
                yield bytes(k[n:]), ino, mode
