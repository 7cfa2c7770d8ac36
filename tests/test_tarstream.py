"""The streaming tar parser: both backends, checked against ``tarfile`` and each other.

``layerfs.tar._pyreader`` is the reference; ``layerfs._ctar`` must yield the very
same events.  Archives come from ``tarfile`` (ustar, GNU and PAX formats) and from
the hand-built headers below (for what ``tarfile`` will not write: binary xattrs,
odd numeric fields, hostile input).  Randomised parts use ``random`` with fixed
seeds so a failure replays.
"""

from __future__ import annotations

import gc
import hashlib
import io
import os
import random
import tarfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

import layerfs.tar._pyreader as py_backend
from layerfs.tar._pyreader import EV_DATA, EV_END, EV_ENTRY, MAX_EXT, TarError

c_backend = pytest.importorskip("layerfs._ctar")

BACKENDS = [pytest.param(c_backend, id="c"), pytest.param(py_backend, id="python")]
FORMATS = [
    pytest.param(tarfile.USTAR_FORMAT, id="ustar"),
    pytest.param(tarfile.GNU_FORMAT, id="gnu"),
    pytest.param(tarfile.PAX_FORMAT, id="pax"),
]
CHUNK = 4096  # chunk size of the format tests; file sizes are chosen around it


# -- helpers: running a parser ---------------------------------------------------


def parse(mod, data: bytes, chunk_size: int = 65536, read: Callable[[int], object] | None = None) -> list:
    return list(mod.TarParser(read or io.BytesIO(data).read, chunk_size))


def outcome(mod, data: bytes, chunk_size: int = 65536, read=None) -> tuple[list, TarError | None]:
    """Events up to the end or the TarError; any other exception propagates (a bug)."""
    events: list = []
    parser = mod.TarParser(read or io.BytesIO(data).read, chunk_size)
    try:
        for ev in parser:
            events.append(ev)
    except TarError as exc:
        # a failed parser is finished, like a generator that raised
        assert next(parser, None) is None
        return events, exc
    return events, None


class ShortReader:
    """read(n) returning 1..max_piece bytes (never more than n) as bytes-likes."""

    def __init__(self, data: bytes, rng: random.Random, max_piece: int, kinds=(bytes,)) -> None:
        self.data, self.pos, self.rng, self.max_piece, self.kinds = data, 0, rng, max_piece, kinds
        self.calls: list[int] = []

    def read(self, n: int):
        self.calls.append(n)
        assert n >= 1
        size = min(n, self.rng.randint(1, self.max_piece))
        piece = self.data[self.pos : self.pos + size]
        self.pos += len(piece)
        if not piece:
            return b""
        kind = self.rng.choice(self.kinds)
        return memoryview(piece) if kind is memoryview else kind(piece)


def members(events: list) -> list[tuple[tuple, bytes, bytes | None, list[int]]]:
    """Group events per member: (header, data, digest or None, piece sizes); checks the order."""
    out: list = []
    for kind, payload in events:
        if kind == EV_ENTRY:
            assert isinstance(payload, tuple) and len(payload) == 13
            out.append([payload, b"", None, []])
        elif kind == EV_DATA:
            assert type(payload) is bytes and payload and out and out[-1][2] is None
            assert out[-1][0][2] == 0x30
            out[-1][1] += payload
            out[-1][3].append(len(payload))
        else:
            assert kind == EV_END and type(payload) is bytes and len(payload) == 32
            assert out and out[-1][2] is None and out[-1][0][2] == 0x30
            out[-1][2] = payload
    for header, data, digest, _ in out:
        if header[2] == 0x30:
            assert digest == hashlib.sha256(data).digest()
            assert header[6] == len(data)
        else:
            assert digest is None and data == b"" and header[6] == 0
    return [tuple(m) for m in out]


def assert_same(data: bytes, chunk_size: int = 65536) -> list:
    c_events = parse(c_backend, data, chunk_size)
    py_events = parse(py_backend, data, chunk_size)
    assert c_events == py_events
    return c_events


def assert_both_refuse(data: bytes, match: str | None = None, chunk_size: int = 512) -> None:
    results = {}
    for mod in (c_backend, py_backend):
        events, err = outcome(mod, data, chunk_size)
        assert err is not None, f"{mod.__name__} accepted hostile input"
        if match is not None:
            assert match in str(err), (mod.__name__, str(err))
        results[mod.__name__] = events
    assert results[c_backend.__name__] == results[py_backend.__name__]


# -- helpers: hand-made archives -------------------------------------------------


def octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def fix_checksum(block: bytearray) -> bytearray:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return block


def header(
    name: bytes = b"file",
    *,
    typ: bytes = b"0",
    size: int | bytes = 0,
    mode: int | bytes = 0o644,
    uid: int | bytes = 1000,
    gid: int | bytes = 1000,
    mtime: int | bytes = 1700000000,
    linkname: bytes = b"",
    magic: bytes = b"ustar\x0000",
    uname: bytes = b"user",
    gname: bytes = b"group",
    devmajor: int | bytes = 0,
    devminor: int | bytes = 0,
    prefix: bytes = b"",
    chksum: bytes | None = None,
) -> bytes:
    block = bytearray(512)

    def put(off: int, width: int, value: int | bytes) -> None:
        raw = octal(value, width) if isinstance(value, int) else value
        assert len(raw) <= width, (off, raw)
        block[off : off + len(raw)] = raw

    put(0, 100, name)
    put(100, 8, mode)
    put(108, 8, uid)
    put(116, 8, gid)
    put(124, 12, size)
    put(136, 12, mtime)
    put(156, 1, typ)
    put(157, 100, linkname)
    put(257, 8, magic)
    put(265, 32, uname)
    put(297, 32, gname)
    put(329, 8, devmajor)
    put(337, 8, devminor)
    put(345, 155, prefix)
    fix_checksum(block)
    if chksum is not None:
        block[148:156] = chksum
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def member(hdr: bytes, data: bytes = b"") -> bytes:
    return hdr + pad(data)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax(records: list[tuple[bytes, bytes]] | bytes, typ: bytes = b"x") -> bytes:
    data = records if isinstance(records, bytes) else b"".join(pax_record(k, v) for k, v in records)
    return member(header(b"././@PaxHeader", typ=typ, size=len(data)), data)


