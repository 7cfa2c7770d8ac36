"""New files in directories already in the upper directory: the C core makes them itself
(upper_create in ext/fusecore.c) where the name is free, and leaves the rest to the union view.
Both cores run these; what the C core must say is what the view says."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from unionutil import (  # noqa: F401 - need_fuse and no_mount_left_behind are fixtures
    extract_layers,
    force_unmount,
    kernel_overlay,
    layerfs_mount,
    need_fuse,
    no_mount_left_behind,
    overlay_unavailable,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("need_fuse", "fuse_core")
SAMPLE = "layerfs-sample:latest"


@pytest.fixture
def sample(cli: Callable[..., Any], sample_layout: str) -> str:
    cli("import", sample_layout)
    return SAMPLE


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


def _inodes(root: str) -> dict[str, int]:
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = os.lstat(p).st_ino
    return out


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
        first = _inodes(mnt)
        assert len(set(first.values())) == len(first) - 2  # only the sample's two hardlinked pairs
    with layerfs_mount(cli, sample, mnt, upper=upper):
        assert _inodes(mnt) == first
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
            "import os; fd = os.open(os.environ['P'], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666);"
            " os.write(fd, b'u'); os.close(fd)"
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
    reason = overlay_unavailable(str(tmp_path))
    if reason:
        pytest.skip(reason)
    mnt, upper = str(tmp_path / "m"), str(tmp_path / "upper")
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
