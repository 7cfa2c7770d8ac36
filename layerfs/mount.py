"""Mount life: start a FUSE daemon for an image, list and unmount mounts.

``mount`` builds (or finds) the image's merged index, then forks a daemon that
opens the store afresh (an LMDB environment must not cross a fork), pins the
image's layers with a lease so ``gc`` cannot remove them while mounted, and
serves the mount.  The parent returns only when the kernel has the mount (the
daemon's FUSE ``init`` writes to a pipe) or with the daemon's one-line error.

Each mount is recorded in ``<store>/mounts/<id>.json``; ``mounts`` lists the
records whose mountpoint is still a layerfs FUSE mount and prunes the rest.
Without ``--upper`` a writable mount gets a fresh upper directory under the
store that ``umount`` deletes (like a container without a volume).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from layerfs import hosttree, procfs
from layerfs.privmount import atime_attr, private_paths
from layerfs.union.index import ChainIndex, build, index_ready
from layerfs.union.lower import ChainLayer, DirLayer, Lower, Stack

if TYPE_CHECKING:  # (layerfs-overlay's daemon uses this module without the store: see layerfs.store)
    from layerfs.store import Store


class MountError(Exception):
    """One line for the user."""


@dataclass
class MountSpec:
    image_id: bytes
    layers: list[bytes]
    mountpoint: str
    upper: str | None = None
    work: str | None = None
    name: str = ""
    allow_other: bool = False
    temporary_upper: bool = False
    lower_dirs: list[str] = field(default_factory=list)  # stacked above the image, leftmost on top
    # generic mount flags over the FUSE core's defaults (which allow setuid bits and devices, as a
    # container's root filesystem needs): {"suid": False, "dev": False} mounts nosuid,nodev
    mount_options: dict[str, bool] = field(default_factory=dict)


def mounted_fuse(mountpoint: str) -> str | None:
    """The filesystem type if ``mountpoint`` is a mount point now, else None."""
    found = procfs.mounts_on(mountpoint)
    return found[0].fstype if found else None


def _registry(store: Store) -> str:
    path = os.path.join(store.path, "mounts")
    os.makedirs(path, exist_ok=True)
    return path


def need_dir(path: str, what: str) -> None:
    """Raise MountError unless ``path`` is a directory (saying whether it is missing)."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise MountError(f"{what} {path} does not exist")
        raise MountError(f"{what} {path} is not a directory")