def gnu_long(typ: bytes, name: bytes) -> bytes:
    data = name + b"\0"
    return member(header(b"././@LongLink", typ=typ, size=len(data), magic=b"ustar  \0"), data)


END = b"\0" * 1024


def base256(value: int, width: int) -> bytes:
    raw = bytearray(value.to_bytes(width, "big", signed=True))
    raw[0] |= 0x80
    return bytes(raw)


# -- archives written by tarfile ------------------------------------------------


@dataclass
class Spec:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    uid: int = 1000
    gid: int = 1000
    mtime: int | float = 1700000000
    uname: str = "user"
    gname: str = "group"
    devmajor: int = 0
    devminor: int = 0
    pax_headers: dict[str, str] = field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(self.name)
        ti.type, ti.linkname, ti.mode = self.type, self.linkname, self.mode
        ti.uid, ti.gid, ti.mtime, ti.uname, ti.gname = self.uid, self.gid, self.mtime, self.uname, self.gname
        ti.devmajor, ti.devminor, ti.size = self.devmajor, self.devminor, len(self.data)
        ti.pax_headers = dict(self.pax_headers)
        return ti

    def expected(self, fmt: int) -> tuple:
        name = self.name + ("/" if self.type == tarfile.DIRTYPE and not self.name.endswith("/") else "")
        regular = self.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
        xattrs: dict[bytes, bytes] = {}
        mtime_ns = self.mtime * 10**9
        if fmt == tarfile.PAX_FORMAT:
            for key, value in self.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    xattrs[key[13:].encode()] = value.encode()
            if "mtime" in self.pax_headers:
                whole, _, frac = self.pax_headers["mtime"].lstrip("-").partition(".")
                mtime_ns = int(whole) * 10**9 + int((frac + "0" * 9)[:9])
                mtime_ns = -mtime_ns if self.pax_headers["mtime"].startswith("-") else mtime_ns
            elif isinstance(self.mtime, float):
                whole, _, frac = repr(abs(self.mtime)).partition(".")
                mtime_ns = int(whole) * 10**9 + int((frac + "0" * 9)[:9])
                mtime_ns = -mtime_ns if self.mtime < 0 else mtime_ns
        return (
            name.encode(),
            self.linkname.encode(),
            0x30 if regular else self.type[0],
            self.mode & 0o7777,
            self.uid,
            self.gid,
            len(self.data) if regular else 0,
            mtime_ns,
            self.devmajor,
            self.devminor,
            self.uname.encode(),
            self.gname.encode(),
            xattrs,
        )


