"""Directory trees on the host, walked and removed without recursion.

An image or a container decides how deep its directories go: Python's recursion limit (about a
thousand frames) and PATH_MAX (4096 bytes) are both smaller than what a layer may hold.  So
nothing here recurses, and ``remove`` works relative to directory descriptors (one open at a
time, climbing back through ``..`` checked against the inode it left), so that a tree deeper
than PATH_MAX goes as well.  ``walk`` is ``os.walk`` (top-down, errors skipped) as an explicit
stack; its paths are ordinary paths, so it reaches as deep as PATH_MAX allows.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from typing import AnyStr

RETRIES = 5  # a directory written into while it is being removed is gone through again
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def walk(top: AnyStr) -> Iterator[tuple[AnyStr, list[AnyStr], list[AnyStr]]]:
    """``os.walk(top)`` without recursion: (dirpath, dirnames, filenames), parents first;
    symlinks to directories are listed as files and not followed; unreadable directories
    are skipped.  Changing ``dirnames`` in place prunes the walk, as with ``os.walk``."""
    stack = [top]
    while stack:
        here = stack.pop()
        dirs: list[AnyStr] = []
        files: list[AnyStr] = []
        try:
            with os.scandir(here) as it:
                for e in it:
                    try:
                        is_dir = e.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    (dirs if is_dir else files).append(e.name)
        except OSError:
            continue
        yield here, dirs, files
        stack.extend(os.path.join(here, d) for d in reversed(dirs))


def remove(path: str | bytes) -> None:
    """Remove ``path`` and everything below it (a file or symlink is just unlinked); a missing
    ``path`` is fine.  Symlinks are never followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    for attempt in range(RETRIES):
        fd = os.open(path, _DIR_FLAGS)
        try:
            _empty(fd)
        finally:
            os.close(fd)
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:  # something wrote into it meanwhile: empty it again
            if exc.errno != errno.ENOTEMPTY or attempt == RETRIES - 1:
                raise


def empty(path: str | bytes) -> None:
    """Remove everything inside the directory ``path``, keeping it."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        _empty(fd)
    finally:
        os.close(fd)


def _empty(top: int) -> None:
    """Remove everything inside the directory open as ``top`` (the descriptor stays the caller's)."""
    fd = os.dup(top)
    # per level below ``top``: (its name in the parent, the parent's (dev, ino), names left)
    trail: list[tuple[str, tuple[int, int], list[str]]] = []
    left = _names(fd)
    retried: dict[str, int] = {}
    try:
        while True:
            if left:
                name = left.pop()
                try:
                    st = os.lstat(name, dir_fd=fd)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    _unlink(name, fd)
                    continue
                here = os.fstat(fd)
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                trail.append((name, (here.st_dev, here.st_ino), left))
                left = _names(fd)
                continue
            if not trail:
                return
            name, parent_id, left = trail.pop()
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != parent_id:  # moved while we were below it
                raise OSError(f"{name}: its directory moved during removal")
            try:
                os.rmdir(name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError as exc:  # something wrote into it meanwhile: go through it again
                retried[name] = retried.get(name, 0) + 1
                if exc.errno != errno.ENOTEMPTY or retried[name] >= RETRIES:
                    raise
                left.append(name)
    finally:
        os.close(fd)


def _names(fd: int) -> list[str]:
    with os.scandir(fd) as it:
        return [e.name for e in it]


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
