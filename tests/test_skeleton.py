"""Skeletons rebuild a tar stream byte for byte: random archives, short reads, both parsers,
file sizes around the read and chunk sizes, trailing garbage; and a damaged skeleton is refused."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile

import pytest
from test_tarstream import BACKENDS, ShortReader, c_backend, random_archive

from layerfs.store import CHUNK_SIZE, Store, StoreError, skeleton
from layerfs.tar.reader import EV_DATA, EV_END, EV_ENTRY


def record(store: Store, mod, data: bytes, read) -> bytes:
    """Store ``data``'s contents and skeleton the way the importer does; the skeleton's id."""
    with store.session() as session:
        rec = skeleton.SkeletonRecorder(session, read)
        parser = mod.TarParser(rec.read, CHUNK_SIZE)
        writer = None
        for ev, val in parser:
            if ev == EV_ENTRY and val[6]:
                rec.contents(parser.offset, val[6])
                writer = session.new_file()
            elif ev == EV_DATA:
                writer.write(val)
            elif ev == EV_END and writer is not None:
                rec.digest(writer.finish(val))
                writer = None
        while rec.read(1 << 20):
            pass
        sha = rec.finish()
    return sha


def rebuilt(store: Store, sha: bytes) -> bytes:
    return b"".join(skeleton.stream(store, sha))


def sized_archive(sizes: list[int], tail: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, size in enumerate(sizes):
            ti = tarfile.TarInfo(f"d/f{i}")
            ti.size = size
            tar.addfile(ti, io.BytesIO(bytes([i % 251]) * size))
    return buf.getvalue() + tail


@pytest.mark.parametrize("mod", BACKENDS)
def test_random_archives_with_short_reads(store: Store, mod) -> None:
    rng = random.Random(7)
    for _ in range(40):
        data = random_archive(rng)
        reader = ShortReader(data, random.Random(rng.random()), rng.choice([1, 7, 700, 5000, 1 << 21]))
        sha = record(store, mod, data, reader.read)
        assert rebuilt(store, sha) == data


@pytest.mark.parametrize("mod", BACKENDS)
def test_sizes_around_reads_and_chunks(store: Store, mod) -> None:
    sizes = [0, 1, 511, 512, 513, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, (1 << 20) + 3, 5, 3 << 20]
    for tail in (b"", bytes(10240), b"garbage after the trailer"):
        data = sized_archive(sizes, tail)
        for piece in (100, 4096, 1 << 20):
            sha = record(store, mod, data, ShortReader(data, random.Random(1), piece).read)
            assert rebuilt(store, sha) == data
    # the skeleton holds headers, not contents: far smaller than the stream
    assert store.object_size(sha) < 64 * 1024 < len(data)


def test_many_small_files_in_one_read(store: Store) -> None:
    data = sized_archive([100] * 3000)
    sha = record(store, c_backend, data, io.BytesIO(data).read)
    assert hashlib.sha256(rebuilt(store, sha)).digest() == hashlib.sha256(data).digest()
    assert len(skeleton.referenced(store, sha)) == 3000


def test_damaged_table_is_refused(store: Store) -> None:
    data = sized_archive([10, 20])
    sha = record(store, c_backend, data, io.BytesIO(data).read)
    whole = store.read_object(sha)
    with store.session() as session:
        bad_magic = session.add_blob(whole[:-1] + b"X")
        bad_order = session.add_blob(
            whole[: -16 - 96] + whole[-16 - 48 : -16] + whole[-16 - 96 : -16 - 48] + whole[-16:]
        )
    with pytest.raises(StoreError, match="not a skeleton"):
        rebuilt(store, bad_magic)
    with pytest.raises(StoreError, match="out of order"):
        rebuilt(store, bad_order)
