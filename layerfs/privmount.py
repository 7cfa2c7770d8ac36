"""The upper directory through a private mount of its own, with the union mount's atime rules.

Every inode of a FUSE mount carries S_NOATIME: the kernel leaves access times to the daemon,
and the daemon's reads (and the kernel's passthrough reads, which use the daemon's descriptors)
follow the atime rule of the mount the *upper directory* sits on, not the one the user gave to
the union mount (``-o noatime``, ``strictatime``, ``nodiratime``).  The kernel overlay
solves the same problem by taking a private clone of the upper mount and applying the overlay
mount's atime flags to it; this does the same from user space: ``open_tree(OPEN_TREE_CLONE)``
makes a detached copy of the directory holding the upper and work directories (same file
system, same inodes: renames between them still work), ``mount_setattr`` sets its atime
rule, and the view reaches both through ``/proc/self/fd/N/...``.

Both calls need CAP_SYS_ADMIN (and Linux 5.12).  Without them the paths stay as given and the
host mount's rule applies, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

# syscall numbers of the calls added after 4.20 are the same on every architecture but alpha
_OPEN_TREE, _MOUNT_SETATTR = 428, 442
_AT_FDCWD, _AT_EMPTY_PATH = -100, 0x1000
_OPEN_TREE_CLONE = 1
MOUNT_ATTR_NOATIME, MOUNT_ATTR_STRICTATIME, MOUNT_ATTR_NODIRATIME = 0x10, 0x20, 0x80
MOUNT_ATTR_RELATIME = 0
_MOUNT_ATTR__ATIME = 0x70
_MOUNT_ATTR = struct.Struct("=QQQQ")  # attr_set, attr_clr, propagation, userns_fd

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def atime_attr(mount_options: dict[str, bool]) -> int:
    """The MOUNT_ATTR_* atime bits for a union mount's options (the names of
    ``layerfs.fuse.lowlevel._FLAGS``: ``atime``/``diratime`` False for no-, ``strictatime``,
    ``relatime``)."""
    if mount_options.get("atime") is False:
        attr = MOUNT_ATTR_NOATIME
    elif mount_options.get("strictatime"):
        attr = MOUNT_ATTR_STRICTATIME
    else:
        attr = MOUNT_ATTR_RELATIME  # the default of every new mount, the union's too
    if mount_options.get("diratime") is False:
        attr |= MOUNT_ATTR_NODIRATIME
    return attr


def private_paths(paths: list[str], attr: int) -> list[str]:
    """``paths`` (directories of one mount) through a private clone of their common ancestor
    with the atime rule ``attr`` (its descriptor stays open for the life of the process: the
    paths name it); ``paths`` unchanged where that cannot be done."""
    real = [os.path.realpath(p) for p in paths]
    common = os.path.commonpath(real)
    path = os.fsencode(common)
    fd = _libc.syscall(_OPEN_TREE, _AT_FDCWD, path, _OPEN_TREE_CLONE | os.O_CLOEXEC)
    if fd < 0:
        return paths
    fd = int(fd)
    arg = ctypes.create_string_buffer(
        _MOUNT_ATTR.pack(attr, _MOUNT_ATTR__ATIME | MOUNT_ATTR_NODIRATIME, 0, 0)
    )
    if _libc.syscall(_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, arg, _MOUNT_ATTR.size) < 0:
        os.close(fd)
        return paths
    # ("/." for the clone's root itself: an lstat of the bare magic link sees the link)
    out = [f"/proc/self/fd/{fd}/" + (os.path.relpath(r, common) if r != common else ".") for r in real]
    # the clone must show the very same directories (a path crossing another mount would not)
    for old, new in zip(real, out, strict=True):
        a, b = os.stat(old), os.stat(new)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            os.close(fd)
            return paths
    return out