def build(specs: list[Spec], fmt: int) -> tuple[bytes, int]:
    """The archive and where its members end (before the zero blocks)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for spec in specs:
            tar.addfile(spec.tarinfo(), io.BytesIO(spec.data) if spec.data else None)
        end = tar.offset
    return buf.getvalue(), end


def format_specs(fmt: int) -> list[Spec]:
    rng = random.Random(1234)
    blob = bytes(rng.getrandbits(8) for _ in range(3 * CHUNK + 17))
    specs = [
        Spec("empty"),
        Spec("one", data=b"x"),
        Spec("block", data=blob[:512]),
        Spec("exact-chunk", data=blob[:CHUNK]),
        Spec("chunk-plus-one", data=blob[: CHUNK + 1]),
        Spec("multi-chunk", data=blob),
        Spec("areg", type=tarfile.AREGTYPE, data=b"old-style regular file"),
        Spec("contiguous", type=tarfile.CONTTYPE, data=b"contiguous file"),
        Spec("hard", type=tarfile.LNKTYPE, linkname="one"),
        Spec("sym", type=tarfile.SYMTYPE, linkname="../target/of/the/link"),
        Spec("chr", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        Spec("blk", type=tarfile.BLKTYPE, devmajor=259, devminor=65535, mode=0o660),
        Spec("dir", type=tarfile.DIRTYPE, mode=0o755),
        Spec("fifo", type=tarfile.FIFOTYPE, mode=0o600),
        Spec("suid", mode=0o104755, data=b"#!/bin/sh\n"),  # file type bits masked off
        Spec("uid-max-octal", uid=2097151, gid=2097151),
        Spec("zero-mtime", mtime=0),
        Spec("a" * 99),
        Spec("d" * 60 + "/" + "b" * 99, data=b"prefix-split in ustar"),
        Spec("e" * 150 + "/" + "f" * 99, type=tarfile.DIRTYPE),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        specs += [
            Spec("long/" * 30 + "name-over-255", data=b"long"),
            Spec("x" * 101),
            Spec("longlink", type=tarfile.SYMTYPE, linkname="t/" * 80 + "end"),
            Spec("hardlong", type=tarfile.LNKTYPE, linkname="long/" * 30 + "name-over-255"),
            Spec("big-ids", uid=2097152, gid=2**31 + 5),
            Spec("huge-uid", uid=2**40 + 1, gid=3),
            Spec("big-mtime", mtime=8**11 + 12345),
            Spec("far-future", mtime=2**40),
            Spec("negative-mtime", mtime=-86400),
            Spec("utf8-name-\u00e9\u4e2d", data=b"u"),
        ]
    if fmt == tarfile.PAX_FORMAT:
        specs += [
            Spec(
                "xattrs",
                data=b"x",
                pax_headers={
                    "SCHILY.xattr.user.foo": "bar",
                    "SCHILY.xattr.security.capability": "caps",
                    "SCHILY.xattr.user.empty": "",
                    "SCHILY.xattr.user.utf8": "\u00fc\u00f1\u00ee",
                },
            ),
            Spec("frac-mtime", mtime=1700000000.5),
            Spec("neg-frac-mtime", mtime=-1.25),
            Spec("ns-mtime", pax_headers={"mtime": "1700000000.123456789123"}),
            Spec("neg-ns-mtime", pax_headers={"mtime": "-1700000000.000000001"}),
            Spec("long-uname", uname="u" * 40, gname="g" * 50),
            Spec("dir-xattr", type=tarfile.DIRTYPE, pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        ]
    return specs


@pytest.mark.parametrize("trailer", [True, False], ids=["trailer", "no-trailer"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mod", BACKENDS)
def test_tarfile_formats(mod, fmt, trailer):
    specs = format_specs(fmt)
    data, end = build(specs, fmt)
    if not trailer:
        data = data[:end]
    got = members(parse(mod, data, CHUNK))
    assert [m[0] for m in got] == [s.expected(fmt) for s in specs]
    for (hdr, content, _, pieces), spec in zip(got, specs):
        assert content == (spec.data if hdr[2] == 0x30 else b"")
        assert all(p == CHUNK for p in pieces[:-1]) and (not pieces or 0 < pieces[-1] <= CHUNK)
        assert len(pieces) == -(-len(content) // CHUNK)


def test_piece_counts_around_chunk_size():
    data, _ = build(format_specs(tarfile.GNU_FORMAT), tarfile.GNU_FORMAT)
    sizes = {m[0][0]: m[3] for m in members(parse(c_backend, data, CHUNK))}
    assert sizes[b"empty"] == []
    assert sizes[b"exact-chunk"] == [CHUNK]
    assert sizes[b"chunk-plus-one"] == [CHUNK, 1]
    assert sizes[b"multi-chunk"] == [CHUNK, CHUNK, CHUNK, 17]


@pytest.mark.parametrize("fmt", FORMATS)
def test_backends_identical_on_formats(fmt):
    data, end = build(format_specs(fmt), fmt)
    for chunk_size in (
        1,
        2,
        3,
        100,
        511,
        512,
        513,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        65536,
        1 << 20,
        3 << 20,
        2**70,
    ):
        for archive in (data, data[:end]):
            assert_same(archive, chunk_size)


def test_backends_identical_with_short_reads():
    data, _ = build(format_specs(tarfile.PAX_FORMAT), tarfile.PAX_FORMAT)
    baseline = parse(py_backend, data, 1000)
    rng = random.Random(99)
    for max_piece in (1, 2, 7, 511, 513, 5000, 1 << 21):
        for mod in (c_backend, py_backend):
            reader = ShortReader(data, rng, max_piece, kinds=(bytes, bytearray, memoryview))
            assert parse(mod, data, 1000, reader.read) == baseline
            assert all(n >= 1 << 20 for n in reader.calls)  # read(max(1 MiB, need))


def offsets(mod, data: bytes, read=None) -> list[tuple[int, int]]:
    """(event kind, parser.offset after it) for every event, then the final offset."""
    parser = mod.TarParser(read or io.BytesIO(data).read, 1000)
    out = [(kind, parser.offset) for kind, _ in parser]
    return out + [(-1, parser.offset)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_offset_marks_where_data_starts(fmt):
    # the importer cuts a layer into headers and contents with it (skeleton export)
    data, end = build(format_specs(fmt), fmt)
    for archive in (data, data[:end]):
        baseline = offsets(py_backend, archive)
        assert offsets(c_backend, archive) == baseline
        reader = ShortReader(archive, random.Random(5), 700)
        assert offsets(c_backend, archive, reader.read) == baseline
        parser = py_backend.TarParser(io.BytesIO(archive).read, 1 << 30)
        for kind, payload in parser:
            if kind == EV_ENTRY and payload[2] == 0x30:
                start, size = parser.offset, payload[6]
                kind, content = next(parser)
                if size:
                    assert archive[start : start + size] == content
        # parsing stops after the zero blocks of the trailer; whatever follows is the caller's
        assert baseline[-1][1] <= len(archive)


# -- hand-made archives: PAX records, GNU names, numeric fields -------------------


@pytest.mark.parametrize("mod", BACKENDS)
def test_binary_xattrs_and_pax_merge_order(mod):
    data = (
        pax(
            [
                (b"SCHILY.xattr.user.a", b"\x00\x01\x02\xfe\xff"),
                (b"SCHILY.xattr.security.capability", b"\x01\x00\x00\x02" + bytes(16)),
                (b"SCHILY.xattr.user.a", b"second value wins, first position kept"),
                (b"uname", b"paxuser"),
                (b"path", b"name/from/pax\xff\xfe"),
                (b"linkpath", b"link \n with = newline"),
                (b"comment", b"ignored"),
                (b"", b"empty key"),
                (b"SCHILY.xattr.", b"empty xattr name"),
            ]
        )
        + member(header(b"ignored", size=3, uid=5), b"abc")
        + member(header(b"second", typ=b"2", linkname=b"t"))
        + END
    )
    (h1, content, _, _), (h2, _, _, _) = members(parse(mod, data))
    assert content == b"abc"
    assert h1[0] == b"name/from/pax\xff\xfe" and h1[1] == b"link \n with = newline"
    assert h1[10] == b"paxuser" and h1[4] == 5
    assert list(h1[12].items()) == [
        (b"user.a", b"second value wins, first position kept"),
        (b"security.capability", b"\x01\x00\x00\x02" + bytes(16)),
        (b"", b"empty xattr name"),
    ]
    # per-entry records are gone
    assert h2[0] == b"second" and h2[10] == b"user" and h2[12] == {}
    assert_same(data)


@pytest.mark.parametrize("mod", BACKENDS)
def test_an_extended_header_replaces_an_earlier_one(mod):
    """As Go's archive/tar: of several x headers before a member, the last applies alone (GNU
    long names and links are kept: Go too keeps them across x headers)."""
    data = (
        pax([(b"path", b"evil"), (b"SCHILY.xattr.user.a", b"1"), (b"uid", b"7")])
        + gnu_long(b"L", b"long/name")
        + pax([(b"gid", b"9")])
        + member(header(b"f", size=3), b"abc")
        + END
    )
    ((h, content, _, _),) = members(parse(mod, data))
    assert (h[0], h[4], h[5], h[12], content) == (b"long/name", 1000, 9, {}, b"abc")
    assert_same(data)


@pytest.mark.parametrize("mod", BACKENDS)
@pytest.mark.parametrize("order", ["pax-first", "gnu-first"])
def test_gnu_long_names_win_over_pax_paths(mod, order):
    """Go's archive/tar applies the PAX records, then a GNU long name or link over them."""
    x = pax([(b"path", b"pax/name"), (b"linkpath", b"pax/link"), (b"uid", b"7")])
    gnu = gnu_long(b"L", b"gnu/name") + gnu_long(b"K", b"gnu/link")
    data = (
        (x + gnu if order == "pax-first" else gnu + x) + member(header(b"l", typ=b"2", linkname=b"t")) + END
    )
    ((h, _, _, _),) = members(parse(mod, data))
    assert (h[0], h[1], h[4]) == (b"gnu/name", b"gnu/link", 7)
    assert_same(data)


