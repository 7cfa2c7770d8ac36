"""The store's file cache: whole decompressed copies of stored files, for the kernel to read.

Writable mounts of a stored image open a lower file's copy from here and hand it to the kernel
(FUSE passthrough), so reading it again costs no decompression and no daemon round trip.  The
C core fills and evicts it (ext/filecache.h has the format: one flat directory, a file per
object named by its hex id); this module owns where it is, how large it may grow, and dropping
copies whose object the store no longer holds (``gc``).

``LAYERFS_FILE_CACHE`` sets the bound (``0`` turns the cache off; ``512M``, ``4G``, bytes); by
default it is 2 GiB, and never more than a quarter of the space free on the store's
filesystem when the mount starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

DIRNAME = "filecache"
DEFAULT_BOUND = 2 << 30
MIN_SIZE = 1 << 20  # smaller files take one READ from the store: a copy would not pay
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NAME = re.compile(r"[0-9a-f]{64}")


def directory(store_path: str) -> str:
    return os.path.join(store_path, DIRNAME)


def parse_size(text: str) -> int:
    """``1048576``, ``512K``, ``64M``, ``2G`` (binary units, an optional ``B`` or ``iB``)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (say 0, 512M or 2G)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def bound(store_path: str) -> int:
    """The cache's size bound for a mount starting now (0: no cache)."""
    setting = os.environ.get("LAYERFS_FILE_CACHE")
    if setting is not None:
        return parse_size(setting)
    try:
        st = os.statvfs(store_path)
    except OSError:
        return 0
    return min(DEFAULT_BOUND, st.f_bavail * st.f_frsize // 4)


def prune(store_path: str, alive: Callable[[bytes], bool]) -> tuple[int, int]:
    """Remove copies whose object is not ``alive``: (files, bytes) removed.  A mount reading a
    removed copy keeps its open descriptor."""
    root = directory(store_path)
    files = size = 0
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return 0, 0
    for e in entries:
        if not _NAME.fullmatch(e.name) or alive(bytes.fromhex(e.name)):
            continue
        try:
            n = e.stat(follow_symlinks=False).st_size
            os.unlink(e.path)
        except FileNotFoundError:
            continue
        files += 1
        size += n
    return files, size
