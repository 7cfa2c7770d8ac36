"""New files in directories already in the upper directory: the C core makes them itself
(upper_create in ext/fusecore.c) where the name is free, and leaves the rest to the union view.
Both cores run these; what the C core must say is what the view says."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import make_layout, member, tar_bytes
from unionutil import (  # noqa: F401 - need_fuse and no_mount_left_behind are fixtures
    extract_layers,
    force_unmount,
    inode_numbers,
    kernel_overlay,
    layerfs_mount,
    need_fuse,
    no_mount_left_behind,
    overlay_unavailable,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("need_fuse", "fuse_core")


@contextlib.contextmanager
def layerfs_mount_cleanup(cli: Callable[..., Any], mnt: str) -> Iterator[None]:
    try:
        yield
    finally:
        try:
            cli("umount", mnt, check=False)
        finally:
            force_unmount(mnt)


def _make(path: str, data: bytes, flags: int = 0, mode: int = 0o644) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, mode)
    try:
        os.write(fd, data)
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _beside_the_kernel_overlay(tmp_path: Any) -> tuple[str, str]:
    """A mount point and an upper directory for a test that then mounts the kernel overlay on
    that upper directory (skipped where it cannot)."""
    reason = overlay_unavailable(str(tmp_path))
    if reason:
        pytest.skip(reason)
    return str(tmp_path / "m"), str(tmp_path / "upper")


def test_new_files_keep_their_inode_numbers_and_contents_across_remounts(cli, sample, tmp_path):
    """The first file in a lower directory copies it up (the view); the next ones in it, in the
    root and in a directory made through the mount are made in C: numbered as the view numbers
    them, so a remount (the view alone) shows the same numbers and bytes."""
    mnt, upper = str(tmp_path / "m"), str(tmp_path / "upper")
    with layerfs_mount(cli, sample, mnt, upper=upper):
        os.mkdir(os.path.join(mnt, "fresh"))
        made = {}
        for rel in ("etc/one", "etc/two", "etc/three", "top", "fresh/a", "fresh/b", "usr/share/doc/n"):
            made[rel] = _make(os.path.join(mnt, rel), rel.encode() * 3)
            assert os.lstat(os.path.join(mnt, rel)).st_ino == made[rel]
        first = inode_numbers(mnt)
        assert len(set(first.values())) == len(first) - 2  # only the sample's two hardlinked pairs
    with layerfs_mount(cli, sample, mnt, upper=upper):
        assert inode_numbers(mnt) == first
        for rel in made:
            with open(os.path.join(mnt, rel), "rb") as f:
                assert f.read() == rel.encode() * 3
    for rel in made:  # in the upper directory as plain files (the kernel overlay's format)
        st = os.lstat(os.path.join(upper, rel))
        assert stat.S_ISREG(st.st_mode) and st.st_size == len(rel) * 3


def test_a_name_that_is_taken_is_not_made_again(cli, sample, tmp_path):
    """O_EXCL on a lower name of a merged directory is EEXIST; a lower name whited out (rm) is
    free again; a lookup of a lower name in a merged directory finds it."""
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt, rw=True):
        etc = os.path.join(mnt, "etc")
        _make(os.path.join(etc, "new"), b"x")  # etc is merged from here on
        with pytest.raises(FileExistsError):
            _make(os.path.join(etc, "passwd"), b"y")
        with pytest.raises(FileExistsError):
            _make(os.path.join(etc, "new"), b"y")
        assert os.path.isfile(os.path.join(etc, "group"))
        before = open(os.path.join(etc, "group"), "rb").read()
        os.unlink(os.path.join(etc, "group"))
        assert not os.path.lexists(os.path.join(etc, "group"))
        _make(os.path.join(etc, "group"), b"replaced")
        with open(os.path.join(etc, "group"), "rb") as f:
            assert f.read() == b"replaced" != before
        assert not os.path.lexists(os.path.join(etc, "nothing-here"))
        with pytest.raises(OSError) as e:
            os.lstat(os.path.join(etc, ".wh.passwd"))  # bookkeeping names never show
        assert e.value.errno == errno.ENOENT


@pytest.fixture
def open_mountpoint() -> Iterator[str]:
    """A mount point other users can reach (pytest's tmp_path is root's alone)."""
    base = tempfile.mkdtemp(prefix="layerfs-upper-create-", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        yield os.path.join(base, "m")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_mode_owner_and_umask_as_the_kernel_applies_them(cli, sample, open_mountpoint):
    mnt = open_mountpoint
    os.makedirs(mnt)
    cli("mount", "--rw", "-o", "allow_other", sample, mnt)
    with layerfs_mount_cleanup(cli, mnt):
        shared = os.path.join(mnt, "shared")
        os.mkdir(shared)
        os.chmod(shared, 0o777)
        _make(os.path.join(shared, "root-owned"), b"r")  # the directory is in the upper now
        script = (
            "import os; p = os.environ['P']; fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666);"
            " os.write(fd, b'u'); os.close(fd); os.mkdir(p + '.d', 0o777); os.symlink('t', p + '.l')"
        )
        for name, umask, want in (("u022", 0o022, 0o644), ("u077", 0o077, 0o600), ("u000", 0, 0o666)):
            p = os.path.join(shared, name)
            subprocess.run(
                [
                    "setpriv",
                    "--reuid=4321",
                    "--regid=4322",
                    "--clear-groups",
                    "sh",
                    "-c",
                    f'umask {umask:03o} && exec python3 -c "$S"',
                ],
                env=dict(os.environ, P=p, S=script),
                check=True,
            )
            st = os.lstat(p)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 4322, want), name
            st = os.lstat(p + ".d")  # (a directory's x bits go with its r bits here)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 4322, 0o777 & ~umask), name
            st = os.lstat(p + ".l")
            assert (st.st_uid, st.st_gid, os.readlink(p + ".l")) == (4321, 4322, "t"), name
        # set-id bits asked for survive the chown to the caller (the mode comes after it)
        p = os.path.join(shared, "setid")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o6755)
        os.close(fd)
        assert stat.S_IMODE(os.lstat(p).st_mode) == 0o6755


def test_a_setgid_directory_gives_its_group(cli, sample, tmp_path):
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt, rw=True):
        d = os.path.join(mnt, "sgid")
        os.mkdir(d)
        os.chown(d, 0, 777)
        os.chmod(d, 0o2775)
        _make(os.path.join(d, "first"), b"1")
        _make(os.path.join(d, "second"), b"2")
        assert os.lstat(os.path.join(d, "first")).st_gid == 777
        assert os.lstat(os.path.join(d, "second")).st_gid == 777


@pytest.mark.parametrize("passthrough", ["1", "0"])
def test_a_new_files_handle_serves_every_call(cli, sample, tmp_path, monkeypatch, passthrough):
    """Writes, reads, ftruncate, fallocate, fsync, fstat and close on a handle the C core made:
    through passthrough or through the daemon (LAYERFS_PASSTHROUGH=0), and after a request to
    Python in between (the view adopts the handle first)."""
    monkeypatch.setenv("LAYERFS_PASSTHROUGH", passthrough)
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt, rw=True):
        etc = os.path.join(mnt, "etc")
        _make(os.path.join(etc, "merged"), b"")
        p = os.path.join(etc, "handle")
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            assert os.write(fd, b"0123456789") == 10
            assert os.pread(fd, 4, 2) == b"2345"
            os.chmod(os.path.join(etc, "hostname"), 0o600)  # a request to Python meanwhile
            os.ftruncate(fd, 4)
            assert os.fstat(fd).st_size == 4
            os.posix_fallocate(fd, 0, 8192)
            assert os.fstat(fd).st_size == 8192
            os.fsync(fd)
            assert os.pread(fd, 6, 0) == b"0123\0\0"
        finally:
            os.close(fd)
        st = os.lstat(p)
        assert (st.st_size, stat.S_IMODE(st.st_mode)) == (8192, 0o640)
        with open(p, "rb") as f:
            assert f.read(4) == b"0123"


def test_a_renamed_directory_is_asked_about_again(cli, sample, tmp_path):
    """A directory's state (merged, or the upper's alone) is asked once and kept until a change
    that may alter it: a merged directory renamed away and a new one made in its place is
    the upper's alone, and a lower name is free in it."""
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt, rw=True):
        etc = os.path.join(mnt, "etc")
        _make(os.path.join(etc, "x"), b"x")
        with pytest.raises(FileExistsError):
            _make(os.path.join(etc, "passwd"), b"p")
        os.rename(etc, os.path.join(mnt, "etc.old"))
        os.mkdir(etc)
        _make(os.path.join(etc, "passwd"), b"new passwd")
        assert sorted(os.listdir(etc)) == ["passwd"]
        with open(os.path.join(etc, "passwd"), "rb") as f:
            assert f.read() == b"new passwd"
        assert os.path.isfile(os.path.join(mnt, "etc.old", "passwd"))
        assert os.path.isfile(os.path.join(mnt, "etc.old", "x"))