@pytest.mark.parametrize("mod", BACKENDS)
def test_empty_extended_names_name_nothing(mod):
    """As Go's archive/tar: an empty PAX path or linkpath, or an empty GNU long name or link,
    leaves the name the header has (or the other extended header's)."""
    link = member(header(b"l", typ=b"2", linkname=b"t"))
    cases = [
        (pax([(b"path", b""), (b"linkpath", b"")]) + link, (b"l", b"t")),
        (gnu_long(b"L", b"") + gnu_long(b"K", b"") + link, (b"l", b"t")),
        (gnu_long(b"L", b"") + pax([(b"path", b"p"), (b"linkpath", b"")]) + link, (b"p", b"t")),
        (gnu_long(b"K", b"k") + pax([(b"path", b""), (b"linkpath", b"q")]) + link, (b"l", b"k")),
    ]
    for data, names in cases:
        ((h, _, _, _),) = members(parse(mod, data + END))
        assert (h[0], h[1]) == names
        assert_same(data + END)


@pytest.mark.parametrize("mod", BACKENDS)
def test_global_header_applies_to_no_member(mod):
    """As Go's archive/tar (docker, containerd): a global header ('g') is an entry of its own,
    which extractors skip.  Its records apply to no member, and extended headers read before it
    (x, L, K) go with it; its records must still be well-formed PAX records."""
    glob = pax(
        [
            (b"path", b"evil"),
            (b"linkpath", b"/etc/shadow"),
            (b"uid", b"0"),
            (b"uname", b"root"),
            (b"size", b"999"),
            (b"mtime", b"5.5"),
            (b"SCHILY.xattr.security.capability", b"\x01"),
            (b"GNU.sparse.major", b"1"),  # a sparse marker, too, applies to nothing
            (b"gid", b"not a number"),  # nor is a value checked that is never used
        ],
        b"g",
    )
    data = (
        glob
        + member(header(b"f", size=3), b"abc")
        + member(header(b"l", typ=b"2", linkname=b"target"))
        + pax([(b"path", b"renamed"), (b"SCHILY.xattr.user.x", b"1")])
        + gnu_long(b"L", b"long name")
        + glob
        + member(header(b"d/", typ=b"5"))
        + glob
    )
    plain = member(header(b"f", size=3), b"abc") + member(header(b"l", typ=b"2", linkname=b"target"))
    expected = parse(py_backend, plain + member(header(b"d/", typ=b"5")) + END)
    for tail in (END, b""):  # a global header last, before the trailer or at EOF
        events = parse(mod, data + tail)
        assert events == expected
        (h1, content, _, _), (h2, _, _, _), (h3, _, _, _) = members(events)
        assert (h1[0], h1[4], h1[6], h1[7], h1[10], h1[12], content) == (
            b"f",
            1000,
            3,
            1700000000 * 10**9,
            b"user",
            {},
            b"abc",
        )
        assert (h2[0], h2[1]) == (b"l", b"target") and (h3[0], h3[12]) == (b"d/", {})
        assert_same(data + tail)
    # an x header before a global one at the end is dropped with it, not a truncated stream
    assert parse(mod, pax([(b"path", b"p")]) + glob) == []


@pytest.mark.parametrize("mod", BACKENDS)
def test_pax_numbers(mod):
    records = [
        (b"size", b"5"),
        (b"uid", b"4294967296"),
        (b"gid", b"000123"),
        (b"mtime", b"1700000000.5"),
        (b"uname", b""),
        (b"gname", b"\xffg"),
    ]
    data = pax(records) + member(header(b"f", size=999), b"12345") + END
    ((hdr, content, _, _),) = members(parse(mod, data))
    assert content == b"12345"
    assert hdr[4:8] == (4294967296, 123, 5, 1700000000500000000)
    assert hdr[10:12] == (b"", b"\xffg")
    for value, ns in [
        (b"-1.25", -1250000000),
        (b"0", 0),
        (b"5.", 5 * 10**9),
        (b"1.0000000019", 10**9 + 1),
        (b"--3", -3 * 10**9),
        (b"-0.000000001", -1),
        (b"99999999999999999999.5", 99999999999999999999500000000),
        (b"9223372036.854775807", 9223372036854775807),
        (b"9223372036.854775808", 9223372036854775808),
    ]:
        data = pax([(b"mtime", value)]) + member(header(b"m", typ=b"5")) + END
        assert members(parse(mod, data))[0][0][7] == ns, value
    # uid beyond 64 bits: passed through as a Python int, like the twin does
    data = (
        pax([(b"uid", b"1" + b"0" * 30), (b"gid", b"18446744073709551616")]) + member(header(typ=b"5")) + END
    )
    assert members(parse(mod, data))[0][0][4:6] == (10**30, 2**64)


