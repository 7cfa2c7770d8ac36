"""A structural check of the store's LMDB environment: is every page of it readable?

LMDB keeps no checksums of its pages.  What it checks as it reads (a page of the wrong type, a
page number past the end of the file) catches most damage, but only where something reads: a
damaged page of the ``tags`` database goes unnoticed by ``gc``, and a damaged freelist (the
pages free for reuse, which LMDB reads only when a write needs pages) by every reader, while
every write fails.  ``check`` reads everything: every key and value of every database through
LMDB, and the freelist from ``data.mdb`` itself (py-lmdb offers no cursor on it), with the
checks LMDB would make and a few more (page numbers, bounds, sorted keys, page lists).

The freelist is read from the file while a read transaction is open: a writer in another
process reuses no page freed after that transaction's snapshot, so the pages of the newest
snapshot stay as they are while we read them.  Only the two meta pages are rewritten in place;
a meta page that changes under us is read again.
"""

from __future__ import annotations

import os
import struct
import sys

import lmdb

from layerfs.store.store import Store

W = struct.calcsize("N")  # size_t: LMDB's page numbers, transaction ids, sizes
_WORD = "Q" if W == 8 else "I"
PAGEHDRSZ = W + 8
NODESIZE = 8
MAGIC = 0xBEEFC0DE
P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2, P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
_TYPES = P_BRANCH | P_LEAF | P_OVERFLOW | P_META | P_LEAF2 | P_SUBP
F_BIGDATA = 0x01
P_INVALID = (1 << (8 * W)) - 1
# MDB_meta after the page header: magic, version, address, mapsize, the free and main MDB_db,
# last page, txnid; MDB_db: pad (the page size, in the free one), flags, depth, branch, leaf and
# overflow page counts, entries, root
_DB = struct.Struct(f"=IHH{_WORD}{_WORD}{_WORD}{_WORD}{_WORD}")
_META = struct.Struct(f"=II{_WORD}{_WORD}{_DB.size}s{_DB.size}s{_WORD}{_WORD}")
_HEAD = struct.Struct(f"={_WORD}HHHH")  # pgno, pad, flags, lower, upper (or u32 overflow pages)
_NODE = struct.Struct("=HHHH")  # lo, hi, flags, ksize (lo and hi swap on big-endian machines)


class Damage(Exception):
    pass


def check(store: Store) -> list[str]:
    """What is damaged, one message per database (empty if every page reads)."""
    errors = []
    for name in (None, *store.DBS):
        try:
            _walk_db(store, name)
        except lmdb.Error as exc:
            errors.append(f"database {name or '(main)'}: {exc}")
    try:
        _check_freelist(store)
    except Damage as exc:
        errors.append(f"freelist: {exc}")
    except OSError as exc:
        errors.append(f"cannot read {os.path.join(store.path, 'data.mdb')}: {exc.strerror}")
    return errors


def _walk_db(store: Store, name: str | None) -> None:
    """Read every key and value (a fresh transaction: damage met by one makes it unusable)."""
    with store.read() as txn:
        db = store.db(name) if name else None
        with txn.cursor(db=db) as cur:
            for _k, _v in cur:
                pass


def _check_freelist(store: Store) -> None:
    """Walk the free database's B-tree in ``data.mdb`` (under a pinning read transaction)."""
    path = os.path.join(store.path, "data.mdb")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with store.read():
            for attempt in range(5):
                meta = _current_meta(fd)
                try:
                    _FreeWalk(fd, meta).run()
                    return
                except Damage:
                    # a writer rewrote a meta page while we read: read the newer snapshot
                    if attempt == 4 or _current_meta(fd) == meta:
                        raise
    finally:
        os.close(fd)


def _current_meta(fd: int) -> tuple[int, int, int, int, int, int]:
    """(txnid, page size, last page, free root, free depth, free entries) of the newer meta page."""
    first = os.pread(fd, PAGEHDRSZ + _META.size, 0)
    if len(first) < PAGEHDRSZ + _META.size:
        raise Damage("data.mdb is shorter than its meta pages")
    psize = _DB.unpack(_META.unpack_from(first, PAGEHDRSZ)[4])[0]
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        raise Damage(f"meta page 0 names a page size of {psize}")
    metas = []
    for pgno in (0, 1):
        raw = os.pread(fd, PAGEHDRSZ + _META.size, pgno * psize)
        magic, version, _, _, free, _, last, txnid = _META.unpack_from(raw, PAGEHDRSZ)
        if magic != MAGIC:
            raise Damage(f"meta page {pgno} has no LMDB magic number")
        _, _, depth, _, _, _, entries, root = _DB.unpack(free)
        metas.append((txnid, psize, last, root, depth, entries))
    return max(metas)


