"""POSIX behaviour an outside conformance suite checked, each as a small repro on
``layerfs-overlay`` (both FUSE cores) and, where the kernel overlay is the reference, on it too.

Every test here failed before its fix: paths past PATH_MAX in the upper directory, stale link
counts of hardlinked special files, O_DIRECT, root mounts without allow_other, ``-o ro``
hiding the upper layer, fstat of a directory renamed over, fallocate modes, atime options,
default and access ACLs, O_TMPFILE.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import pytest
from unionutil import force_unmount, fuse_unavailable, kernel_overlay, mounted, overlay_unavailable

pytestmark = pytest.mark.usefixtures("fuse_core")

HELPER = [sys.executable, "-m", "layerfs.overlay"]
T = TypeVar("T")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 16


@dataclass
class Dirs:
    lower: str
    upper: str
    work: str
    mnt: str


@pytest.fixture
def dirs(tmp_path) -> Dirs:
    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    d = Dirs(*(str(tmp_path / n) for n in ("lower", "upper", "work", "mnt")))
    for p in (d.lower, d.upper, d.work, d.mnt):
        os.makedirs(p)
    with open(os.path.join(d.lower, "file"), "wb") as f:
        f.write(b"lower data\n" * 1000)
    os.mkdir(os.path.join(d.lower, "dir"))
    return d


@contextmanager
def overlay(d: Dirs, extra: str = "", upper: bool = True) -> Iterator[str]:
    o = f"lowerdir={d.lower}" + (f",upperdir={d.upper},workdir={d.work}" if upper else "")
    o += "," + extra if extra else ""
    res = subprocess.run([*HELPER, "-o", o, d.mnt], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        assert mounted(d.mnt)
        yield d.mnt
    finally:
        subprocess.run(["fusermount3", "-u", d.mnt], capture_output=True)
        force_unmount(d.mnt)


def test_paths_longer_than_path_max(dirs: Dirs) -> None:
    """A tree deeper than PATH_MAX bytes in total, made and used through the mount (the kernel
    works relative to directories; joining the upper directory and the path gave ENAMETOOLONG)."""
    with overlay(dirs) as mnt:
        os.chdir(mnt)
        try:
            # 24 levels of 250-byte names (6 KB), made 16 at a time from a directory half-way in
            os.makedirs("/".join(["x" * 250] * 16))
            os.chdir("/".join(["x" * 250] * 8))
            deep = "/".join(["x" * 250] * 16)
            os.makedirs(deep, exist_ok=True)
            with open(os.path.join(deep, "f"), "w") as f:
                f.write("deep")
            with open(os.path.join(deep, "f")) as f:
                assert f.read() == "deep"
            os.rename(os.path.join(deep, "f"), os.path.join(deep, "g"))
            assert os.listdir(deep) == ["g"]
            os.symlink("g", os.path.join(deep, "link"))
            assert os.readlink(os.path.join(deep, "link")) == "g"
            os.unlink(os.path.join(deep, "g"))
        finally:
            os.chdir("/")
        # the upper directory holds the tree in the kernel's format
        fd = os.open(dirs.upper, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(24):
                nxt = os.open("x" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nxt
            assert os.listdir(fd) == ["link"]
        finally:
            os.close(fd)


def test_hardlinked_special_files_share_attributes(dirs: Dirs, fuse_core: str) -> None:
    """``mkfifo p && ln p q && stat -c %h p`` prints 2 at once: one inode per object."""
    if fuse_core == "python":
        pytest.skip("the high-level twin gives each name its own kernel inode (cached ~1 s)")
    with overlay(dirs) as mnt:
        p, q = os.path.join(mnt, "p"), os.path.join(mnt, "q")
        os.mkfifo(p)
        assert os.lstat(p).st_nlink == 1
        os.link(p, q)
        assert os.lstat(p).st_nlink == 2 and os.lstat(q).st_nlink == 2
        os.chmod(q, 0o600)
        assert os.lstat(p).st_mode & 0o777 == 0o600
        os.unlink(q)
        assert os.lstat(p).st_nlink == 1
        os.symlink("target", os.path.join(mnt, "s"))
        os.link(os.path.join(mnt, "s"), os.path.join(mnt, "s2"))
        assert os.lstat(os.path.join(mnt, "s")).st_nlink == 2


def test_o_direct(dirs: Dirs) -> None:
    """``dd oflag=direct`` / ``iflag=direct`` on upper files (EINVAL before)."""
    with overlay(dirs) as mnt:
        target = os.path.join(mnt, "od")
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={target}", "bs=4096", "count=4", "oflag=direct"],
            check=True,
            capture_output=True,
        )
        assert os.path.getsize(target) == 16384
        out = subprocess.run(
            ["dd", f"if={target}", "of=/dev/null", "bs=4096", "iflag=direct"], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        # a lower file opened for direct writing is copied up first
        lower = os.path.join(mnt, "file")
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={lower}", "bs=4096", "count=1", "oflag=direct", "conv=notrunc"],
            check=True,
            capture_output=True,
        )
        with open(lower, "rb") as f:
            data = f.read()
        assert data[:4096] == bytes(4096) and data[4096:] == (b"lower data\n" * 1000)[4096:]


def test_root_mount_is_for_every_user(dirs: Dirs) -> None:
    """As fuse-overlayfs: run by root, the mount implies allow_other (EACCES for others before)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    # pytest's temporary directories are private to root: mount where another user can look
    dirs.mnt = tempfile.mkdtemp(prefix="layerfs-allow-other-")
    os.chmod(dirs.mnt, 0o755)
    try:
        with overlay(dirs) as mnt:
            out = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", f"{mnt}/file"],
                capture_output=True,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout == b"lower data\n" * 1000
    finally:
        os.rmdir(dirs.mnt)