def test_the_kernel_overlay_shows_what_was_made(cli, sample, sample_layout, tmp_path):
    mnt, upper = _beside_the_kernel_overlay(tmp_path)
    with layerfs_mount(cli, sample, mnt, upper=upper):
        for i in range(50):
            _make(os.path.join(mnt, "etc", f"n{i}"), b"%d" % i)
            _make(os.path.join(mnt, f"r{i}"), b"r%d" % i)
        os.unlink(os.path.join(mnt, "etc", "group"))
        _make(os.path.join(mnt, "etc", "group"), b"g")
        ours = snapshot(mnt)
    lowers = extract_layers(sample_layout, str(tmp_path / "lowers"))
    with kernel_overlay(lowers, upper, str(tmp_path / "work"), str(tmp_path / "k")) as k:
        theirs = snapshot(k)
    assert theirs == ours


def _lstat_fields(path: str) -> tuple[int, ...]:
    st = os.lstat(path)
    return (
        st.st_ino,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )


def drop_dentries() -> None:
    """Have the kernel forget the names it holds (unused dentries), so the next lstat of each
    is a LOOKUP."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def test_lower_names_of_a_merged_directory_are_what_they_were(cli, sample, tmp_path):
    """Once a directory is in the upper directory (a file made in it), a LOOKUP of the lower
    names beside it (the C core answers those from the store) gives each the attributes and
    inode number it had before, when the directory was the image's alone; a whited-out name
    is gone, a copied-up one the copy."""
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt, rw=True):
        etc = os.path.join(mnt, "etc")
        names = sorted(os.listdir(etc))
        before = {n: _lstat_fields(os.path.join(etc, n)) for n in names}
        top = sorted(os.listdir(mnt))  # directories too: the root is merged once etc is copied up
        top_before = {n: _lstat_fields(os.path.join(mnt, n)) for n in top if n != "etc"}
        _make(os.path.join(etc, "made"), b"m")
        os.unlink(os.path.join(etc, "group"))
        with open(os.path.join(etc, "passwd"), "ab") as f:
            f.write(b"#\n")
        drop_dentries()
        after = {n: _lstat_fields(os.path.join(etc, n)) for n in names if n not in ("group", "passwd")}
        assert after == {n: v for n, v in before.items() if n not in ("group", "passwd")}
        assert {n: _lstat_fields(os.path.join(mnt, n)) for n in top_before} == top_before
        assert os.listdir(os.path.join(mnt, "usr"))  # a lower directory found so: listed from the store
        assert not os.path.lexists(os.path.join(etc, "group"))
        st = os.lstat(os.path.join(etc, "passwd"))
        assert (st.st_ino, st.st_size) == (before["passwd"][0], before["passwd"][5] + 2)
        assert sorted(os.listdir(etc)) == sorted([*(set(names) - {"group"}), "made"])


def test_a_directory_shows_the_names_made_in_it_as_the_kernel_overlay(cli, sample, sample_layout, tmp_path):
    """Each name made in a directory makes the kernel ask for the directory's attributes again
    (the C core answers from the host directory): its times move, a directory merged with a
    lower one keeps one link, an upper-only one counts its subdirectories, as the kernel
    overlay shows them on the same upper directory."""
    mnt, upper = _beside_the_kernel_overlay(tmp_path)

    def dir_attrs(root: str) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for rel in ("etc", "fresh", "fresh/sub"):
            st = os.stat(os.path.join(root, rel))
            # (not the ctime: the kernel overlay sets its xattrs on the directories it looks up)
            out[rel] = (st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_mtime_ns)
        return out

    with layerfs_mount(cli, sample, mnt, upper=upper):
        etc = os.path.join(mnt, "etc")
        _make(os.path.join(etc, "first"), b"1")  # copies etc up
        before = os.stat(etc)
        os.mkdir(os.path.join(mnt, "fresh"))
        os.mkdir(os.path.join(mnt, "fresh", "sub"))
        os.chmod(etc, 0o750)
        for i in range(20):  # (the last change before the stat is a name made)
            _make(os.path.join(etc, f"n{i}"), b"%d" % i)
            _make(os.path.join(mnt, "fresh", f"n{i}"), b"%d" % i)
        ours = dir_attrs(mnt)
    assert ours["etc"][4] > before.st_mtime_ns, "the directory's mtime did not move"
    assert stat.S_IMODE(ours["etc"][0]) == 0o750
    assert ours["etc"][1] == 1 and ours["fresh"][1] == 3
    lowers = extract_layers(sample_layout, str(tmp_path / "lowers"))
    with kernel_overlay(lowers, upper, str(tmp_path / "work"), str(tmp_path / "k")) as k:
        theirs = dir_attrs(k)
    assert theirs == ours


def test_renames_of_new_files_as_the_kernel_overlay_shows_them(cli, sample, sample_layout, tmp_path):
    """A package manager's unpack: new files renamed over lower ones, over upper ones, to free
    names, across directories (the C core's renames); and the renames that must leave a
    whiteout behind (a copied-up file, a lower one: the view's).  The mount, a remount and the
    kernel overlay on the same upper directory show the same tree."""
    mnt, upper = _beside_the_kernel_overlay(tmp_path)
    with layerfs_mount(cli, sample, mnt, upper=upper):
        etc, fresh = os.path.join(mnt, "etc"), os.path.join(mnt, "fresh")
        os.mkdir(fresh)
        _make(os.path.join(etc, "passwd.dpkg-new"), b"root:x:0:0::/root:/bin/sh\n")
        os.rename(os.path.join(etc, "passwd.dpkg-new"), os.path.join(etc, "passwd"))  # over a lower file
        for n in ("a", "c"):
            _make(os.path.join(fresh, n), n.encode())
        os.rename(os.path.join(fresh, "a"), os.path.join(fresh, "b"))  # to a free name
        os.rename(os.path.join(fresh, "b"), os.path.join(fresh, "c"))  # over an upper file
        os.symlink("c", os.path.join(fresh, "l"))
        os.rename(os.path.join(fresh, "l"), os.path.join(etc, "l"))  # across directories
        with open(os.path.join(etc, "hostname"), "ab") as f:  # copied up: a lower file behind it
            f.write(b"more\n")
        os.rename(os.path.join(etc, "hostname"), os.path.join(fresh, "hostname"))
        os.rename(os.path.join(etc, "group"), os.path.join(fresh, "group"))  # a lower file
        os.rename(os.path.join(etc, "passwd"), os.path.join(etc, "passwd.back"))  # the new one again
        with open(os.path.join(etc, "passwd.back"), "rb") as f:
            assert f.read() == b"root:x:0:0::/root:/bin/sh\n"
        assert sorted(os.listdir(fresh)) == ["c", "group", "hostname"]
        assert not os.path.lexists(os.path.join(etc, "hostname"))
        assert not os.path.lexists(os.path.join(etc, "passwd"))
        with open(os.path.join(fresh, "c"), "rb") as f:
            assert f.read() == b"a"
        drop_dentries()  # and once more through LOOKUPs
        ours = snapshot(mnt)
        assert ours["/etc/l"]["target"] == "c" and "/etc/passwd" not in ours
    with layerfs_mount(cli, sample, mnt, upper=upper):
        assert snapshot(mnt) == ours
    lowers = extract_layers(sample_layout, str(tmp_path / "lowers"))
    with kernel_overlay(lowers, upper, str(tmp_path / "work"), str(tmp_path / "k")) as k:
        assert snapshot(k) == ours


def test_removals_of_new_and_copied_up_files_as_the_kernel_overlay_shows_them(
    cli, sample, sample_layout, tmp_path
):
    """rm of files made through the mount (in a merged directory and in a new one: the C core
    unlinks them), of a copied-up file and of a lower one (whiteouts), and of a file still open
    (it stays readable, with no links).  The kernel overlay shows the same tree."""
    mnt, upper = _beside_the_kernel_overlay(tmp_path)
    with layerfs_mount(cli, sample, mnt, upper=upper):
        etc, fresh = os.path.join(mnt, "etc"), os.path.join(mnt, "fresh")
        os.mkdir(fresh)
        for d in (etc, fresh):
            for n in ("a", "b", "c"):
                _make(os.path.join(d, n), n.encode())
            os.symlink("a", os.path.join(d, "l"))
            os.unlink(os.path.join(d, "a"))
            os.unlink(os.path.join(d, "l"))
        with open(os.path.join(etc, "hostname"), "ab") as f:  # copied up: its lower file hidden
            f.write(b"more\n")
        os.unlink(os.path.join(etc, "hostname"))
        os.unlink(os.path.join(etc, "group"))
        fd = os.open(os.path.join(fresh, "b"), os.O_RDONLY)
        try:
            os.unlink(os.path.join(fresh, "b"))
            assert os.fstat(fd).st_nlink == 0 and os.read(fd, 10) == b"b"
        finally:
            os.close(fd)
        assert sorted(os.listdir(fresh)) == ["c"]
        assert {"a", "l", "hostname", "group"}.isdisjoint(os.listdir(etc))
        assert {"b", "c"} <= set(os.listdir(etc))
        drop_dentries()
        ours = snapshot(mnt)
        for gone in ("/etc/a", "/etc/hostname", "/etc/group", "/fresh/b", "/fresh/l"):
            assert gone not in ours
    lowers = extract_layers(sample_layout, str(tmp_path / "lowers"))
    with kernel_overlay(lowers, upper, str(tmp_path / "work"), str(tmp_path / "k")) as k:
        assert snapshot(k) == ours


def _listing(root: str) -> dict[str, object]:
    """Below ``root``: each directory's entries (name, d_ino, type) and each entry's lstat."""
    out: dict[str, object] = {}
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        with os.scandir(d) as it:
            out["ls " + rel] = sorted(
                (e.name, e.inode(), e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it
            )
        for name in dirs + files:
            st = os.lstat(os.path.join(d, name))
            fields = (st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
            out[os.path.join(rel, name)] = fields
    return out


def test_upper_directories_list_as_the_view_lists_them(cli, sample, tmp_path, monkeypatch):
    """Directories whose names are the upper directory's alone (made through the mount, or made
    over a removed lower one: opaque) are listed by the C core from the host.  Each entry's
    number is the view's (a copied-up file moved there keeps its lower number); whiteouts and
    the format's names never show.  The same listing and attributes come through the same mount
    after the kernel forgot its names, after a remount, and through the other core."""
    mnt, upper = str(tmp_path / "m"), str(tmp_path / "upper")
    with layerfs_mount(cli, sample, mnt, upper=upper):
        fresh = os.path.join(mnt, "fresh")
        os.makedirs(os.path.join(fresh, "sub", "deeper"))
        for i in range(40):
            _make(os.path.join(fresh, f"f{i:02}"), b"%d" % i, mode=0o600 + i % 3 * 0o44)
        os.symlink("f00", os.path.join(fresh, "link"))
        os.link(os.path.join(fresh, "f01"), os.path.join(fresh, "sub", "hard"))
        lower_ino = os.lstat(os.path.join(mnt, "etc", "hostname")).st_ino
        os.rename(os.path.join(mnt, "etc", "hostname"), os.path.join(fresh, "moved"))  # copied up
        os.unlink(os.path.join(fresh, "f02"))
        shutil.rmtree(os.path.join(mnt, "usr"))  # a lower tree, whited out
        os.mkdir(os.path.join(mnt, "usr"))  # and made again: opaque
        _make(os.path.join(mnt, "usr", "only"), b"o")
        first = _listing(fresh), _listing(os.path.join(mnt, "usr"))
        assert os.lstat(os.path.join(fresh, "moved")).st_ino == lower_ino
        assert sorted(os.listdir(os.path.join(mnt, "usr"))) == ["only"]
        drop_dentries()
        assert (_listing(fresh), _listing(os.path.join(mnt, "usr"))) == first
    with layerfs_mount(cli, sample, mnt, upper=upper):
        assert (_listing(fresh), _listing(os.path.join(mnt, "usr"))) == first
    other = "python" if os.environ.get("LAYERFS_FUSE") == "c" else "c"
    monkeypatch.setenv("LAYERFS_FUSE", other)
    with layerfs_mount(cli, sample, mnt, upper=upper):
        assert (_listing(fresh), _listing(os.path.join(mnt, "usr"))) == first
    names = [n for n, *_ in first[0]["ls ."]]
    assert "f02" not in names and "moved" in names and not any(n.startswith(".wh.") for n in names)


def _tree_tar(path: str) -> None:
    """A tar as a package or an image layer has them: directories (one setgid, one private),
    files of several modes and owners (one set-uid), symlinks, a hardlink, times in the past
    and past 2038, and a directory listed after its files (its mode and time set last)."""
    old, late = 1_000_000_000, 2_200_000_000

    def entry(
        name: str,
        kind: bytes,
        *,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        data: bytes = b"",
        link: str = "",
        mtime: int = old,
    ) -> tuple[tarfile.TarInfo, bytes]:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime, ti.linkname = kind, mode, uid, gid, mtime, link
        ti.size = len(data)
        return ti, data

    members = [
        entry("t", tarfile.DIRTYPE, mode=0o755),
        entry("t/bin", tarfile.DIRTYPE, mode=0o755, mtime=old + 1),
        entry("t/bin/tool", tarfile.REGTYPE, mode=0o4755, data=b"#!/bin/sh\n"),
        entry("t/bin/alias", tarfile.SYMTYPE, mode=0o777, uid=1234, gid=5678, link="tool"),
        entry("t/bin/same", tarfile.LNKTYPE, mode=0o4755, link="t/bin/tool"),
        entry("t/share", tarfile.DIRTYPE, mode=0o2775, uid=1000, gid=1000),
        entry("t/share/doc", tarfile.REGTYPE, mode=0o444, uid=1000, gid=1000, data=b"d" * 5000),
        entry("t/private/key", tarfile.REGTYPE, mode=0o600, uid=1234, gid=5678, data=b"k", mtime=late),
        entry("t/private", tarfile.DIRTYPE, mode=0o700, uid=1234, gid=5678, mtime=late),
        entry("t/empty", tarfile.REGTYPE, mode=0o640, uid=0, gid=42),
    ]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data else None)


def test_a_tar_extracts_as_on_the_kernel_overlay(cli, sample, sample_layout, tmp_path):
    """tar -x as root: the C core makes the directories, files and symlinks of a plain upper
    directory and sets their owners, modes and times (MKDIR, CREATE, SYMLINK, SETATTR); a setgid
    directory's files are the view's.  What the mount shows is what the kernel overlay shows on
    the same upper directory, and a remount (numbers kept) shows it again."""
    reason = overlay_unavailable(str(tmp_path))
    if reason:
        pytest.skip(reason)
    mnt, upper, tar = str(tmp_path / "m"), str(tmp_path / "upper"), str(tmp_path / "t.tar")
    _tree_tar(tar)
    with layerfs_mount(cli, sample, mnt, upper=upper):
        os.mkdir(os.path.join(mnt, "x"))
        subprocess.run(["tar", "-C", os.path.join(mnt, "x"), "-xpf", tar, "--numeric-owner"], check=True)
        ours = snapshot(os.path.join(mnt, "x"), dir_mtimes=True)
        numbers = inode_numbers(os.path.join(mnt, "x"))
    with layerfs_mount(cli, sample, mnt, upper=upper):
        assert inode_numbers(os.path.join(mnt, "x")) == numbers
        assert snapshot(os.path.join(mnt, "x"), dir_mtimes=True) == ours
    lowers = extract_layers(sample_layout, str(tmp_path / "lowers"))
    with kernel_overlay(lowers, upper, str(tmp_path / "work"), str(tmp_path / "k")) as k:
        theirs = snapshot(os.path.join(k, "x"), dir_mtimes=True)
    assert theirs == ours
    # and what tar asked for, so a mistake made the same way on both sides shows too
    assert ours["/t/bin/tool"]["mode"] == oct(0o4755) and ours["/t/private"]["mode"] == oct(0o700)
    assert (ours["/t/bin/alias"]["uid"], ours["/t/bin/alias"]["gid"]) == (1234, 5678)
    assert ours["/t/private/key"]["mtime_ns"] == 2_200_000_000 * 10**9
    assert ours["/t/private"]["mtime_ns"] == 2_200_000_000 * 10**9
    assert ours["/t/share"]["mode"] == oct(0o2775) and ours["/t/share/doc"]["gid"] == 1000
    assert ["/t/bin/same", "/t/bin/tool"] in ours["#hardlinks"]


# -- copy-up in C: a lower file alone in its inode, in a directory already in the upper ----------
CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service=ep (v2)


@pytest.fixture
def xattr_image(cli: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Files with an owner, a mode, set-id bits, xattrs, a capability and a hardlink pair."""
    members = [member("d/", kind=tarfile.DIRTYPE, mode=0o755)]
    for i in range(4):
        info, data = member(f"d/f{i}", b"lower %d\n" % i * 1000, mode=0o640, mtime=1_600_000_000 + i)
        info.uid, info.gid = 1000 + i, 2000 + i
        members.append((info, data))
    info, data = member("d/xa", b"with xattrs", mode=0o4755)
    info.pax_headers = {"SCHILY.xattr.user.note": "hello", "SCHILY.xattr.trusted.keep": "t"}
    members.append((info, data))
    info, data = member("d/cap", b"#!/bin/true\n", mode=0o755)
    info.pax_headers = {"SCHILY.xattr.security.capability": CAP.decode("latin-1")}
    members.append((info, data))
    members.append(member("d/big", bytes(range(256)) * 12_000))  # several chunks
    members.append(member("d/h1", b"linked"))
    members.append(member("d/h2", kind=tarfile.LNKTYPE, link="d/h1"))
    layout = str(tmp_path_factory.mktemp("xattr-image") / "layout")
    make_layout(layout, [tar_bytes(members)], ref="xattrs:1")
    cli("import", layout)
    return "xattrs:1", layout


def _meta(path: str) -> tuple[Any, ...]:
    st = os.lstat(path)
    xattrs = {
        n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)
    }
    return (st.st_ino, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, xattrs)


