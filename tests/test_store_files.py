"""The pack-file payload backend (``FilePayload``): chunks in ``STORE/packs/<id>``, metadata in
LMDB; the backend recorded in ``meta/payload``; its crash order (pack files synced before the
commit that names them, deleted after the commit that drops them, orphans removed); damaged
pack files; gc giving disk space back; and the LMDB map on a 32-bit address space (small,
grown, one clear error when it cannot grow).

The rest of the store and mount suites run on file packs too, with
``LAYERFS_STORE_PAYLOAD=files`` in the environment (every store a test creates is then one).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import make_layout, member, tar_bytes

import layerfs.store.store as store_mod
from layerfs.store import CHUNK_SIZE, CorruptionError, Store, StoreError, collect, verify
from layerfs.store.payload import PACK_TARGET, FilePayload, LmdbPayload
from layerfs.store.records import ImageRecord
from layerfs.store.store import MapLimitError, MissingPackError, decode_object
from layerfs.store.usage import usage

MiB = 1 << 20
WORKTREE = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
def files_store(store_path: str):
    s = Store(store_path, payload="files")
    yield s
    s.close()


def packs_dir(store: Store | str) -> str:
    return os.path.join(store if isinstance(store, str) else store.path, "packs")


def pack_files(store: Store | str) -> dict[str, int]:
    d = packs_dir(store)
    return (
        {name: os.path.getsize(os.path.join(d, name)) for name in os.listdir(d)} if os.path.isdir(d) else {}
    )


def chunks_of(store: Store, sha: bytes):  # type: ignore[no-untyped-def]
    with store.read() as txn:
        return decode_object(bytes(txn.get(sha, db=store.db("objects"))))[1]


def pack_path(store: Store, pack: int) -> str:
    return os.path.join(packs_dir(store), f"{pack:016x}")


def files_env(store_path: str) -> dict[str, str]:
    """A subprocess's environment: this tree's code (whatever its cwd), file packs."""
    path = os.environ.get("PYTHONPATH")
    return dict(
        os.environ,
        LAYERFS_STORE=store_path,
        LAYERFS_STORE_PAYLOAD="files",
        PYTHONPATH=WORKTREE + (os.pathsep + path if path else ""),
    )


# -- choosing and recording the backend -------------------------------------------------------
def test_the_backend_is_recorded_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERFS_STORE_PAYLOAD", raising=False)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with Store(a, payload="files") as s:
        assert s.payload_kind == "files" and isinstance(s.payload, FilePayload)
        with s.read() as txn:
            assert bytes(txn.get(b"payload", db=s.db("meta"))) == b"files"
        assert os.path.isdir(packs_dir(a))
    with Store(b, payload="lmdb") as s:
        assert s.payload_kind == "lmdb" and isinstance(s.payload, LmdbPayload)
    # an existing store keeps its backend, whatever is asked now
    monkeypatch.setenv("LAYERFS_STORE_PAYLOAD", "lmdb")
    with Store(a) as s, Store(b, payload="files") as t:
        assert (s.payload_kind, t.payload_kind) == ("files", "lmdb")
    with Store(a, readonly=True) as s:
        assert s.payload_kind == "files"
    # the environment chooses for a new store
    monkeypatch.setenv("LAYERFS_STORE_PAYLOAD", "files")
    with Store(str(tmp_path / "c")) as s:
        assert s.payload_kind == "files"
    monkeypatch.setenv("LAYERFS_STORE_PAYLOAD", "tape")
    with pytest.raises(StoreError, match="LAYERFS_STORE_PAYLOAD must be one of lmdb, files, not 'tape'"):
        Store(str(tmp_path / "d"))


def test_automatic_choice_follows_the_address_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERFS_STORE_PAYLOAD", raising=False)
    monkeypatch.setattr(store_mod, "ADDRESS_32", True)
    with Store(str(tmp_path / "a")) as s:
        assert s.payload_kind == "files"
    monkeypatch.setattr(store_mod, "ADDRESS_32", False)
    with Store(str(tmp_path / "b")) as s:
        assert s.payload_kind == "lmdb"


def test_a_store_made_before_the_key_is_lmdb(store_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERFS_STORE_PAYLOAD", "files")
    with Store(store_path, payload="lmdb") as s:
        s.write(lambda txn: txn.delete(b"payload", db=s.db("meta")))
    with Store(store_path) as s:
        assert s.payload_kind == "lmdb"


def test_an_unknown_backend_is_refused(store_path: str) -> None:
    with Store(store_path, payload="files") as s:
        s.write(lambda txn: txn.put(b"payload", b"s3", db=s.db("meta")))
    with pytest.raises(StoreError, match="keeps its payload in 's3'"):
        Store(store_path)


# -- writing and reading ------------------------------------------------------------------------
def test_objects_live_in_pack_files(files_store: Store) -> None:
    s = files_store
    blobs = [os.urandom(3 * CHUNK_SIZE + 17), b"compress me " * 50_000, b"", b"x"]
    blobs += [os.urandom(CHUNK_SIZE) for _ in range(70)]  # more than one 4 MiB pack
    with s.session() as w:
        shas = [w.add_blob(b) for b in blobs]
    files = pack_files(s)
    assert len(files) >= 2 and all(size <= PACK_TARGET for size in files.values())
    for sha, data in zip(shas, blobs):
        assert s.read_object(sha) == data
        assert s.read_at(sha, 5, 100_000) == data[5:100_005]
    # the records say each pack's length; the payload is not in data.mdb
    with s.read() as txn:
        recorded = {f"{pid:016x}": size for pid, size in s.payload.pack_ids(txn)}
    assert recorded == files
    assert os.path.getsize(os.path.join(s.path, "data.mdb")) < sum(files.values()) // 4
    u = usage(s)
    assert u["payload_bytes"] == sum(files.values())
    assert u["file_bytes"] == sum(files.values()) + os.path.getsize(os.path.join(s.path, "data.mdb"))
    assert verify(s).errors == []
    assert {m & 0o777 for m in [os.stat(packs_dir(s)).st_mode]} == {0o700}
    assert all(os.stat(os.path.join(packs_dir(s), n)).st_mode & 0o777 == 0o600 for n in files)


def test_import_and_read_through_the_cli(store_path: str, tmp_path: Path, cli) -> None:
    contents = {f"f{i}": os.urandom(i * 5000) for i in range(40)}
    contents["big"] = os.urandom(3 * MiB)
    layer = tar_bytes([member(name, data) for name, data in contents.items()])
    layout = make_layout(tmp_path / "img", [layer], ref="files:1")
    out = cli("import", "-q", "--json", layout, env={"LAYERFS_STORE_PAYLOAD": "files"}).json()
    assert out[0]["layers_new"] == 1  # type: ignore[index]
    assert pack_files(store_path)
    assert cli("verify", "-q").code == 0
    df = cli("df", "--json").json()
    assert df["payload"] == "files" and df["file_bytes"] > df["payload_bytes"]  # type: ignore[index]
    assert "(data.mdb and pack files)" in cli("df").out
    with Store(store_path) as s:
        assert s.payload_kind == "files"
        ((layer_id, _),) = s.layers()
        for e in s.layer_entries(layer_id):
            if e.content is not None:
                assert s.read_object(e.content) == contents[e.path.decode()]


def test_an_aborted_transaction_leaves_no_pack_file(files_store: Store) -> None:
    s = files_store

    def fn(txn):  # type: ignore[no-untyped-def]
        s.payload.put_pack(txn, 99, b"never committed")
        assert os.path.exists(pack_path(s, 99))
        raise StoreError("changed my mind")

    with pytest.raises(StoreError, match="changed my mind"):
        s.write(fn)
    assert pack_files(s) == {}


# -- damage --------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "short", "flipped", "empty"])
def test_a_damaged_pack_file_is_a_clear_error(damage: str, store_path: str, cli) -> None:
    data = os.urandom(CHUNK_SIZE * 2 + 1000)
    with Store(store_path, payload="files") as s:
        with s.session() as w:
            sha = w.add_blob(data)
            other = w.add_blob(b"an innocent bystander " * 10)
        c = chunks_of(s, sha)[1]
        path = pack_path(s, c.pack)
        if damage == "missing":
            os.unlink(path)
        elif damage == "short":
            os.truncate(path, c.offset + c.stored // 2)
        elif damage == "empty":
            os.truncate(path, 0)
        else:
            with open(path, "r+b") as f:
                f.seek(c.offset + 10)
                byte = f.read(1)[0]
                f.seek(c.offset + 10)
                f.write(bytes([byte ^ 0x5A]))
    with Store(store_path) as s:  # (opened for writing: nothing is removed for it)
        with pytest.raises(CorruptionError) as exc:
            s.read_object(sha)
        message = str(exc.value)
        if damage == "flipped":
            assert "fails its checksum" in message
        else:
            assert isinstance(exc.value, MissingPackError) and isinstance(exc.value, LookupError)
            assert path in message and ("missing" in message if damage == "missing" else "shorter" in message)
        if damage == "flipped":  # the rest of the pack reads
            assert s.read_object(other) == b"an innocent bystander " * 10
        errors = verify(s).errors
        assert any(sha.hex() in e for e in errors), errors
        if damage != "flipped":
            assert any(e.startswith(f"pack {c.pack}: file {path}") for e in errors), errors
    out = cli("verify", check=False)
    assert out.code == 3 and f"CORRUPT: object {sha.hex()}" in out.out, out.out
    assert len(out.err.strip().splitlines()) <= 1  # no traceback


# -- gc ------------------------------------------------------------------------------------------
def test_gc_deletes_and_compacts_pack_files(files_store: Store) -> None:
    s = files_store
    per_pack = PACK_TARGET // CHUNK_SIZE
    blobs = [os.urandom(CHUNK_SIZE) for _ in range(3 * per_pack + 8)]
    keep_idx = [0, 1] + list(range(2 * per_pack, 2 * per_pack + 40))  # pack 1: 2 alive, pack 3: 40
    with s.session() as w:
        shas = [w.add_blob(b) for b in blobs]
        keep = [shas[i] for i in keep_idx]
        w.put_image(b"\x01" * 32, ImageRecord(keep[0], keep[1], "", layers=(), blobs=tuple(keep)))
    before = pack_files(s)
    assert len(before) == 4
    disk_before = sum(before.values())
    res = collect(s)
    assert (res.packs_removed, res.packs_compacted) == (2, 1)
    after = pack_files(s)
    # packs 2 and 4 deleted, 1 rewritten into a new pack of its 2 live chunks, 3 kept whole
    assert len(after) == 2 and f"{3:016x}" in after and f"{1:016x}" not in after
    assert sum(after.values()) == (2 + per_pack) * CHUNK_SIZE
    assert disk_before - sum(after.values()) == res.bytes_reclaimed
    for i in keep_idx:
        assert s.read_object(shas[i]) == blobs[i]
    assert verify(s).errors == []
    assert not any(collect(s).as_dict().values())
    s.remove_image(b"\x01" * 32)
    collect(s)
    assert pack_files(s) == {} and usage(s)["payload_bytes"] == 0


def test_disk_usage_drops_after_rmi_and_gc(store_path: str, tmp_path: Path, cli) -> None:
    layer = tar_bytes([member(f"f{i}", os.urandom(MiB)) for i in range(24)])
    layout = make_layout(tmp_path / "img", [layer], ref="big:1")
    env = {"LAYERFS_STORE_PAYLOAD": "files"}
    cli("import", "-q", layout, env=env)

    def du() -> int:
        return int(
            subprocess.run(["du", "-sb", store_path], capture_output=True, text=True).stdout.split()[0]
        )

    full = du()
    assert full > 24 * MiB
    cli("rmi", "big:1")  # (which collects what the image alone used)
    cli("gc")
    assert du() < full // 8 and pack_files(store_path) == {}
    assert cli("verify", "-q").code == 0


# -- crashes -------------------------------------------------------------------------------------
_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from layerfs.store import Store
    from layerfs.store import payload

    moment = sys.argv[2]
    real_write = os.write
    if moment == "mid-write":  # the second pack file half written
        count = [0]

        def write(fd, data):
            count[0] += 1
            if count[0] == 2:
                real_write(fd, bytes(data[: len(data) // 2]))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(fd, data)

        payload.os.write = write
    else:  # every pack file written and synced, the commit not yet made
        def before_commit(self, real=payload.FilePayload.before_commit):
            real(self)
            if self._synced:
                os.kill(os.getpid(), signal.SIGKILL)

        payload.FilePayload.before_commit = before_commit
    with Store(sys.argv[1]) as s:
        with s.session() as w:
            for i in range(200):
                w.add_blob(os.urandom(64 * 1024) + bytes([i]))
    """
)