@pytest.mark.parametrize("mod", BACKENDS)
def test_numeric_field_encodings(mod):
    def one(**kw):
        data = member(header(b"n", typ=b"5", **kw)) + END
        return members(parse(mod, data))[0][0]

    assert one(uid=base256(2**61 + 5, 8), gid=base256(0, 8))[4:6] == (2**61 + 5, 0)
    assert one(uid=b"\xc0" + bytes(7))[4] == -(2**62)  # 0x40 under the marker: negative
    assert one(uid=base256(-1, 8))[4] == -1
    assert one(uid=b"\x80" + b"\xff" * 7)[4] == 2**56 - 1
    assert one(mode=b"\xff" * 8)[3] == 0o7777  # -1 & 0o7777
    assert one(mtime=base256(-(2**40), 12))[7] == -(2**40) * 10**9
    # 12-byte base-256 beyond int64 and 12-digit octal: ns past int64, still exact
    assert one(mtime=base256(2**90 + 7, 12))[7] == (2**90 + 7) * 10**9
    assert one(mtime=base256(-(2**94), 12))[7] == -(2**94) * 10**9
    assert one(mtime=b"777777777777")[7] == (8**12 - 1) * 10**9
    # octal as Python's int(text, 8) reads it: spaces, NUL end, whitespace, sign, 0o, underscores
    assert one(uid=b"  17  \0x", gid=b"\0garbage")[4:6] == (0o17, 0)
    assert one(uid=b"\t17\n", gid=b"0o17")[4:6] == (0o17, 0o17)
    assert one(uid=b"1_7", gid=b"0O_7")[4:6] == (0o17, 7)
    assert one(uid=b"+7", gid=b"-7")[4:6] == (7, -7)
    assert one(uid=b"        ")[4] == 0
    assert one(devmajor=b"\x80\0\0\0\0\0\x01\x00", devminor=b"7777777")[8:10] == (256, 0o7777777)
    # a negative size is refused, even for entries that have no data
    with pytest.raises(TarError, match="negative size"):
        one(size=b"-1")
    with pytest.raises(TarError, match="negative size"):
        one(size=base256(-1, 12))


@pytest.mark.parametrize("mod", BACKENDS)
def test_checksum_signed_and_base256(mod):
    hdr = bytearray(header(b"caf\xe9", typ=b"5", uname=b"\xff\xfe"))
    signed = sum(b - 256 if b > 127 else b for b in hdr[:148] + hdr[156:]) + 256
    hdr[148:156] = b"%06o\0 " % signed
    assert members(parse(mod, bytes(hdr) + END))[0][0][0] == b"caf\xe9"
    hdr[148:156] = base256(signed, 8)
    assert members(parse(mod, bytes(hdr) + END))[0][0][0] == b"caf\xe9"


@pytest.mark.parametrize("mod", BACKENDS)
def test_typeflags_and_names(mod):
    data = (
        member(header(b"nul-type", typ=b"\0", size=2), b"ab")
        + member(header(b"cont", typ=b"7", size=1), b"c")
        + member(header(b"dir-with-size", typ=b"5", size=1024))  # header-only: no data follows
        + member(header(b"name", prefix=b"pre/fix"))
        + member(header(b"gnu-name", prefix=b"ignored", magic=b"ustar  \0"))
        + member(header(b"n" * 100, linkname=b"l" * 100, typ=b"1", uname=b"u" * 32, gname=b"g" * 32))
        + gnu_long(b"L", b"gnu/" * 100 + b"long\0tail ignored")
        + gnu_long(b"K", b"link/" * 100)
        + member(header(b"short", typ=b"2", linkname=b"short-link"))
        + END
        + b"garbage after the end marker is not read"
    )
    hdrs = [m[0] for m in members(parse(mod, data))]
    assert [(h[0], h[2], h[6]) for h in hdrs[:5]] == [
        (b"nul-type", 0x30, 2),
        (b"cont", 0x30, 1),
        (b"dir-with-size", 0x35, 0),
        (b"pre/fix/name", 0x30, 0),
        (b"gnu-name", 0x30, 0),
    ]
    assert hdrs[5][:3] == (b"n" * 100, b"l" * 100, 0x31) and hdrs[5][10:12] == (b"u" * 32, b"g" * 32)
    assert hdrs[6][:3] == (b"gnu/" * 100 + b"long", b"link/" * 100, 0x32)
    assert_same(data)


@pytest.mark.parametrize("mod", BACKENDS)
def test_ext_header_limits_accepted(mod):
    # exactly MAX_EXT bytes of PAX records is allowed
    value_len = MAX_EXT - len(pax_record(b"comment", b""))
    while len(pax_record(b"comment", b"c" * value_len)) > MAX_EXT:
        value_len -= 1
    rec = pax_record(b"comment", b"c" * value_len)
    assert len(rec) == MAX_EXT
    data = pax(rec) + member(header(b"f", size=1), b"z") + END
    assert members(parse(mod, data))[0][1] == b"z"
    # empty extended headers; NUL padding after the last record
    data = (
        pax(b"")
        + pax(pax_record(b"uid", b"7") + b"\0\0junk")
        + gnu_long(b"L", b"")
        + member(header(b"x"))
        + END
    )
    # (the empty long name names nothing: the header's name stays, as in Go)
    assert members(parse(mod, data))[0][0][0] == b"x" and members(parse(mod, data))[0][0][4] == 7


@pytest.mark.parametrize("mod", BACKENDS)
def test_api(mod):
    assert (mod.EV_ENTRY, mod.EV_DATA, mod.EV_END) == (0, 1, 2)
    parser = mod.TarParser(io.BytesIO(END).read)
    assert iter(parser) is parser
    assert list(parser) == [] and list(parser) == []
    assert list(mod.TarParser(io.BytesIO(b"").read)) == []
    assert list(mod.TarParser(read=io.BytesIO(b"").read, chunk_size=True)) == []
    for bad in (0, -1, -(2**70)):
        with pytest.raises(ValueError, match="chunk_size must be positive"):
            mod.TarParser(io.BytesIO(b"").read, bad)


def test_c_module_shares_twin_error():
    assert c_backend.TarError is TarError
    assert issubclass(TarError, ValueError)
    assert c_backend.MAX_EXT == MAX_EXT == 1 << 20


@pytest.mark.parametrize("mod", BACKENDS)
def test_read_callable_errors_propagate(mod):
    data = member(header(b"f", size=5000), b"q" * 5000) + END
    calls = []

    def read(n):
        calls.append(n)
        if len(calls) > 1:
            raise OSError("disk on fire")
        return data[:700]

    parser = mod.TarParser(read, 100)
    assert next(parser)[0] == EV_ENTRY
    assert next(parser)[0] == EV_DATA
    with pytest.raises(OSError, match="disk on fire"):
        list(parser)
    assert next(parser, None) is None

    with pytest.raises(TypeError):
        list(mod.TarParser(lambda n: "text"))

    # falsy values mean EOF, like the twin's `if not data`
    assert list(mod.TarParser(lambda n: None)) == []


@pytest.mark.parametrize("mod", BACKENDS)
def test_reentrant_next_is_refused(mod):
    data = member(header(b"f", size=3), b"abc") + END
    holder: list = []

    def read(n):
        next(holder[0])
        return data

    holder.append(mod.TarParser(read))
    with pytest.raises(ValueError, match="already executing"):
        next(holder[0])


