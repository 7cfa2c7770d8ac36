"""FUSE adapters: serve a ``UnionView`` at a mount point.  Protocol only, no union rules.

Two cores serve the same view, as the tar parser has two backends:

* ``lowlevel`` drives the C request path (``layerfs._cfuse``) on the kernel's inode-based
  protocol: one kernel inode per object, READDIRPLUS, long cache timeouts;
* ``highlevel`` is the pure-Python twin on mfusepy (libfuse3's path-based API).

``LAYERFS_FUSE=c`` or ``python`` chooses; without it ``LAYERFS_IMPL`` (which also chooses the
tar parser) does: ``python`` selects the twin.  Unset, the C core serves (the twin where the
extension is not built).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from layerfs.union.view import UnionView

TRIM_EVERY = 4096  # lookups between checks of the store pages mapped into the daemon
TRIM_ABOVE = 8 << 20


def trim_store_map(view: UnionView) -> None:
    """A walk maps the store's B-tree pages into the daemon; past TRIM_ABOVE they are dropped
    from its resident set (they stay in the page cache).  Both cores call this."""
    if view.store is not None:
        view.store.trim_map_above(TRIM_ABOVE)


def core() -> str:
    """Which core serves mounts: ``c`` or ``python``."""
    choice = os.environ.get("LAYERFS_FUSE") or os.environ.get("LAYERFS_IMPL", "auto")
    if choice == "python":
        return "python"
    try:
        from layerfs import _cfuse  # noqa: F401
    except ImportError:
        return "python"
    return "c"


FUSE_DEVICE = os.makedev(10, 229)


def check_device() -> None:
    """Refuse, in one sentence that says what is needed, a /dev/fuse this process cannot use
    (libfuse said only "4", the kernel "Invalid argument")."""
    try:
        st = os.stat("/dev/fuse")
    except FileNotFoundError:
        raise OSError(
            errno.ENODEV, "/dev/fuse is missing: FUSE is not available here (modprobe fuse)"
        ) from None
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != FUSE_DEVICE:
        raise OSError(errno.ENODEV, "/dev/fuse is not the FUSE device (character device 10:229)")
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise OSError(
            errno.EACCES,
            "no access to /dev/fuse: mount as root, or give this user read and write access to "
            "/dev/fuse (and have fusermount3 installed setuid root, as the fuse3 package does)",
        )


def serve(view: UnionView, mountpoint: str, **options: Any) -> None:
    """Mount ``view`` at ``mountpoint`` and serve it until unmounted, with the selected core;
    ``options`` as ``layerfs.fuse.lowlevel.serve`` documents them (both cores take the same)."""
    check_device()
    if core() == "c":
        from layerfs.fuse import lowlevel as impl
    else:
        from layerfs.fuse import highlevel as impl  # type: ignore[no-redef]
    impl.serve(view, mountpoint, **options)
