"""Trees deeper than Python's recursion limit (about 1,000 frames) and than PATH_MAX: an image
or a container decides how deep its directories go.  A layer 2,000 directories deep imported,
but its mount failed with "maximum recursion depth exceeded" (the index lookup, the union's
visibility and copy-up, the merge of layers all recursed per component); so did `rm` of a
container that had made a deep tree (shutil.rmtree), and a lookup past PATH_MAX in a writable
mount answered ENOENT.  layerfs/hosttree.py walks and removes host trees without recursion."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from typing import Any

import pytest
from conftest import make_layout, member, tar_bytes
from unionutil import layerfs_mount, need_fuse  # noqa: F401 - need_fuse is a fixture

from layerfs import hosttree

DEPTH = 2000  # 4,000 bytes of path: past the recursion limit, and PATH_MAX with any prefix


def _make_deep_host_tree(root: str, depth: int) -> None:
    """A chain of ``depth`` directories, each holding a file, made relative to descriptors."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
                f.write(str(i))
            os.mkdir("dd", dir_fd=fd)
            nxt = os.open("dd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


def test_remove_a_tree_deeper_than_path_max(tmp_path):
    top = str(tmp_path / "top")
    os.mkdir(top)
    _make_deep_host_tree(top, 3000)  # 9,000 bytes of path
    os.symlink("/", os.path.join(top, "root-link"))  # never followed
    hosttree.remove(top)
    assert not os.path.exists(top)
    hosttree.remove(top)  # missing: fine
    f = tmp_path / "file"
    f.write_text("x")
    hosttree.remove(str(f))
    assert not f.exists()


def test_empty_keeps_the_directory(tmp_path):
    top = str(tmp_path / "top")
    os.mkdir(top)
    _make_deep_host_tree(top, 1500)
    hosttree.empty(top)
    assert os.listdir(top) == []


def test_walk_is_os_walk(tmp_path):
    for p in ("a/b/c", "a/d", "e"):
        os.makedirs(tmp_path / "t" / p)
    for p in ("a/f", "a/b/c/g", "h"):
        (tmp_path / "t" / p).write_text("x")
    top = str(tmp_path / "t")

    def norm(walk: Any) -> list[tuple[str, list[str], list[str]]]:
        return sorted((d, sorted(ds), sorted(fs)) for d, ds, fs in walk)

    assert norm(hosttree.walk(top)) == norm(os.walk(top))
    assert norm(hosttree.walk(os.fsencode(top))) == norm(os.walk(os.fsencode(top)))
    os.symlink("a", tmp_path / "t" / "link")  # unlike os.walk: a symlink is a file, never a dir
    _, dirs, files = next(iter(hosttree.walk(top)))
    assert (sorted(dirs), sorted(files)) == (["a", "e"], ["h", "link"])
    # deeper than the recursion limit
    deep = str(tmp_path / "deep")
    os.mkdir(deep)
    try:
        _make_deep_host_tree(deep, 1200)
        assert sum(1 for _ in hosttree.walk(deep)) == 1201
    finally:
        hosttree.remove(deep)  # (pytest's own clean-up of old test trees recurses)


@pytest.fixture
def deep_image(cli: Callable[..., Any], tmp_path: Any) -> str:
    path, members = "", []
    for _ in range(DEPTH):
        path = f"{path}/d" if path else "d"
        members.append(member(path, kind=tarfile.DIRTYPE, mode=0o755))
    members.append(member(f"{path}/f", b"at the bottom\n"))
    cli("import", make_layout(tmp_path / "layout", [tar_bytes(members)], ref="deep:1"))
    return "deep:1"


def _descend(mnt: str, depth: int) -> None:
    """chdir one component at a time (a path this long cannot be given whole)."""
    os.chdir(mnt)
    for _ in range(depth):
        os.chdir("d")


@pytest.mark.usefixtures("need_fuse", "fuse_core")
@pytest.mark.parametrize("rw", [False, True], ids=["ro", "rw"])
def test_mount_an_image_deeper_than_the_recursion_limit(cli, deep_image, tmp_path, rw):
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, deep_image, mnt, rw=rw):
        try:
            _descend(mnt, DEPTH)
            with open("f") as f:
                assert f.read() == "at the bottom\n"
            if rw:  # the 2,000 directories above are copied up first
                with open("new", "w") as f:
                    f.write("made at the bottom\n")
                with open("new") as f:
                    assert f.read() == "made at the bottom\n"
                os.chdir("..")
                os.rename("d", "moved")  # a rename that deep, then back up and list
                assert sorted(os.listdir("moved")) == ["f", "new"]
        finally:
            os.chdir("/")


@pytest.mark.usefixtures("need_fuse")
def test_a_container_that_makes_a_deep_tree(cli, sample_layout, tmp_path):
    cli("import", sample_layout)
    script = "i=0; while [ $i -lt 1200 ]; do mkdir d; cd d; i=$((i+1)); done; echo x > f"
    cli("run", "--name", "deep", "layerfs-sample:latest", "sh", "-c", script)
    changes = cli("diff", "deep").out.splitlines()
    assert changes[0] == "C /app" and len(changes) == 1202 and changes[-1].endswith("/d/f")
    cli("commit", "deep", "deep:2")
    assert cli("rm", "deep").out == "deep\n"
    with layerfs_mount(cli, "deep:2", str(tmp_path / "m")) as mnt:
        try:
            os.chdir(os.path.join(mnt, "app") if os.path.isdir(os.path.join(mnt, "app")) else mnt)
            for _ in range(1200):
                os.chdir("d")
            with open("f") as f:
                assert f.read() == "x\n"
        finally:
            os.chdir("/")


def test_remove_a_tree_being_written_into(tmp_path, monkeypatch):
    """A directory that gains an entry while it is being removed is gone through again (a
    container's monitor may still write its state while `rm -f` removes it)."""
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_text("x")
    real_rmdir = os.rmdir
    late = {"done": False}

    def rmdir(path: Any, *, dir_fd: Any = None) -> None:
        if path == "b" and not late["done"]:  # a file appears just before b is removed
            late["done"] = True
            with open(os.open("b/late", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dir_fd), "w") as f:
                f.write("y")
        real_rmdir(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "rmdir", rmdir)
    hosttree.remove(str(top))
    assert late["done"] and not top.exists()