def test_read_only_mount_shows_the_upper_layer(dirs: Dirs) -> None:
    """``-o ro`` with an upperdir shows the upper layer read-only (it hid it before)."""
    with open(os.path.join(dirs.upper, "from-upper"), "w") as f:
        f.write("up")
    os.mknod(os.path.join(dirs.upper, "dir"), 0o20000, os.makedev(0, 0))  # a whiteout
    with overlay(dirs, "ro") as mnt:
        assert sorted(os.listdir(mnt)) == ["file", "from-upper"]
        with pytest.raises(OSError) as exc:
            open(os.path.join(mnt, "new"), "w")
        assert exc.value.errno == errno.EROFS


def test_fstat_of_a_directory_renamed_over(dirs: Dirs, fuse_core: str) -> None:
    """The kernel answers with st_nlink 0 (ESTALE before)."""
    if fuse_core == "python":
        pytest.skip("the high-level twin has no inode for a path that is gone")
    with overlay(dirs) as mnt:
        a, b = os.path.join(mnt, "a"), os.path.join(mnt, "b")
        os.mkdir(a)
        os.mkdir(b)
        fd = os.open(a, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rename(b, a)
            st = os.fstat(fd)
            assert st.st_nlink == 0
        finally:
            os.close(fd)


def ours_and_the_kernels(
    dirs: Dirs, tmp_path, fuse_core: str, results: Callable[[str], T], twin_lacks: str
) -> tuple[T, T]:
    """``results`` of the mount root on layerfs-overlay and on the kernel overlay of the same
    lower directory (skipped on the twin, which lacks ``twin_lacks``, or without the kernel's)."""
    if fuse_core == "python":
        pytest.skip(f"the high-level twin {twin_lacks}")
    if overlay_unavailable(str(tmp_path)):
        pytest.skip(overlay_unavailable(str(tmp_path)))
    with overlay(dirs) as mnt:
        ours = results(mnt)
    k = tmp_path / "k"
    with kernel_overlay([dirs.lower], str(k / "upper"), str(k / "work"), str(k / "mnt")) as mnt:
        theirs = results(mnt)
    return ours, theirs


def _fallocate(path: str, mode: int, offset: int, length: int) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            return ctypes.get_errno()
        return 0
    finally:
        os.close(fd)


def _fallocate_results(root: str) -> list[tuple[str, int, int, bytes]]:
    out = []
    for name, mode in (
        ("plain", 0),
        ("keep", FALLOC_FL_KEEP_SIZE),
        ("punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE),
        ("zero", FALLOC_FL_ZERO_RANGE),
    ):
        p = os.path.join(root, name)
        with open(p, "wb") as f:
            f.write(b"z" * 20000)
        err = _fallocate(p, mode, 4096, 8192 if mode != FALLOC_FL_KEEP_SIZE else 40000)
        with open(p, "rb") as f:
            data = f.read()
        out.append((name, err, os.path.getsize(p), data))
    return out


def test_fallocate_modes_match_the_kernel(dirs: Dirs, tmp_path, fuse_core: str) -> None:
    """Punch hole, zero range and keep size as the kernel overlay does them (EOPNOTSUPP before).
    Collapse and insert range are refused by the kernel's FUSE module itself, for every server."""
    ours, theirs = ours_and_the_kernels(
        dirs, tmp_path, fuse_core, _fallocate_results, "passes only mode 0 on (os.posix_fallocate)"
    )
    assert ours == theirs
    assert all(err == 0 for _, err, _, _ in ours)


def test_atime_options_reach_the_mount(dirs: Dirs, fuse_core: str) -> None:
    with overlay(dirs, "noatime,nodiratime") as mnt, open("/proc/self/mountinfo") as f:
        flags = next(x for x in f if f" {os.path.realpath(mnt)} " in x).split()[5].split(",")
    assert "noatime" in flags
    if fuse_core == "c":  # libfuse 3.14, under the twin, knows no nodiratime: left out there
        assert "nodiratime" in flags
    with overlay(dirs, "strictatime") as mnt, open("/proc/self/mountinfo") as f:
        flags = next(x for x in f if f" {os.path.realpath(mnt)} " in x).split()[5].split(",")
    assert "relatime" not in flags or fuse_core == "python"


def test_upper_files_are_read_and_written_by_the_kernel(dirs: Dirs, fuse_core: str) -> None:
    """FUSE passthrough: once an upper file is open, its reads and writes go from the kernel to
    the host file; no READ or WRITE request reaches the daemon (its --debug log lists each)."""
    if fuse_core == "python" or os.geteuid() != 0:
        pytest.skip("passthrough is the C core's, for a privileged daemon")
    log_path = os.path.join(os.path.dirname(dirs.mnt), "daemon.log")
    opts = f"lowerdir={dirs.lower},upperdir={dirs.upper},workdir={dirs.work}"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            [*HELPER, "-d", "-o", opts, dirs.mnt], stderr=log, stdout=subprocess.DEVNULL
        )
        try:
            for _ in range(500):
                if mounted(dirs.mnt):
                    break
                time.sleep(0.01)
            data = os.urandom(1 << 20) * 4
            with open(os.path.join(dirs.mnt, "big"), "wb") as f:
                f.write(data)
            with open(os.path.join(dirs.mnt, "big"), "rb") as f:
                assert f.read() == data
            with open(os.path.join(dirs.mnt, "file"), "r+b") as f:  # copied up, then passed through
                f.write(b"LOWER")
            with open(os.path.join(dirs.upper, "file"), "rb") as f:
                assert f.read(11) == b"LOWER data\n"
        finally:
            subprocess.run(["fusermount3", "-u", dirs.mnt], capture_output=True)
            force_unmount(dirs.mnt)
            daemon.wait(timeout=30)
    with open(log_path) as f:
        ops = [line.split()[2] for line in f if line.startswith("layerfs: op ")]
    assert ops.count("16") == 0 and ops.count("15") == 0, "READ/WRITE reached the daemon"
    assert "35" in ops  # CREATE: the log did list the requests


def test_an_upper_file_open_several_times_at_once(dirs: Dirs) -> None:
    """Readers and writers of one upper file at the same time (the kernel takes one passthrough
    backing per inode: each open made its own, and the second open failed with EIO)."""
    with overlay(dirs) as mnt:
        p = os.path.join(mnt, "log")
        with open(p, "wb") as w:
            w.write(b"one\n")
            w.flush()
            with open(p, "rb") as r1, open(p, "rb") as r2:
                assert r1.read() == b"one\n"
                w.write(b"two\n")
                w.flush()
                assert r2.read() == b"one\ntwo\n"
                with open(p, "r+b") as rw:
                    rw.seek(0)
                    rw.write(b"ONE")
                r1.seek(0)
                assert r1.read() == b"ONE\ntwo\n"
        lower = os.path.join(mnt, "file")  # a lower file: a reader, then a writer copies it up
        with open(lower, "rb") as r:
            assert r.read(5) == b"lower"
            with open(lower, "r+b") as w:
                w.write(b"UPPER")
            with open(lower, "rb") as again:
                assert again.read(5) == b"UPPER"
        with open(os.path.join(dirs.upper, "log"), "rb") as f:
            assert f.read() == b"ONE\ntwo\n"
    with open(os.path.join(dirs.lower, "file"), "rb") as f:  # the write went to the copy alone
        assert f.read(5) == b"lower"


def test_file_capabilities_are_dropped_by_a_write(dirs: Dirs) -> None:
    """As on any Linux file system: a write drops security.capability (the kernel asks for it
    before every write; the C core remembers a file has none until an xattr call changes that)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    caps = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # v2, effective, cap_net_raw
    with overlay(dirs) as mnt:
        p = os.path.join(mnt, "tool")
        with open(p, "wb") as f:
            f.write(b"#!/bin/sh\n")
            f.write(b"true\n")  # a second write: the "no capability" answer is now remembered
        os.setxattr(p, "security.capability", caps)
        assert os.getxattr(p, "security.capability") == caps
        with open(p, "ab") as f:
            f.write(b"# changed\n")
        with pytest.raises(OSError) as exc:
            os.getxattr(p, "security.capability")
        assert exc.value.errno == errno.ENODATA
        os.setxattr(p, "security.capability", caps)
        assert os.getxattr(p, "security.capability") == caps


def test_a_full_upper_filesystem_gives_enospc(tmp_path) -> None:
    """Every call that needs room in a full upper filesystem fails with ENOSPC, as on the
    kernel overlay (an outside review saw EIO for a create)."""
    if os.geteuid() != 0 or fuse_unavailable():
        pytest.skip("needs root (a small tmpfs) and FUSE")
    small = str(tmp_path / "small")
    os.makedirs(small)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=16", "tmpfs", small]).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        d = Dirs(str(tmp_path / "lower"), f"{small}/upper", f"{small}/work", str(tmp_path / "mnt"))
        for p in (d.lower, d.upper, d.work, d.mnt):
            os.makedirs(p)
        with open(os.path.join(d.lower, "file"), "wb") as f:
            f.write(b"lower data\n")
        with overlay(d) as mnt:
            with pytest.raises(OSError) as exc, open(os.path.join(mnt, "big"), "wb") as f:
                f.write(b"x" * (2 << 20))
                f.flush()
            assert exc.value.errno == errno.ENOSPC
            calls = [
                lambda i: open(os.path.join(mnt, f"new{i}"), "w").close(),
                lambda i: os.mkdir(os.path.join(mnt, f"dir{i}")),
                lambda i: os.symlink("x", os.path.join(mnt, f"link{i}")),
            ]
            for call in calls:
                with pytest.raises(OSError) as exc:
                    for i in range(32):
                        call(i)
                assert exc.value.errno == errno.ENOSPC, call
    finally:
        subprocess.run(["umount", "-l", small])


def _exchange(a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


def test_rename_exchange(dirs: Dirs) -> None:
    """renameat2(RENAME_EXCHANGE) swaps two names, lower or upper, files or directories (was
    EINVAL); a directory that merges lower contents gives EXDEV, as the kernel overlay does
    without redirect_dir."""
    os.makedirs(os.path.join(dirs.lower, "ldir"))
    with open(os.path.join(dirs.lower, "ldir", "inside"), "w") as f:
        f.write("in\n")
    with overlay(dirs) as mnt:
        lower_file, new_file = os.path.join(mnt, "file"), os.path.join(mnt, "new")
        with open(new_file, "w") as f:
            f.write("new\n")
        ino_lower, ino_new = os.lstat(lower_file).st_ino, os.lstat(new_file).st_ino
        _exchange(lower_file, new_file)
        with open(lower_file) as f:
            assert f.read() == "new\n"
        with open(new_file) as f:
            assert f.read() == "lower data\n" * 1000
        assert (os.lstat(lower_file).st_ino, os.lstat(new_file).st_ino) == (ino_new, ino_lower)
        os.mkdir(os.path.join(mnt, "udir"))
        _exchange(os.path.join(mnt, "udir"), new_file)  # a directory and a file
        assert os.path.isdir(new_file) and os.path.isfile(os.path.join(mnt, "udir"))
        with pytest.raises(OSError) as exc:
            _exchange(os.path.join(mnt, "ldir"), lower_file)
        assert exc.value.errno == errno.EXDEV
        with pytest.raises(OSError) as exc:
            _exchange(lower_file, os.path.join(mnt, "missing"))
        assert exc.value.errno == errno.ENOENT
        assert sorted(os.listdir(mnt)) == ["dir", "file", "ldir", "new", "udir"]
    # the upper directory holds the swapped entries themselves (the kernel's format)
    assert sorted(os.listdir(dirs.upper)) == ["file", "new", "udir"]
    assert os.path.isdir(os.path.join(dirs.upper, "new"))
    with open(os.path.join(dirs.upper, "udir")) as f:
        assert f.read() == "lower data\n" * 1000


def _acl_results(root: str) -> dict[str, object]:
    """Default ACLs set on a lower directory (copied up) and a new one, then objects made in
    them under umask 022; what getfacl and stat say of each, and what a user the ACLs name may
    read where the mode bits alone would refuse."""
    out: dict[str, object] = {}

    def facl(*args: str) -> None:
        subprocess.run(["setfacl", *args], check=True, capture_output=True)

    lower_dir, new_dir = os.path.join(root, "dir"), os.path.join(root, "newdir")
    os.mkdir(new_dir, 0o755)
    for d in (lower_dir, new_dir):
        facl("-d", "-m", "u:4242:rwx,g::r-x,o::---,m::rwx", d)
    old = os.umask(0o022)
    try:
        for d in (lower_dir, new_dir):
            os.close(os.open(os.path.join(d, "f"), os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(os.path.join(d, "sub"), 0o777)
            os.mkfifo(os.path.join(d, "fifo"), 0o640)
            os.close(os.open(os.path.join(root, "plain"), os.O_CREAT | os.O_WRONLY, 0o666))
    finally:
        os.umask(old)
    for rel in ("plain", *(f"{d}/{n}" for d in ("dir", "newdir") for n in ("f", "sub", "fifo", "sub/.."))):
        p = os.path.join(root, rel)
        getfacl = subprocess.run(["getfacl", "-cp", p], capture_output=True, text=True)
        out[rel] = (oct(os.lstat(p).st_mode), getfacl.returncode, getfacl.stdout)
    # an access ACL the kernel must enforce: mode 0600, read allowed to uid 4242 by the ACL only
    secret = os.path.join(root, "secret")
    with open(secret, "w") as f:
        f.write("for 4242")
    os.chmod(secret, 0o600)
    facl("-m", "u:4242:r", secret)
    for uid in (4242, 4343):
        # (from inside the mount: the test's temporary directories above it are root's alone)
        res = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat", "secret"],
            cwd=root,
            capture_output=True,
            text=True,
        )
        out[f"read as {uid}"] = (res.returncode, res.stdout)
    return out


def test_default_and_access_acls_as_the_kernel(dirs: Dirs, tmp_path, fuse_core: str) -> None:
    """A directory's default ACL is inherited by what is made in it (the umask not counting
    then), and access ACLs are enforced, as the kernel overlay does (the mode bits alone and
    the caller's umask decided before)."""
    ours, theirs = ours_and_the_kernels(
        dirs,
        tmp_path,
        fuse_core,
        _acl_results,
        "(libfuse 3.14 through mfusepy) does not negotiate POSIX ACLs",
    )
    assert ours == theirs
    assert theirs["read as 4242"] == (0, "for 4242") and theirs["read as 4343"][0] != 0
    assert "user:4242:rwx" in str(theirs["dir/f"]) and "0o100660" in str(
        theirs["dir/f"]
    )  # not 0644: no umask


def _flink(fd: int, path: str) -> None:
    """linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH): how an O_TMPFILE file gets a name."""
    if _libc.linkat(fd, b"", -100, os.fsencode(path), 0x1000) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), path)


