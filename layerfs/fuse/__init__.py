"""FUSE adapters: serve a ``UnionView`` at a mount point.  Protocol only, no union rules.

Two cores serve the same view, as the tar parser has two backends:

* ``lowlevel`` drives the C request path (``layerfs._cfuse``) on the kernel's inode-based
  protocol: one kernel inode per object, READDIRPLUS, long cache timeouts;
* ``highlevel`` is the pure-Python twin on mfusepy (libfuse3's path-based API).

``LAYERFS_FUSE=c`` or ``python`` chooses; without it ``LAYERFS_IMPL`` (which also chooses the
tar parser) does: ``python`` selects the twin, ``c`` the C core.  Unset, the twin serves while
the C core is young.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from layerfs.union.view import UnionView


def core() -> str:
    """Which core serves mounts: ``c`` or ``python``."""
    choice = os.environ.get("LAYERFS_FUSE") or os.environ.get("LAYERFS_IMPL", "auto")
    if choice != "c":
        return "python"
    try:
        from layerfs import _cfuse  # noqa: F401
    except ImportError:
        return "python"
    return "c"


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
    if core() == "c":
        from layerfs.fuse import lowlevel as impl
    else:
        from layerfs.fuse import highlevel as impl  # type: ignore[no-redef]
    impl.serve(
        view,
        mountpoint,
        fsname=fsname,
        allow_other=allow_other,
        on_ready=on_ready,
        debug=debug,
        subtype=subtype,
        mount_options=mount_options,
    )
