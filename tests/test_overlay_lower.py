"""layerfs-overlay's lower directories served by the C core itself (ext/fusecore.c, stack_*).

Below a directory that has nothing in the upper directory, the C core answers LOOKUP,
GETATTR, READDIR(PLUS), READLINK and OPEN for reading from the lowerdirs without Python.
It must give what Python gives (``LAYERFS_C_LOWER=0`` keeps those requests in Python): the
same inode numbers, attributes and listings.  It must give what the kernel overlay gives over
the same directories.  And it must never let a write reach a lower layer.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from test_overlay import HELPER, opts, overlay_mount
from unionutil import (
    _copy_meta,
    assert_same,
    cached_pages,
    fuse_unavailable,
    kernel_overlay,
    overlay_unavailable,
    snapshot,
    upper_snapshot,
)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _whiteout(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, 0)


def build_layers(base: str, fallbacks: bool) -> list[str]:
    """Three layers in the kernel format, bottom first, deep enough that most directories are
    the lower layers' alone: whiteouts, opaque directories, hardlinks, special files, a file
    hiding a directory.  ``fallbacks``: also the forms the kernel does not read but layerfs
    does (``.wh.`` whiteout files, the ``.wh..wh..opq`` marker, ``user.overlay.opaque``)."""
    l0, l1, l2 = (os.path.join(base, f"l{i}") for i in range(3))  # l0 bottom
    for n in range(40):
        _write(f"{l0}/a/b/c/many{n:02}", b"bottom %d\n" % n)
    _write(f"{l0}/a/b/c/file1", b"old one\n")
    _write(f"{l0}/a/b/c/large", bytes(range(256)) * 8192)  # 2 MiB: passed through
    _write(f"{l0}/a/b/gone", b"whited out above\n")
    _write(f"{l0}/a/b/hidden/x", b"in a whited-out dir\n")
    _write(f"{l0}/a/keep/k1", b"dir hidden by a file\n")
    _write(f"{l0}/a/opq/old", b"hidden by an opaque xattr\n")
    _write(f"{l0}/a/opq2/old2", b"hidden by the marker file\n")
    _write(f"{l0}/a/opq3/old3", b"hidden by user.overlay.opaque\n")
    _write(f"{l0}/a/hl1", b"hardlinked\n")
    os.link(f"{l0}/a/hl1", f"{l0}/a/hl2")
    os.symlink("b/c/file1", f"{l0}/a/sym")
    os.setxattr(f"{l0}/a/sym", "trusted.mark", b"on a symlink", follow_symlinks=False)
    os.setxattr(f"{l0}/a/b", "user.dir", b"on a directory")
    os.mkfifo(f"{l0}/a/fifo")
    os.mknod(f"{l0}/a/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    _write(f"{l0}/deep/x1/x2/x3/x4/f", b"deep\n")
    _write(f"{l1}/a/b/c/file1", b"newer one\n")
    _write(f"{l1}/a/b/c/file3", b"middle\n")
    os.setxattr(f"{l1}/a/b/c/file3", "user.note", b"kept")
    os.setxattr(
        f"{l1}/a/b/c/file3", "security.capability", struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    )
    os.setxattr(f"{l1}/a/b/c/file3", "trusted.overlay.origin", b"private: never shown")
    os.chown(f"{l1}/a/b/c/file3", 1234, 5678)
    os.chmod(f"{l1}/a/b/c/file3", 0o4751)
    _whiteout(f"{l1}/a/b/gone")
    _write(f"{l1}/a/keep", b"a file over a directory\n")
    _write(f"{l1}/a/opq/new", b"in the opaque dir\n")
    os.setxattr(f"{l1}/a/opq", "trusted.overlay.opaque", b"y")
    _write(f"{l1}/a/opq2/new2", b"beside the marker\n")
    _write(f"{l1}/a/opq3/new3", b"user opaque\n")
    _write(f"{l1}/deep/x1/x2/x3/x4/g", b"merged deep\n")
    _write(f"{l2}/a/b/c/file4", b"top\n")
    _whiteout(f"{l2}/a/b/c/many07")
    _write(f"{l2}/deep/x1/x2/top", b"top deep\n")
    if fallbacks:
        _write(f"{l1}/a/b/.wh.hidden", b"")
        _write(f"{l1}/a/opq2/.wh..wh..opq", b"")
        os.setxattr(f"{l1}/a/opq3", "user.overlay.opaque", b"y")
        _write(f"{l2}/a/b/c/.wh.many08", b"")
    else:
        _whiteout(f"{l1}/a/b/hidden")
        os.setxattr(f"{l1}/a/opq2", "trusted.overlay.opaque", b"y")
        os.setxattr(f"{l1}/a/opq3", "trusted.overlay.opaque", b"y")
        _whiteout(f"{l2}/a/b/c/many08")
    for d in (l0, l1, l2):
        os.chmod(d, 0o755)
    return [l0, l1, l2]


def _layers(tmp_path_factory: pytest.TempPathFactory, fallbacks: bool) -> tuple[str, list[str]]:
    base = str(tmp_path_factory.mktemp("ovl-lower"))
    reason = fuse_unavailable() or overlay_unavailable(base)
    if reason:
        pytest.skip(reason)
    try:
        from layerfs import _cfuse  # noqa: F401
    except ImportError:
        pytest.skip("the C core is not built")
    return base, build_layers(base, fallbacks)


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """What the kernel overlay reads too."""
    return _layers(tmp_path_factory, False)


@pytest.fixture(scope="module")
def all_layers(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """... and the fallback forms."""
    return _layers(tmp_path_factory, True)


@contextmanager
def ours(
    base: str, lowers: list[str], name: str, *, c_lower: bool = True, writable: bool = True, **env: str
) -> Iterator[str]:
    """layerfs-overlay over ``lowers`` (bottom first) with a fresh upper directory, or none."""
    upper, work, mnt = (os.path.join(base, f"{name}-{k}") for k in ("upper", "work", "mnt"))
    for d in (upper, work):
        subprocess.run(["rm", "-rf", d], check=True)
        os.makedirs(d)
    _copy_meta(lowers[-1], upper)
    old = {k: os.environ.get(k) for k in ("LAYERFS_FUSE", "LAYERFS_C_LOWER", *env)}
    os.environ.update(LAYERFS_FUSE="c", LAYERFS_C_LOWER="1" if c_lower else "0")
    os.environ.update(env)
    try:
        o = opts(lowers, upper, work) if writable else opts(lowers)
        with overlay_mount([*HELPER, "-o", o, mnt], mnt):
            yield mnt
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def full_stat(root: str) -> dict[str, object]:
    """Every lstat field, xattr and listing (order, d_ino, d_type) below ``root``; not the
    root's (each mount has an upper directory of its own) nor atimes (reading a layer's
    directory or file moves its atime on the host)."""
    out: dict[str, object] = {}
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        with os.scandir(d) as it:
            out["ls " + rel] = [(e.name, e.inode(), e.is_dir(follow_symlinks=False)) for e in it]
        for name in [*dirs, *files]:
            p = os.path.join(d, name)
            names = os.listxattr(p, follow_symlinks=False)
            out["xattrs " + os.path.relpath(p, root)] = [
                (n, os.getxattr(p, n, follow_symlinks=False)) for n in names
            ]
            st = os.lstat(p)
            out[os.path.normpath(os.path.join(rel, name))] = (
                st.st_ino,
                st.st_mode,
                st.st_nlink,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_blocks,
                st.st_rdev,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
    return out


def read_all(root: str) -> dict[str, bytes]:
    out = {}
    for d, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.mark.parametrize("writable", [True, False], ids=["rw", "ro"])
def test_c_answers_what_python_answers(all_layers: tuple[str, list[str]], writable: bool) -> None:
    base, lowers = all_layers
    with ours(base, lowers, "py", c_lower=False, writable=writable) as m:
        expected = full_stat(m)
        expected["read"] = read_all(m)
    with ours(base, lowers, "c", writable=writable) as m:
        got = full_stat(m)
        # a second look: now from the nodes C remembered (GETATTR, cached LOOKUPs)
        assert full_stat(m) == got
        got["read"] = read_all(m)
    assert sorted(expected) == sorted(got)
    for key in expected:
        assert got[key] == expected[key], key
    names = {k.split("/")[-1] for k in got}
    assert {"many06", "file4", "new", "new2", "new3", "g", "top", "x"} - names == {"x"}
    assert not names & {"gone", "many07", "many08", "old", "old2", "old3", "hidden", "k1"}


def test_lower_names_of_merged_directories_as_python_gives_them(layers: tuple[str, list[str]]) -> None:
    """Directories made upper (a file made in each): a LOOKUP of the lower names beside it, with
    the kernel's names dropped first, is answered by C from the layers; it gives what Python
    gives, and what the names showed before."""
    base, lowers = layers

    def run(m: str) -> dict[str, object]:
        out: dict[str, object] = {}
        dirs = ["", "a", "a/b", "a/b/c"]
        names = {d: sorted(os.listdir(os.path.join(m, d))) for d in dirs}
        before = {f"{d}/{n}": os.lstat(os.path.join(m, d, n)) for d in dirs for n in names[d]}
        for d in dirs:
            with open(os.path.join(m, d, "made-here"), "wb") as f:
                f.write(b"m")
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        for key, st in before.items():
            now = os.lstat(os.path.join(m, key.lstrip("/")))
            fields = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_mtime_ns")
            if stat.S_ISDIR(st.st_mode):  # (a directory in the walk's way was made upper too)
                fields = ("st_ino", "st_mode", "st_uid", "st_gid")
            out[key] = tuple(getattr(now, f) for f in fields)
            assert out[key] == tuple(getattr(st, f) for f in fields), key
        return out

    with ours(base, lowers, "mp", c_lower=False) as m:
        expected = run(m)
    with ours(base, lowers, "mc") as m:
        assert run(m) == expected


def test_tree_is_the_kernel_overlays(layers: tuple[str, list[str]]) -> None:
    base, lowers = layers
    kupper, kwork = os.path.join(base, "k-upper"), os.path.join(base, "k-work")
    with kernel_overlay(lowers, kupper, kwork, os.path.join(base, "k-mnt")) as km:
        expected = snapshot(km)
    with ours(base, lowers, "c") as m:
        assert_same(expected, snapshot(m), "lower directories served by C")
        with open(os.path.join(m, "a/sym")) as f:  # READLINK, then OPEN of the target
            assert f.read() == "newer one\n"


def test_changes_below_c_served_directories_match_the_kernel(layers: tuple[str, list[str]]) -> None:
    """After C answered for a directory, changes in it go to Python and the directory is the
    union's again: new files (in a merged directory, by C), a copy-up, removals, renames."""
    base, lowers = layers

    def run(m: str) -> list[object]:
        steps: list[object] = []
        full_stat(m)  # every node remembered as the layers' first
        c = os.path.join(m, "a/b/c")

        def step(fn, *args):  # type: ignore[no-untyped-def]
            try:
                steps.append(fn(*args))
            except OSError as e:
                steps.append(errno.errorcode[e.errno or 0])

        step(os.open, os.path.join(c, "file1"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        fd = os.open(os.path.join(c, "new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, b"made\n")
        os.close(fd)
        for name in ("many07", "many08", "many06"):  # whited out (both kinds), then a lower name
            step(os.open, os.path.join(c, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        ino = os.lstat(os.path.join(c, "file3")).st_ino
        with open(os.path.join(c, "file3"), "ab") as f:  # copy-up (the directory is upper now)
            f.write(b"appended\n")
        steps.append(os.lstat(os.path.join(c, "file3")).st_ino == ino)
        os.unlink(os.path.join(c, "many01"))
        os.rename(os.path.join(c, "many02"), os.path.join(c, "renamed"))
        os.rename(os.path.join(m, "deep/x1/x2"), os.path.join(m, "deep/moved"))
        os.mkdir(os.path.join(m, "a/b/hidden"))
        steps.append(sorted(os.listdir(c)))
        steps.append(sorted(os.listdir(os.path.join(m, "deep/moved"))))
        steps.append(os.listdir(os.path.join(m, "a/b/hidden")))
        for name in sorted(os.listdir(c))[:30]:  # unlinks of lower files, by C once it knows c
            os.unlink(os.path.join(c, name))
        steps.append(sorted(os.listdir(c)))
        shutil.rmtree(os.path.join(m, "deep"))  # the whole of a lower tree
        steps.append(sorted(os.listdir(m)))
        return [s if not isinstance(s, int) else "fd" for s in steps]

    kupper, kwork = os.path.join(base, "k2-upper"), os.path.join(base, "k2-work")
    with kernel_overlay(lowers, kupper, kwork, os.path.join(base, "k2-mnt")) as km:
        expected_steps = run(km)
        volatile = {"/a/b/c/new", "/a/b/c/file3", "/a/b/c/many07", "/a/b/c/many08"}
        expected = snapshot(km, volatile=volatile)
    with ours(base, lowers, "c2") as m:
        assert run(m) == expected_steps
        assert_same(expected, snapshot(m, volatile=volatile), "after the changes")
    upper = upper_snapshot(os.path.join(base, "c2-upper"))
    kupper_snap = upper_snapshot(kupper)
    whiteouts = sorted(p for p, v in upper.items() if v == "whiteout")
    assert whiteouts == sorted(p for p, v in kupper_snap.items() if v == "whiteout")
    assert "/a/b/c/many10" in whiteouts
    # the kernel mounts what layerfs-overlay left in the upper directory, and shows the same
    with kernel_overlay(
        lowers, os.path.join(base, "c2-upper"), os.path.join(base, "c2-kwork"), os.path.join(base, "c2-kmnt")
    ) as km:
        assert_same(expected, snapshot(km, volatile=volatile), "the upper directory under the kernel")


@pytest.mark.parametrize(
    "core, passthrough", [("c", "1"), ("c", "0"), ("python", "0")], ids=["c-passthrough", "c", "python"]
)
def test_a_write_never_reaches_a_lower_layer(
    layers: tuple[str, list[str]], core: str, passthrough: str
) -> None:
    """A lower file open for reading while it is opened to be written: the write goes to its
    copy in the upper directory, and every reader of the mount sees it, the one already open
    too (from the kernel's page cache, or, out of it, from the copy).  The layer's own file never changes.  (The C
    core passed lower files through to the layer's file, and a writer's open shared that
    backing, the kernel taking one per inode: the write went into the lower layer.)  The
    twin too: its handles on lower files read the copy once it is made."""
    base, lowers = layers
    files = {"a/b/c/file3": lowers[1], "a/hl1": lowers[0]}
    before = {name: open(os.path.join(layer, name), "rb").read() for name, layer in files.items()}
    # served by C (a directory of the layers alone), and by Python (one merged with the upper)
    for name in files:
        with ours(base, lowers, "w" + passthrough, LAYERFS_PASSTHROUGH=passthrough, LAYERFS_FUSE=core) as m:
            path = os.path.join(m, name)
            reader = os.open(path, os.O_RDONLY)
            try:
                first = os.pread(reader, 4096, 0)
                with open(path, "ab") as writer:
                    writer.write(b"written\n")
                assert os.pread(reader, 4096, 0) == first + b"written\n"
                # out of the page cache: the reader's next read reaches the daemon, which
                # reads the copy now, as the kernel overlay does (ovl_real_fdget)
                os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(reader, 4096, 0) == first + b"written\n"
                with open(path, "rb") as again:
                    assert again.read() == first + b"written\n"
            finally:
                os.close(reader)
            with open(os.path.join(base, "w" + passthrough + "-upper", name), "rb") as f:
                assert f.read() == first + b"written\n"
        for other, layer in files.items():
            assert open(os.path.join(layer, other), "rb").read() == before[other]


@pytest.mark.parametrize("passthrough", ["1", "0"])
def test_a_large_lower_file_is_passed_through_and_never_written(
    layers: tuple[str, list[str]], passthrough: str
) -> None:
    """A lower file of 1 MiB or more is passed through to the layer's file where the kernel
    can, as a stored image's file cache copies are: while it is open for reading, an open to
    write it (its copy-up) waits, with ETXTBSY (the kernel takes one backing file per inode);
    once the reader is gone it works.  The layer's file never changes."""
    base, lowers = layers
    name, layer_file = "a/b/c/large", os.path.join(lowers[0], "a/b/c/large")
    before = open(layer_file, "rb").read()
    with ours(base, lowers, "big" + passthrough, LAYERFS_PASSTHROUGH=passthrough) as m:
        path = os.path.join(m, name)
        with open(path, "rb") as reader:
            assert reader.read() == before
            try:
                with open(path, "r+b") as writer:
                    writer.write(b"NEW")
            except OSError as e:
                assert passthrough == "1" and e.errno == errno.ETXTBSY
            else:
                reader.seek(0)
                assert reader.read(3) == b"NEW"
        with open(path, "r+b") as writer:
            writer.write(b"NEW")
        with open(path, "rb") as f:
            assert f.read() == b"NEW" + before[3:]
    assert open(layer_file, "rb").read() == before


@pytest.mark.parametrize("writable", [True, False], ids=["rw", "ro"])
def test_small_lower_files_reach_the_page_cache_with_their_open(tmp_path: str, writable: bool) -> None:
    """A writable mount stores a small lower file (up to 64 KiB) into the kernel's page cache as
    it answers the file's first OPEN, so reading it takes no READ; a larger one, and any file
    of a read-only mount (which has no OPEN), is read as before.  The bytes are the file's."""
    base = str(tmp_path)
    reason = fuse_unavailable() or overlay_unavailable(base)
    if reason:
        pytest.skip(reason)
    low = os.path.join(base, "l0")
    files = {"s": os.urandom(1000), "page": os.urandom(4096), "edge": os.urandom(64 << 10)}
    files["over"] = os.urandom((64 << 10) + 1)
    for name, data in files.items():
        _write(os.path.join(low, name), data)
    os.chmod(low, 0o755)
    with ours(base, [low], "push", writable=writable) as m:
        cached = {name: cached_pages(os.path.join(m, name)) for name in files}
        for name, data in files.items():
            with open(os.path.join(m, name), "rb") as f:
                assert f.read() == data, name
    want = {name: writable and name != "over" for name in files}
    assert {name: all(pages) for name, pages in cached.items()} == want
    assert not any(cached["over"]) and (writable or not any(cached["s"]))


def _daemon_rchar(mnt: str) -> int:
    """Bytes the mount's daemon has read with read(2) and its kin (not splice(2))."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"layerfs.overlay" not in argv or os.fsencode(mnt) not in argv:
                continue
            with open(f"/proc/{pid}/io") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
        except OSError:
            continue
    raise AssertionError(f"no daemon serves {mnt}")


def _read_at(path: str, offset: int, size: int, direct: bool) -> bytes:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the READ reaches the daemon
            return os.pread(fd, size, offset)
        buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
        try:
            return bytes(buf[: os.preadv(fd, [buf], offset)])
        finally:
            buf.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("writable", [True, False], ids=["rw", "ro"])
def test_large_reads_are_spliced_and_give_the_files_bytes(
    layers: tuple[str, list[str]], writable: bool
) -> None:
    """A READ of 64 KiB or more of a host file (a layer's, an upper one's, without passthrough)
    reaches the kernel by splice(2): the daemon never reads the bytes itself (its rchar stays
    far below what was read).  Every offset and size still gives the file's bytes: at the end
    of the file, off the page grid, and a direct read one page too large for the pipe (that one
    goes by pread)."""
    base, lowers = layers
    top = os.path.join(base, "splice-top")
    data = os.urandom(3 << 20)  # (not periodic: a read from a wrong offset shows)
    _write(os.path.join(top, "rand"), data)
    os.chmod(top, 0o755)
    with ours(base, [*lowers, top], "splice", writable=writable, LAYERFS_PASSTHROUGH="0") as m:
        files = {os.path.join(m, "rand"): data}
        if writable:
            new = os.urandom(3 << 20)
            _write(os.path.join(m, "up", "new"), new)
            files[os.path.join(m, "up", "new")] = new
        before = _daemon_rchar(m)
        for path, want in files.items():
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                assert f.read() == want
        assert _daemon_rchar(m) - before < len(data) // 8, "the bytes went through the daemon"
        cases = [
            (0, 1 << 20, False),
            (len(data) - 100, 1 << 20, False),  # a short read at the end
            (512, 64 << 10, True),
            (4096 + 512, 1020 << 10, True),  # 256 pages and the header: by pread
            ((1 << 20) + 4096, 1020 << 10, True),
            (len(data) - 5000, 1 << 20, True),
        ]
        for path, want in files.items():
            for offset, size, direct in cases:
                got = _read_at(path, offset, size, direct)
                assert got == want[offset : offset + size], (path, offset, size, direct)