def _inside(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def check_overlaps(mountpoint: str, dirs: list[tuple[str, str, bool]]) -> None:
    """Refuse a directory the daemon would reach through its own mount: ``(what, path,
    both_ways)`` equal to the mount point or inside it, or (``both_ways``) holding the mount
    point, whose name the daemon would look up there.  Either way a request the daemon makes
    of the kernel waits for the daemon itself: every access to the mount, and its unmount,
    hung.  (The kernel's overlayfs reaches its layers through private clones of their mounts,
    which do not see the overlay; a FUSE daemon sees what every process sees.)"""
    mp = os.path.realpath(mountpoint)
    for what, path, both_ways in dirs:
        real = os.path.realpath(path)
        if real == mp:
            raise MountError(f"{what} {path} is the mount point")
        if _inside(real, mp):
            raise MountError(f"{what} {path} lies inside the mount point {mountpoint}")
        if both_ways and _inside(mp, real):
            raise MountError(f"the mount point {mountpoint} lies inside {what} {path}")


def prepare(store: Store, spec: MountSpec) -> None:
    """Check the mountpoint and the upper directory; raise MountError with the reason."""
    mp = spec.mountpoint
    need_dir(mp, "mountpoint")
    if mounted_fuse(mp) is not None:
        raise MountError(f"mountpoint {mp} is busy (already mounted)")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: FUSE is not available on this machine")
    if spec.upper is not None:
        # absolute: the daemon changes directory to / when it detaches
        spec.upper = os.path.abspath(spec.upper)
        if spec.work is None:
            up = spec.upper
            spec.work = os.path.join(os.path.dirname(up), f".{os.path.basename(up)}.layerfs-work")
        spec.work = os.path.abspath(spec.work)
    dirs = []
    if spec.upper is not None and spec.work is not None:
        dirs += [("upper directory", spec.upper, True), ("work directory", spec.work, True)]
    dirs += [("lower directory", d, True) for d in spec.lower_dirs]
    # the registry, a temporary upper directory and the file cache are in the store (a mount
    # point inside the store is fine: containers mount there)
    dirs.append(("the store", store.path, False))
    check_overlaps(mp, dirs)
    if spec.upper is not None and spec.work is not None:
        os.makedirs(spec.upper, exist_ok=True)
        os.makedirs(spec.work, exist_ok=True)
        if os.stat(spec.upper).st_dev != os.stat(spec.work).st_dev:
            raise MountError("the work directory must be on the same filesystem as the upper directory")
        # leftovers of an interrupted copy-up are never part of the tree
        for name in os.listdir(spec.work):
            with contextlib.suppress(OSError):
                p = os.path.join(spec.work, name)
                hosttree.remove(p)


def _init_upper_root(store: Store, chain: bytes, upper: str) -> None:
    """A new, empty upper directory takes the image root's owner, mode and times
    (its attributes are what the mount's root shows)."""
    if os.listdir(upper):
        return
    index = ChainIndex(store, chain)
    with store.read() as txn:
        root = index.node(txn, 1)
    os.chown(upper, root.uid, root.gid)
    os.chmod(upper, stat.S_IMODE(root.mode))
    os.utime(upper, ns=(root.mtime_ns, root.mtime_ns))


def _build_index(store: Store, layers: list[bytes]) -> bytes:
    """Build the merged index in a short-lived child process when it is not cached yet: the
    daemon is forked from this process, and must not inherit the heap a large build leaves."""
    from layerfs.store.store import chain_id

    chain = chain_id(layers)
    if index_ready(store, chain):
        return chain
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    store.close()  # never use an LMDB environment across fork: each side opens its own
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 1
        try:
            store.reopen()
            build(store, layers)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            with contextlib.suppress(OSError):
                os.write(write_fd, str(exc).encode(errors="replace")[:500])
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    store.reopen()
    if status != 0:
        raise MountError(f"building the merged index failed: {message or 'child exited with ' + str(status)}")
    return chain


def mount(store: Store, spec: MountSpec, *, foreground: bool = False, debug: bool = False) -> int:
    """Mount; returns the daemon's pid (or serves in the foreground until unmounted).

    The image is pinned from here on: the caller resolved its name a moment ago, and an rmi +
    gc meanwhile (or while the first mount builds the merged index) would leave a mount that
    lists every file and then fails every read.  This process's lease holds the layers until
    the daemon's own lease does."""
    from layerfs.store import StoreError

    try:
        lease_id = store.add_lease("mount", spec.layers, image_id=spec.image_id)
    except StoreError as exc:
        raise MountError(f"{exc} while it was being mounted") from None
    try:
        return _mount(store, spec, foreground=foreground, debug=debug)
    finally:
        _drop_lease(store, lease_id)


def _drop_lease(store: Store, lease_id: bytes) -> None:
    def drop(txn: Any) -> None:
        store.drop_lease(txn, lease_id)

    import lmdb

    from layerfs.store import StoreError

    with contextlib.suppress(Exception):  # (else gc reclaims it once this process is gone)
        try:
            store.write(drop)
        except (lmdb.Error, StoreError):  # closed before the daemon was forked: open it again
            store.reopen()
            store.write(drop)


def _mount(store: Store, spec: MountSpec, *, foreground: bool, debug: bool) -> int:
    chain = _build_index(store, spec.layers)
    prepare(store, spec)
    if spec.upper is not None:
        _init_upper_root(store, chain, spec.upper)
    mount_id = hashlib.sha256(os.path.realpath(spec.mountpoint).encode()).hexdigest()[:16]
    record = {
        "id": mount_id,
        "mountpoint": os.path.realpath(spec.mountpoint),
        "image": spec.image_id.hex(),
        "name": spec.name,
        "upper": spec.upper and os.path.abspath(spec.upper),
        "work": spec.work and os.path.abspath(spec.work),
        "temporary_upper": spec.temporary_upper,
        "created": time.time(),
    }
    store_path = store.path
    log = None if foreground else os.path.join(_registry(store), f"{mount_id}.log")
    if log:
        record["log"] = log
    store.close()
    return daemonize(
        lambda ready: _serve(store_path, spec, chain, record, ready, debug), foreground=foreground, log=log
    )


def error_text(exc: BaseException) -> str:
    """An error as one sentence: an OSError's own words, without Python's "[Errno N]"."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def daemonize(run: Callable[[Callable[[], None]], None], *, foreground: bool, log: str | None) -> int:
    """Run ``run(ready)`` in a daemon and return once it calls ``ready()`` (the mount is up),
    raising MountError with the daemon's error if it fails first.  In the foreground,
    ``run`` is simply called.  Returns the pid serving the mount.

    The daemon's stdout and stderr go to ``log`` (a new file: an earlier daemon of the same
    name may still be exiting), removed when the daemon exits if nothing was written to it."""
    if foreground:
        run(lambda: None)
        return os.getpid()
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        code = 0

        def ready() -> None:
            os.write(write_fd, b"ok")
            os.close(write_fd)

        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            if log:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(log)
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if log else devnull
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            run(ready)
        except BaseException as exc:  # noqa: BLE001 - report anything to the waiting parent
            with contextlib.suppress(OSError):
                os.write(write_fd, b"E" + error_text(exc).encode(errors="replace")[:500])
            code = 1
        finally:
            if log:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                    _drop_empty_log(log, os.fstat(2))
            os._exit(code)
    os.close(write_fd)
    msg = b""
    while True:
        chunk = os.read(read_fd, 1024)
        if not chunk:
            break
        msg += chunk
        if msg.startswith(b"ok"):
            break
    os.close(read_fd)
    if not msg.startswith(b"ok"):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        reason = msg[1:].decode(errors="replace") if msg else "the mount daemon exited without mounting"
        raise MountError(reason)
    return pid


def _serve(
    store_path: str,
    spec: MountSpec,
    chain: bytes,
    record: dict[str, Any],
    on_ready: Callable[[], None],
    debug: bool,
) -> None:
    from layerfs.fuse import serve
    from layerfs.store import Store
    from layerfs.union.view import UnionView

    store = Store(store_path)
    lease_id = store.add_lease("mount", spec.layers, image_id=spec.image_id)
    record = dict(record, pid=os.getpid(), start=procfs.start_time(os.getpid()), lease=lease_id.hex())
    reg = os.path.join(_registry(store), f"{record['id']}.json")
    image_layer = ChainLayer(store, ChainIndex(store, chain))
    lower: Lower = image_layer
    if spec.lower_dirs:  # host directories stacked above the image, leftmost on top
        lower = Stack(
            [*(DirLayer(os.path.realpath(d), i) for i, d in enumerate(spec.lower_dirs)), image_layer]
        )
    upper, work = spec.upper, spec.work
    if upper is not None and work is not None:  # under the mount's atime rule (privmount.py)
        upper, work = private_paths([upper, work], atime_attr(spec.mount_options))
    view = UnionView(store, lower, upper, work)
    view.label = f"image {spec.name or spec.image_id.hex()[:12]}"

    def ready() -> None:
        with open(reg, "w") as f:
            json.dump(record, f)
        on_ready()

    try:
        serve(
            view,
            spec.mountpoint,
            fsname=f"layerfs:{spec.name or spec.image_id.hex()[:12]}",
            allow_other=spec.allow_other,
            on_ready=ready,
            debug=debug,
            mount_options=spec.mount_options,
        )
    finally:
        with contextlib.suppress(Exception):
            store.write(lambda txn: store.drop_lease(txn, lease_id))
        with contextlib.suppress(OSError):
            os.unlink(reg)
        if spec.temporary_upper and spec.upper:
            with contextlib.suppress(OSError):
                hosttree.remove(os.path.dirname(os.path.abspath(spec.upper)))
        store.close()


def _drop_empty_log(log: str, own: os.stat_result | None = None) -> None:
    """Remove the daemon log ``log`` if it is empty (and, with ``own``, still that file)."""
    with contextlib.suppress(OSError):
        st = os.stat(log)
        if st.st_size == 0 and (own is None or (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)):
            os.unlink(log)


def mounts(store: Store) -> list[dict[str, Any]]:
    """Active mounts: those whose mountpoint is a layerfs mount served by a live daemon.  The
    records of the others are removed; a dead daemon's is let go of as ``umount`` would (its
    temporary upper directory, the pin of its image, an empty log), but its dead mount (every
    access: ENOTCONN) stays for ``umount`` to detach."""
    out = []
    for rec in sorted(_records(store), key=lambda r: str(r.get("mountpoint"))):
        fstype = mounted_fuse(rec["mountpoint"])
        if not _daemon_alive(rec):
            _forget(store, rec)
        elif fstype is None or not fstype.startswith("fuse.layerfs"):
            # detached (umount -l, fusermount -u): the daemon serves what is still open, and
            # removes the rest itself when it exits
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(_registry(store), f"{rec['id']}.json"))
        else:
            out.append(rec)
    return out


UMOUNT_TIMEOUT = 30.0  # seconds umount waits for the daemon to exit


def umount(store: Store, mountpoint: str, *, timeout: float = UMOUNT_TIMEOUT) -> str | None:
    """Unmount; also cleans up after a daemon that was killed (ENOTCONN mounts).

    Returns once the daemon has exited, so its lease is gone and ``gc`` can reclaim what only
    the mount pinned; or a warning for the user (None if all went well).  A busy mount is
    detached lazily (as ``umount -l``): its daemon serves the files still open until they are
    closed; if they still are after ``timeout`` seconds, MountError says so (the daemon is not
    killed under its readers, and cleans up itself).  A daemon still running ``timeout`` seconds
    after a complete unmount has nothing left to serve: it is killed (the warning says so)."""
    mp = os.path.realpath(mountpoint)
    fstype = mounted_fuse(mp)
    rec = next((r for r in _records(store) if r["mountpoint"] == mp), None)
    lazily = False  # detached while it may be busy: the daemon may still serve open files
    if fstype is None:
        if rec is None:
            raise MountError(f"{mountpoint} is not mounted")
        lazily = True  # detached by someone else (fusermount3 -u -z, umount -l)
    elif not fstype.startswith("fuse.layerfs"):
        raise MountError(f"{mountpoint} is a {fstype} mount, not a layerfs one")
    else:
        for attempt in range(4):
            res = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
            # busy for a moment (a stat or close still on its way out, on a loaded machine) is
            # worth a few short waits before detaching lazily, which leaves the daemon running
            if res.returncode == 0 or "busy" not in res.stderr:
                break
            time.sleep(0.05 * 2**attempt)
        if res.returncode != 0:
            # busy, or a dead daemon's "Transport endpoint is not connected": detach lazily
            lazy = subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, text=True)
            if lazy.returncode != 0:
                raise MountError(f"cannot unmount {mountpoint}: {res.stderr.strip() or lazy.stderr.strip()}")
            lazily = True
    if rec is None:
        return None
    warning = None
    pid = rec.get("pid")
    if pid and not _wait_exit(rec, timeout):
        if lazily:
            raise MountError(
                f"{mountpoint} is unmounted, but files opened through it are still in use: "
                f"its daemon (pid {pid}) serves them until they are closed"
            )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_exit(rec, 5.0)
        warning = (
            f"the daemon of {mountpoint} (pid {pid}) had not exited {timeout:g} s after the unmount: killed"
        )
    _forget(store, rec)
    return warning


def _forget(store: Store, rec: dict[str, Any]) -> None:
    """What a mount whose daemon is gone leaves: its record, its temporary upper directory, and
    the pin of its image (a killed daemon could not drop it; gc takes a zombie the init
    process has not reaped yet for a live process)."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(_registry(store), f"{rec['id']}.json"))
    if rec.get("temporary_upper") and rec.get("upper"):
        with contextlib.suppress(OSError):
            hosttree.remove(os.path.dirname(rec["upper"]))
    if rec.get("lease") and not store.readonly:
        lease_id = bytes.fromhex(rec["lease"])
        store.write(lambda txn: store.drop_lease(txn, lease_id))
    if rec.get("log"):
        _drop_empty_log(rec["log"])


def _wait_exit(rec: dict[str, Any], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the daemon of ``rec`` to exit; True once it has."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while _daemon_alive(rec):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def _records(store: Store) -> list[dict[str, Any]]:
    reg = _registry(store)
    out = []
    for name in os.listdir(reg):
        if name.endswith(".json"):
            with contextlib.suppress(OSError, ValueError), open(os.path.join(reg, name)) as f:
                out.append(json.load(f))
    return out


def _daemon_alive(rec: dict[str, Any]) -> bool:
    """Is the daemon of mount record ``rec`` running?  A record without a pid: assumed so."""
    pid = rec.get("pid")
    return pid is None or procfs.alive(pid, rec.get("start"))


__all__ = ["MountError", "MountSpec", "mount", "mounts", "umount"]