def test_c_parser_cycle_is_collected():
    class Source:
        def __init__(self):
            self.parser = c_backend.TarParser(self.read)

        def read(self, n):
            return b""

    src = Source()
    ref = weakref.ref(src)
    del src
    gc.collect()
    assert ref() is None


# -- hostile input ---------------------------------------------------------------

GOOD = member(header(b"f", size=1000), b"d" * 1000) + END


def hostile_cases() -> list:
    sparse_pax = pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")])
    cases = [
        ("truncated-header", GOOD[:300], "truncated tar stream in header"),
        ("truncated-data", GOOD[:700], "truncated tar stream in file data"),
        ("truncated-padding", GOOD[:1500], "truncated tar stream in file data"),
        ("truncated-after-pax", pax([(b"path", b"p")]), "after extended header"),
        ("truncated-after-L", gnu_long(b"L", b"name"), "after extended header"),
        ("truncated-after-K", gnu_long(b"K", b"name"), "after extended header"),
        ("truncated-pax-data", pax([(b"path", b"p" * 600)])[:700], "truncated tar stream in PAX header"),
        ("truncated-pax-padding", pax([(b"path", b"p" * 600)])[:1130], "truncated tar stream in PAX header"),
        ("truncated-L-data", gnu_long(b"L", b"n" * 600)[:700], "truncated tar stream in GNU long name"),
        ("bad-checksum", header(b"f", chksum=b"0000000\0") + END, "checksum mismatch"),
        ("not-tar", b"PK\x03\x04" + bytes(600), "checksum mismatch"),
        ("sparse-S", member(header(b"s", typ=b"S")) + END, "sparse files"),
        ("sparse-pax", sparse_pax + member(header(b"s", size=0)) + END, "sparse files"),
        ("type-V", member(header(b"v", typ=b"V")) + END, "unsupported tar entry type 'V'"),
        ("type-D", member(header(b"v", typ=b"D")) + END, "unsupported tar entry type"),
        ("type-high", member(header(b"v", typ=b"\xe9")) + END, "unsupported tar entry type"),
        ("pax-over-limit", header(b"p", typ=b"x", size=MAX_EXT + 1) + bytes(MAX_EXT + 512), "exceeds the"),
        ("global-over-limit", header(b"p", typ=b"g", size=MAX_EXT + 1), "exceeds the"),
        ("L-over-limit", header(b"p", typ=b"L", size=MAX_EXT + 1), "exceeds the"),
        ("K-over-limit", header(b"p", typ=b"K", size=base256(2**62, 12)), "exceeds the"),
        ("pax-over-int64", header(b"p", typ=b"x", size=base256(2**90, 12)), "exceeds the"),
        ("pax-bad-length", pax(b"x3 a=b\n") + GOOD, "malformed PAX record length"),
        ("global-pax-bad-length", pax(b"x3 a=b\n", b"g") + GOOD, "malformed PAX record length"),
        ("global-pax-no-newline", pax(b"6 a=bc", b"g") + GOOD, "malformed PAX record"),
        ("pax-no-length", pax(b" a=b\n") + GOOD, "malformed PAX record length"),
        ("pax-no-space", pax(b"12345") + GOOD, "malformed PAX record length"),
        ("pax-missing-eq", pax(b"7 ab c\n") + GOOD, "no '='"),
        ("pax-empty-record", pax(b"3 \n") + GOOD, "no '='"),
        ("pax-length-past-end", pax(b"99 a=b\n") + GOOD, "malformed PAX record"),
        ("pax-length-huge", pax(b"99999999999999999999999999 a=b\n") + GOOD, "malformed PAX record"),
        ("pax-length-short", pax(b"2 a=b\n") + GOOD, "malformed PAX record"),
        ("pax-length-zero", pax(b"0 a=b\n") + GOOD, "malformed PAX record"),
        ("pax-no-newline", pax(b"6 a=bc") + GOOD, "malformed PAX record"),
        ("pax-bad-size", pax([(b"size", b"12a")]) + GOOD, "invalid PAX size"),
        ("pax-empty-uid", pax([(b"uid", b"")]) + GOOD, "invalid PAX uid"),
        ("pax-neg-gid", pax([(b"gid", b"-1")]) + GOOD, "invalid PAX gid"),
        ("pax-bad-size-dir", pax([(b"size", b"1 ")]) + member(header(typ=b"5")) + END, "invalid PAX size"),
        ("pax-mtime-2dots", pax([(b"mtime", b"1.2.3")]) + GOOD, "invalid PAX mtime"),
        ("pax-mtime-lead-dot", pax([(b"mtime", b".5")]) + GOOD, "invalid PAX mtime"),
        ("pax-mtime-dash", pax([(b"mtime", b"-")]) + GOOD, "invalid PAX mtime"),
        ("pax-mtime-exp", pax([(b"mtime", b"1e9")]) + GOOD, "invalid PAX mtime"),
        ("pax-mtime-space", pax([(b"mtime", b" 1")]) + GOOD, "invalid PAX mtime"),
        ("pax-mtime-utf8", pax([(b"mtime", "\u0661".encode())]) + GOOD, "invalid PAX mtime"),
        ("negative-base256-size", header(b"f", size=base256(-5, 12)) + END, "negative size"),
        ("negative-octal-size", header(b"f", size=b"-1") + END, "negative size"),
        ("file-size-beyond-file", header(b"f", size=2**32) + b"x" * 5000, "truncated"),
    ]
    for fname, off, width in [
        ("mode", 100, 8),
        ("uid", 108, 8),
        ("gid", 116, 8),
        ("size", 124, 12),
        ("mtime", 136, 12),
        ("devmajor", 329, 8),
        ("devminor", 337, 8),
        ("checksum", 148, 8),
    ]:
        for bad in (
            b"0000089\0",
            b"12 34\0",
            b"0x1f\0",
            b"1__2\0",
            b"_12\0",
            b"12_\0",
            b"0o\0",
            b"-\0",
            b"1\xa0\0",
        ):
            block = bytearray(header(b"o", typ=b"5"))
            block[off : off + width] = bad.ljust(width, b"\0")
            if fname != "checksum":
                fix_checksum(block)
            cases.append(
                (f"octal-{fname}-{bad!r}", bytes(block) + END, f"invalid octal number in {fname} field")
            )
    return cases


