"""Hostile layers: a corpus of malicious or broken tars, each imported as a layer of an OCI layout.

Every hostile case must be refused with a one-line error (exit 1 from the CLI, ``ImportError_``
from ``import_path``) and leave the store empty and verifiable.  The positive cases check the
changeset rules of ``tools/layer.py`` on the stored entry tables.  Tars are built by hand here
(header checksums computed below) where ``tarfile`` would not write them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Callable

import pytest
import zstandard
from conftest import make_layout, member, tar_bytes

from layerfs.store import Store, verify
from layerfs.store import entries as E
from layerfs.store.usage import usage
from layerfs.tools.image import ImportError_, import_path

BLOCK = 512
END = b"\0" * (2 * BLOCK)


# -- raw tar construction ---------------------------------------------------------------
def header(
    name: bytes,
    *,
    typ: bytes = b"0",
    size: int = 0,
    mode: int = 0o644,
    link: bytes = b"",
    size_field: bytes | None = None,
    uid_field: bytes | None = None,
    chksum: int | None = None,
) -> bytes:
    """One ustar header block; the checksum is computed unless ``chksum`` forces a value."""
    b = bytearray(BLOCK)
    b[0 : len(name)] = name
    b[100:108] = b"%07o\0" % mode
    b[108:116] = uid_field if uid_field is not None else b"0000000\0"
    b[116:124] = b"0000000\0"
    b[124:136] = size_field if size_field is not None else b"%011o\0" % size
    b[136:148] = b"%011o\0" % 1_700_000_000
    b[148:156] = b" " * 8
    b[156:157] = typ
    b[157 : 157 + len(link)] = link
    b[257:265] = b"ustar\x0000"
    b[148:156] = b"%06o\0 " % (sum(b) if chksum is None else chksum)
    return bytes(b)


def rec(name: bytes, data: bytes = b"", **kw: object) -> bytes:
    """A member: header plus data padded to the block size."""
    kw.setdefault("size", len(data))
    return header(name, **kw) + data + b"\0" * (-len(data) % BLOCK)  # type: ignore[arg-type]


def pax_body(records: list[tuple[bytes, bytes]]) -> bytes:
    body = b""
    for key, value in records:
        line = b" " + key + b"=" + value + b"\n"
        n = len(line) + 1
        while len(str(n)) + len(line) != n:
            n += 1
        body += str(n).encode() + line
    return body


def pax(records: list[tuple[bytes, bytes]], typ: bytes = b"x") -> bytes:
    return rec(b"PaxHeader", pax_body(records), typ=typ)


def d(name: bytes) -> bytes:
    return rec(name, typ=b"5", mode=0o755)


# -- the hostile corpus ---------------------------------------------------------------------
def _one(raw: bytes, **kw: object) -> Callable[[Path], str]:
    return lambda p: make_layout(p, [raw], **kw)  # type: ignore[arg-type]


def _bad_digest(p: Path) -> str:
    raw = rec(b"a", b"data") + END
    blob = gzip.compress(raw, mtime=0)
    fake = hashlib.sha256(b"something else").hexdigest()
    make_layout(p, [raw], layer_digests=["sha256:" + fake])
    blobs = p / "blobs" / "sha256"
    shutil.copy(blobs / hashlib.sha256(blob).hexdigest(), blobs / fake)  # right name, wrong bytes
    return str(p)


def _wrong_size(p: Path) -> str:
    raw = rec(b"a", b"data") + END
    return make_layout(p, [raw], layer_sizes=[len(gzip.compress(raw, mtime=0)) + 7])


def _truncated_gzip(p: Path) -> str:
    raw = rec(b"a", os.urandom(20000)) + END
    return make_layout(p, [gzip.compress(raw, mtime=0)[:-100]], compress=False)


def _truncated_zstd(p: Path) -> str:
    raw = rec(b"a", os.urandom(3000)) + rec(b"b", b"x" * 100_000) + END
    blob = zstandard.ZstdCompressor().compress(raw)[:-50]
    return make_layout(p, [blob], compress=False, diff_ids=["sha256:" + hashlib.sha256(raw).hexdigest()])


HOSTILE: dict[str, tuple[Callable[[Path], str], str]] = {
    "dotdot-traversal": (_one(rec(b"../etc/passwd", b"root::0:0")), "escapes the layer root"),
    "inner-dotdot": (_one(rec(b"a/../../x", b"x")), "escapes the layer root"),
    "symlink-escape": (
        _one(rec(b"link", typ=b"2", link=b"/etc") + rec(b"link/passwd", b"evil") + END),
        "makes a non-directory",
    ),
    "symlink-escape-relative": (
        _one(d(b"a/") + rec(b"a/up", typ=b"2", link=b"../..") + rec(b"a/up/x", b"evil") + END),
        "makes a non-directory",
    ),
    "hardlink-outside": (
        _one(rec(b"f", b"x") + rec(b"h", typ=b"1", link=b"../../outside") + END),
        "escapes the layer root",
    ),
    "hardlink-missing": (
        _one(rec(b"h", typ=b"1", link=b"no/such/file") + END),
        "not a file of this or a lower layer",
    ),
    "hardlink-to-dir": (_one(d(b"dir/") + rec(b"h", typ=b"1", link=b"dir") + END), "non-regular"),
    "bare-whiteout": (_one(rec(b"dir/.wh.") + END), "bare whiteout"),
    "whiteout-dot": (_one(rec(b".wh..") + END), "names no file"),
    "whiteout-dotdot": (_one(rec(b"a/.wh...") + END), "names no file"),
    "bad-layer-digest": (_bad_digest, "content hashes to"),
    "wrong-layer-size": (_wrong_size, "descriptor says"),
    "wrong-diff-id": (
        _one(rec(b"a", b"x") + END, diff_ids=["sha256:" + "ab" * 32]),
        "uncompressed content hashes to",
    ),
    "truncated-gzip": (_truncated_gzip, "truncated"),
    # refused by the diff_id check (the zstd reader ends silently at a truncated frame)
    "truncated-zstd": (_truncated_zstd, ""),
    "truncated-tar": (_one((rec(b"a", b"x" * 5000) + END)[:2000]), "truncated tar stream"),
    "garbage": (_one(b"this is not a tar archive, just some text\n" * 50), "bad tar stream"),
    "huge-pax-header": (
        _one(header(b"PaxHeader", typ=b"x", size=100 << 20) + b"1" * BLOCK),
        "exceeds the 1048576-byte limit",
    ),
    "pax-negative-length": (
        _one(rec(b"PaxHeader", b"-5 path=x\n", typ=b"x") + rec(b"a", b"x") + END),
        "malformed PAX record",
    ),
    "pax-garbage-length": (
        _one(rec(b"PaxHeader", b"1x2 path=x\n", typ=b"x") + rec(b"a", b"x") + END),
        "malformed PAX record",
    ),
    "pax-overlong-record": (
        _one(rec(b"PaxHeader", b"999 path=x\n", typ=b"x") + rec(b"a", b"x") + END),
        "malformed PAX record",
    ),
    "gnu-sparse-S": (_one(rec(b"sparse", b"x" * 10, typ=b"S") + END), "sparse"),
    "pax-gnu-sparse": (
        _one(pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")]) + rec(b"s", b"x") + END),
        "sparse",
    ),
    "base256-negative-size": (_one(header(b"a", size_field=b"\xff" * 12) + END), "negative size"),
    "bad-checksum": (_one(header(b"a", chksum=12345) + END), "checksum mismatch"),
    "typeflag-V": (_one(rec(b"vol", typ=b"V") + END), "unsupported tar entry type"),
    # values the entry table cannot hold: refused, not a traceback
    "path-too-long": (_one(pax([(b"path", b"a/" * 33000 + b"b")]) + rec(b"x", b"x") + END), "too long"),
    "symlink-target-too-long": (
        _one(pax([(b"linkpath", b"x" * 70000)]) + rec(b"l", typ=b"2") + END),
        "too long",
    ),
    "uid-out-of-range": (_one(pax([(b"uid", b"99999999999")]) + rec(b"x", b"x") + END), "out of range"),
    "base256-negative-uid": (_one(rec(b"x", b"x", uid_field=b"\xff" * 8) + END), "out of range"),
    "mtime-out-of-range": (
        _one(pax([(b"mtime", b"99999999999999999999")]) + rec(b"x", b"x") + END),
        "out of range",
    ),
    "nul-in-path": (_one(pax([(b"path", b"a\0b")]) + rec(b"x", b"x") + END), "NUL"),
}


def assert_store_empty(store: Store) -> None:
    u = usage(store)
    assert (u["images"], u["tags"], u["layers"], u["objects"], u["payload_bytes"]) == (0, 0, 0, 0, 0), u
    assert store.leases() == []
    assert verify(store).errors == []


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_cli(case: str, cli, tmp_path: Path, store_path: str) -> None:
    build, expect = HOSTILE[case]
    layout = build(tmp_path / "layout")
    res = cli("import", "-q", layout, check=False)
    lines = res.err.strip().splitlines()
    assert res.code == 1, res.err
    assert len(lines) == 1 and lines[0].startswith("layerfs: import of "), res.err
    assert expect in lines[0]
    assert res.out == ""
    df = cli("df", "--json").json()
    assert isinstance(df, dict)
    assert (df["images"], df["layers"], df["objects"], df["payload_bytes"]) == (0, 0, 0, 0)
    assert cli("verify", "-q").code == 0
    with Store(store_path) as s:
        assert s.leases() == []


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_import_path(case: str, backend: str, store: Store, tmp_path: Path) -> None:
    build, expect = HOSTILE[case]
    layout = build(tmp_path / "layout")
    with pytest.raises(ImportError_) as info:
        import_path(store, layout)
    msg = str(info.value)
    assert expect in msg and "\n" not in msg
    assert_store_empty(store)


def test_refused_import_keeps_what_was_there(store: Store, tmp_path: Path) -> None:
    """A refused import removes only its own writes: an image already stored stays intact."""
    good = make_layout(tmp_path / "good", [rec(b"keep", b"kept data") + END], ref="good:1")
    import_path(store, good)
    before = usage(store)
    bad = make_layout(tmp_path / "bad", [rec(b"new", b"new data") + rec(b"../x", b"x") + END], ref="bad:1")
    with pytest.raises(ImportError_):
        import_path(store, bad)
    after = usage(store)
    assert {k: after[k] for k in ("images", "layers", "objects", "payload_bytes")} == {
        k: before[k] for k in ("images", "layers", "objects", "payload_bytes")
    }
    assert len(store.tags()) == 1
    assert verify(store).errors == []


# -- positive changeset cases -------------------------------------------------------------
def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def import_layers(store: Store, tmp_path: Path, layers: list[bytes]) -> list[dict[bytes, E.Entry]]:
    """Import an image of ``layers``; the stored entry table of each layer, by path."""
    res = import_path(store, make_layout(tmp_path / "layout", layers))
    assert verify(store).errors == []
    return [{e.path: e for e in store.layer_entries(bytes.fromhex(i[7:]))} for i in res[0].layer_ids]


def test_absolute_path_is_clamped(backend: str, store: Store, tmp_path: Path) -> None:
    (t,) = import_layers(store, tmp_path, [rec(b"/etc/x", b"clamped") + rec(b"//abs/dir/", typ=b"5") + END])
    assert set(t) == {b"etc/x", b"abs/dir"}
    assert t[b"etc/x"].kind == E.REG and store.read_object(t[b"etc/x"].content) == b"clamped"  # type: ignore[arg-type]


def test_absolute_path_cli(cli, tmp_path: Path, store_path: str) -> None:
    layout = make_layout(tmp_path / "layout", [rec(b"/etc/x", b"clamped") + END])
    assert cli("import", "-q", layout).code == 0
    with Store(store_path) as s:
        ((layer_id, _),) = s.layers()
        assert [e.path for e in s.layer_entries(layer_id)] == [b"etc/x"]


def test_normalization(backend: str, store: Store, tmp_path: Path) -> None:
    raw = d(b"./") + d(b"./a//b/") + rec(b"./a/./b//c", b"c") + rec(b"a/b/../b/d", b"d") + END
    (t,) = import_layers(store, tmp_path, [raw])
    assert sorted(t) == [b"", b"a/b", b"a/b/c", b"a/b/d"]
    assert t[b""].kind == E.DIR and t[b"a/b"].kind == E.DIR


def test_global_pax_header_applies_to_no_member(backend: str, store: Store, tmp_path: Path) -> None:
    """Go's archive/tar (docker, containerd) hands a global header ('g') out as an entry of its
    own, which their extractors skip: its records apply to no member.  Applied to every later
    member, ``path=evil`` made all of them one file ``evil``."""
    glob = pax(
        [(b"path", b"evil"), (b"uid", b"7"), (b"mtime", b"5"), (b"SCHILY.xattr.user.g", b"1")],
        typ=b"g",
    )
    raw = glob + rec(b"a", b"A") + d(b"dir/") + rec(b"dir/b", b"B") + glob + rec(b"c", b"C") + END
    (t,) = import_layers(store, tmp_path, [raw])
    assert sorted(t) == [b"a", b"c", b"dir", b"dir/b"]
    for name, data in ((b"a", b"A"), (b"dir/b", b"B"), (b"c", b"C")):
        e = t[name]
        assert e.kind == E.REG and store.read_object(e.content) == data  # type: ignore[arg-type]
        assert (e.uid, e.mtime_ns, e.xattrs) == (0, 1_700_000_000 * 10**9, ())


def test_second_pax_header_replaces_the_first(backend: str, store: Store, tmp_path: Path) -> None:
    """Of two extended headers before one member, Go's archive/tar (docker, containerd) applies
    the second alone; merged, ``path=evil`` of the first renamed the member."""
    first = pax([(b"path", b"evil"), (b"uid", b"7")])
    second = pax([(b"mtime", b"1600000000.5")])
    (t,) = import_layers(store, tmp_path, [first + second + rec(b"good", b"G") + END])
    assert sorted(t) == [b"good"]
    assert (t[b"good"].uid, t[b"good"].mtime_ns) == (0, 1_600_000_000_500_000_000)


def test_duplicates_last_wins(backend: str, store: Store, tmp_path: Path) -> None:
    raw = tar_bytes(
        [
            member("a", b"one"),
            member("a", b"two", mode=0o600),
            member("x", kind=tarfile.DIRTYPE),
            member("x", b"now a file"),
        ]
    )
    (t,) = import_layers(store, tmp_path, [raw])
    assert t[b"a"].content == _sha(b"two") and t[b"a"].mode == 0o600 and t[b"a"].size == 3
    assert t[b"x"].kind == E.REG and store.read_object(_sha(b"now a file")) == b"now a file"


def test_whiteout_entry(backend: str, store: Store, tmp_path: Path) -> None:
    raw = tar_bytes([member("d", kind=tarfile.DIRTYPE, mode=0o755), member("d/.wh.gone"), member(".wh.top")])
    (t,) = import_layers(store, tmp_path, [raw])
    assert sorted(t) == [b"d", b"d/gone", b"top"]
    assert t[b"d/gone"].kind == E.WHITEOUT and t[b"top"].kind == E.WHITEOUT
    assert not t[b"d"].flags & E.OPAQUE


@pytest.mark.parametrize("order", ["dir-first", "marker-first", "no-dir"])
def test_opaque_marker(order: str, backend: str, store: Store, tmp_path: Path) -> None:
    dir_m, marker = member("d", kind=tarfile.DIRTYPE, mode=0o700), member("d/.wh..wh..opq")
    ms = {"dir-first": [dir_m, marker], "marker-first": [marker, dir_m], "no-dir": [marker]}[order]
    (t,) = import_layers(store, tmp_path, [tar_bytes([*ms, member("d/kept", b"k")])])
    assert sorted(t) == [b"d", b"d/kept"]
    e = t[b"d"]
    assert e.kind == E.DIR and e.opaque
    if order == "no-dir":
        assert e.flags == E.IMPLICIT | E.OPAQUE and e.mode == 0o755
    else:
        assert e.flags == E.OPAQUE and e.mode == 0o700


def test_whiteout_then_recreate(backend: str, store: Store, tmp_path: Path) -> None:
    raw = tar_bytes(
        [
            member(".wh.d"),
            member("d", kind=tarfile.DIRTYPE),
            member("d/new", b"n"),
            member(".wh.f"),
            member("f", b"file again"),
        ]
    )
    (t,) = import_layers(store, tmp_path, [raw])
    assert sorted(t) == [b"d", b"d/new", b"f"]
    assert t[b"d"].kind == E.DIR and t[b"d"].flags == E.OPAQUE
    assert t[b"f"].kind == E.REG and t[b"f"].content == _sha(b"file again")


def test_hardlink_to_lower_layer(backend: str, store: Store, tmp_path: Path) -> None:
    lower = tar_bytes([member("lib", kind=tarfile.DIRTYPE), member("lib/data", b"lower content", mode=0o640)])
    upper = tar_bytes([member("copy", kind=tarfile.LNKTYPE, link="lib/data")])
    _, t = import_layers(store, tmp_path, [lower, upper])
    e = t[b"copy"]
    assert (e.kind, e.link, e.size, e.mode) == (E.REG, b"", 13, 0o640)
    assert store.read_object(e.content) == b"lower content"  # type: ignore[arg-type]


def test_hardlink_group(backend: str, store: Store, tmp_path: Path) -> None:
    raw = tar_bytes(
        [
            member("a", b"X"),
            member("b", kind=tarfile.LNKTYPE, link="a"),
            member("c", kind=tarfile.LNKTYPE, link="./b"),
        ]
    )
    (t,) = import_layers(store, tmp_path, [raw])
    assert t[b"a"].kind == E.REG
    for p in (b"b", b"c"):  # a link to a link points at the group root
        assert (t[p].kind, t[p].link, t[p].content, t[p].size) == (E.HARDLINK, b"a", _sha(b"X"), 1)


def test_hardlink_root_replaced_promotes_first_link(backend: str, store: Store, tmp_path: Path) -> None:
    raw = tar_bytes(
        [
            member("a", b"X"),
            member("b", kind=tarfile.LNKTYPE, link="a"),
            member("c", kind=tarfile.LNKTYPE, link="a"),
            member("a", b"Y"),
        ]
    )
    (t,) = import_layers(store, tmp_path, [raw])
    assert (t[b"a"].kind, t[b"a"].content) == (E.REG, _sha(b"Y"))
    assert (t[b"b"].kind, t[b"b"].link, t[b"b"].content) == (E.REG, b"", _sha(b"X"))
    assert (t[b"c"].kind, t[b"c"].link, t[b"c"].content) == (E.HARDLINK, b"b", _sha(b"X"))


def test_hardlink_replaced_leaves_group(backend: str, store: Store, tmp_path: Path) -> None:
    raw = tar_bytes(
        [
            member("a", b"X"),
            member("b", kind=tarfile.LNKTYPE, link="a"),
            member("b", b"own"),
            member("c", kind=tarfile.LNKTYPE, link="a"),
            member("a", b"Y"),
        ]
    )
    (t,) = import_layers(store, tmp_path, [raw])
    assert (t[b"b"].kind, t[b"b"].content) == (E.REG, _sha(b"own"))
    assert (t[b"c"].kind, t[b"c"].link, t[b"c"].content) == (E.REG, b"", _sha(b"X"))
    assert t[b"a"].content == _sha(b"Y")


def test_aufs_metadata_dropped(backend: str, store: Store, tmp_path: Path) -> None:
    raw = (
        d(b".wh..wh.plnk/")
        + rec(b".wh..wh.plnk/123.456", b"aufs")
        + rec(b".wh..wh.aufs", b"")
        + d(b"d/")
        + rec(b"d/.wh..wh.orph", b"")
        + rec(b"f", b"f")
        + END
    )
    (t,) = import_layers(store, tmp_path, [raw])
    assert sorted(t) == [b"d", b"f"]


def test_multi_member_gzip_layer(backend: str, store: Store, tmp_path: Path) -> None:
    """A gzip layer of several members (``cat a.gz b.gz``) is one stream."""
    raw = rec(b"a", b"first") + rec(b"b", b"second") + END
    blob = gzip.compress(raw[:1024], mtime=0) + gzip.compress(raw[1024:], mtime=0)
    res = import_path(
        store,
        make_layout(
            tmp_path / "layout",
            [blob],
            compress=False,
            diff_ids=["sha256:" + hashlib.sha256(raw).hexdigest()],
        ),
    )
    t = store.layer_entries(bytes.fromhex(res[0].layer_ids[0][7:]))
    assert [e.path for e in t] == [b"a", b"b"]


# -- a corrupt archive of layers the store already has ------------------------------------------
def _flip_middle_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_corrupt_layout_of_stored_layers_is_refused(tmp_path, store_path, cli):
    """Layers the store has are not imported again, but their blobs are still checked: a
    corrupt copy of an image already loaded printed "Loaded image" and exited 0."""
    layer = tar_bytes([member("data", os.urandom(300_000)), member("etc/conf", b"x=1\n")])
    good = make_layout(tmp_path / "good", [layer], ref="known:1")
    cli("import", "-q", good)
    bad = str(tmp_path / "bad")
    shutil.copytree(good, bad)
    with open(os.path.join(bad, "index.json")) as f:
        manifest_digest = json.load(f)["manifests"][0]["digest"][7:]
    with open(os.path.join(bad, "blobs", "sha256", manifest_digest)) as f:
        layer_digest = json.load(f)["layers"][0]["digest"][7:]
    _flip_middle_byte(os.path.join(bad, "blobs", "sha256", layer_digest))
    res = cli("import", bad, check=False)
    assert res.code == 1 and "Loaded" not in res.out
    (line,) = res.err.strip().splitlines()
    assert "content hashes to" in line, line
    assert cli("verify").code == 0
    assert [i["repo_tags"] for i in cli("images", "--json").json()] == [["known:1"]]


def test_a_corrupt_docker_archive_of_stored_layers_is_refused(tmp_path, store_path, cli):
    """The same for a `docker save` archive of the old kind, whose manifest names layer.tar
    files by path and no digest: a known layer is decompressed and hashed against its diff_id."""
    layer = tar_bytes([member("data", os.urandom(300_000))])
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()

    def archive(path: str, layer_tar: bytes) -> str:
        members = [
            (
                "manifest.json",
                json.dumps([{"Config": "c.json", "RepoTags": ["old:1"], "Layers": ["l/layer.tar"]}]),
            ),
            ("c.json", config),
            ("l/layer.tar", layer_tar),
        ]
        with tarfile.open(path, "w") as t:
            for name, data in members:
                data = data if isinstance(data, bytes) else data.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return path

    cli("import", "-q", archive(str(tmp_path / "good.tar"), layer))
    corrupt = bytearray(layer)
    corrupt[len(corrupt) // 2] ^= 0xFF
    res = cli("import", archive(str(tmp_path / "bad.tar"), bytes(corrupt)), check=False)
    assert res.code == 1 and "Loaded" not in res.out
    assert "uncompressed content hashes to" in res.err and "config says " + diff_id in res.err
    assert cli("verify").code == 0