def _tmpfile_results(root: str) -> list[object]:
    out: list[object] = []
    d = os.path.join(root, "dir")  # a lower directory: copied up for the new file
    fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o640)
    try:
        os.write(fd, b"made nameless")
        st = os.fstat(fd)
        out += [sorted(os.listdir(d)), st.st_nlink, st.st_size, oct(st.st_mode)]
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 4)
        _flink(fd, os.path.join(d, "named"))
        st = os.fstat(fd)
        out += [st.st_nlink, oct(st.st_mode), os.lstat(os.path.join(d, "named")).st_ino == st.st_ino]
    finally:
        os.close(fd)
    with open(os.path.join(d, "named"), "rb") as f:
        out.append(f.read())
    fd = os.open(root, os.O_TMPFILE | os.O_WRONLY | os.O_EXCL, 0o600)  # O_EXCL: never linkable
    try:
        _flink(fd, os.path.join(root, "never"))
    except OSError as exc:
        out.append(errno.errorcode[exc.errno or 0])
    finally:
        os.close(fd)
    out.append(sorted(os.listdir(root)))
    return out


def test_o_tmpfile_as_the_kernel(dirs: Dirs, tmp_path, fuse_core: str) -> None:
    """O_TMPFILE files: nameless, written, changed through the descriptor, then named with
    linkat (EOPNOTSUPP before)."""
    ours, theirs = ours_and_the_kernels(
        dirs, tmp_path, fuse_core, _tmpfile_results, "(libfuse 3.14 through mfusepy) has no tmpfile call"
    )
    assert ours == theirs
    assert theirs[4:] == [1, "0o100600", True, b"made", "ENOENT", ["dir", "file"]]


