"""The pure-Python FUSE core: translates mfusepy (libfuse3 high-level) calls to a ``UnionView``.

This is a protocol adapter only: no filesystem logic lives here.  Paths arrive
as ``/a/b`` strings (surrogate-escaped) and go to the view as relative bytes;
``OSError`` from the view becomes the FUSE errno (mfusepy does that).

Dispatch is single-threaded: the view's calls hold the GIL throughout, so more
dispatch threads only add their switching; sequential reads overlap decompression
with a read-ahead thread inside the view instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would load libfuse2 first

import mfusepy  # noqa: E402

from layerfs.fuse import TRIM_EVERY, trim_store_map  # noqa: E402
from layerfs.union.view import UnionView  # noqa: E402

# libfuse's high-level API marks "now" and "leave alone" in tv_nsec of a zero tv_sec;
# with use_ns the two arrive as these integers
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RO_TIMEOUT = 3600.0  # lower layers are immutable: let the kernel cache them
RW_TIMEOUT = 1.0
MAX_REQUEST = 1 << 20
LIBFUSE_FLAGS = ("dev", "suid", "exec", "atime")  # the generic mount flags libfuse passes on


# what fuse_main's exit statuses mean (libfuse's fuse_main_real)
_FUSE_MAIN_FAILURES = {
    1: "parse the mount options",
    2: "find the mount point",
    3: "set up the FUSE session",
    4: "mount (see the daemon's log for libfuse's reason)",
    5: "detach the daemon",
    6: "set up its signal handlers",
    7: "keep serving the mount",
}


def _p(path: str) -> bytes:
    return os.fsencode(path)[1:]


class UnionOperations(mfusepy.Operations):  # type: ignore[misc]
    """Read-only operations.  OPEN answers ENOSYS (the kernel then sends neither OPEN nor
    RELEASE again) and there is no flush: reading a small file costs LOOKUP and READ only;
    ``kernel_cache`` keeps the page cache."""

    use_ns = True

    def __init__(self, view: UnionView, on_ready: Callable[[], None] | None = None) -> None:
        self.view = view
        self._on_ready = on_ready
        self._ops = 0
        self._config: Any = None

    def init_with_config(self, conn: Any, config: Any) -> None:
        timeout = RW_TIMEOUT if self.view.writable else RO_TIMEOUT
        if config is not None:
            config.use_ino = 1
            config.entry_timeout = timeout
            config.negative_timeout = timeout
            config.attr_timeout = timeout
            self._config = config  # libfuse reads attr_timeout from here for every reply
            if not self.view.writable:
                config.kernel_cache = 1  # immutable: the page cache survives close/open
        if conn is not None:
            # 1 MiB requests instead of 128 KiB: a quarter of the calls into Python on
            # sequential reads and writes (the kernel sizes its requests from max_write)
            conn.max_write = MAX_REQUEST
            conn.max_readahead = MAX_REQUEST
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        pass

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        # served by _FUSE.fgetattr straight from bytes; kept so libfuse registers the call
        return self.view.getattr(_p(path))

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # glibc's readdir skips entries with inode 0: every entry carries its inode and type
        here = {"st_ino": self.view.getattr(_p(path))["st_ino"], "st_mode": stat.S_IFDIR}
        out = [(".", here, 0), ("..", here, 0)]
        out += [
            (os.fsdecode(name), {"st_ino": ino, "st_mode": mode}, 0)
            for name, ino, mode in self.view.readdir(_p(path))
        ]
        return out

    def readlink(self, path: str) -> str:
        return os.fsdecode(self.view.readlink(_p(path)))

    def open(self, path: str, fi: Any) -> int:
        # "no open support": on ENOSYS the kernel stops sending OPEN and RELEASE for good
        # and keeps the page cache; reads then come by path
        raise OSError(errno.ENOSYS, "stateless reads")

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        return self.view.read_path(_p(path), size, offset)

    def statfs(self, path: str) -> dict[str, int]:
        return self.view.statfs()

    def listxattr(self, path: str) -> list[str]:
        return [os.fsdecode(n) for n in self.view.listxattr(_p(path))]

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.view.getxattr(_p(path), os.fsencode(name))


class WritableOperations(UnionOperations):
    """Read-write operations: handles for files (copy-up happens at open for write)."""

    def open(self, path: str, fi: Any) -> int:
        fi.fh = self.view.open(_p(path), fi.flags)
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        return self.view.read(fi.fh, size, offset)

    def release(self, path: str, fi: Any) -> int:
        self.view.release(fi.fh)
        return 0

    def create(self, path: str, mode: int, fi: Any) -> int:
        uid, gid, _ = mfusepy.fuse_get_context()
        fi.fh = self.view.create(_p(path), mode, fi.flags, uid, gid)
        return 0

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        return self.view.write(fi.fh, data, offset)

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        self.view.truncate(_p(path), length, fh.fh if fh is not None else None)
        return 0

    def fsync(self, path: str, datasync: int, fi: Any) -> int:
        self.view.fsync(fi.fh, bool(datasync))
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fi: Any) -> int:
        self.view.fallocate(fi.fh, mode, offset, size)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        uid, gid, _ = mfusepy.fuse_get_context()
        self.view.mkdir(_p(path), mode, uid, gid)
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        uid, gid, _ = mfusepy.fuse_get_context()
        self.view.mknod(_p(path), mode, dev, uid, gid)
        return 0

    def symlink(self, target: str, source: str) -> int:
        # mfusepy passes (link path, link target)
        uid, gid, _ = mfusepy.fuse_get_context()
        self.view.symlink(_p(target), os.fsencode(source), uid, gid)
        return 0

    def link(self, target: str, source: str) -> int:
        # mfusepy passes (new name, existing name)
        self.view.link(_p(source), _p(target))
        return 0

    def unlink(self, path: str) -> int:
        self.view.unlink(_p(path))
        return 0

    def rmdir(self, path: str) -> int:
        self.view.rmdir(_p(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        self.view.rename(_p(old), _p(new))
        return 0

    def chmod(self, path: str, mode: int) -> int:
        self.view.chmod(_p(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self.view.chown(_p(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        now = time.time_ns()
        if times is None:
            atime: int | None = now
            mtime: int | None = now
        else:
            atime, mtime = (now if t == UTIME_NOW else None if t == UTIME_OMIT else t for t in times)
        self.view.utimens(_p(path), atime, mtime)
        return 0

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self.view.setxattr(_p(path), os.fsencode(name), value, options)
        return 0

    def removexattr(self, path: str, name: str) -> int:
        self.view.removexattr(_p(path), os.fsencode(name))
        return 0


def _stat_packer() -> tuple[Callable[[dict[str, int]], bytes], int]:
    """Packs an attribute dict into this platform's ``struct stat`` (laid out from mfusepy's
    ctypes definition), so a getattr reply is one pack and one memmove instead of a dozen
    ctypes attribute stores: LOOKUP and GETATTR are the hottest calls of a tree walk."""
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    fields = []  # (offset, struct code, expression over the attribute dict ``a``)
    for name in (
        "st_ino",
        "st_mode",
        "st_nlink",
        "st_uid",
        "st_gid",
        "st_rdev",
        "st_size",
        "st_blksize",
        "st_blocks",
    ):
        f = getattr(mfusepy.c_stat, name)
        fields.append((f.offset, codes[f.size], f"a[{name!r}]"))
    for name in ("st_atime", "st_mtime", "st_ctime"):
        f = getattr(mfusepy.c_stat, name + "spec")
        half = f.size // 2  # tv_sec, tv_nsec
        seconds = f"a[{name!r}] // 1000000000"
        if half == 4:
            # a 32-bit time_t (armhf, i386 until Debian 13) holds no time after 2038-01-19: the
            # pack raised, mfusepy answered EINVAL and lstat failed; the latest it can say instead
            seconds = f"min(max({seconds}, {-(1 << 31)}), {(1 << 31) - 1})"
        fields.append((f.offset, codes[half].lower(), seconds))
        fields.append((f.offset + half, codes[half].lower(), f"a[{name!r}] % 1000000000"))
    fields.sort()
    fmt, pos = "=", 0
    for offset, code, _ in fields:
        fmt += "x" * (offset - pos) + code
        pos = offset + struct.calcsize("=" + code)
    size = ctypes.sizeof(mfusepy.c_stat)
    layout = struct.Struct(fmt + "x" * (size - pos))
    source = f"def pack(a):\n    return layout_pack({', '.join(e for _, _, e in fields)})\n"
    namespace: dict[str, Any] = {"layout_pack": layout.pack}
    exec(source, namespace)  # noqa: S102 - generated from the field table above, no input
    return namespace["pack"], size


_pack_stat, _STAT_SIZE = _stat_packer()


class _Statvfs(ctypes.Structure):
    """``struct statvfs`` as libfuse (built with 64-bit file offsets) hands it to us, up to
    ``f_namemax``.  On a 32-bit target glibc puts an int after ``f_fsid`` (``__f_unused``; musl
    pads the same), which mfusepy's ``c_statvfs`` lacks: through it ``f_flag`` landed in the
    padding, ``f_namemax`` in ``f_flag``, and statvfs(2) on the mount said names of 0 bytes."""

    _fields_ = [
        ("f_bsize", ctypes.c_ulong),
        ("f_frsize", ctypes.c_ulong),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64),
        ("f_favail", ctypes.c_uint64),
        ("f_fsid", ctypes.c_ulong),
        *([("f_unused", ctypes.c_int)] if ctypes.sizeof(ctypes.c_ulong) == 4 else []),
        ("f_flag", ctypes.c_ulong),
        ("f_namemax", ctypes.c_ulong),
    ]


_STATVFS_FIELDS = tuple(f[0] for f in _Statvfs._fields_ if f[0] != "f_unused")


class _FUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy drops rename flags; RENAME_NOREPLACE must reach the view, the rest is refused."""

    def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
        ops = self.operations
        ops._ops += 1
        if ops._ops % TRIM_EVERY == 0:
            trim_store_map(ops.view)
        attrs = ops.view.getattr(path[1:] if path else b"")
        if ops.view.writable and ops._config is not None:
            # libfuse's high-level API gives every path its own kernel inode: a change made
            # through one name of a hardlinked file (or a new link to it) would leave the other
            # names' cached size and link count stale, so regular files are not cached.
            # Directories are: every create walks them, and the kernel refreshes them itself
            # when it changes their entries.  (libfuse reads the timeout for this reply after
            # we return; dispatch is single-threaded.)
            ops._config.attr_timeout = 0.0 if stat.S_ISREG(attrs["st_mode"]) else RW_TIMEOUT
        ctypes.memmove(buf, _pack_stat(attrs), _STAT_SIZE)
        return 0

    def statfs(self, path: bytes, buf: Any) -> int:
        # our own layout of the struct, not mfusepy's (wrong for 32-bit glibc: see _Statvfs)
        attrs = self.operations.statfs(os.fsdecode(path))
        out = ctypes.cast(buf, ctypes.POINTER(_Statvfs)).contents
        for name in _STATVFS_FIELDS:
            if name in attrs:
                setattr(out, name, attrs[name])
        return 0

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        ops = self.operations
        ops.view.rename(old[1:], new[1:], flags)
        return 0


