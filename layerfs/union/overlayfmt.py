"""The overlay directory format: how a host directory says what it hides of the layers below.

The kernel's overlay filesystem defines it, and everything here reads or writes it: the union
view's upper directory, the directory layers of ``layerfs-overlay`` and ``--lower``, and the
change scan of ``diff`` and ``commit``.

* A whiteout (a name deleted from the layers below) is a 0/0 character device; where mknod is
  refused (an unprivileged daemon) a ``.wh.<name>`` file, the OCI name for the same thing.
* An opaque directory (one that shows nothing of the layers below) carries
  ``trusted.overlay.opaque=y``, else ``user.overlay.opaque=y``, else a ``.wh..wh..opq`` file.
* ``*.overlay.*`` and ``*.layerfs.*`` xattrs are bookkeeping (opaque flags, the inode number a
  copied-up file keeps), never shown as a file's attributes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from layerfs import hosttree
from layerfs.tar.whiteouts import OPAQUE_MARKER, WHITEOUT_PREFIX

WH_PREFIX = WHITEOUT_PREFIX  # the fallback whiteout's prefix (.wh.), the OCI name
OPAQUE_FILE = OPAQUE_MARKER  # the fallback opaque marker (.wh..wh..opq)
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"trusted.layerfs.", b"user.layerfs.")


def is_whiteout(st: os.stat_result) -> bool:
    """A whiteout in the kernel's format: a 0/0 character device."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque_dir(path: bytes) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return os.path.lexists(os.path.join(path, OPAQUE_FILE))


def set_opaque(path: bytes) -> None:
    """Mark directory ``path`` opaque: the kernel's xattr where we may set it, else a fallback."""
    try:
        os.setxattr(path, OPAQUE_XATTRS[0], b"y")
    except PermissionError:
        try:
            os.setxattr(path, OPAQUE_XATTRS[1], b"y")
        except OSError:
            with open(os.path.join(path, OPAQUE_FILE), "wb"):
                pass


def drop_whiteouts(path: bytes) -> None:
    """Remove the whiteouts of a tree about to become opaque: the kernel lists the entries of a
    directory that merges nothing as they are, whiteouts included."""
    for here, _dirs, files in hosttree.walk(path):
        for name in files:
            p = os.path.join(here, name)
            if name.startswith(WH_PREFIX) and name != OPAQUE_FILE:
                os.unlink(p)
            elif is_whiteout(os.lstat(p)):
                os.unlink(p)


class UpperItem(NamedTuple):
    path: bytes  # relative to the scanned directory
    st: os.stat_result
    whiteout: bool  # hides ``path`` in the layers below
    opaque: bool  # a directory hiding the layers' directory at ``path``


def scan(upper: str | bytes, skip: Iterable[bytes] = ()) -> Iterator[UpperItem]:
    """A directory in the overlay format, parents first, siblings by name, each entry as what it
    means to the layers below; ``skip``: top-level directories left out while empty (mount
    points a container runtime made)."""
    root = os.fsencode(upper)
    skipped = set(skip)

    def listing(rel: bytes) -> Iterator[tuple[bytes, UpperItem | None]]:
        """A directory's items by name; (path, None) after a directory's own item: descend."""
        host = os.path.join(root, rel) if rel else root
        names = sorted(os.listdir(host))
        fallback_whiteouts = {
            n[len(WH_PREFIX) :] for n in names if n.startswith(WH_PREFIX) and n != OPAQUE_FILE
        }
        for name in names:
            if name == OPAQUE_FILE:
                continue
            path = rel + b"/" + name if rel else name
            if name.startswith(WH_PREFIX):
                target = name[len(WH_PREFIX) :]
                tpath = rel + b"/" + target if rel else target
                yield tpath, UpperItem(tpath, os.lstat(os.path.join(root, path)), True, False)
                continue
            if name in fallback_whiteouts:
                continue  # the .wh. file says deleted; a stale entry beside it does not count
            st = os.lstat(os.path.join(root, path))
            if (
                not rel
                and name in skipped
                and stat.S_ISDIR(st.st_mode)
                and not os.listdir(os.path.join(root, path))
            ):
                continue
            if is_whiteout(st):
                yield path, UpperItem(path, st, True, False)
            elif stat.S_ISDIR(st.st_mode):
                yield path, UpperItem(path, st, False, is_opaque_dir(os.path.join(root, path)))
                yield path, None
            else:
                yield path, UpperItem(path, st, False, False)

    # depth first with a stack of listings, not recursion: the tree decides the depth
    stack = [listing(b"")]
    while stack:
        for path, item in stack[-1]:
            if item is None:
                stack.append(listing(path))
                break
            yield item
        else:
            stack.pop()