@pytest.mark.parametrize("case", hostile_cases(), ids=lambda c: c[0])
def test_hostile_input_refused(case):
    _, data, match = case
    assert_both_refuse(data, match)
    assert_both_refuse(data, match, chunk_size=1)


def test_huge_regular_file_size_refused_early():
    # 12-byte base-256 sizes above int64 (header field or PAX record): the twin yields
    # the entry and then fails on the missing data; the C parser refuses the header
    for data in (
        header(b"f", size=base256(2**64, 12)) + b"x" * 3000,
        pax([(b"size", b"9" * 40)]) + header(b"f") + b"x" * 3000,
    ):
        c_events, c_err = outcome(c_backend, data, 1000)
        py_events, py_err = outcome(py_backend, data, 1000)
        assert c_err is not None and "too large" in str(c_err)
        assert py_err is not None and "truncated" in str(py_err)
        assert c_events == [] and py_events[0][0] == EV_ENTRY and py_events[0][1][6] >= 2**63
    # ... but a big size on an entry without data is ignored by both
    data = member(header(b"d", typ=b"5", size=base256(2**80, 12))) + END
    assert assert_same(data)[0][1][6] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_over_long_pax_numbers_are_refused(backend):
    # Python's int() refuses more than sys.get_int_max_str_digits() digits with a plain
    # ValueError: both backends must say TarError instead
    many = b"1" * 5000
    for records in ([(b"uid", many)], [(b"size", many)], [(b"mtime", many)]):
        events, err = outcome(backend, pax(records) + GOOD)
        assert err is not None and events == []
    for records in ([(b"uid", many)], [(b"size", many)]):  # even where the size is not used
        events, err = outcome(backend, pax(records) + member(header(typ=b"5")) + END)
        assert err is not None and f"invalid PAX {records[0][0].decode()}" in str(err)
    events, err = outcome(backend, pax(many + b" a=b\n") + GOOD)
    assert err is not None and "malformed PAX record" in str(err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [b"x", b"L"])
def test_many_extended_headers_add_up_to_the_limit(backend, kind):
    # each header is under the 1 MiB cap; together they must not grow memory without bound
    if kind == b"x":
        chunk = pax([(b"comment", b"c" * 200_000)], typ=kind)
    else:
        chunk = gnu_long(kind, b"n" * 200_000)
    events, err = outcome(backend, chunk * 6 + GOOD)
    assert err is not None and "in total" in str(err) and events == []
    # below the total, the same headers are fine
    events, err = outcome(backend, chunk * 4 + GOOD)
    assert err is None and events


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_headers_do_not_add_up(backend):
    # a global header is dropped once read (each is still capped at MAX_EXT)
    chunk = pax([(b"comment", b"c" * 200_000)], typ=b"g")
    events, err = outcome(backend, chunk * 12 + GOOD)
    assert err is None and events == parse(py_backend, GOOD)


# -- randomised corpus and fuzzing -------------------------------------------------


def random_name(rng: random.Random, max_len: int) -> str:
    parts = []
    length = rng.randint(1, max_len)
    while sum(map(len, parts)) < length:
        parts.append("".join(rng.choice("abcdefghij_-.") for _ in range(rng.randint(1, 40))))
    return "/".join(parts)[:length].strip("/") or "n"