def test_a_copy_up_keeps_what_the_lower_file_had(cli, xattr_image, tmp_path):
    image, layout = xattr_image
    """Opened to write, each lower file is copied up whole: its bytes, owner, mode (set-id bits
    too), xattrs, modification time and inode number, as the view copies; its directory's
    times stay.  What the kernel overlay mounts from the same upper directory is the same."""
    mnt, upper = str(tmp_path / "m"), str(tmp_path / "upper")
    with layerfs_mount(cli, image, mnt, upper=upper):
        d = os.path.join(mnt, "d")
        names = ["f0", "f1", "f2", "f3", "xa", "cap", "big", "h1"]
        before = {n: _meta(os.path.join(d, n)) for n in names}
        data = {n: open(os.path.join(d, n), "rb").read() for n in names}
        fd = os.open(os.path.join(d, "f0"), os.O_RDONLY)  # the first copy-up makes d an upper directory
        os.close(fd)
        _make(os.path.join(d, "new"), b"n")
        dir_times = os.lstat(d).st_mtime_ns
        for n in names:
            fd = os.open(os.path.join(d, n), os.O_RDWR)  # copied up, nothing written
            os.close(fd)
            got = _meta(os.path.join(d, n))
            assert got == before[n], n
            with open(os.path.join(d, n), "rb") as f:
                assert f.read() == data[n], n
        assert os.lstat(d).st_mtime_ns == dir_times
        assert os.lstat(os.path.join(d, "h1")).st_ino == os.lstat(os.path.join(d, "h2")).st_ino
        with open(os.path.join(d, "f1"), "ab") as f:  # and written
            f.write(b"appended")
        with open(os.path.join(d, "f1"), "rb") as f:
            assert f.read() == data["f1"] + b"appended"
        fd = os.open(os.path.join(d, "f2"), os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        assert os.lstat(os.path.join(d, "f2")).st_size == 0
        ours = snapshot(mnt, volatile={"/d/f1", "/d/f2", "/d/new"})
        inos = {n: os.lstat(os.path.join(d, n)).st_ino for n in names}
    with layerfs_mount(cli, image, mnt, upper=upper):
        assert {n: os.lstat(os.path.join(mnt, "d", n)).st_ino for n in names} == inos
    for n in names:  # plain files in the upper directory
        assert stat.S_ISREG(os.lstat(os.path.join(upper, "d", n)).st_mode)
    assert not [n for n in os.listdir(os.path.join(tmp_path, "upper")) if n.startswith("copyup-")]
    reason = overlay_unavailable(str(tmp_path))
    if reason:
        pytest.skip(reason)
    lowers = extract_layers(layout, str(tmp_path / "lowers"))
    with kernel_overlay(lowers, upper, str(tmp_path / "work"), str(tmp_path / "k")) as k:
        assert snapshot(k, volatile={"/d/f1", "/d/f2", "/d/new"}) == ours


def test_a_write_after_copy_up_drops_a_capability_as_the_kernel_does(cli, xattr_image, tmp_path):
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, xattr_image[0], mnt, rw=True):
        d = os.path.join(mnt, "d")
        _make(os.path.join(d, "new"), b"n")
        p = os.path.join(d, "cap")
        assert os.getxattr(p, "security.capability") == CAP
        with open(p, "ab") as f:
            f.write(b"# more\n")
        with pytest.raises(OSError) as e:
            os.getxattr(p, "security.capability")
        assert e.value.errno == errno.ENODATA


def test_a_reader_open_before_the_copy_up_reads_the_copy(cli, xattr_image, tmp_path):
    """As the kernel overlay's files do once their inode is copied up: a lower file opened to
    read, then copied up and written through another open, reads the copy, also where the
    kernel's page cache no longer has it (from the store, before)."""
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, xattr_image[0], mnt, rw=True):
        d = os.path.join(mnt, "d")
        _make(os.path.join(d, "new"), b"n")  # d in the upper directory: the copy-up is C's
        for name in ("f3", "big"):
            p = os.path.join(d, name)
            reader = os.open(p, os.O_RDONLY)
            try:
                first = os.pread(reader, 1 << 22, 0)
                with open(p, "r+b") as writer:
                    writer.write(b"NEW")
                os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(reader, 1 << 22, 0) == b"NEW" + first[3:], name
            finally:
                os.close(reader)