def _mmap_write_times(root: str) -> list[bool]:
    """Whether stat sees new times after a write through a shared mapping, then after msync."""
    import mmap

    p = os.path.join(root, "mapped")
    with open(p, "wb") as f:
        f.write(b"\0" * 4096)
    before = os.stat(p)
    time.sleep(0.05)
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
        before = os.fstat(f.fileno())  # (what the kernel caches, as xfs_io's mmap command does)
        time.sleep(0.05)
        m[:5] = b"hello"
        after_write = os.stat(p)
        m.flush()
    after_sync = os.stat(p)
    return [
        after_write.st_mtime_ns > before.st_mtime_ns,
        after_write.st_ctime_ns > before.st_ctime_ns,
        after_sync.st_mtime_ns > before.st_mtime_ns,
    ]


def test_a_write_through_a_shared_mapping_updates_the_times(dirs: Dirs, tmp_path, fuse_core: str) -> None:
    """xfstests generic/080 and 215: the kernel writes a passthrough file's mapping to the host
    file with no request, so attributes the kernel cached before stayed (times went stale until
    the cache timed out)."""
    if fuse_core == "python":  # the page cache's: the times move when msync writes the pages
        with overlay(dirs) as mnt:
            assert _mmap_write_times(mnt) == [False, False, True]
        return
    ours, theirs = ours_and_the_kernels(dirs, tmp_path, fuse_core, _mmap_write_times, "")
    assert ours == theirs == [True, True, True]


