"""What 32-bit userlands (armhf boards) got wrong through a mount, with each FUSE core.

These pass on 64-bit machines as they did; the emulated CI job (``.ci/emulated``) runs them on
arm64 and armhf under qemu-user, where they failed: post-2038 times made lstat fail with EINVAL
through the mfusepy core, and its statvfs said names of 0 bytes.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import make_layout, member, tar_bytes
from unionutil import layerfs_mount, need_fuse, no_mount_left_behind  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("need_fuse", "fuse_core")

FUTURE = 2_209_032_000  # 2040-01-01, after a 32-bit time_t ends (2038-01-19 03:14:07)
INT32_MAX = (1 << 31) - 1
BIG = hashlib.sha256(b"big").digest() * 10_000  # 320 KiB: several chunks


def _statx_mtime(path: str) -> int:
    """The file's mtime in seconds from statx(2), which has 64-bit times whatever time_t is."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "statx"):
        pytest.skip("no statx in this C library")
    buf = ctypes.create_string_buffer(256)
    at_fdcwd, at_symlink_nofollow, statx_mtime = -100, 0x100, 0x40
    if libc.statx(at_fdcwd, os.fsencode(path), at_symlink_nofollow, statx_mtime, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    (seconds,) = struct.unpack_from("=q", buf, 112)  # struct statx: stx_mtime.tv_sec
    return int(seconds)


@pytest.fixture
def image(cli: Callable[..., Any], tmp_path: Path) -> str:
    layer = tar_bytes(
        [
            member("dir", kind=tarfile.DIRTYPE, mode=0o755),
            member("dir/future", b"from 2040\n", mtime=FUTURE),
            member("dir/big", BIG),
            member("dir/link", kind=tarfile.SYMTYPE, link="future"),
            member("now", b"today\n"),
        ]
    )
    cli("import", "-q", make_layout(tmp_path / "layout", [layer], ref="arch32:1"))
    return "arch32:1"


def test_a_file_from_after_2038(cli, image, tmp_path, fuse_core):
    """lstat never fails with EINVAL: it gives the time, or, where this userland's time_t cannot
    hold it, EOVERFLOW as for such a file on any filesystem; statx gives the stored time (the
    mfusepy core, through a libfuse with a 32-bit time_t, the latest time that holds)."""
    with layerfs_mount(cli, image, str(tmp_path / "m")) as mnt:
        path = os.path.join(mnt, "dir/future")
        try:
            seen = os.lstat(path).st_mtime
        except OSError as exc:
            assert exc.errno == errno.EOVERFLOW, exc
        else:
            assert seen in (FUTURE, INT32_MAX), seen
        narrow = fuse_core == "python" and ctypes.sizeof(getattr(ctypes, "c_time_t", ctypes.c_long)) == 4
        assert _statx_mtime(path) == (INT32_MAX if narrow else FUTURE)
        with open(path, "rb") as f:
            assert f.read() == b"from 2040\n"


def test_statvfs_names_and_sizes(cli, image, tmp_path, fuse_core):
    with layerfs_mount(cli, image, str(tmp_path / "m")) as mnt:
        st = os.statvfs(mnt)
        assert st.f_namemax == 255
        assert st.f_bsize == st.f_frsize == 4096
        assert st.f_blocks * st.f_bsize >= len(BIG)
        assert st.f_files == 6  # the root and five entries


def test_walk_and_read(cli, image, tmp_path, fuse_core):
    with layerfs_mount(cli, image, str(tmp_path / "m")) as mnt:
        seen = {}
        for top, dirs, files in os.walk(mnt):
            for name in dirs + files:
                path = os.path.join(top, name)
                try:
                    seen[os.path.relpath(path, mnt)] = os.lstat(path).st_mode
                except OSError as exc:  # a 32-bit time_t cannot hold its 2040 (test above)
                    assert exc.errno == errno.EOVERFLOW and name == "future", exc
                    seen[os.path.relpath(path, mnt)] = 0
        assert sorted(seen) == ["dir", "dir/big", "dir/future", "dir/link", "now"]
        assert os.readlink(os.path.join(mnt, "dir/link")) == "future"
        with open(os.path.join(mnt, "dir/big"), "rb") as f:
            assert f.read() == BIG
            f.seek(200_000)  # a read in the middle of a chunk, at an offset past 64 KiB
            assert f.read(4096) == BIG[200_000:204_096]
        assert Path(mnt, "now").read_bytes() == b"today\n"
