"""The C FUSE core's Python half: mounting, and the calls the C request path makes into the view.

``layerfs._cfuse.Session`` reads the kernel's requests, keeps the inode and name tables and
answers what needs no union rule; it calls ``CoreOps`` with paths (relative bytes, ``b""`` is
the root) for everything else.  ``CoreOps`` only translates: attribute dicts become the tuples
the C side packs, handles become (handle, host descriptor) pairs.  ``OSError`` raised here
reaches the kernel as its errno; anything else is logged and answered with EIO.

Mounting uses mount(2) where we may (root), else fusermount3 with its descriptor-passing
protocol, so the core needs no libfuse.  Not thread-safe: the C loop is single-threaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from layerfs import procfs
from layerfs.fuse import TRIM_EVERY, trim_store_map
from layerfs.store import filecache
from layerfs.union.lower import ChainLayer, DirLayer, Stack, join_path, parent_path
from layerfs.union.view import UPPER_INO, UnionView

# (ino, mode, nlink, uid, gid, rdev, size, blocks, atime_ns, mtime_ns, ctime_ns[, lower])
Attr = tuple[int, ...]

STACK_MAX_LAYERS = 63  # MAX_LAYERS in ext/fusecore.c: one bit each in a node's layer mask
RO_TIMEOUT = 3600.0  # lower layers are immutable: let the kernel cache them
RW_TIMEOUT = 3600.0  # writable mounts too: every change goes through the mount, and the kernel
# drops what its own requests change (one inode per object: no other name of a file goes stale)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_SYNCHRONOUS, MS_NOATIME, MS_NODIRATIME = 16, 1024, 2048
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
MNT_DETACH = 2
# generic mount flags by name: (flag, set by the plain name)
_FLAGS = {
    "suid": (MS_NOSUID, False),
    "dev": (MS_NODEV, False),
    "exec": (MS_NOEXEC, False),
    "atime": (MS_NOATIME, False),
    "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True),
    "strictatime": (MS_STRICTATIME, True),
    "sync": (MS_SYNCHRONOUS, True),
}


def _attr(a: dict[str, int]) -> Attr:
    return (
        a["st_ino"],
        a["st_mode"],
        a["st_nlink"],
        a["st_uid"],
        a["st_gid"],
        a["st_rdev"],
        a["st_size"],
        a["st_blocks"],
        a["st_atime"],
        a["st_mtime"],
        a["st_ctime"],
    )


class CoreOps:
    """What the C core asks of the union view (see ext/fusecore.c for the call sites)."""

    def __init__(self, view: UnionView) -> None:
        self.view = view
        self._calls = 0
        self._pin: Any = None
        self.stored_reads = False  # the C side reads lower files from the store
        self.stack: Stack | None = None  # ... or from layerfs-overlay's directory layers

    def pin(self) -> None:
        """Hold (and renew: about once a second) a read transaction of the store, so that no
        page of a snapshot the C side reads is reused by a writer (see ext/fusestore.h)."""
        store = self.view.store
        if store is None:
            return
        old, self._pin = self._pin, store.read()
        if old is not None:
            old.abort()

    def unpin(self) -> None:
        if self._pin is not None:
            self._pin.abort()
            self._pin = None

    # -- names and attributes --------------------------------------------------------
    def lookup(self, path: bytes) -> Attr:
        """Attributes; with a 12th item, not 0, when the C side may answer for this node and
        all below it from the lower layers themselves (``UnionView.lookup``) until something
        changes: 1 for a stored image, the node's layers (``Stack.layer_mask``) for directory
        layers."""
        self._calls += 1
        if self._calls % TRIM_EVERY == 0:
            trim_store_map(self.view)
        attr, lower = self.view.lookup(path)
        if lower and self.stored_reads:
            return (*_attr(attr), 1)
        if lower and self.stack is not None:
            mask = self.stack.layer_mask(path, attr["st_ino"], stat.S_ISDIR(attr["st_mode"]))
            return (*_attr(attr), mask)
        return _attr(attr)

    getattr = lookup

    def union_dir(self, path: bytes) -> int:
        """What the C core may decide by itself about new names in directory ``path``: -1
        nothing (not an upper directory, or merged with lower directories it cannot read);
        0 an upper directory whose names are its own; else the index inode of the stored lower
        directory merged with it, or for directory layers that directory's layers (a name free
        in both is free in the union)."""
        is_dir, lower = self.view.upper_dir_state(path)
        if not is_dir:
            return -1
        if lower is None:
            return 0
        if self.stored_reads and lower.host is None:
            return lower.ino
        if self.stack is not None:
            return self.stack.layer_mask(path, lower.ino, True) or -1
        return -1

    def adopt(self, fd: int) -> int:
        """The view's handle for an upper file the C core created and opened."""
        return self.view.adopt(fd)

    def made(self, numbers: list[tuple[int, int]]) -> None:
        self.view.made(numbers)

    def fgetattr(self, fh: int) -> Attr:
        return _attr(self.view.fgetattr(fh))

    def readdir(self, path: bytes) -> list[tuple[bytes, Attr]]:
        """The whole listing with attributes (READDIRPLUS answers from it), "." and ".." first."""
        view = self.view
        self._calls += 1
        if self._calls % (TRIM_EVERY // 64) == 0:
            trim_store_map(view)
        here = _attr(view.getattr(path))
        up = _attr(view.getattr(parent_path(path))) if path else here
        out: list[tuple[bytes, Attr]] = [(b".", here), (b"..", up)]
        for name, _, _ in view.readdir(path):
            try:
                out.append((name, self.lookup(join_path(path, name))))
            except OSError:
                continue  # gone between the listing and its stat: leave it out
        return out

    def readlink(self, path: bytes) -> bytes:
        return self.view.readlink(path)

    def statfs(self) -> tuple[int, ...]:
        s = self.view.statfs()
        return (
            s["f_blocks"],
            s["f_bfree"],
            s["f_bavail"],
            s["f_files"],
            s["f_ffree"],
            s["f_bsize"],
            s["f_namemax"],
            s["f_frsize"],
        )

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        return self.view.getxattr(path, name)

    def listxattr(self, path: bytes) -> bytes:
        names = self.view.listxattr(path)
        return b"".join(n + b"\0" for n in names)

    # -- files -------------------------------------------------------------------------
    def open(self, path: bytes, flags: int) -> tuple[int | None, int, int, bool]:
        """(view handle, host descriptor or -1, 0, whether the descriptor is a lower layer's
        own file); or (None, -1, index inode, False) for a lower file opened for reading, which
        the C side reads from the store itself (no handle here).  A lower layer's file is
        never passed through: a writer of the same node (the file once copied up) would be
        passed through to it too (one backing per inode)."""
        if self.stored_reads and not flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            ino = self.view.stored_lower_ino(path)
            if ino is not None:
                return None, -1, ino, False
        fh = self.view.open(path, flags)
        return fh, self.view.handle_fd(fh), 0, self.view.is_lower_handle(fh)

    def create(
        self, path: bytes, mode: int, flags: int, uid: int, gid: int, umask: int
    ) -> tuple[int, int, Attr]:
        fh = self.view.create(path, mode, flags, uid, gid, umask)
        return fh, self.view.handle_fd(fh), self.fgetattr(fh)

    def tmpfile(
        self, path: bytes, mode: int, flags: int, uid: int, gid: int, umask: int
    ) -> tuple[int, int, Attr]:
        fh = self.view.tmpfile(path, mode, flags, uid, gid, umask)
        return fh, self.view.handle_fd(fh), self.fgetattr(fh)

    def link_open(self, fh: int, new: bytes) -> Attr:
        self.view.link_open(fh, new)
        return self.getattr(new)

    def read(self, fh: int, size: int, offset: int) -> bytes:
        return self.view.read(fh, size, offset)

    def read_path(self, path: bytes, size: int, offset: int) -> bytes:
        return self.view.read_path(path, size, offset)

    def write(self, fh: int, data: memoryview, offset: int) -> int:
        return self.view.write(fh, data, offset)

    def release(self, fh: int) -> None:
        self.view.release(fh)

    def fsync(self, fh: int, datasync: int) -> None:
        self.view.fsync(fh, bool(datasync))

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        self.view.fallocate(fh, mode, offset, length)

    # -- changes -----------------------------------------------------------------------
    def setattr(
        self,
        path: bytes | None,
        fh: int | None,
        valid: int,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        atime: int,
        mtime: int,
    ) -> Attr:
        view = self.view
        if path is None:  # an open file without a name (unlinked, O_TMPFILE): only its handle is left
            fd = view.handle_fd(fh) if fh is not None else -1
            if fh is None or fd < 0:
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
            if valid & 1:
                os.fchmod(fd, mode & 0o7777)
            if valid & 6:
                os.fchown(fd, uid if valid & 2 else -1, gid if valid & 4 else -1)
            if valid & 8:
                os.ftruncate(fd, size)
            if atime != -1 or mtime != -1:
                now, st = time.time_ns(), os.fstat(fd)
                os.utime(
                    fd,
                    ns=(
                        st.st_atime_ns if atime == -1 else now if atime == -2 else atime,
                        st.st_mtime_ns if mtime == -1 else now if mtime == -2 else mtime,
                    ),
                )
            return self.fgetattr(fh)
        if valid & 1:
            view.chmod(path, mode)
        if valid & 6:
            view.chown(path, uid if valid & 2 else -1, gid if valid & 4 else -1)
        if valid & 8:
            view.truncate(path, size, fh)
        if atime != -1 or mtime != -1:
            now = time.time_ns()
            view.utimens(
                path,
                None if atime == -1 else now if atime == -2 else atime,
                None if mtime == -1 else now if mtime == -2 else mtime,
            )
        return self.getattr(path)

    def mkdir(self, path: bytes, mode: int, _rdev: int, uid: int, gid: int, umask: int) -> Attr:
        self.view.mkdir(path, mode, uid, gid, umask)
        return self.getattr(path)

    def mknod(self, path: bytes, mode: int, rdev: int, uid: int, gid: int, umask: int) -> Attr:
        self.view.mknod(path, mode, rdev, uid, gid, umask)
        return self.getattr(path)

    def symlink(self, path: bytes, target: bytes, uid: int, gid: int) -> Attr:
        self.view.symlink(path, target, uid, gid)
        return self.getattr(path)

    def link(self, existing: bytes, new: bytes) -> Attr:
        self.view.link(existing, new)
        return self.getattr(new)

    def unlink(self, path: bytes) -> None:
        self.view.unlink(path)

    def rmdir(self, path: bytes) -> None:
        self.view.rmdir(path)

    def rename(self, old: bytes, new: bytes, flags: int) -> None:
        self.view.rename(old, new, flags)

    def setxattr(self, path: bytes, name: bytes, value: bytes, flags: int, kill_sgid: int = 0) -> None:
        self.view.setxattr(path, name, value, flags, kill_sgid=bool(kill_sgid))

    def removexattr(self, path: bytes, name: bytes) -> None:
        self.view.removexattr(path, name)


# -- mounting ------------------------------------------------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount_flags(read_only: bool, mount_options: dict[str, bool]) -> tuple[int, list[str]]:
    flags = MS_RDONLY if read_only else 0
    names = ["ro"] if read_only else []
    for name, on in mount_options.items():
        bit, plain_sets = _FLAGS.get(name, (0, False))
        if not bit:
            continue
        if on == plain_sets:
            flags |= bit
        else:
            flags &= ~bit
        names.append(name if on else "no" + name)
    return flags, names


def mount_fuse(
    mountpoint: str,
    *,
    fsname: str,
    subtype: str,
    read_only: bool,
    allow_other: bool,
    mount_options: dict[str, bool],
) -> int:
    """Mount a FUSE file system at ``mountpoint``; returns the open /dev/fuse descriptor."""
    flags, names = _mount_flags(read_only, mount_options)
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        fd = -1  # /dev/fuse is root's here: fusermount3 (setuid) opens it for us
    if fd >= 0:
        data = f"fd={fd},rootmode={stat.S_IFDIR:o},user_id={os.getuid()},group_id={os.getgid()}"
        data += ",default_permissions" + (",allow_other" if allow_other else "")
        rc = _libc.mount(
            fsname.encode(), os.fsencode(mountpoint), f"fuse.{subtype}".encode(), flags, data.encode()
        )
        if rc == 0:
            return fd
        err = ctypes.get_errno()
        os.close(fd)
        if err not in (errno.EPERM, errno.EACCES):
            raise OSError(err, f"mount {mountpoint}: {os.strerror(err)}")
    opts = [f"fsname={fsname}", f"subtype={subtype}", "default_permissions", *names]
    if allow_other:
        opts.append("allow_other")
    return _fusermount(mountpoint, ",".join(o.replace(",", "\\,") for o in opts))


def _fusermount(mountpoint: str, options: str) -> int:
    """Unprivileged: fusermount3 mounts and hands the descriptor back over a socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.run(
            ["fusermount3", "-o", options, "--", mountpoint],
            pass_fds=(theirs.fileno(),),
            env=env,
            capture_output=True,
            text=True,
        )
        theirs.close()
        if proc.returncode != 0:
            raise OSError(errno.EPERM, proc.stderr.strip() or f"fusermount3 exited {proc.returncode}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise OSError(errno.EIO, "fusermount3 passed no descriptor")
        return fds[0]
    finally:
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()


def _raise_readahead(target: str, kib: int) -> None:
    """Let the kernel read ahead ``kib`` instead of its 128 KiB default (the FUSE INIT reply can
    only lower it): READs of 1 MiB, not 128 KiB, and several of them at once where the session's
    threads decompress them side by side (``Session.read_ahead``).
    ``target`` is the mount point's real path, resolved before mounting: the mount's device is
    taken from mountinfo, since any look at the mount point itself would wait for INIT, which
    only this process can answer."""
    devs = [m.device for m in procfs.mounts_on(target, resolved=True)]
    if not devs:
        return
    try:
        with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError:
        pass  # not root, or no sysfs: the default stays


def unmount_lazily(mountpoint: str) -> None:
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
        return
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


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
    """Mount and serve until unmounted; SIGINT, SIGTERM and SIGHUP unmount (lazily, as a busy
    mount cannot go at once) and the loop ends when the kernel lets go.

    ``fsname`` and ``subtype`` name the mount (``fuse.SUBTYPE`` in mountinfo); ``on_ready`` is
    called once the kernel has the mount; ``mount_options`` are generic mount flags (``dev``,
    ``suid``, ``exec``, ``atime``, ``diratime``, ``relatime``, ``strictatime``: True to set,
    False for the ``no`` form) over the defaults; ``debug`` logs every request to stderr."""
    from layerfs import _cfuse

    options = {"dev": True, "suid": True}
    options.update(mount_options or {})
    target = os.path.realpath(mountpoint)
    fd = mount_fuse(
        mountpoint,
        fsname=fsname,
        subtype=subtype,
        read_only=not view.writable,
        allow_other=allow_other,
        mount_options=options,
    )
    timeout = RW_TIMEOUT if view.writable else RO_TIMEOUT
    ops = CoreOps(view)
    from_store: dict[str, Any] = {}
    # the C side maps the store again (one map per thread): on a 32-bit userland the address
    # space cannot hold that beside py-lmdb's map when the payload is in LMDB, so there Python
    # reads the store; with file packs the map holds only metadata, and C maps just that
    chain, store = view.lower, view.store
    small_map = store is not None and store.payload_kind == "files"
    can_map = (sys.maxsize > 2**32 or small_map) and os.environ.get("LAYERFS_C_STORE", "1") != "0"
    if can_map and isinstance(chain, ChainLayer) and store is not None:
        ops.pin()
        from_store = {"store": store.path, "chain_prefix": chain.index.prefix}
        if view.writable:
            # a writable mount of one stored image: lower files opened for reading are read by C,
            # from the store or from their decompressed copies in the file cache
            ops.stored_reads = True
            if view.upper is not None:  # new files in upper directories made by C (upper_create)
                from_store.update(upper_dir=view.upper, upper_ino=UPPER_INO, work_dir=view.work)
            size = filecache.bound(store.path)
            if size > 0:
                from_store.update(
                    file_cache=filecache.directory(store.path),
                    file_cache_size=size,
                    file_cache_min=filecache.MIN_SIZE,
                )
        else:
            # a read-only mount of one stored image: the C core answers from the store itself,
            # on a thread per CPU (up to 4): zstd of one file's chunks runs on all of them at once
            from_store.update(statfs=ops.statfs(), threads=min(4, len(os.sched_getaffinity(0))))
    elif (
        isinstance(chain, Stack)
        and len(chain.layers) <= STACK_MAX_LAYERS
        and os.environ.get("LAYERFS_C_LOWER", "1") != "0"
        and len(dirs := [layer for layer in chain.layers if isinstance(layer, DirLayer)]) == len(chain.layers)
    ):
        # layerfs-overlay: lower nodes answered by C from the layers' directories, new files
        # made and lower files copied up by C (the same calls as for a stored image)
        ops.stack = chain
        from_store = {"lower_dirs": [layer.root for layer in dirs]}
        if view.upper is not None:
            from_store.update(upper_dir=view.upper, upper_ino=UPPER_INO, work_dir=view.work)
    try:
        session = _cfuse.Session(
            fd,
            ops,
            writable=view.writable,
            entry_timeout=timeout,
            attr_timeout=timeout,
            negative_timeout=timeout,
            debug=debug,
            # upper files read and written by the kernel itself (FUSE_DEV_IOC_BACKING_OPEN is
            # for privileged servers only; LAYERFS_PASSTHROUGH=0 turns it off)
            passthrough=os.geteuid() == 0 and os.environ.get("LAYERFS_PASSTHROUGH", "1") != "0",
            label=view.label,
            **from_store,
        )
    except BaseException:
        ops.unpin()
        os.close(fd)
        unmount_lazily(mountpoint)
        raise
    _raise_readahead(target, session.read_ahead() // 1024)

    def stop(signum: int, frame: Any) -> None:
        unmount_lazily(mountpoint)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        if on_ready is not None:
            on_ready()
        session.run()
    finally:
        del session  # closes the C side's store handle before the pin is dropped
        ops.unpin()
        os.close(fd)
