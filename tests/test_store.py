"""Unit tests of the store on a real LMDB: objects, chunks, dedup, corruption, schema, map growth,
gc compaction, entry tables and the packing of small objects."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import lmdb
import pytest

from layerfs.store import CHUNK_SIZE, CorruptionError, Store, StoreError, collect, verify
from layerfs.store import entries as E
from layerfs.store import store as store_mod
from layerfs.store.entries import Entry, TableError, decode_table, encode_table
from layerfs.store.payload import PACK_TARGET
from layerfs.store.records import ImageRecord, LayerRecord
from layerfs.store.store import RAW, ZSTD, compress_chunk, decode_object
from layerfs.store.usage import usage

_U64 = struct.Struct(">Q")


def chunks_of(store: Store, sha: bytes) -> tuple[int, list]:  # type: ignore[type-arg]
    with store.read() as txn:
        return decode_object(txn.get(sha, db=store.db("objects")))


def mixed(n: int, seed: int = 0) -> bytes:
    """Half random, half repetitive text: neither all-compressible nor all-raw."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rnd.randbytes(1000) + b"the quick brown fox jumps over the lazy dog\n" * 25
    return bytes(out[:n])


# -- objects ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        1000,
        CHUNK_SIZE - 1,
        CHUNK_SIZE,
        CHUNK_SIZE + 1,
        2 * CHUNK_SIZE,
        3 * CHUNK_SIZE - 1,
        3 * CHUNK_SIZE,
        3 * CHUNK_SIZE + 1,
    ],
)
def test_object_round_trip(store: Store, size: int) -> None:
    data = mixed(size, seed=size)
    with store.session() as s:
        sha = s.add_blob(data)
    assert sha == hashlib.sha256(data).digest()
    assert store.has_object(sha) and store.object_size(sha) == size
    assert store.read_object(sha) == data
    pieces = list(store.iter_object(sha))
    assert b"".join(pieces) == data
    assert len(pieces) == -(-size // CHUNK_SIZE) and all(len(p) <= CHUNK_SIZE for p in pieces)
    rnd = random.Random(size)
    ranges = [(0, size), (0, 0), (size, 10), (size + 5, 10), (max(size - 1, 0), 100)]
    for boundary in (CHUNK_SIZE, 2 * CHUNK_SIZE):
        ranges += [(boundary - 1, 2), (boundary, 1), (boundary - 10, CHUNK_SIZE + 20)]
    ranges += [(rnd.randrange(size + 1), rnd.randrange(2 * CHUNK_SIZE + 3)) for _ in range(40)]
    for off, length in ranges:
        assert store.read_at(sha, off, length) == data[off : off + length], (off, length)
    assert verify(store).errors == []


def test_missing_object(store: Store) -> None:
    with pytest.raises(StoreError, match="not in the store"):
        store.read_object(b"\0" * 32)
    with pytest.raises(StoreError, match="not in the store"):
        store.read_at(b"\0" * 32, 0, 1)


def test_dedup(store: Store) -> None:
    data = mixed(3 * CHUNK_SIZE + 17)
    with store.session() as s:
        a = s.add_blob(data)
        b = s.add_blob(data)  # same session: pending already
    assert a == b and s.new_objects == 1
    first = usage(store)
    assert first["objects"] == 1
    with store.session() as s2:
        assert s2.add_blob(data) == a
    assert (s2.new_objects, s2.new_bytes) == (0, 0)
    again = usage(store)
    assert (again["objects"], again["payload_bytes"]) == (1, first["payload_bytes"])


def test_codecs(store: Store) -> None:
    noise = os.urandom(2 * CHUNK_SIZE + 100)
    text = b"compress me " * 20000
    with store.session() as s:
        n, t = s.add_blob(noise), s.add_blob(text)
    _, nc = chunks_of(store, n)
    assert [c.codec for c in nc] == [RAW] * 3 and all(c.stored == c.raw for c in nc)
    _, tc = chunks_of(store, t)
    assert {c.codec for c in tc} == {ZSTD} and sum(c.stored for c in tc) < len(text) // 20
    assert store.read_object(n) == noise and store.read_object(t) == text


def literals_type(frame: bytes) -> int:
    """The literals section type of a zstd frame's first block (RFC 8878 3.1.1, 3.1.1.3.1):
    0 raw, 1 RLE, 2 Huffman-compressed, 3 treeless; -1 when that block is not compressed."""
    assert frame[:4] == b"\x28\xb5\x2f\xfd"
    fhd = frame[4]
    single, dict_flag, fcs_flag = fhd >> 5 & 1, fhd & 3, fhd >> 6
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
    if (frame[pos] >> 1) & 3 != 2:
        return -1
    return frame[pos + 3] & 3


def test_small_chunks_keep_their_literals_raw(store: Store) -> None:
    """Text up to SMALL_CHUNK bytes is compressed without Huffman literals (decoding a 1 KiB
    chunk is then no longer mostly building tables); larger chunks keep them.  Both kinds,
    stored through a session and the group compressor, read back whole."""
    rnd = random.Random(7)
    words = [rnd.randbytes(rnd.randrange(2, 9)).hex() for _ in range(300)]

    def text(n: int) -> bytes:
        return " ".join(rnd.choice(words) for _ in range(n)).encode()[:n]

    small, edge, large = text(1000), text(store_mod.SMALL_CHUNK), text(store_mod.SMALL_CHUNK + 1)
    with store.session() as s:
        digests = [s.add_blob(b) for b in (small, edge, large)]
    kinds = []
    for d, b in zip(digests, (small, edge, large)):
        _, (chunk,) = chunks_of(store, d)
        assert chunk.codec == ZSTD and chunk.raw == len(b)
        with store.read() as txn:
            kinds.append(literals_type(store.payload.read(txn, chunk.pack, chunk.offset, chunk.stored)))
        assert store.read_object(d) == b
    assert kinds == [0, 0, 2]
    assert [literals_type(c[0]) for c in store_mod.compress_group([large, small, edge])] == [2, 0, 0]


def test_zstandard_without_multi_compress(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """zstandard built on the system's libzstd (Debian's python3-zstandard) lacks
    multi_compress_to_buffer: every import failed with AttributeError there."""

    class SystemZstd:
        def __init__(self, cctx: Any) -> None:
            self.compress = cctx.compress

    real = store_mod._compressor
    monkeypatch.setattr(store_mod, "_compressor", lambda small=False: SystemZstd(real(small)))
    raws = [b"text " * 10000, os.urandom(CHUNK_SIZE), b"more text " * 3000, b"small text " * 90]
    assert store_mod.compress_group(raws) == [compress_chunk(r) for r in raws]
    text = b"compress me " * 20000
    with store.session() as s:
        t = s.add_blob(text)
    assert store.read_object(t) == text


# -- corruption ------------------------------------------------------------------------------
def flip(store: Store, pack: int, offset: int) -> None:
    """Damage one byte of a pack, wherever the store keeps it."""
    if store.payload_kind == "files":
        with open(os.path.join(store.path, "packs", f"{pack:016x}"), "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x5A]))
        return

    def fn(txn: lmdb.Transaction) -> None:
        key = _U64.pack(pack)
        value = bytearray(txn.get(key, db=store.db("packs")))
        value[offset] ^= 0x5A
        txn.put(key, bytes(value), db=store.db("packs"))

    store.write(fn)


@pytest.mark.parametrize("kind", ["raw", "zstd-header", "zstd-body"])
def test_corruption_detected(kind: str, store_path: str, cli) -> None:
    rnd = random.Random(7)
    data = (
        os.urandom(CHUNK_SIZE + 5) if kind == "raw" else bytes(rnd.choice(b"abcdefgh ") for _ in range(60000))
    )
    with Store(store_path) as store:
        with store.session() as s:
            sha = s.add_blob(data)
            other = s.add_blob(b"an innocent bystander" * 100)
        _, chunks = chunks_of(store, sha)
        c = chunks[0]
        assert c.codec == (RAW if kind == "raw" else ZSTD)
        flip(store, c.pack, c.offset + {"raw": 100, "zstd-header": 1, "zstd-body": c.stored // 2}[kind])
        with pytest.raises(CorruptionError):
            store.read_object(sha)
        with pytest.raises(CorruptionError):
            store.read_at(sha, 10, 10)
        assert store.read_object(other) == b"an innocent bystander" * 100
        res = verify(store)
        assert len(res.errors) == 1 and sha.hex() in res.errors[0] and res.objects == 2
    out = cli("verify", "-q", check=False)
    assert out.code == 3 and f"CORRUPT: object {sha.hex()}" in out.out, out.err
    js = cli("verify", "--json", check=False)
    assert js.code == 3 and js.json()["ok"] is False  # type: ignore[index]


def test_missing_pack_detected(store: Store) -> None:
    with store.session() as s:
        sha = s.add_blob(b"x" * 5000)
    _, (c,) = chunks_of(store, sha)
    store.write(lambda txn: store.payload.delete_pack(txn, c.pack))
    assert sha.hex() in verify(store).errors[0]
    with pytest.raises(LookupError):
        store.read_object(sha)


# -- opening -----------------------------------------------------------------------------------
def test_schema_mismatch(store_path: str) -> None:
    with Store(store_path) as s:
        s.write(lambda txn: txn.put(b"schema", b"99", db=s.db("meta")))
    with pytest.raises(StoreError, match=r"has schema version 99; this layerfs reads version 1"):
        Store(store_path)
    with pytest.raises(StoreError, match="schema version 99"):
        Store(store_path, readonly=True)


def test_open_missing_readonly(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no layerfs store"):
        Store(str(tmp_path / "nope"), readonly=True)
    with pytest.raises(StoreError, match="no layerfs store"):
        Store(str(tmp_path / "nope"), create=False)


def test_map_growth(store: Store) -> None:
    store.env.set_mapsize(1 << 20)
    blobs = [os.urandom(1 << 20) for _ in range(10)]
    with store.session() as s:
        shas = [s.add_blob(b) for b in blobs]
    if store.payload_kind == "lmdb":  # (pack files keep the payload out of the map)
        assert store.env.info()["map_size"] >= 10 << 20
    assert [store.read_object(h) for h in shas] == blobs
    assert verify(store).errors == []


# -- gc ------------------------------------------------------------------------------------
def test_gc_compaction(store: Store) -> None:
    # 64 KiB random objects: one RAW chunk each, exactly 64 per 4 MiB pack
    per_pack = PACK_TARGET // CHUNK_SIZE
    blobs = [os.urandom(CHUNK_SIZE) for _ in range(3 * per_pack + 8)]
    keep_idx = [0, 1] + list(range(2 * per_pack, 2 * per_pack + 40))  # pack 1: 2 alive, pack 3: 40 alive
    with store.session() as s:
        shas = [s.add_blob(b) for b in blobs]
        keep = [shas[i] for i in keep_idx]
        s.put_image(b"\x01" * 32, ImageRecord(keep[0], keep[1], "", layers=(), blobs=tuple(keep)))
    packs = {c.pack for h in shas for c in chunks_of(store, h)[1]}
    assert len(packs) == 4
    before = usage(store)
    res = collect(store)
    assert res.objects_removed == len(blobs) - len(keep)
    assert (res.packs_removed, res.packs_compacted, res.leases_reclaimed) == (2, 1, 0)
    after = usage(store)
    assert after["objects"] == len(keep)
    assert after["payload_bytes"] == before["payload_bytes"] - res.bytes_reclaimed
    # pack 1 compacted to its 2 live chunks; pack 3 is more than half alive and stays whole
    assert after["payload_bytes"] == (2 + per_pack) * CHUNK_SIZE
    for i in keep_idx:
        assert store.read_object(shas[i]) == blobs[i]
    assert not store.has_object(shas[5])
    assert verify(store).errors == []
    again = collect(store)
    assert not any(again.as_dict().values()), again  # nothing more to do
    store.remove_image(b"\x01" * 32)
    collect(store)
    assert (usage(store)["objects"], usage(store)["payload_bytes"]) == (0, 0)


# -- entry tables --------------------------------------------------------------------------------
def sample_entries() -> list[Entry]:
    sha = hashlib.sha256(b"content").digest()
    long_path = b"/".join([b"d" * 200] * 30)  # 6029 bytes
    return [
        Entry(b"", E.DIR, 0o755, flags=E.OPAQUE),
        Entry(
            b"bin/sh",
            E.REG,
            0o4755,
            0,
            0,
            7,
            1_700_000_000_123_456_789,
            sha,
            xattrs=(
                (b"security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00\xff\x00"),
                (b"user.empty", b""),
                (b"user.nul", b"\x00" * 300),
            ),
        ),
        Entry(b"bin/ash", E.HARDLINK, 0o755, 1, 2, 7, 0, sha, b"bin/sh"),
        Entry(b"etc/alt", E.SYMLINK, 0o777, link=b"../../../" * 400 + b"target"),
        Entry(b"dev/null", E.CHR, 0o666, devmajor=1, devminor=3),
        Entry(b"dev/sda", E.BLK, 0o660, 0, 6, devmajor=8, devminor=0xFFFFFFFF),
        Entry(b"run/fifo", E.FIFO, 0o600, 2**32 - 1, 2**32 - 1, mtime_ns=-(2**63)),
        Entry(b"gone", E.WHITEOUT, 0),
        Entry(b"opq", E.DIR, 0o755, mtime_ns=2**63 - 1, flags=E.IMPLICIT | E.OPAQUE),
        Entry(long_path, E.REG, 0o644, size=0),
        Entry("ünïcødé/\udcff".encode("utf-8", "surrogateescape"), E.REG, 0o644),
    ]


def test_entry_table_round_trip(store: Store) -> None:
    entries = sample_entries()
    assert len(entries[9].path) > 4096
    table = encode_table(entries)
    assert decode_table(table) == entries
    assert decode_table(encode_table([])) == []
    assert {e.kind for e in entries} == set(range(8))
    with store.session() as s:
        sha = s.add_blob(table)
    assert decode_table(store.read_object(sha)) == entries  # as the store keeps it (bytes, not views)


def test_entry_table_refuses_bad_input() -> None:
    table = encode_table(sample_entries())
    with pytest.raises(TableError):
        decode_table(b"XXXX" + table[4:])
    with pytest.raises(TableError, match="version"):
        decode_table(table[:4] + b"\x09" + table[5:])
    for cut in (3, 9, 40, len(table) // 2, len(table) - 1):
        with pytest.raises(TableError):
            decode_table(table[:cut])


# -- packing of small objects -----------------------------------------------------------------
def test_small_objects_are_packed(store: Store) -> None:
    """2000 small compressible files must not cost an LMDB page each."""
    rnd = random.Random(42)
    files = [rnd.randbytes(rnd.randrange(512, 1536)).hex().encode() for _ in range(2000)]  # 1-3 KiB
    raw_total = sum(map(len, files))
    compressed = sum(len(compress_chunk(f)[0]) for f in files)
    with store.session() as s:
        for f in files:
            s.add_blob(f)
    u = usage(store)
    assert u["objects"] == 2000
    stored = u["metadata_bytes"] + u["payload_bytes"]
    psize = store.env.stat()["psize"]
    with store.read() as txn:
        pages = 0
        for name in store.DBS:
            st = txn.stat(store.db(name))
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
    page_bytes = pages * psize
    print(
        f"\npacking: 2000 files, raw {raw_total} B, compressed {compressed} B, stored {stored} B "
        f"(payload {u['payload_bytes']} + metadata {u['metadata_bytes']}) = {stored / compressed:.3f}x; "
        f"all LMDB pages {page_bytes} B = {page_bytes / compressed:.3f}x; "
        f"page-per-object would be >= {2000 * psize} B"
    )
    assert u["payload_bytes"] == compressed
    assert stored < 1.2 * compressed
    assert page_bytes < 1.2 * compressed


def test_layer_records_visible_only_after_commit(store: Store) -> None:
    entries = [Entry(b"f", E.REG, 0o644, size=1, content=hashlib.sha256(b"x").digest())]
    s = store.session()
    s.add_blob(b"x")
    table = s.add_table(entries)
    s.put_layer(b"\x02" * 32, LayerRecord("sha256:" + "02" * 32, table, 1, 1, 1, "", 0, "tar", 0.0))
    s.put_image(b"\x03" * 32, ImageRecord(b"\x04" * 32, b"\x05" * 32, "", layers=(b"\x02" * 32,)))
    s.set_tag("t:1", b"\x03" * 32)
    s.flush()
    assert store.layers() == [] and store.images() == [] and store.tags() == {}
    assert len(store.leases()) == 1
    s.commit()
    assert store.layer_entries(b"\x02" * 32) == entries
    assert store.get_tag("t:1") == b"\x03" * 32 and store.leases() == []
    image = store.get_image(b"\x03" * 32)
    assert image is not None and image.layers == (b"\x02" * 32,)
    assert verify(store).errors == [] and collect(store).objects_removed == 0


def _peak_rss_mib(cmd: list[str], env: dict[str, str]) -> float:
    """The peak RSS of ``cmd``, run as the only child of a fresh interpreter."""
    probe = (
        "import resource, subprocess, sys; "
        "rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True)
    rc, kib = out.stdout.splitlines()[-1].split()
    assert rc == "0", out.stderr
    return int(kib) / 1024


@pytest.mark.parametrize("content", ["zeros", "random"])
def test_import_memory_does_not_grow_with_a_file(content: str, tmp_path: Path, store_path: str) -> None:
    """A 4.7 MB gzip layer holding 1 GiB of zeros peaked at 1.1 GB of RSS during import (the raw
    chunks were held until the file's batch was written); an incompressible file peaked at
    twice its size (its chunks and LMDB's dirty pages).  Now a file's chunks go to packs as they
    come, so the import's memory is bounded whatever the layer holds."""
    from conftest import make_layout

    size = 384 << 20
    if content == "zeros":
        data = bytes(size)
    else:
        rnd = random.Random(7)
        data = b"".join(rnd.randbytes(1 << 20) for _ in range(size >> 20))
    info = tarfile.TarInfo("big")
    info.size = size
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(info, io.BytesIO(data))
    del data
    layout = make_layout(tmp_path / "layout", [buf.getvalue()], ref="big:1", compress=content == "zeros")
    del buf
    env = dict(os.environ, LAYERFS_STORE=store_path)
    peak = _peak_rss_mib([sys.executable, "-m", "layerfs", "import", "-q", layout], env)
    assert peak < 200, f"import of a {size >> 20} MiB file of {content} peaked at {peak:.0f} MiB"
    with Store(store_path) as s:
        assert verify(s).errors == []
