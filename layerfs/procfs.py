"""What /proc says that layerfs relies on: whether a process still lives, and what is mounted.

A process is named by its pid and its start time (clock ticks since boot, field 22 of
``/proc/PID/stat``), and by the boot it ran in (``boot_id``): a pid alone may be reused by
another process after the first one died, a start time is not reused within one boot.
Records that outlive their writer (store leases, mount records, a container's waiting process)
keep all three (``identity``) and ask ``is_alive`` later.  A zombie counts as gone: killed, it
holds nothing, and its parent may take seconds to reap it.

The start time is read as the kernel writes it, through a directory descriptor of ``/proc``
and a relative ``PID/stat``, never as ``/proc/self/stat``: qemu-user answers an emulated
process's reads of ``/proc/self/stat`` and ``/proc/<its own pid>/stat`` itself, with a start
time of its own making (a tick or more after the kernel's, and in a forked child, which
daemons are, its parent's: seconds off), so every lease and mount record an emulated process
wrote about itself looked dead to the next ``gc``, which deleted layers in use.  qemu rewrites
only those absolute paths; the relative read gets the kernel's value, the one every other
process sees, so the times still match exactly.

``mountinfo`` parses ``/proc/self/mountinfo``: mount points unescaped, in the kernel's order
(a mount stacked over another comes after it).  Reading it never touches a mount point, so it
works on a mount whose daemon hangs.  Stateless, so safe from any thread.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if it is gone or a zombie.
    Its first thread may be a zombie while others run (it ended first, or the process is
    being killed and its other threads are still exiting): that process is not gone yet."""
    try:
        proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = os.open(f"{pid}/stat", os.O_RDONLY, dir_fd=proc)  # not /proc/self: docstring
        finally:
            os.close(proc)
        try:
            stat = os.read(fd, 65536)
        finally:
            os.close(fd)
    except OSError:
        return None
    fields = _stat_fields(stat)
    if fields[0] in _ENDED and not _other_thread_runs(pid):
        return None
    return int(fields[19])


_ENDED = (b"Z", b"X")  # zombie, dead


def _stat_fields(stat: bytes) -> list[bytes]:
    """A /proc stat line's fields from the state on: the command name may hold spaces and
    parentheses, so they start after the last ')'."""
    return stat[stat.rindex(b")") + 2 :].split()


def _other_thread_runs(pid: int) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                if _stat_fields(f.read())[0] not in _ENDED:
                    return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def alive(pid: int, start: int | None = None) -> bool:
    """Running (not a zombie), and when ``start`` is given, still the process that started then."""
    found = start_time(pid)
    return found is not None and (start is None or found == start)


def boot_id() -> str:
    """This boot's id ("" where the kernel does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def identity(pid: int) -> dict[str, Any]:
    """What a record keeps to find process ``pid`` again: ``pid``, ``start``, ``boot``."""
    return {"pid": pid, "start": start_time(pid), "boot": boot_id()}


def is_alive(record: dict[str, Any]) -> bool:
    """Is the process a record's ``identity`` fields name still running, in this boot?"""
    if record.get("boot") != boot_id():
        return False
    found = start_time(int(record.get("pid", 0)))
    return found is not None and found == record.get("start")


class Mount(NamedTuple):
    """One line of /proc/self/mountinfo (see proc(5))."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor"
    root: str  # the directory of the filesystem mounted there
    mountpoint: str  # unescaped
    options: str  # per-mount options (ro, nosuid, ...)
    fstype: str  # e.g. "fuse.layerfs"
    source: str
    super_options: str


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in paths as octal escapes."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mountinfo() -> list[Mount]:
    """The mounts this process sees, in the kernel's order."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)  # optional fields (shared:N ...) come before the "-"
            out.append(
                Mount(
                    int(fields[0]),
                    int(fields[1]),
                    fields[2],
                    _unescape(fields[3]),
                    _unescape(fields[4]),
                    fields[5],
                    fields[sep + 1],
                    _unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
                    fields[sep + 3] if len(fields) > sep + 3 else "",
                )
            )
    return out


def mounts_on(path: str, *, resolved: bool = False) -> list[Mount]:
    """What is mounted on ``path``, bottom first; empty if it is no mount point.

    ``path`` is resolved with realpath first, which looks at the mount point itself and waits
    for its daemon; ``resolved``: it already is (a look at a hung mount would never return)."""
    target = path if resolved else os.path.realpath(path)
    return [m for m in mountinfo() if m.mountpoint == target]


def mounts_below(directory: str) -> list[Mount]:
    """The mounts strictly inside ``directory``."""
    base = os.path.realpath(directory).rstrip("/") + "/"
    return [m for m in mountinfo() if m.mountpoint.startswith(base)]
