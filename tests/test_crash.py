"""Crash safety: ``kill -9`` in the middle of an import, and leases protecting live sessions.

An import commits its data in batches but makes layers, images and tags visible only in its
last transaction.  Killed after a batch, it must leave no image, layer or tag, one lease of a
dead process, and a store that verifies; ``gc`` reclaims the lease and everything it pinned.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import make_layout, member, tar_bytes

from layerfs.store import Store, collect, verify

MiB = 1 << 20


def _tar(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        d = tarfile.TarInfo("data")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        t.addfile(d)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_layout(tmp_path_factory: pytest.TempPathFactory) -> str:
    """~180 MiB uncompressed layer: random 1 MiB files, compressible text files and one file
    above the store's hold threshold (compressed while it streams)."""
    files = [(f"data/rand{i:03d}", os.urandom(MiB)) for i in range(100)]
    text = b"".join(b"line %d of a compressible file: lorem ipsum dolor sit amet\n" % i for i in range(34000))
    files += [(f"data/text{i:03d}", b"%d\n" % i + text[: 2 * MiB]) for i in range(30)]
    files.append(("data/big", os.urandom(20 * MiB)))
    # plain tar (no gzip): generating the layer must stay fast
    return make_layout(
        tmp_path_factory.mktemp("crash") / "layout", [_tar(files)], ref="big:1", compress=False
    )