@pytest.mark.parametrize("moment", ["mid-write", "before-commit"])
def test_kill_9_of_a_writer_leaves_a_consistent_store(moment: str, store_path: str, cli) -> None:
    """A writer killed while it writes a pack file, or after it synced its pack files but before
    LMDB committed the transaction naming them: no object refers to them, the store verifies,
    and the files are removed (when the store is next opened for writing, or by gc)."""
    with Store(store_path, payload="files") as s:
        with s.session() as w:
            kept = w.add_blob(b"committed before the crash" * 1000)
            w.put_image(b"\x02" * 32, ImageRecord(kept, kept, "", layers=(), blobs=(kept,)))
    committed = pack_files(store_path)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, store_path, moment],
        env=files_env(store_path),
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = pack_files(store_path)
    assert set(left) > set(committed)  # the killed writer's files, named by no record
    with Store(store_path, readonly=True) as s:
        res = verify(s)  # read-only: sees the orphans, touches nothing
        assert res.errors == [] and res.objects == 1
        with s.read() as txn:
            assert len(s.payload.orphans(txn)) == len(left) - len(committed)
    assert pack_files(store_path) == left
    with Store(store_path) as s:  # opened for writing: the orphans go
        assert pack_files(store_path) == committed
        assert s.read_object(kept) == b"committed before the crash" * 1000
        ((_, lease),) = s.leases()  # the dead writer's lease: gc's
        assert not Store.lease_alive(lease)
    gc = cli("gc", "--json").json()
    assert gc["leases_reclaimed"] == 1  # type: ignore[index]
    assert cli("verify", "-q").code == 0 and pack_files(store_path) == committed