def random_archive(rng: random.Random, max_file: int = 20000) -> bytes:
    fmt = rng.choice([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
    buf = io.BytesIO()
    types = [tarfile.REGTYPE] * 4 + [
        tarfile.AREGTYPE,
        tarfile.LNKTYPE,
        tarfile.SYMTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.DIRTYPE,
        tarfile.FIFOTYPE,
    ]
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for _ in range(rng.randint(0, 8)):
            ti = tarfile.TarInfo(random_name(rng, rng.choice([20, 100, 300])))
            ti.type = rng.choice(types)
            if ti.type in (tarfile.LNKTYPE, tarfile.SYMTYPE):
                ti.linkname = random_name(rng, rng.choice([20, 100, 300]))
            ti.mode = rng.getrandbits(16)
            ti.uid, ti.gid = (
                rng.choice([0, 1000, 2097151, 2097152, 2**32 - 1]),
                rng.getrandbits(rng.choice([8, 21, 24])),
            )
            ti.mtime = rng.choice([0, 1700000000, 8**11 + 1, -5, 1700000000.25, 2**35 + 0.5])
            ti.uname, ti.gname = random_name(rng, 40), random_name(rng, 8)
            if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                ti.devmajor, ti.devminor = rng.getrandbits(12), rng.getrandbits(20)
            if fmt == tarfile.PAX_FORMAT and rng.random() < 0.5:
                ti.pax_headers = {
                    f"SCHILY.xattr.user.k{i}": random_name(rng, 30) for i in range(rng.randint(0, 4))
                }
            payload = None
            if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                size = rng.choice([0, 1, 511, 512, 513, 1024, rng.randint(0, max_file)])
                payload = rng.randbytes(size)
                ti.size = size
            try:
                tar.addfile(ti, io.BytesIO(payload) if payload is not None else None)
            except ValueError:  # does not fit this format
                continue
        end = tar.offset
    data = buf.getvalue()
    if rng.random() < 0.3:
        data = data[:end]
    if rng.random() < 0.3:  # hand-made extended headers tarfile does not write
        records = [(b"SCHILY.xattr.user.bin", rng.randbytes(rng.randint(0, 40))), (b"gname", b"\xff")]
        rng.shuffle(records)
        data = pax(records[: rng.randint(0, 2)], rng.choice([b"x", b"g"])) + data
    return data


# the share of the random rounds below to run: the emulated CI job (.ci/emulated) runs a tenth,
# as many rounds as natively would take ten times as long under qemu-user
FUZZ_SCALE = float(os.environ.get("LAYERFS_FUZZ_SCALE", "1"))


def rounds(n: int) -> int:
    return max(10, int(n * FUZZ_SCALE))


def test_random_corpus_identical():
    rng = random.Random(20240229)
    chunk_sizes = [1, 2, 7, 100, 511, 512, 513, 4096, 65536, 1 << 20, 3 << 20]
    for _ in range(rounds(150)):
        data = random_archive(rng)
        chunk = rng.choice(chunk_sizes)
        baseline = parse(py_backend, data, chunk)
        members(baseline)
        assert parse(c_backend, data, chunk) == baseline
        for mod in (c_backend, py_backend):
            reader = ShortReader(
                data,
                random.Random(rng.random()),
                rng.choice([1, 3, 64, 700, 5000]),
                kinds=(bytes, bytearray, memoryview),
            )
            assert parse(mod, data, chunk, reader.read) == baseline


def header_offsets(data: bytes) -> list[int]:
    """Offsets of the header blocks of a valid archive (per the twin's view)."""
    offsets, pos, pax_size = [], 0, None
    while pos + 512 <= len(data) and data[pos : pos + 512].count(0) != 512:
        offsets.append(pos)
        field = data[pos + 124 : pos + 136]
        size = (
            int.from_bytes(field[1:], "big")
            if field[0] & 0x80
            else int(field.split(b"\0")[0].strip() or b"0", 8)
        )
        typ = data[pos + 156 : pos + 157]
        if typ == b"x":
            pax_size = py_backend._parse_pax(data[pos + 512 : pos + 512 + size]).get(b"size", pax_size)
        elif typ in (b"0", b"\0", b"7") and pax_size is not None:
            size, pax_size = int(pax_size), None
        skip = size if typ in (b"0", b"\0", b"7", b"x", b"g", b"L", b"K") else 0
        pos += 512 + skip + (-skip % 512)
    return offsets


def mutate(rng: random.Random, data: bytes, headers: list[int]) -> bytes:
    buf = bytearray(data)
    touched = set()
    for _ in range(rng.choice([1, 1, 2, 3, 6])):
        if headers and rng.random() < 0.75:
            start = rng.choice(headers)
            off = start + rng.choice([rng.randrange(512), rng.randrange(100, 160), rng.randrange(329, 345)])
            touched.add(start)
        else:
            off = rng.randrange(len(buf) or 1)
        if off < len(buf):
            buf[off] = rng.choice(
                [
                    rng.getrandbits(8),
                    0,
                    0x20,
                    0x30 + rng.randrange(10),
                    0x80,
                    0xFF,
                    ord("_"),
                    ord("-"),
                    ord("\n"),
                    ord("="),
                    ord("x"),
                    ord("L"),
                    ord("g"),
                    ord("S"),
                ]
            )
    for start in touched:  # mostly keep the checksum right, to get past it
        if rng.random() < 0.85 and start + 512 <= len(buf):
            block = bytearray(buf[start : start + 512])
            buf[start : start + 512] = fix_checksum(block)
    if rng.random() < 0.3:
        del buf[rng.randrange(len(buf) + 1) :]
    return bytes(buf)


def fuzz_seeds() -> list[bytes]:
    rng = random.Random(7)
    seeds = [GOOD]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        specs = [s for s in format_specs(fmt) if len(s.data) < 1000][:14]
        data, end = build(specs, fmt)
        seeds.append(data[:end] + END)
    seeds.append(
        pax([(b"SCHILY.xattr.user.a", b"\x00\xff"), (b"mtime", b"-1.5"), (b"uid", b"99")], b"g")
        + pax([(b"path", b"p" * 120), (b"size", b"700"), (b"linkpath", b"l"), (b"gid", b"7")])
        + member(header(b"f", size=7), b"\x01" * 700)
        + gnu_long(b"L", b"L" * 300)
        + gnu_long(b"K", b"K" * 200)
        + member(header(typ=b"1"))
        + member(header(b"dev", typ=b"3", devmajor=base256(300, 8), uid=b"0o17", mtime=base256(-3, 12)))
        + END
    )
    seeds += [random_archive(rng, max_file=1500) for _ in range(8)]
    return [s for s in seeds if len(s) >= 1024]


def test_fuzz_both_backends_agree():
    rng = random.Random(424242)
    seeds = [(s, header_offsets(s)) for s in fuzz_seeds()]
    stats = {"same": 0, "both-refused": 0, "c-refused-earlier": 0}
    deadline = time.monotonic() + 60
    for _ in range(rounds(10000)):
        seed, headers = rng.choice(seeds)
        data = mutate(rng, seed, headers)
        chunk = rng.choice([1, 64, 512, 700, 65536])
        c_events, c_err = outcome(c_backend, data, chunk)
        py_events, py_err = outcome(py_backend, data, chunk)
        if c_err is None or py_err is None:
            assert c_err is None and py_err is None, (data, c_err, py_err)
            assert c_events == py_events, data
            stats["same"] += 1
        elif c_events == py_events:
            assert str(c_err) == str(py_err), data  # same message too
            stats["both-refused"] += 1
        else:
            # the only allowed difference: a regular file whose size does not fit int64
            assert "too large" in str(c_err), (data, c_err, py_err)
            assert py_events[: len(c_events)] == c_events
            assert py_events[len(c_events)][0] == EV_ENTRY and py_events[len(c_events)][1][6] >= 2**63
            stats["c-refused-earlier"] += 1
        assert time.monotonic() < deadline
    assert stats["same"] > rounds(1000) and stats["both-refused"] > rounds(1000), stats


def test_fuzz_short_reads_and_c_robustness():
    """The C parser alone, on more mutants and awkward reads: it must only ever raise TarError."""
    rng = random.Random(5150)
    seeds = [(s, header_offsets(s)) for s in fuzz_seeds()]
    for _ in range(rounds(1500)):
        seed, headers = rng.choice(seeds)
        data = mutate(rng, seed, headers)
        chunk = rng.choice([1, 3, 512, 1 << 20])
        events, err = outcome(c_backend, data, chunk)
        reader = ShortReader(
            data,
            random.Random(rng.random()),
            rng.choice([1, 5, 513, 4096]),
            kinds=(bytes, bytearray, memoryview),
        )
        short_events, short_err = outcome(c_backend, data, chunk, reader.read)
        assert short_events == events and (short_err is None) == (err is None), data
        if err is None:
            members(events)