def _wait_for_batch(store_path: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """Poll (read-only, from this process) until the import has committed a batch of objects."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the import finished before a batch was seen"
        try:
            with Store(store_path, readonly=True) as s, s.read() as txn:
                objects = txn.stat(s.db("objects"))["entries"]
                leases = txn.stat(s.db("leases"))["entries"]
            if leases and objects:
                return int(objects)
        except Exception:  # the store is not created yet
            pass
        time.sleep(0.005)
    raise AssertionError("no batch committed in time")


def test_kill_mid_import(big_layout: str, store_path: str, cli) -> None:
    env = dict(os.environ, LAYERFS_STORE=store_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerfs", "import", "-q", big_layout],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        seen = _wait_for_batch(store_path, proc)
    finally:
        proc.send_signal(signal.SIGKILL)

    def zombie() -> bool:
        """Every thread has ended (the first one first, maybe: SIGKILL makes the leader a
        zombie while the compression threads are still exiting, and until they are gone the
        process still runs)."""
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            try:
                with open(f"/proc/{proc.pid}/task/{tid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                        return False
            except FileNotFoundError:  # that thread is gone
                continue
        return True

    deadline = time.monotonic() + 10
    while not zombie() and time.monotonic() < deadline:
        time.sleep(0.01)
    with Store(store_path) as s:  # not reaped yet: a zombie holds nothing (its parent may be slow)
        ((_, lease),) = s.leases()
        assert not Store.lease_alive(lease)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert seen > 0

    with Store(store_path) as s:
        assert s.images() == [] and s.layers() == [] and s.tags() == {}
        ((_, lease),) = s.leases()
        assert lease["pid"] == proc.pid and lease["purpose"] == "import"
        assert not Store.lease_alive(lease)
        with s.read() as txn:
            assert txn.stat(s.db("objects"))["entries"] >= seen
            assert txn.stat(s.db("lease_objs"))["entries"] > 0
        res = verify(s)
        assert res.errors == [] and res.objects >= seen and res.images == 0

    size_killed = os.path.getsize(os.path.join(store_path, "data.mdb"))
    packs = os.path.join(store_path, "packs")  # a store with file packs (LAYERFS_STORE_PAYLOAD=files)
    files_killed = os.listdir(packs) if os.path.isdir(packs) else []
    gc = cli("gc", "--json").json()
    assert isinstance(gc, dict)
    assert gc["leases_reclaimed"] == 1 and gc["objects_removed"] >= seen and gc["packs_removed"] > 0
    if files_killed:  # the payload was in pack files, and they are gone
        assert gc["packs_removed"] >= len(files_killed) and os.listdir(packs) == []
    else:  # the space comes back to the filesystem (LMDB alone keeps its file as large as it was)
        assert gc["file_bytes_returned"] > 0 and not gc["file_in_use"]
        assert os.path.getsize(os.path.join(store_path, "data.mdb")) < size_killed // 4
    df = cli("df", "--json").json()
    assert isinstance(df, dict)
    assert (df["images"], df["layers"], df["objects"], df["payload_bytes"]) == (0, 0, 0, 0)
    with Store(store_path) as s, s.read() as txn:
        assert s.leases() == []
        for name in ("lease_objs", "lease_packs", "packs"):
            assert txn.stat(s.db(name))["entries"] == 0, name

    out = cli("import", "-q", "--json", big_layout).json()
    assert isinstance(out, list) and out[0]["layers_new"] == 1
    assert cli("verify", "-q").code == 0
    df = cli("df", "--json").json()
    assert isinstance(df, dict)
    assert (df["images"], df["layers"]) == (1, 1) and df["objects"] >= 131
    assert cli("gc", "--json").json() == {
        "leases_reclaimed": 0,
        "layers_removed": 0,
        "objects_removed": 0,
        "packs_removed": 0,
        "packs_compacted": 0,
        "bytes_reclaimed": 0,
        "cached_files_removed": 0,
        "file_bytes_returned": 0,
        "file_in_use": False,
        "file_error": "",
    }


def test_live_lease_protects_objects(store_path: str, cli) -> None:
    data = b"written by a session that is still running\n" * 1000
    with Store(store_path) as s:
        session = s.session()
        sha = session.add_blob(data)
        session.flush()
        assert s.has_object(sha) and s.layers() == []
        # gc in this process and from another one (a second store handle): the lease is alive
        assert collect(s).objects_removed == 0
        gc = cli("gc", "--json").json()
        assert isinstance(gc, dict)
        assert (gc["leases_reclaimed"], gc["objects_removed"], gc["packs_removed"]) == (0, 0, 0)
        assert s.read_object(sha) == data and len(s.leases()) == 1
        session.abort()
        assert s.leases() == []
        gc = cli("gc", "--json").json()
        assert isinstance(gc, dict)
        assert (gc["leases_reclaimed"], gc["objects_removed"], gc["packs_removed"]) == (0, 1, 1)
        assert not s.has_object(sha)
        assert verify(s).errors == []


def test_live_lease_protects_objects_in_process(store: Store) -> None:
    session = store.session()
    sha = session.add_blob(b"pinned" * 5000)
    session.flush()
    assert collect(store).objects_removed == 0 and store.has_object(sha)
    session.abort()
    res = collect(store)
    assert (res.objects_removed, res.packs_removed) == (1, 1) and not store.has_object(sha)


def test_full_disk_gives_one_line_and_a_consistent_store(tmp_path, cli):
    """An import that fills the filesystem stops with one line, stores nothing visible, and
    the store verifies and collects once space is back."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        store = str(small / "store")
        layout = make_layout(
            tmp_path / "img",
            [tar_bytes([member(f"f{i}", os.urandom(1 << 20)) for i in range(30)])],
            ref="big:latest",
        )
        env = {"LAYERFS_STORE": store}
        res = cli("import", str(layout), check=False, env=env)
        assert res.code == 1
        (line,) = res.err.strip().splitlines()
        assert line.startswith("layerfs: import of") and "cannot write to the store" in line
        assert cli("verify", env=env).code == 0
        # what the failed import wrote went back to the filesystem: the disk is not left full
        assert os.path.getsize(os.path.join(store, "data.mdb")) < 2 << 20
        assert os.statvfs(str(small)).f_bavail * os.statvfs(str(small)).f_frsize > 8 << 20
        df = cli("df", "--json", env=env).json()
        assert df["images"] == 0 and df["layers"] == 0
        # space back (a bigger filesystem): the same import works and gc leaves nothing behind
        subprocess.run(["mount", "-o", "remount,size=200m", str(small)], check=True)
        assert cli("import", str(layout), env=env).code == 0
        assert cli("gc", "--json", env=env).json()["objects_removed"] == 0
        assert cli("verify", env=env).code == 0
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_gc_returns_space_only_when_no_one_else_has_the_store(
    big_layout, sample_layout, store_path, cli, tmp_path, monkeypatch
):
    """LMDB never shrinks data.mdb: gc rewrites it without its free pages (a compacting copy),
    but only while no other process has the store open, since a copy swapped in under a mount
    would be lost to it; with a mount up it says so and leaves the file as it is."""
    from unionutil import fuse_unavailable, layerfs_mount

    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    monkeypatch.setenv("LAYERFS_STORE_PAYLOAD", "lmdb")  # the payload in data.mdb: what this is about
    data = os.path.join(store_path, "data.mdb")
    cli("import", "-q", sample_layout)
    cli("import", "-q", big_layout)
    full = os.path.getsize(data)
    with layerfs_mount(cli, "layerfs-sample:latest", str(tmp_path / "m")) as mnt:
        cli("rmi", "big:1")
        gc = cli("gc", "--json").json()
        assert gc["file_in_use"] and gc["file_bytes_returned"] == 0
        assert os.path.getsize(data) >= full  # (rmi and gc wrote a few pages more)
        assert "other processes have the store open" in cli("gc").out
        with open(os.path.join(mnt, "etc/hostname")) as f:
            assert f.read() == "layerfs-sample\n"
    gc = cli("gc", "--json").json()
    assert gc["file_bytes_returned"] > full // 2 and not gc["file_in_use"]
    assert os.path.getsize(data) < full // 4
    assert cli("verify").code == 0
    with layerfs_mount(cli, "layerfs-sample:latest", str(tmp_path / "m")) as mnt:
        with open(os.path.join(mnt, "etc/hostname")) as f:
            assert f.read() == "layerfs-sample\n"
    cli("import", "-q", big_layout)  # the compacted store takes writes as before
    assert cli("verify").code == 0