def meta_problem(path: str) -> str | None:
    """What is wrong with the meta pages of ``path``'s data.mdb, None if they look sound: for an
    environment LMDB refuses to open with a plain error (a meta page with its magic number but
    garbage sizes makes LMDB map a nonsense size: "Invalid argument")."""
    try:
        with open(os.path.join(path, "data.mdb"), "rb") as f:
            head = f.read(PAGEHDRSZ + _META.size)
            if len(head) < PAGEHDRSZ + _META.size:
                return "data.mdb is shorter than its meta pages"
            psize = _DB.unpack(_META.unpack_from(head, PAGEHDRSZ)[4])[0]
            if psize < 512 or psize > 65536 or psize & (psize - 1):
                return f"meta page 0 names a page size of {psize}"
            size = os.fstat(f.fileno()).st_size
            for pgno in (0, 1):
                raw = os.pread(f.fileno(), PAGEHDRSZ + _META.size, pgno * psize)
                if len(raw) < PAGEHDRSZ + _META.size:
                    return "data.mdb is shorter than its meta pages"
                magic, version, _, mapsize, free, main, last, _ = _META.unpack_from(raw, PAGEHDRSZ)
                roots = [_DB.unpack(free)[-1], _DB.unpack(main)[-1]]
                if magic != MAGIC or version != 1:
                    return f"meta page {pgno} is not an LMDB meta page"
                if not 1 <= last < size // psize or mapsize > 1 << 48:
                    return f"meta page {pgno} names sizes past the end of the file"
                if any(r != P_INVALID and not 2 <= r <= last for r in roots):
                    return f"meta page {pgno} names a root page past its last page"
    except OSError:
        return None
    return None


class _FreeWalk:
    def __init__(self, fd: int, meta: tuple[int, int, int, int, int, int]) -> None:
        self.fd = fd
        self.txnid, self.psize, self.last, self.root, self.depth, self.entries = meta
        self.seen: set[int] = set()
        self.keys: list[int] = []

    def run(self) -> None:
        if self.root == P_INVALID:
            return
        self.walk(self.root, 1)
        if self.keys != sorted(set(self.keys)):
            raise Damage("its keys are out of order")

    def page(self, pgno: int, want: int) -> tuple[bytes, int, int]:
        if not 2 <= pgno <= self.last:
            raise Damage(f"page {pgno} is past the end (last page {self.last})")
        if pgno in self.seen:
            raise Damage(f"page {pgno} is reached twice")
        self.seen.add(pgno)
        data = os.pread(self.fd, self.psize, pgno * self.psize)
        if len(data) < self.psize:
            raise Damage(f"page {pgno} is past the end of the file")
        stored, _, flags, lower, upper = _HEAD.unpack_from(data)
        if stored != pgno or flags & _TYPES != want:
            raise Damage(f"page {pgno} is not the {_KIND[want]} page it should be")
        return data, lower, upper

    def walk(self, pgno: int, level: int) -> None:
        if level > self.depth:
            raise Damage(f"page {pgno} lies deeper than the tree's depth {self.depth}")
        kind = P_LEAF if level == self.depth else P_BRANCH
        data, lower, upper = self.page(pgno, kind)
        if not PAGEHDRSZ < lower <= upper <= self.psize or (lower - PAGEHDRSZ) % 2:
            raise Damage(f"page {pgno} has a malformed header")
        for i in range((lower - PAGEHDRSZ) // 2):
            (off,) = struct.unpack_from("=H", data, PAGEHDRSZ + 2 * i)
            if not upper <= off <= self.psize - NODESIZE:
                raise Damage(f"page {pgno} has a node outside the page")
            lo, hi, nflags, ksize = _NODE.unpack_from(data, off)
            if sys.byteorder == "big":
                lo, hi = hi, lo
            key = data[off + NODESIZE : off + NODESIZE + ksize]
            if kind == P_BRANCH:
                if len(key) != ksize or (i > 0 and ksize != W):
                    raise Damage(f"page {pgno} has a malformed branch node")
                self.walk(lo | hi << 16 | (nflags << 32 if W == 8 else 0), level + 1)
                continue
            if ksize != W or len(key) != W:
                raise Damage(f"page {pgno} has a key that is no transaction id")
            (txnid,) = struct.unpack("=" + _WORD, key)
            if txnid > self.txnid:
                raise Damage(f"page {pgno} names transaction {txnid}, after the last ({self.txnid})")
            self.keys.append(txnid)
            self.idl(pgno, data, off + NODESIZE + ksize, lo | hi << 16, nflags)

    def idl(self, pgno: int, data: bytes, at: int, size: int, flags: int) -> None:
        """A record's list of free pages: a count, then that many page numbers."""
        if flags & F_BIGDATA:
            if at + W > self.psize:
                raise Damage(f"page {pgno} has a node outside the page")
            (over,) = struct.unpack_from("=" + _WORD, data, at)
            head, _, _ = self.page(over, P_OVERFLOW)
            (npages,) = struct.unpack_from("=I", head, W + 4)
            if npages < 1 or over + npages - 1 > self.last or PAGEHDRSZ + size > npages * self.psize:
                raise Damage(f"overflow page {over} does not hold its record")
            value = head[PAGEHDRSZ:] + os.pread(
                self.fd, npages * self.psize - self.psize, (over + 1) * self.psize
            )
            value = value[:size]
        else:
            value = data[at : at + size]
        if len(value) != size or size < W or size % W:
            raise Damage(f"a record of page {pgno} is cut short")
        ids = struct.unpack(f"={size // W}{_WORD}", value)
        if ids[0] != len(ids) - 1:
            raise Damage(f"a record of page {pgno} counts {ids[0]} pages and holds {len(ids) - 1}")
        if any(not 2 <= p <= self.last for p in ids[1:]):
            raise Damage(f"a record of page {pgno} names a page past the end")


_KIND = {P_BRANCH: "branch", P_LEAF: "leaf", P_OVERFLOW: "overflow"}