def _as_user(uid: int, gid: int, cwd: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    # (run from inside the mount: the test's temporary directories above it are root's alone)
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def _setgid_results(root: str) -> dict[str, str]:
    """Set-id bits after an access ACL set by an owner outside the group (generic/375) and
    after fallocate, punch hole and zero range by a user without CAP_FSETID (generic/683-685)."""
    out: dict[str, str] = {}
    for name, mkdir in (("sgfile", False), ("sgdir", True)):
        p = os.path.join(root, name)
        os.mkdir(p) if mkdir else open(p, "w").close()
        os.chown(p, 4242, 4242)
        os.chmod(p, 0o2755)
        res = _as_user(4242, 4343, root, "setfacl", "-m", "u::rwx,g::rwx,o::rwx", name)
        out[name] = f"{res.returncode} {oct(os.stat(p).st_mode)}"
    falloc = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "sys.exit(0 if libc.fallocate(fd, int(sys.argv[2]), 4096, 4096) == 0 else ctypes.get_errno())\n"
    )
    for op, mode in (
        ("alloc", 0),
        ("punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE),
        ("zero", FALLOC_FL_ZERO_RANGE),
    ):
        for bits in (0o6666, 0o6766):
            p = os.path.join(root, f"{op}-{bits:o}")
            with open(p, "wb") as f:
                f.write(b"x" * 16384)
            os.chmod(p, bits)
            res = _as_user(4242, 4242, root, sys.executable, "-c", falloc, os.path.basename(p), str(mode))
            out[p.rsplit("/", 1)[1]] = f"{res.returncode} {oct(os.stat(p).st_mode)}"
    return out


def test_set_id_bits_cleared_as_the_kernel(dirs: Dirs, tmp_path, fuse_core: str) -> None:
    """S_ISGID goes when an owner outside the file's group sets its access ACL, and S_ISUID
    (S_ISGID too, as the group may not execute or the caller is outside it) when a user without
    CAP_FSETID allocates, punches or zeroes a range: the daemon does those as root, which keeps
    them, so it clears them as the kernel would have for the caller."""
    if os.geteuid() != 0:
        pytest.skip("needs root (files of another user)")
    ours, theirs = ours_and_the_kernels(
        dirs,
        tmp_path,
        fuse_core,
        _setgid_results,
        "(libfuse 3.14) passes neither the caller nor SETXATTR_EXT",
    )
    assert ours == theirs
    assert theirs["sgfile"] == "0 0o100777" and theirs["alloc-6666"] == "0 0o100666"


def _name_to_handle_errno(root: str) -> int:
    class FileHandle(ctypes.Structure):
        _fields_ = [
            ("handle_bytes", ctypes.c_uint),
            ("handle_type", ctypes.c_int),
            ("f_handle", ctypes.c_char * 128),
        ]

    fh, mount_id = FileHandle(handle_bytes=128), ctypes.c_int()
    p = os.path.join(root, "file")
    r = _libc.name_to_handle_at(-100, os.fsencode(p), ctypes.byref(fh), ctypes.byref(mount_id), 0)
    return 0 if r == 0 else ctypes.get_errno()


def test_file_handles_are_refused_as_the_kernel(dirs: Dirs, tmp_path, fuse_core: str) -> None:
    """name_to_handle_at says EOPNOTSUPP, as the kernel overlay does without nfs_export: a
    handle made here could not be opened once the kernel forgot its inode (ESTALE; xfstests
    generic/426, 467, 477, 756, 777)."""
    ours, theirs = ours_and_the_kernels(
        dirs, tmp_path, fuse_core, _name_to_handle_errno, "(libfuse 3.14) predates FUSE_NO_EXPORT_SUPPORT"
    )
    assert ours == theirs == errno.EOPNOTSUPP


def _atime_moves(root: str) -> dict[str, bool]:
    """Whether a read moves the access time: one older than the mtime (relatime moves it),
    and one newer than the mtime and the ctime, not a day old (only strictatime moves it)."""
    out = {}
    for name, atime in (("older", time.time() - 180), ("newer", time.time() + 60)):
        p = os.path.join(root, name)
        with open(p, "wb") as f:
            f.write(b"data")
        os.utime(p, (atime, time.time() - 120))
        before = os.stat(p).st_atime
        with open(p, "rb") as f:
            f.read()
        out[name] = os.stat(p).st_atime != before
    return out


@pytest.mark.parametrize("option", ["relatime", "noatime", "strictatime"])
def test_atime_options_rule_reads_as_the_kernel(dirs: Dirs, tmp_path, fuse_core: str, option: str) -> None:
    """noatime, relatime and strictatime decide what a read does to an upper file's access
    time, as on the kernel overlay (xfstests generic/003, 120): the daemon reads through a
    private mount of the upper directory with the union mount's atime rule (the host mount's
    rule decided before)."""
    if os.geteuid() != 0:
        pytest.skip("a private mount needs CAP_SYS_ADMIN")
    with overlay(dirs, option) as mnt:
        ours = _atime_moves(mnt)
    want = {"relatime": {"older": True, "newer": False}, "noatime": {"older": False, "newer": False}}
    want["strictatime"] = {"older": True, "newer": True}
    assert ours == want[option]
    if not overlay_unavailable(str(tmp_path)):
        k = tmp_path / "k"
        with kernel_overlay(
            [dirs.lower], str(k / "upper"), str(k / "work"), str(k / "mnt"), extra=option
        ) as mnt:
            assert _atime_moves(mnt) == want[option]


def test_a_read_only_mount_changes_no_access_time(dirs: Dirs) -> None:
    """``-o ro`` with an upper directory: reading its files and listing its directories moves
    no access time, as on any read-only mount (the host's relatime moved them; generic/003)."""
    if os.geteuid() != 0:
        pytest.skip("a private mount needs CAP_SYS_ADMIN")
    p, d = os.path.join(dirs.upper, "old"), os.path.join(dirs.upper, "olddir")
    os.mkdir(d)
    with open(p, "wb") as f:
        f.write(b"data")
    for x in (p, d):
        os.utime(x, (time.time() - 180, time.time() - 120))  # relatime would move them
    before = [os.stat(x).st_atime_ns for x in (p, d)]
    with overlay(dirs, "ro") as mnt:
        # what the mount shows is the upper's own access and change times (they were the mtime)
        shown = [os.stat(os.path.join(mnt, x)) for x in ("old", "olddir")]
        assert [st.st_atime_ns for st in shown] == before
        assert [st.st_ctime_ns for st in shown] == [os.stat(x).st_ctime_ns for x in (p, d)]
        with open(os.path.join(mnt, "old"), "rb") as f:
            assert f.read() == b"data"
        assert os.listdir(os.path.join(mnt, "olddir")) == []
    assert [os.stat(x).st_atime_ns for x in (p, d)] == before


def test_times_past_2262_are_shown_and_set(dirs: Dirs) -> None:
    """ext4 keeps times up to 2446, past what 64-bit nanoseconds hold (2262): a directory or file
    carrying one (xfstests' time tests leave them behind) was EIO to every stat, and setting one
    overflowed.  Now both show the time the host file has, as the kernel overlay does."""
    far = (13_569_465_600 * 10**9 + 500_000_000, 14_000_000_000 * 10**9)  # 2400, 2413
    os.utime(os.path.join(dirs.lower, "file"), ns=far)
    os.utime(dirs.upper, ns=far)  # the mount's root
    with overlay(dirs) as mnt:
        for path in (mnt, os.path.join(mnt, "file")):
            st = os.stat(path)
            assert (st.st_atime_ns, st.st_mtime_ns) == far, path
        new = os.path.join(mnt, "new")
        open(new, "w").close()
        os.utime(new, ns=far)
        st = os.stat(new)
        assert (st.st_atime_ns, st.st_mtime_ns) == far
        st = os.stat(os.path.join(dirs.upper, "new"))
        assert (st.st_atime_ns, st.st_mtime_ns) == far