def test_gc_removes_orphans(files_store: Store) -> None:
    s = files_store
    with s.session() as w:
        sha = w.add_blob(os.urandom(5000))
        w.put_image(b"\x03" * 32, ImageRecord(sha, sha, "", layers=(), blobs=(sha,)))
    orphan = pack_path(s, 1 << 40)
    with open(orphan, "wb") as f:
        f.write(b"left by a writer killed before its commit")
    res = collect(s)
    assert res.packs_removed == 1 and res.bytes_reclaimed >= 40 and not os.path.exists(orphan)
    assert s.read_object(sha) and verify(s).errors == []


def test_kill_mid_import_file_packs(store_path: str, tmp_path: Path, cli) -> None:
    """A real importer killed as soon as its first pack file appears (before or just after its
    first commit): the store opens, verifies and collects to nothing."""
    layer = tar_bytes([member(f"f{i}", os.urandom(MiB)) for i in range(100)])
    layout = make_layout(tmp_path / "img", [layer], ref="big:1", compress=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerfs", "import", "-q", layout],
        env=files_env(store_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not pack_files(store_path) and time.monotonic() < deadline:
            assert proc.poll() is None, "the import finished before a pack file was seen"
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with Store(store_path) as s:
        assert s.images() == [] and s.layers() == []
        assert verify(s).errors == []
    gc = cli("gc", "--json").json()
    assert gc["leases_reclaimed"] == 1  # type: ignore[index]
    assert pack_files(store_path) == {}
    df = cli("df", "--json").json()
    assert (df["objects"], df["payload_bytes"]) == (0, 0)  # type: ignore[index]
    cli("import", "-q", layout)
    assert cli("verify", "-q").code == 0


# -- the LMDB map --------------------------------------------------------------------------------
def test_a_map_that_cannot_grow_is_one_clear_error(store_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real LMDB environment whose map may not pass 4 MiB (MAP_LIMIT, the private knob): with
    the payload in LMDB it fills, and the store says so in its own words; the store stays usable."""
    monkeypatch.setattr(store_mod, "MAP_LIMIT", 4 * MiB)
    with Store(store_path, payload="lmdb") as s:
        assert s.env.info()["map_size"] <= 4 * MiB
        with s.session() as w:
            small = w.add_blob(b"fits" * 1000)
        with pytest.raises(MapLimitError) as exc, s.session() as w:
            for _ in range(8):
                w.add_blob(os.urandom(MiB))
        message = str(exc.value)
        assert isinstance(exc.value, StoreError)
        assert message.startswith(
            f"cannot grow the store at {store_path}: its database needs a map of more than 4 MiB"
        )
        assert "LAYERFS_STORE_PAYLOAD=files" in message
        assert s.read_object(small) == b"fits" * 1000
        assert verify(s).errors == []


def test_file_packs_keep_the_map_small(store_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same limit, file packs: the map holds only metadata, so 8 MiB of payload fits."""
    monkeypatch.setattr(store_mod, "MAP_LIMIT", 4 * MiB)
    blobs = [os.urandom(MiB) for _ in range(8)]
    with Store(store_path, payload="files") as s:
        with s.session() as w:
            shas = [w.add_blob(b) for b in blobs]
        assert [s.read_object(h) for h in shas] == blobs
        assert s.env.info()["map_size"] <= 4 * MiB


def test_the_map_grows_for_metadata(store_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """File packs start with a small map where address space is 32-bit, and grow it for metadata."""
    monkeypatch.setattr(store_mod, "ADDRESS_32", True)
    monkeypatch.setattr(store_mod, "INITIAL_MAP", MiB)
    with Store(store_path, payload="files") as s:
        assert s.env.info()["map_size"] == MiB
        with s.session() as w:  # ~30k small objects: some MiB of records
            shas = [w.add_blob(b"%d" % i) for i in range(30_000)]
        assert s.env.info()["map_size"] > MiB
        assert s.read_object(shas[12345]) == b"12345"


def test_an_existing_store_is_not_mapped_twice_on_32_bit(
    store_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(store_path, payload="lmdb") as s, s.session() as w:
        for _ in range(12):
            w.add_blob(os.urandom(MiB))
    used = os.path.getsize(os.path.join(store_path, "data.mdb"))
    assert used > 12 * MiB
    monkeypatch.setattr(store_mod, "ADDRESS_32", True)
    monkeypatch.setattr(store_mod, "INITIAL_MAP", MiB)
    with Store(store_path) as s:
        assert used <= s.env.info()["map_size"] <= used + used // 8
    monkeypatch.setattr(store_mod, "ADDRESS_32", False)
    with Store(store_path) as s:
        assert s.env.info()["map_size"] >= 2 * used  # (64-bit: room to grow without remapping)


def test_several_small_stores_in_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On 32-bit, a third open store failed (1 GiB of address space each); file-pack stores now
    reserve tens of MiB each."""
    monkeypatch.setattr(store_mod, "ADDRESS_32", True)
    monkeypatch.setattr(store_mod, "INITIAL_MAP", 32 * MiB)
    stores = [Store(str(tmp_path / f"s{i}"), payload="files") for i in range(6)]
    try:
        assert sum(s.env.info()["map_size"] for s in stores) <= 6 * 32 * MiB
    finally:
        for s in stores:
            s.close()


def test_the_cli_says_one_line_when_the_map_cannot_grow(
    store_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from layerfs.cli import main

    monkeypatch.setattr(store_mod, "MAP_LIMIT", 4 * MiB)
    monkeypatch.setenv("LAYERFS_STORE_PAYLOAD", "lmdb")
    layer = tar_bytes([member(f"f{i}", os.urandom(MiB)) for i in range(8)])
    layout = make_layout(tmp_path / "img", [layer], ref="big:1")
    assert main(["--store", store_path, "import", "-q", str(layout)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"layerfs: import of {layout} refused: cannot grow the store at {store_path}"), (
        line
    )
    # the same import with file packs fits the same map
    monkeypatch.setenv("LAYERFS_STORE_PAYLOAD", "files")
    assert main(["--store", str(tmp_path / "files"), "import", "-q", str(layout)]) == 0


# -- through a real mount ------------------------------------------------------------------------
def test_mount_reads_pack_files(store_path: str, tmp_path: Path, cli, fuse_core: str) -> None:
    """Both FUSE cores read a file-pack store (C: pread on its cached descriptors), and a
    damaged pack file is EIO for the reader, not a dead daemon."""
    from unionutil import fuse_unavailable, layerfs_mount

    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    contents = {f"d/f{i}": os.urandom(i * 7000) for i in range(30)}
    contents["big"] = os.urandom(5 * MiB + 123)
    contents["text"] = b"a line of text\n" * 100_000
    contents["victim"] = os.urandom(3 * CHUNK_SIZE)
    layer = tar_bytes([member(name, data) for name, data in contents.items()])
    env = files_env(store_path)
    cli("import", "-q", make_layout(tmp_path / "img", [layer], ref="files:1"), env=env)
    for rw in (False, True):
        with layerfs_mount(cli, "files:1", str(tmp_path / f"m{int(rw)}"), rw=rw) as mnt:
            for name, data in contents.items():
                with open(os.path.join(mnt, name), "rb") as f:
                    assert f.read() == data, name
                    f.seek(len(data) // 3)
                    assert f.read(5000) == data[len(data) // 3 : len(data) // 3 + 5000]
    with Store(store_path, readonly=True) as s:
        c = chunks_of(s, hashlib.sha256(contents["victim"]).digest())[0]
        os.truncate(pack_path(s, c.pack), c.offset + 10)
    with layerfs_mount(cli, "files:1", str(tmp_path / "m"), rw=False) as mnt:
        with pytest.raises(OSError) as exc, open(os.path.join(mnt, "victim"), "rb") as f:
            f.read()
        assert exc.value.errno == errno.EIO
        with open(os.path.join(mnt, "d/f3"), "rb") as f:  # the daemon is still there
            assert f.read() == contents["d/f3"]
    assert cli("verify", check=False).code == 3


_ADDRESS_SPACE_RUNS_OUT = textwrap.dedent(
    """
    import os, resource, sys
    import layerfs.store.store as store_mod
    from layerfs.store import Store, StoreError

    store_mod.ADDRESS_32 = True  # start small and grow, as on a 32-bit board
    store_mod.INITIAL_MAP = 32 << 20
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    # room for the interpreter, the compression threads and a map of about 256 MiB, no more
    resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), resource.RLIM_INFINITY))
    with Store(sys.argv[1], payload=sys.argv[2]) as s:
        try:
            with s.session() as w:
                for _ in range(600):
                    w.add_blob(os.urandom(1 << 20))
        except StoreError as exc:
            print(type(exc).__name__, exc)
        else:
            print("stored")
        print("map", s.env.info()["map_size"] >> 20)
        print("after", len(s.images()))
    """
)


@pytest.mark.parametrize("payload", ["lmdb", "files"])
def test_when_mmap_refuses_to_grow_the_map(payload: str, store_path: str) -> None:
    """The real failure of a 32-bit board, made here by a limit on the address space: mmap
    refuses the larger map.  With the payload in LMDB the store says so in one clear error
    and stays usable; with file packs the map never needs to grow that far."""
    proc = subprocess.run(
        [sys.executable, "-c", _ADDRESS_SPACE_RUNS_OUT, store_path, payload],
        env=files_env(store_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    if payload == "files":
        assert lines[0] == "stored" and int(lines[1].split()[1]) <= 64, lines
    else:
        assert lines[0].startswith("MapLimitError cannot grow the store at"), lines
        assert lines[2] == "after 0", lines  # the store reads after the failed growth


def test_a_reader_of_an_older_snapshot_keeps_the_files_it_may_read(
    files_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc deletes the records of dead and compacted packs, but their files stay while a reader
    (here a read transaction of this process; in a mount, the daemon's pin) holds a snapshot
    from before: it still reads them, as it would an LMDB pack's pages.  The next gc after
    it let go removes them."""
    import layerfs.store.payload as payload_mod

    monkeypatch.setattr(payload_mod, "READER_WAIT", 0.2)
    s = files_store
    per_pack = PACK_TARGET // CHUNK_SIZE
    blobs = [os.urandom(CHUNK_SIZE) for _ in range(2 * per_pack)]
    with s.session() as w:
        shas = [w.add_blob(b) for b in blobs]
        w.put_image(b"\x04" * 32, ImageRecord(shas[0], shas[1], "", layers=(), blobs=(shas[0], shas[1])))
    before = pack_files(s)
    old = s.read()  # a snapshot from before the gc
    try:
        old_chunks = [chunks_of(s, h)[0] for h in shas[:3]]
        res = collect(s)
        assert (res.packs_removed, res.packs_compacted) == (1, 1)
        assert set(pack_files(s)) > set(before)  # the old files stay, the compacted copy is new
        for c, data in zip(old_chunks, blobs):  # the old snapshot reads as it did
            assert s.chunk_bytes(old, c) == data
        assert s.read_object(shas[0]) == blobs[0]  # and the new one through the new pack
        assert verify(s).errors == []  # the leftovers are no damage
    finally:
        old.abort()
    res = collect(s)
    assert res.packs_removed == 2  # the two files left behind, as orphans
    assert len(pack_files(s)) == 1 and s.read_object(shas[1]) == blobs[1]
    assert verify(s).errors == []