def serve(
    view: UnionView,
    mountpoint: str,
    *,
    fsname: str,
    allow_other: bool = False,
    on_ready: Callable[[], None] | None = None,
    debug: bool = False,
    subtype: str = "layerfs",
    mount_options: dict[str, bool] | None = None,
) -> None:
    """Mount and serve until unmounted or signalled (SIGINT/SIGTERM/SIGHUP unmount).

    ``mount_options`` are generic mount flags (``dev``, ``suid``, ``exec``, ``atime``
    and the like: True to set, False for the ``no`` form) over the defaults."""
    options: dict[str, Any] = {
        "fsname": fsname,
        "subtype": subtype,
        "default_permissions": True,
        "ro": not view.writable,
        "dev": True,
        "suid": True,
    }
    for name, on in (mount_options or {}).items():
        if name not in LIBFUSE_FLAGS:
            continue  # libfuse 3.14 refuses the mount over diratime, relatime, strictatime
        options.pop(name, None)
        options.pop("no" + name, None)
        options[name if on else "no" + name] = True
    if allow_other:
        options["allow_other"] = True
    ops = WritableOperations(view, on_ready) if view.writable else UnionOperations(view, on_ready)
    try:
        _FUSE(ops, mountpoint, foreground=True, nothreads=True, raw_fi=True, debug=debug, **options)
    except RuntimeError as exc:  # fuse_main's status: a number (libfuse printed the reason)
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        raise OSError(
            errno.EIO, f"libfuse could not {_FUSE_MAIN_FAILURES.get(code, 'serve the mount')}"
        ) from None
