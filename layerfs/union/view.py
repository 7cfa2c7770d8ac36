"""The union view: an image's merged lower tree from the store plus an optional
writable upper directory, as a filesystem model.  No FUSE in here: every
method takes paths (bytes, relative, ``b""`` is the root), returns plain
values and raises ``OSError`` with the errno a kernel filesystem would give.

Lower layers come from a ``ChainIndex`` (one B-tree lookup per path).  The
upper directory uses the kernel overlayfs format, so it can be inspected, or
mounted by the kernel: a whiteout is a 0/0 character device (or, where mknod
is refused, an empty ``.wh.<name>`` file); an opaque directory carries
``trusted.overlay.opaque=y`` (``user.overlay.opaque`` or a ``.wh..wh..opq``
file are understood too).  Lookups check the upper directory first.

Copy-up happens before any change to a lower object and copies data, mode,
owner, times and xattrs through a work directory on the upper filesystem, so a
crash never leaves a half-copied file in the tree.  A hardlinked lower file is
copied up with all of its names linked together, so writing one name changes
what every name shows (fuse-overlayfs breaks the pair).

Renaming a directory that has lower contents copies the whole merged directory
up first (marked opaque), then renames it in the upper directory: where overlayfs
without ``redirect_dir`` answers ``EXDEV`` and leaves the copying to ``mv``, the
rename simply works (the kernel with ``redirect_dir=on`` gives the same tree).

Inode numbers: lower inodes are the index's (stable, small); an object keeps
its lower inode number across copy-up (recorded in ``trusted.overlay.layerfs.ino``, or
``user.overlay.layerfs.ino`` where trusted.* is refused: names the kernel overlay keeps to
itself, so a kernel mount of the upper directory does not show them as the file's xattrs);
objects created in the upper directory get the host inode plus ``UPPER_INO``.

Not thread-safe: the FUSE adapter dispatches single-threaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs import hosttree
from layerfs.store import entries as E
from layerfs.union.index import ROOT_INO, Node
from layerfs.union.lower import Lower, base_name, host_statfs, join_path, parent_path
from layerfs.union.overlayfmt import (
    OPAQUE_FILE,
    PRIVATE_XATTR_PREFIXES,
    WH_PREFIX,
    drop_whiteouts,
    is_opaque_dir,
    is_whiteout,
    set_opaque,
)

if TYPE_CHECKING:  # (a view of host directories alone never loads the store: see layerfs.store)
    from layerfs.store import Store
    from layerfs.store.reader import ObjectReader, StoredObject

UPPER_INO = 1 << 40
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
AT_EMPTY_PATH = 0x1000
# where copy-up records the lower inode number; user.* where trusted.* is refused (unprivileged).
# Inside overlay.* (the kernel overlay hides its own namespace); upper directories written
# before that used the legacy names, still read
INO_XATTRS = (b"trusted.overlay.layerfs.ino", b"user.overlay.layerfs.ino")
_INO_XATTRS_READ = INO_XATTRS + (b"trusted.layerfs.ino", b"user.layerfs.ino")
_INO = struct.Struct("<Q")
LONG_PATH = 3800  # host paths from this long go through a directory descriptor (PATH_MAX: 4096)
DIR_FDS = 16
# O_DIRECT is not passed on to the upper file: what a caller asks of it (no page cache between
# it and the file) ends at the FUSE mount, and on the host file it would demand buffers aligned
# to the block size, which the request buffers of a FUSE daemon are not (EINVAL on every write)
_HOST_FLAGS = ~os.O_DIRECT
_ACL_DEFAULT = "system.posix_acl_default"


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass
class _LowerFile:
    obj: StoredObject | None  # None: an empty file (no object)
    node: Node
    path: bytes  # (for messages)


@dataclass
class _UpperFile:
    fd: int
    lower: bool = False  # a directory layer's file, opened to read (never to write through)
    node_ino: int = 0  # ... and the number of its node (a copy-up of it is followed)


class UnionView:
    def __init__(
        self, store: Store | None, lower: Lower, upper: str | None = None, work: str | None = None
    ) -> None:
        self.store = store  # None when every lower layer is a host directory
        self.lower = lower
        self.upper = os.fsencode(upper) if upper else None
        self.work = os.fsencode(work) if work else None
        if self.upper is not None and self.work is None:
            raise ValueError("a writable view needs a work directory on the upper filesystem")
        self.objects: ObjectReader | None = None
        if store is not None:
            from layerfs.store.reader import ObjectReader

            self.objects = ObjectReader(store)
        self._handles: dict[int, _LowerFile | _UpperFile] = {}
        # descriptors of lower files whose handles now read their copy-up, closed at release: a
        # FUSE core given the number at open (handle_fd) may still read it
        self._superseded: dict[int, int] = {}
        self._path_files: dict[bytes, _LowerFile | _UpperFile] = {}  # read_path's recent files
        self._looked_up: dict[bytes, Node] = {}  # read-only: files just stat'ed, for read_path
        self._next_fh = 1
        self._vis = _PathCache()  # can lower entries show below this directory?
        self.label = "the image"  # what messages call the lower layers (mounts name the image)
        self._reported: set[bytes | None] = set()
        self._dir_fds: dict[bytes, int] = {}  # deep upper directories (see _up)
        self._upper_ino: dict[int, int] = {}
        self._tmp = 0
        self._mknod_ok = True

    @property
    def writable(self) -> bool:
        return self.upper is not None

    # -- resolution ---------------------------------------------------------------
    def _up(self, path: bytes) -> bytes:
        """The host path of ``path`` in the upper directory.  One past PATH_MAX (a deep tree
        made through the mount) goes through a descriptor of its parent directory instead,
        as the kernel itself works relative to directories: ``/proc/self/fd/N/name``."""
        assert self.upper is not None
        full = os.path.join(self.upper, path) if path else self.upper
        if len(full) < LONG_PATH:
            return full
        parent, _, name = path.rpartition(b"/")
        return b"/proc/self/fd/%d/%s" % (self._dir_fd(parent), name)

    def _dir_fd(self, path: bytes) -> int:
        """An O_PATH descriptor of the upper directory ``path``, opened one component at a time
        (never following a symlink); a few are kept, until a rename or rmdir moves directories."""
        fd = self._dir_fds.get(path)
        if fd is not None:
            return fd
        assert self.upper is not None
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.upper, flags)
        try:
            for part in path.split(b"/") if path else []:
                nxt = os.open(part, flags, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError:
            os.close(fd)
            raise
        if len(self._dir_fds) >= DIR_FDS:
            os.close(self._dir_fds.pop(next(iter(self._dir_fds))))
        self._dir_fds[path] = fd
        return fd

    def _moved(self, *paths: bytes) -> None:
        """Directories were renamed or removed: forget what was cached at and below them."""
        for path in paths:
            self._vis.drop(path)
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()

    def _ulstat(self, path: bytes) -> os.stat_result | None:
        if self.upper is None:
            return None
        try:
            return os.lstat(self._up(path))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None

    def _opaque(self, path: bytes) -> bool:
        return is_opaque_dir(self._up(path))

    def _wh_file(self, path: bytes) -> bool:
        """The ``.wh.<name>`` fallback whiteout for ``path`` exists in the upper dir."""
        try:
            return os.path.lexists(self._up(join_path(parent_path(path), WH_PREFIX + base_name(path))))
        except (FileNotFoundError, NotADirectoryError):  # a deep parent the upper lacks (see _up)
            return False

    def _lower_visible(self, dir_path: bytes) -> bool:
        """Can lower entries show below ``dir_path``?  (No upper whiteout/opaque/non-dir above.)"""
        if self.upper is None:
            return True
        vis = self._vis.get(dir_path)
        if vis is not None:
            return vis
        # climb to the nearest ancestor already known (a loop: images decide the depth), then
        # decide each directory below it, top down
        pending = [dir_path]
        while pending[-1]:
            vis = self._vis.get(parent_path(pending[-1]))
            if vis is not None:
                break
            pending.append(parent_path(pending[-1]))
        for path in reversed(pending):
            if path == b"":
                vis = not self._opaque(b"")
            elif vis:
                st = self._ulstat(path)
                if st is None:
                    vis = not self._wh_file(path)
                else:
                    vis = stat.S_ISDIR(st.st_mode) and not self._opaque(path)
            else:
                vis = False  # below a directory that hides the lower layers
            self._vis.put(path, vis)
        return bool(vis)

    def _lower(self, path: bytes) -> Node | None:
        """The lower node visible at ``path`` (ignoring an upper entry at ``path`` itself)."""
        if path and (
            not self._lower_visible(parent_path(path)) or (self.upper is not None and self._wh_file(path))
        ):
            return None
        return self.lower.lookup(path)

    def resolve(self, path: bytes) -> os.stat_result | Node:
        """What ``path`` is: an upper ``stat_result`` or a lower ``Node``; ENOENT if neither."""
        st = self._ulstat(path)
        if st is not None:
            if is_whiteout(st):
                raise _err(errno.ENOENT)
            return st
        if self.upper is not None and base_name(path).startswith(WH_PREFIX):
            raise _err(errno.ENOENT)  # fallback whiteouts are bookkeeping, never shown
        node = self._lower(path)
        if node is None:
            raise _err(errno.ENOENT)
        return node

    # -- attributes ---------------------------------------------------------------
    def getattr(self, path: bytes) -> dict[str, int]:
        return self.lookup(path)[0]

    def lookup(self, path: bytes) -> tuple[dict[str, int], bool]:
        """The attributes of ``path``, and whether they come from the lower layers alone: the
        upper directory has nothing at ``path``, so (a directory) nothing below it either, and
        what is there stays the lower layers' until a change through the view copies it up."""
        r = self.resolve(path)
        if isinstance(r, Node):
            if self.upper is None and r.kind == E.REG:
                # a LOOKUP is mostly followed by a READ of the same file: keep the node so
                # read_path need not resolve it again (lower nodes never change)
                if len(self._looked_up) >= 1024:
                    self._looked_up.clear()
                self._looked_up[path] = r
            return self._node_attr(r), True
        attr = self._stat_attr(path, r)
        if stat.S_ISDIR(r.st_mode) and self._lower_visible(path):
            lower = self._lower(path)
            if lower is not None and lower.is_dir:
                attr["st_nlink"] = 1  # merged with a lower directory: one link, as overlayfs
        return attr, False

    @staticmethod
    def _node_attr(n: Node) -> dict[str, int]:
        size = len(n.link) if n.kind == E.SYMLINK else n.size
        return {
            "st_ino": n.ino,
            "st_mode": n.mode,
            "st_nlink": n.nlink,
            "st_uid": n.uid,
            "st_gid": n.gid,
            "st_size": size,
            "st_rdev": n.rdev,
            "st_blocks": (size + 511) // 512,
            "st_blksize": 65536,
            "st_atime": n.mtime_ns if n.atime_ns is None else n.atime_ns,
            "st_mtime": n.mtime_ns,
            "st_ctime": n.mtime_ns if n.ctime_ns is None else n.ctime_ns,
        }

    def _stat_attr(self, path: bytes, st: os.stat_result) -> dict[str, int]:
        return {
            "st_ino": self._ino_of(path, st),
            "st_mode": st.st_mode,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_size": st.st_size,
            "st_rdev": st.st_rdev,
            "st_blocks": st.st_blocks,
            "st_blksize": st.st_blksize,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    def handle_fd(self, fh: int) -> int:
        """The host descriptor behind an open upper file (a FUSE core may read and write it
        directly), or -1 for a lower file, whose bytes come from the store."""
        h = self._handles.get(fh)
        return h.fd if isinstance(h, _UpperFile) else -1

    def is_lower_handle(self, fh: int) -> bool:
        """Whether handle ``fh`` reads a lower layer's own file (a directory layer's)."""
        h = self._handles.get(fh)
        return isinstance(h, _UpperFile) and h.lower

    def fgetattr(self, fh: int) -> dict[str, int]:
        """Attributes of an open file, whatever became of its names."""
        h = self._handles.get(fh)
        if isinstance(h, _LowerFile):
            return self._node_attr(h.node)
        if h is None:
            raise _err(errno.EBADF)
        st = os.fstat(h.fd)
        attr = self._stat_attr(b"", st)
        ino = self._upper_ino.get(st.st_ino)
        if ino is None:
            try:
                ino = _INO.unpack(_first_fxattr(h.fd, _INO_XATTRS_READ))[0]
            except OSError:
                ino = st.st_ino + UPPER_INO
            self._upper_ino[st.st_ino] = ino
        attr["st_ino"] = ino
        return attr

    def _new_ino(self, st: os.stat_result) -> None:
        """An object made in the upper directory just now: its inode number is the host's plus
        UPPER_INO (no copy-up xattr to look for; and a host inode number reused after a
        deletion must not keep the number its earlier file had)."""
        self._upper_ino[st.st_ino] = st.st_ino + UPPER_INO

    def made(self, numbers: list[tuple[int, int]]) -> None:
        """Objects a FUSE core beside the view made (new files: host inode + UPPER_INO) or
        copied up (the lower inode number): (host inode, number) pairs."""
        self._upper_ino.update(numbers)

    def upper_dir_state(self, path: bytes) -> tuple[bool, Node | None]:
        """Whether ``path`` is a directory of the upper directory, and the lower directory
        whose names show in it beside the upper's (None: only the upper's count, as in an
        opaque or an upper-only directory).  What a FUSE core needs to decide, by itself,
        that a name is free there: no upper entry, no fallback whiteout, no such lower name."""
        st = self._ulstat(path)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return False, None
        if not self._lower_visible(path):
            return True, None
        lower = self._lower(path)
        return True, lower if lower is not None and lower.is_dir else None

    def adopt(self, fd: int) -> int:
        """A handle for an upper file a FUSE core made and opened (``fd`` is the view's now)."""
        return self._new_handle(_UpperFile(fd))

    def _ino_of(self, path: bytes, st: os.stat_result) -> int:
        if not path:
            return ROOT_INO
        ino = self._upper_ino.get(st.st_ino)
        if ino is None:
            try:
                ino = _INO.unpack(_first_xattr(self._up(path), _INO_XATTRS_READ))[0]
            except OSError:
                ino = st.st_ino + UPPER_INO
            self._upper_ino[st.st_ino] = ino
        return ino

    def readlink(self, path: bytes) -> bytes:
        r = self.resolve(path)
        if isinstance(r, Node):
            if r.kind != E.SYMLINK:
                raise _err(errno.EINVAL)
            return r.link
        return os.readlink(self._up(path))

    def listxattr(self, path: bytes) -> list[bytes]:
        r = self.resolve(path)
        if isinstance(r, Node):
            return [name for name, _ in r.xattrs]
        names = os.listxattr(self._up(path), follow_symlinks=False)
        return [os.fsencode(n) for n in names if not os.fsencode(n).startswith(PRIVATE_XATTR_PREFIXES)]

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        r = self.resolve(path)
        if isinstance(r, Node):
            for n, v in r.xattrs:
                if n == name:
                    return v
            raise _err(errno.ENODATA)
        if name.startswith(PRIVATE_XATTR_PREFIXES):
            raise _err(errno.ENODATA)
        return os.getxattr(self._up(path), name, follow_symlinks=False)

    def statfs(self) -> dict[str, int]:
        if self.upper is not None:
            return host_statfs(self.upper)
        return self.lower.statfs()

    # -- directories ----------------------------------------------------------------
    def readdir(self, path: bytes) -> list[tuple[bytes, int, int]]:
        """(name, inode, file type bits) of every entry, without ``.`` and ``..``."""
        r = self.resolve(path)
        is_dir = stat.S_ISDIR(r.st_mode) if isinstance(r, os.stat_result) else r.is_dir
        if not is_dir:
            raise _err(errno.ENOTDIR)
        out: list[tuple[bytes, int, int]] = []
        hidden: set[bytes] = set()
        if isinstance(r, os.stat_result):
            with os.scandir(self._up(path)) as it:
                for d in it:
                    name = d.name
                    if name.startswith(WH_PREFIX):
                        if name != OPAQUE_FILE:
                            hidden.add(name[len(WH_PREFIX) :])
                        continue
                    st = d.stat(follow_symlinks=False)
                    if is_whiteout(st):
                        hidden.add(name)
                    else:
                        out.append((name, self._ino_of(join_path(path, name), st), stat.S_IFMT(st.st_mode)))
            lower_ok = self._lower_visible(path)
        else:
            lower_ok = True
        if lower_ok:
            seen = {name for name, _, _ in out} | hidden
            out += [c for c in self.lower.readdir(path) if c[0] not in seen]
        return out

    # -- reading ----------------------------------------------------------------------
    def open(self, path: bytes, flags: int) -> int:
        flags &= _HOST_FLAGS
        wants_write = flags & (os.O_WRONLY | os.O_RDWR) or flags & os.O_TRUNC
        if wants_write:
            self._need_rw()
            self._copy_up(path, data=not flags & os.O_TRUNC)
            fd = os.open(self._up(path), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW) | os.O_NOFOLLOW)
            return self._new_handle(_UpperFile(fd))
        r = self.resolve(path)
        if isinstance(r, os.stat_result):
            return self._new_handle(_UpperFile(os.open(self._up(path), flags | os.O_NOFOLLOW)))
        return self._new_handle(self._lower_file(r, path))

    def stored_lower_ino(self, path: bytes) -> int | None:
        """The index inode of ``path`` if it is a lower regular file whose contents are in the
        store (what a reader outside Python can read by itself), else None."""
        r = self.resolve(path)
        if isinstance(r, Node) and r.kind == E.REG and r.host is None and self.store is not None:
            return r.ino
        return None

    def read_path(self, path: bytes, size: int, offset: int) -> bytes:
        """Read by path, without an open handle: what a read-only mount uses, so the kernel's
        OPEN and RELEASE never reach Python (libfuse answers them itself)."""
        h = self._path_files.get(path)
        if h is None:
            r = self._looked_up.pop(path, None) or self.resolve(path)
            if isinstance(r, os.stat_result):
                with open(self._up(path), "rb") as f:
                    return os.pread(f.fileno(), size, offset)
            h = self._lower_file(r, path)
            if len(self._path_files) >= 256:
                old = self._path_files.pop(next(iter(self._path_files)))
                if isinstance(old, _UpperFile):
                    os.close(old.fd)
            self._path_files[path] = h
        if isinstance(h, _UpperFile):
            return os.pread(h.fd, size, offset)
        return self._read_lower(h, size, offset)

    def _lower_file(self, r: Node, path: bytes) -> _LowerFile | _UpperFile:
        if r.kind == E.DIR:
            raise _err(errno.EISDIR)
        if r.host is not None:  # a directory-backed lower layer: read the host file
            return _UpperFile(os.open(r.host, os.O_RDONLY | os.O_NOFOLLOW), lower=True, node_ino=r.ino)
        obj = None
        if r.content is not None:
            from layerfs.store import StoreError

            assert self.objects is not None
            try:
                obj = self.objects.open(r.content)
            except StoreError:
                raise _err(errno.EIO) from None
        return _LowerFile(obj, r, path)

    def _new_handle(self, h: _LowerFile | _UpperFile) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = h
        return fh

    def read(self, fh: int, size: int, offset: int) -> bytes:
        h = self._handles[fh]
        if isinstance(h, _UpperFile):
            return os.pread(h.fd, size, offset)
        return self._read_lower(h, size, offset)

    def _read_lower(self, h: _LowerFile, size: int, offset: int) -> bytes:
        if h.obj is None:
            return b""
        from layerfs.store import CorruptionError

        assert self.objects is not None
        try:
            return self.objects.read(h.obj, offset, size)
        except CorruptionError as exc:  # EIO for the reader, and where it is for the log
            if h.obj.sha not in self._reported:
                self._reported.add(h.obj.sha)
                print(
                    f"layerfs: damaged data in {self.label} at /{h.path.decode(errors='replace')} "
                    f"(object {h.obj.sha.hex()}): reads of it give EIO; run layerfs verify ({exc})",
                    file=sys.stderr,
                    flush=True,
                )
            raise _err(errno.EIO) from None

    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if isinstance(h, _UpperFile):
            os.close(h.fd)
        old = self._superseded.pop(fh, None)
        if old is not None:
            os.close(old)

    # -- writing ----------------------------------------------------------------------
    def _need_rw(self) -> None:
        if self.upper is None:
            raise _err(errno.EROFS)

    def write(self, fh: int, data: bytes | memoryview, offset: int) -> int:
        h = self._handles[fh]
        if not isinstance(h, _UpperFile):
            raise _err(errno.EBADF)
        return os.pwrite(h.fd, data, offset)

    def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handles.get(fh)
        if isinstance(h, _UpperFile):
            (os.fdatasync if datasync else os.fsync)(h.fd)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        h = self._handles[fh]
        if not isinstance(h, _UpperFile):
            raise _err(errno.EBADF)
        if mode:
            raise _err(errno.EOPNOTSUPP)
        os.posix_fallocate(h.fd, offset, length)

    def truncate(self, path: bytes, length: int, fh: int | None = None) -> None:
        self._need_rw()
        h = self._handles.get(fh) if fh is not None else None
        if isinstance(h, _UpperFile):
            os.ftruncate(h.fd, length)
            return
        self._copy_up(path, data=length > 0)
        os.truncate(self._up(path), length)

    # ``umask``: a FUSE core that passes modes unmasked gives the caller's umask; 0 otherwise
    def create(self, path: bytes, mode: int, flags: int, uid: int, gid: int, umask: int = 0) -> int:
        flags &= _HOST_FLAGS
        self._need_rw()
        self._prepare_new(path)
        gid = self._new_gid(path, gid)
        bits = self._new_mode(path, mode, umask)
        fd = os.open(self._up(path), flags | os.O_CREAT | os.O_NOFOLLOW, mode & 0o7777)
        return self._new_file(fd, uid, gid, bits)

    def _new_file(self, fd: int, uid: int, gid: int, bits: int | None) -> int:
        """A handle of the file just made on ``fd``, given its owner and (``bits``) its mode."""
        try:
            st = os.fstat(fd)
            # mostly the daemon's owner is the caller's and the mode came out right: each
            # chown or chmod spared is a journaled inode change (and an ACL read) on the host
            chown = (st.st_uid, st.st_gid) != (uid, gid)
            if chown:
                os.fchown(fd, uid, gid)  # this drops set-id bits, which the mode gives back
            if bits is not None and (chown or stat.S_IMODE(st.st_mode) != bits):
                os.fchmod(fd, bits)
            self._new_ino(st)
        except OSError:
            os.close(fd)
            raise
        return self._new_handle(_UpperFile(fd))

    def tmpfile(self, dir_path: bytes, mode: int, flags: int, uid: int, gid: int, umask: int = 0) -> int:
        """An O_TMPFILE file in ``dir_path``: made in its upper directory, nameless until
        ``link_open`` names it."""
        self._need_rw()
        r = self.resolve(dir_path)
        if not (
            isinstance(r, Node) and r.is_dir or isinstance(r, os.stat_result) and stat.S_ISDIR(r.st_mode)
        ):
            raise _err(errno.ENOTDIR)
        self._copy_up(dir_path)
        inside = join_path(dir_path, b"tmpfile")  # what _new_gid and _new_mode ask of a new object
        gid = self._new_gid(inside, gid)
        bits = self._new_mode(inside, mode, umask)
        flags = flags & _HOST_FLAGS & ~(os.O_CREAT | os.O_TRUNC) | os.O_TMPFILE
        fd = os.open(self._up(dir_path), flags, mode & 0o7777)
        return self._new_file(fd, uid, gid, bits)

    def link_open(self, fh: int, new: bytes) -> None:
        """Name an open upper file that has none (made with O_TMPFILE): linkat through its
        descriptor, as the kernel does for the caller's linkat(fd, "", AT_EMPTY_PATH)."""
        self._need_rw()
        h = self._handles.get(fh)
        if not isinstance(h, _UpperFile):
            raise _err(errno.EBADF)
        self._prepare_new(new)
        # AT_EMPTY_PATH wants CAP_DAC_READ_SEARCH (before Linux 6.10); the /proc link does not
        if _libc.linkat(h.fd, b"", AT_FDCWD, self._up(new), AT_EMPTY_PATH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOENT, errno.EPERM):
                raise _err(err)
            os.link(f"/proc/self/fd/{h.fd}", self._up(new), follow_symlinks=True)

    def mkdir(self, path: bytes, mode: int, uid: int, gid: int, umask: int = 0) -> None:
        self._need_rw()
        replaced_whiteout = self._prepare_new(path)
        up = self._up(path)
        parent_gid = self._setgid_parent(path)
        if parent_gid is not None:  # inherited from a setgid parent, as the kernel does
            gid, mode = parent_gid, mode | stat.S_ISGID
        bits = self._new_mode(path, mode, umask)
        os.mkdir(up, mode & 0o7777)
        os.lchown(up, uid, gid)
        if bits is not None:
            os.chmod(up, bits)
        self._new_ino(os.lstat(up))
        if replaced_whiteout or self._lower(path) is not None:
            # a directory re-created over a deleted lower one must not show the old contents
            set_opaque(up)
        self._vis.drop(path)

    def mknod(self, path: bytes, mode: int, rdev: int, uid: int, gid: int, umask: int = 0) -> None:
        self._need_rw()
        self._prepare_new(path)
        gid = self._new_gid(path, gid)
        bits = self._new_mode(path, mode, umask)
        up = self._up(path)
        os.mknod(up, mode, rdev)
        os.lchown(up, uid, gid)
        if bits is not None:
            os.chmod(up, bits)
        self._new_ino(os.lstat(up))

    def _new_mode(self, path: bytes, mode: int, umask: int) -> int | None:
        """The permission bits a new object at ``path`` gets (its parent copied up already);
        None where the parent has a default ACL: the host applies that as it makes the object,
        the umask not counting then (POSIX.1e, as the kernel's own file systems), and a chmod
        afterwards would spoil the inherited ACL's mask."""
        try:
            os.getxattr(self._up(parent_path(path)), _ACL_DEFAULT, follow_symlinks=False)
        except OSError:
            return mode & ~umask & 0o7777
        return None

    def symlink(self, path: bytes, target: bytes, uid: int, gid: int) -> None:
        self._need_rw()
        self._prepare_new(path)
        gid = self._new_gid(path, gid)
        up = self._up(path)
        os.symlink(target, up)
        os.lchown(up, uid, gid)
        self._new_ino(os.lstat(up))

    def link(self, existing: bytes, new: bytes) -> None:
        self._need_rw()
        r = self.resolve(existing)
        if isinstance(r, Node) and r.is_dir or isinstance(r, os.stat_result) and stat.S_ISDIR(r.st_mode):
            raise _err(errno.EPERM)
        self._copy_up(existing)
        self._prepare_new(new)
        os.link(self._up(existing), self._up(new), follow_symlinks=False)

    def unlink(self, path: bytes) -> None:
        self._need_rw()
        r = self.resolve(path)
        if isinstance(r, Node) and r.is_dir or isinstance(r, os.stat_result) and stat.S_ISDIR(r.st_mode):
            raise _err(errno.EISDIR)
        self._remove(path, r)

    def rmdir(self, path: bytes) -> None:
        self._need_rw()
        if not path:
            raise _err(errno.EBUSY)
        r = self.resolve(path)
        if not (
            isinstance(r, Node) and r.is_dir or isinstance(r, os.stat_result) and stat.S_ISDIR(r.st_mode)
        ):
            raise _err(errno.ENOTDIR)
        if self.readdir(path):
            raise _err(errno.ENOTEMPTY)
        self._remove(path, r)
        self._moved(path)

    def _remove(self, path: bytes, r: os.stat_result | Node) -> None:
        """Remove ``path`` from the merged view: delete the upper object, whiteout the lower."""
        lower = self._lower(path)
        if isinstance(r, os.stat_result):
            up = self._up(path)
            if stat.S_ISDIR(r.st_mode):
                hosttree.empty(up)  # only whiteouts and markers are left in it
                os.rmdir(up)
            else:
                os.unlink(up)
            self._upper_ino.pop(r.st_ino, None)
        if lower is not None:
            self._whiteout(path)

    def rename(self, old: bytes, new: bytes, flags: int = 0) -> None:
        self._need_rw()
        if flags == RENAME_EXCHANGE:
            self._exchange(old, new)
            return
        if flags & ~RENAME_NOREPLACE:  # RENAME_WHITEOUT is the kernel's own, not offered
            raise _err(errno.EINVAL)
        src = self.resolve(old)
        src_dir = (
            isinstance(src, Node)
            and src.is_dir
            or isinstance(src, os.stat_result)
            and stat.S_ISDIR(src.st_mode)
        )
        try:
            dst: os.stat_result | Node | None = self.resolve(new)
        except FileNotFoundError:
            dst = None
        if old == new:
            return
        dst_dir = False
        if dst is not None:
            if flags & 1:
                raise _err(errno.EEXIST)
            dst_dir = (
                isinstance(dst, Node)
                and dst.is_dir
                or isinstance(dst, os.stat_result)
                and stat.S_ISDIR(dst.st_mode)
            )
            if src_dir and not dst_dir:
                raise _err(errno.ENOTDIR)
            if dst_dir and not src_dir:
                raise _err(errno.EISDIR)
            if dst_dir and self.readdir(new):
                raise _err(errno.ENOTEMPTY)
        if new.startswith(old + b"/"):
            raise _err(errno.EINVAL)
        if src_dir and self._has_lower_contents(old):
            # overlayfs without redirect_dir says EXDEV here and leaves the copying to mv;
            # we copy the whole merged directory up instead and mark it opaque, so once it
            # moves nothing of the lower layers can show through it at its new place
            self._copy_up_tree(old)
            drop_whiteouts(self._up(old))  # nothing below an opaque directory needs hiding
            set_opaque(self._up(old))
        old_lower = self._lower(old) is not None
        self._copy_up(old)
        if dst is None or dst_dir:
            if dst is not None:
                self._remove(new, dst)  # an empty directory: its whiteouts go with it
            replaced_whiteout = self._prepare_new(new)
        else:
            # over a file: one rename(2) replaces it, atomically, as on any file system (it was
            # removed first: a reader saw neither for a moment, and after a crash, for good)
            self._copy_up(parent_path(new))
            replaced_whiteout = False
        os.rename(self._up(old), self._up(new))
        if isinstance(dst, os.stat_result) and not dst_dir:
            self._upper_ino.pop(dst.st_ino, None)
        if src_dir and (replaced_whiteout or self._lower(new) is not None):
            set_opaque(self._up(new))
        if old_lower:
            self._whiteout(old)
        self._moved(old, new)

    def _copy_up_tree(self, path: bytes) -> None:
        """Copy a directory and everything visible below it into the upper directory."""
        self._copy_up(path)
        dirs = [path]
        while dirs:
            here = dirs.pop()
            for name, _, mode in self.readdir(here):
                child = join_path(here, name)
                self._copy_up(child)
                if stat.S_ISDIR(mode):
                    dirs.append(child)

    def _exchange(self, old: bytes, new: bytes) -> None:
        """renameat2(RENAME_EXCHANGE): both copied up, then swapped in the upper directory.  A
        directory that merges lower contents gives EXDEV, as on the kernel overlay without
        redirect_dir (moved, the lower contents would not follow it)."""
        kinds = [self.resolve(p) for p in (old, new)]  # ENOENT if either is missing
        if old == new:
            return
        if new.startswith(old + b"/") or old.startswith(new + b"/"):
            raise _err(errno.EINVAL)
        for path, r in zip((old, new), kinds):
            is_dir = r.is_dir if isinstance(r, Node) else stat.S_ISDIR(r.st_mode)
            if is_dir and self._has_lower_contents(path):
                raise _err(errno.EXDEV)
        self._copy_up(old)
        self._copy_up(new)
        if _libc.renameat2(AT_FDCWD, self._up(old), AT_FDCWD, self._up(new), RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._moved(old, new)

    def _has_lower_contents(self, path: bytes) -> bool:
        node = self._lower(path)
        if node is None or not node.is_dir or not self._lower_visible(path):
            return False
        return bool(self.lower.readdir(path))

    def chmod(self, path: bytes, mode: int) -> None:
        self._need_rw()
        self._copy_up(path)
        up = self._up(path)
        if stat.S_ISLNK(os.lstat(up).st_mode):
            raise _err(errno.EOPNOTSUPP)  # as Linux does for a symlink's own mode
        os.chmod(up, mode & 0o7777)

    def chown(self, path: bytes, uid: int, gid: int) -> None:
        self._need_rw()
        self._copy_up(path)
        os.lchown(self._up(path), uid, gid)

    def utimens(self, path: bytes, atime_ns: int | None, mtime_ns: int | None) -> None:
        self._need_rw()
        self._copy_up(path)
        up = self._up(path)
        st = os.lstat(up)
        ns = (
            st.st_atime_ns if atime_ns is None else atime_ns,
            st.st_mtime_ns if mtime_ns is None else mtime_ns,
        )
        os.utime(up, ns=ns, follow_symlinks=False)

    def setxattr(
        self, path: bytes, name: bytes, value: bytes, flags: int, *, kill_sgid: bool = False
    ) -> None:
        """``kill_sgid``: the caller, not in the file's group, set its access ACL, which clears
        S_ISGID (the kernel's rule; this process may set it and keep the bit)."""
        self._need_rw()
        if name.startswith(PRIVATE_XATTR_PREFIXES):
            raise _err(errno.EPERM)
        self._copy_up(path)
        up = self._up(path)
        os.setxattr(up, name, value, flags, follow_symlinks=False)
        if kill_sgid:
            mode = os.lstat(up).st_mode
            if mode & stat.S_ISGID and not stat.S_ISLNK(mode):
                os.chmod(up, stat.S_IMODE(mode) & ~stat.S_ISGID)

    def removexattr(self, path: bytes, name: bytes) -> None:
        self._need_rw()
        if name.startswith(PRIVATE_XATTR_PREFIXES):
            raise _err(errno.ENODATA)
        self._copy_up(path)
        os.removexattr(self._up(path), name, follow_symlinks=False)

    # -- copy-up machinery -----------------------------------------------------------------
    def _prepare_new(self, path: bytes) -> bool:
        """Make room for a new upper object at ``path``: parents copied up, a whiteout
        there removed.  EEXIST if something visible is there.  Returns whether a
        whiteout was replaced (the new object hides a deleted lower one)."""
        try:
            self.resolve(path)
        except FileNotFoundError:
            pass
        else:
            raise _err(errno.EEXIST)
        parent = parent_path(path)
        pr = self.resolve(parent)
        if not (
            isinstance(pr, Node) and pr.is_dir or isinstance(pr, os.stat_result) and stat.S_ISDIR(pr.st_mode)
        ):
            raise _err(errno.ENOTDIR)
        self._copy_up(parent)
        up = self._up(path)
        st = self._ulstat(path)
        replaced = False
        if st is not None and is_whiteout(st):
            os.unlink(up)
            replaced = True
        wh = self._up(join_path(parent, WH_PREFIX + base_name(path)))
        if os.path.lexists(wh):
            os.unlink(wh)
            replaced = True
        return replaced

    def _setgid_parent(self, path: bytes) -> int | None:
        """The group of ``path``'s (copied-up) parent if that directory is setgid."""
        st = os.lstat(self._up(parent_path(path)))
        return st.st_gid if st.st_mode & stat.S_ISGID else None

    def _new_gid(self, path: bytes, gid: int) -> int:
        """As the kernel does: a new object in a setgid directory takes the directory's group
        (a new directory also its setgid bit)."""
        parent_gid = self._setgid_parent(path)
        return gid if parent_gid is None else parent_gid

    def _whiteout(self, path: bytes) -> None:
        self._copy_up(parent_path(path))
        up = self._up(path)
        if self._mknod_ok:
            # as the kernel does: whiteouts are hardlinks of one 0/0 device in the work
            # directory; a new inode per deleted file made rm -rf cost a mknod each
            try:
                os.link(self._shared_whiteout(), up)
                return
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    raise
            try:
                os.mknod(up, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                return
            except PermissionError:
                self._mknod_ok = False  # unprivileged: fall back to .wh. files from now on
        with open(self._up(join_path(parent_path(path), WH_PREFIX + base_name(path))), "wb"):
            pass

    def _shared_whiteout(self) -> bytes:
        assert self.work is not None
        wh = os.path.join(self.work, b"whiteout")
        try:
            st = os.lstat(wh)
            if is_whiteout(st) and st.st_nlink < 60000:  # ext4 caps links at 65000
                return wh
            os.unlink(wh)
        except FileNotFoundError:
            pass
        os.mknod(wh, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        return wh

    def _copy_up(self, path: bytes, data: bool = True) -> None:
        """Make sure ``path`` exists in the upper directory (with its parents)."""
        r = self.resolve(path)
        if isinstance(r, os.stat_result):
            return
        # the parents first, top down, from the deepest one the upper directory has (a loop:
        # images decide the depth); the upper root always exists
        parents: list[tuple[bytes, Node]] = []
        parent = path
        while parent:
            parent = parent_path(parent)
            p = self.resolve(parent)
            if isinstance(p, os.stat_result):
                break
            parents.append((parent, p))
        for parent, p in reversed(parents):
            self._copy_one(parent, p, True)
        if r.kind == E.REG and r.nlink > 1:
            names = self.lower.link_group(r)
            first = self._copy_one(path, r, data)
            for other in names:
                if other == path:
                    continue
                try:
                    o = self.resolve(other)
                except OSError:
                    continue
                if isinstance(o, Node) and o.ino == r.ino:
                    self._copy_up(parent_path(other))
                    dst = self._up(other)
                    with _parent_times_kept(dst):
                        os.link(first, dst)
            return
        self._copy_one(path, r, data)

    def _copy_one(self, path: bytes, n: Node, data: bool) -> bytes:
        assert self.work is not None
        self._tmp += 1
        tmp = os.path.join(self.work, b"copyup-%d-%d" % (os.getpid(), self._tmp))
        fd = -1
        try:
            if n.kind == E.DIR:
                os.mkdir(tmp, 0o700)
            elif n.kind == E.REG:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                if data and n.host is not None:
                    with open(n.host, "rb") as src:
                        while piece := src.read(1 << 20):
                            os.write(fd, piece)
                elif data and n.content is not None:
                    assert self.store is not None
                    for piece in self.store.iter_object(n.content):
                        os.write(fd, piece)
            elif n.kind == E.SYMLINK:
                os.symlink(n.link, tmp)
            else:
                os.mknod(tmp, n.mode, n.rdev)
            # a regular file's metadata through its descriptor: no path walk per call
            target: bytes | int = tmp if fd < 0 else fd
            follow = fd >= 0  # (a descriptor is never followed; a path must not be)
            os.chown(target, n.uid, n.gid, follow_symlinks=follow)
            if n.kind != E.SYMLINK:
                os.chmod(target, n.mode & 0o7777)  # after chown, which clears setuid bits
            for name, value in n.xattrs:
                try:
                    os.setxattr(target, name, value, follow_symlinks=follow)
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                        raise
            for name in INO_XATTRS:
                try:
                    os.setxattr(target, name, _INO.pack(n.ino), follow_symlinks=follow)
                    break
                except OSError as exc:  # a symlink takes no user.* xattr: its number may change
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                        raise
            os.utime(target, ns=(n.mtime_ns, n.mtime_ns), follow_symlinks=follow)
            if fd >= 0:
                os.close(fd)
                fd = -1
            final = self._up(path)
            with _parent_times_kept(final):
                os.rename(tmp, final)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            hosttree.remove(tmp)
            raise
        self._vis.drop(path)
        if n.kind == E.REG:
            self._follow_copy(n.ino, final)
        return final

    def _follow_copy(self, ino: int, copy: bytes) -> None:
        """Handles open on lower file ``ino`` read its copy from now on, as the kernel overlay's
        open files do once their inode is copied up (a write through another open shows)."""
        for fh, h in list(self._handles.items()):
            if (h.node.ino if isinstance(h, _LowerFile) else h.node_ino) != ino:
                continue
            fd = os.open(copy, os.O_RDONLY | os.O_NOFOLLOW)
            if isinstance(h, _UpperFile):
                self._superseded[fh] = h.fd
            self._handles[fh] = _UpperFile(fd)


@contextlib.contextmanager
def _parent_times_kept(path: bytes) -> Iterator[None]:
    """A copy-up is not a change of the directory it lands in: its times stay (as overlayfs keeps
    them), or a commit would record every copied-up file's parent as changed now."""
    parent = os.path.dirname(path)
    st = os.stat(parent)  # a directory; stat, not lstat: it may be a /proc/self/fd link (_up)
    yield
    os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns))


def _first_xattr(path: bytes, names: tuple[bytes, ...]) -> bytes:
    for name in names[:-1]:
        try:
            return os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            pass
    return os.getxattr(path, names[-1], follow_symlinks=False)


def _first_fxattr(fd: int, names: tuple[bytes, ...]) -> bytes:
    for name in names[:-1]:
        try:
            return os.getxattr(fd, name)
        except OSError:
            pass
    return os.getxattr(fd, names[-1])


class _PathCache:
    """A value per directory path; dropping a path drops what is cached below it too (a
    change at one directory leaves the rest of a deep tree's answers standing)."""

    def __init__(self) -> None:
        self._values: dict[bytes, bool] = {}
        self._below: dict[bytes, set[bytes]] = {}

    def get(self, path: bytes) -> bool | None:
        return self._values.get(path)

    def put(self, path: bytes, value: bool) -> None:
        self._values[path] = value
        if path:
            self._below.setdefault(parent_path(path), set()).add(path)

    def drop(self, path: bytes) -> None:
        if path:
            self._below.get(parent_path(path), set()).discard(path)
        todo = [path]
        while todo:
            here = todo.pop()
            self._values.pop(here, None)
            todo.extend(self._below.pop(here, ()))
