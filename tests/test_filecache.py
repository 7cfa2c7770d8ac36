"""The file cache of writable mounts (layerfs/store/filecache.py, ext/filecache.c): a lower file
read through a ``--rw`` mount is copied, decompressed, into ``<store>/filecache`` once it is
closed; later opens hand the copy to the kernel (passthrough), so no READ reaches the daemon.
The directory stays within its bound, a copy that does not fit the index is ignored, and ``gc``
drops copies of objects the store no longer holds."""

from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Callable
from typing import Any

import pytest
from conftest import make_layout, member, tar_bytes
from unionutil import debug_ops, layerfs_mount, need_fuse, no_mount_left_behind, wait_until  # noqa: F401

pytestmark = pytest.mark.usefixtures("need_fuse")
MiB = 1 << 20


def _data(seed: int, size: int) -> bytes:
    """Half random, half text: some chunks compress, some are stored as they are."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rnd.randbytes(32 << 10) + (b"line %d of a text\n" % len(out)) * 1500
    return bytes(out[:size])


@pytest.fixture
def image(cli: Callable[..., Any], tmp_path: Any) -> dict[str, bytes]:
    files = {f"big{i}": _data(i, 2 * MiB + i * 4099) for i in range(4)}
    files["small"] = _data(9, 100_000)
    layer = tar_bytes([member(name, data) for name, data in files.items()])
    cli("import", make_layout(tmp_path / "layout", [layer], ref="cached:1"))
    return files


def _copies(store_path: str) -> dict[str, int]:
    root = os.path.join(store_path, "filecache")
    if not os.path.isdir(root):
        return {}
    return {e.name: e.stat().st_size for e in os.scandir(root)}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_read_file_is_copied_then_read_by_the_kernel(cli, image, store_path, tmp_path):
    if os.environ.get("LAYERFS_FUSE", "c") == "python" or os.geteuid() != 0:
        pytest.skip("the file cache is the C core's, passthrough needs a privileged daemon")
    mnt = str(tmp_path / "m")
    os.makedirs(mnt)
    cli("mount", "--rw", "--debug", "cached:1", mnt)
    try:
        big = os.path.join(mnt, "big0")
        assert _read(big) == image["big0"]  # from the store: the copy is filled once it is closed
        want = hashlib.sha256(image["big0"]).hexdigest()
        assert wait_until(lambda: want in _copies(store_path), 30), _copies(store_path)
        assert _read(os.path.join(mnt, "small")) == image["small"]
        node = str(os.lstat(big).st_ino)
        before = len(debug_ops(store_path))
        with open(big, "rb") as f:  # this open finds the copy: the kernel reads it itself
            assert f.read() == image["big0"]
            f.seek(MiB + 5)
            assert f.read(100) == image["big0"][MiB + 5 : MiB + 105]
        after = debug_ops(store_path)[before:]
        assert ("14", node) in after, "the second OPEN did not reach the daemon's log"
        assert not [op for op in after if op == ("15", node)], "READ reached the daemon"
    finally:
        cli("umount", mnt, check=False)
    copies = _copies(store_path)
    assert copies == {want: len(image["big0"])}, "only files of 1 MiB and more are copied"
    with open(os.path.join(store_path, "filecache", want), "rb") as f:
        assert f.read() == image["big0"]


def test_a_cached_file_open_several_times_then_written(cli, image, store_path, tmp_path):
    """Opens of one lower file share its copy (the kernel takes one backing per inode: a second
    open of a running program gave EIO).  The kernel would pass a writer through to that same
    copy, so while it is read a writer gets ETXTBSY, as a write to a running program does;
    once the readers are gone the writer copies the file up."""
    if os.environ.get("LAYERFS_FUSE", "c") == "python" or os.geteuid() != 0:
        pytest.skip("the file cache is the C core's, passthrough needs a privileged daemon")
    with layerfs_mount(cli, "cached:1", str(tmp_path / "m"), rw=True) as mnt:
        p = os.path.join(mnt, "big3")
        assert _read(p) == image["big3"]
        want = hashlib.sha256(image["big3"]).hexdigest()
        assert wait_until(lambda: want in _copies(store_path), 30)
        with open(p, "rb") as a, open(p, "rb") as b:
            assert a.read(MiB) == image["big3"][:MiB]
            assert b.read() == image["big3"]
            for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
                with pytest.raises(OSError) as e:
                    os.close(os.open(p, flags))
                assert e.value.errno == errno.ETXTBSY
            with pytest.raises(OSError) as e:
                os.truncate(p, 0)
            assert e.value.errno == errno.ETXTBSY
            os.chmod(p, 0o600)  # metadata copies it up; readers share the unchanged copy
            with open(p, "rb") as c:
                assert c.read() == image["big3"]
            assert a.read() == image["big3"][MiB:]
        with open(p, "r+b") as w:
            w.write(b"changed")
        assert _read(p) == b"changed" + image["big3"][7:]
    assert _copies(store_path)[want] == len(image["big3"])  # the copy is untouched
    with open(os.path.join(store_path, "filecache", want), "rb") as f:
        assert f.read() == image["big3"]


def test_the_cache_stays_within_its_bound(cli, image, store_path, tmp_path):
    if os.environ.get("LAYERFS_FUSE", "c") == "python":
        pytest.skip("the file cache is the C core's")
    bound = 5 * MiB  # two 2 MiB copies fit, a third evicts the least recently used
    env = {"LAYERFS_FILE_CACHE": "5M"}
    mnt = str(tmp_path / "m")
    os.makedirs(mnt)
    cli("mount", "--rw", "cached:1", mnt, env=env)
    try:
        for i in range(4):
            name = f"big{i}"
            assert _read(os.path.join(mnt, name)) == image[name]
            want = hashlib.sha256(image[name]).hexdigest()
            assert wait_until(lambda w=want: w in _copies(store_path), 30), (name, _copies(store_path))
            assert sum(_copies(store_path).values()) <= bound
        assert len(_copies(store_path)) == 2
        for i in range(4):  # evicted or not, every file reads right
            assert _read(os.path.join(mnt, f"big{i}")) == image[f"big{i}"]
    finally:
        cli("umount", mnt, check=False)


def test_a_copy_that_does_not_fit_the_index_is_not_used(cli, image, store_path, tmp_path):
    if os.environ.get("LAYERFS_FUSE", "c") == "python":
        pytest.skip("the file cache is the C core's")
    root = os.path.join(store_path, "filecache")
    os.makedirs(root, exist_ok=True)
    want = hashlib.sha256(image["big1"]).hexdigest()
    with open(os.path.join(root, want), "wb") as f:  # a short copy (say, from a full disk)
        f.write(image["big1"][: MiB + 1])
    with layerfs_mount(cli, "cached:1", str(tmp_path / "m"), rw=True) as mnt:
        assert _read(os.path.join(mnt, "big1")) == image["big1"]


def test_gc_drops_copies_of_removed_images(cli, image, store_path, tmp_path):
    root = os.path.join(store_path, "filecache")
    os.makedirs(root, exist_ok=True)
    kept = hashlib.sha256(image["big2"]).hexdigest()
    gone = "ab" * 32  # no such object in the store
    for name in (kept, gone):
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"x" * 10)
    out = cli("gc", "--json").json()
    assert out["cached_files_removed"] == 1
    assert set(_copies(store_path)) == {kept}
    cli("rmi", "cached:1")
    cli("gc")
    assert _copies(store_path) == {}


def test_a_store_without_room_for_copies_still_serves(cli, image, store_path, tmp_path):
    """Copies cannot be made (the directory is a file): reads come from the store, as before."""
    if os.environ.get("LAYERFS_FUSE", "c") == "python":
        pytest.skip("the file cache is the C core's")
    with open(os.path.join(store_path, "filecache"), "w") as f:
        f.write("not a directory")
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, "cached:1", mnt, rw=True):
        assert _read(os.path.join(mnt, "big3")) == image["big3"]
