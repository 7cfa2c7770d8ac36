"""Hostile and mistaken command lines: one line on stderr, the documented exit code, and
nothing written where nothing should be (issue 11)."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import lmdb
import pytest
from conftest import make_layout, member, tar_bytes


def one_line(res, code: int) -> str:  # type: ignore[no-untyped-def]
    """The single ``layerfs: ...`` line a failed command writes to stderr."""
    lines = res.err.splitlines()
    assert res.code == code, (res.code, res.err)
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), f"stderr is not one line: {res.err!r}"
    return str(lines[0])


def snapshot(path: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``path``: bytes, mtime (ns) and mode."""
    out = {}
    for name in sorted(os.listdir(path)):
        p = path / name
        st = p.stat()
        out[name] = (p.read_bytes(), st.st_mtime_ns, st.st_mode)
    return out


# -- item 1: --store ---------------------------------------------------------------------------
def test_empty_store_name_is_a_usage_error(cli, store_path):
    for args in (["--store", ""], ["--store="]):
        for verb in ("images", "gc"):
            line = one_line(cli(*args, verb, check=False), 2)
            assert "--store" in line and "empty" in line
    assert not os.path.exists(store_path)  # not the default store either


@pytest.mark.parametrize("kind", ["file", "devnull"])
def test_store_that_is_not_a_directory(kind, cli, tmp_path):
    path = str(tmp_path / "file") if kind == "file" else "/dev/null"
    if kind == "file":
        Path(path).write_bytes(b"not a store")
    for verb in ("images", "gc", "verify"):
        line = one_line(cli("--store", path, verb, check=False), 1)
        assert "not a directory" in line and path in line
    if kind == "file":
        assert Path(path).read_bytes() == b"not a store"


def _plain_env(path: Path) -> None:
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()


def _named_dbs_env(path: Path) -> None:
    env = lmdb.open(str(path), max_dbs=4)
    for name in (b"users", b"posts"):
        db = env.open_db(name)
        with env.begin(write=True) as txn:
            txn.put(b"a", b"b", db=db)
    env.close()


def _meta_key_env(path: Path) -> None:
    # a plain key named like our meta database
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"meta", b"v")
    env.close()


@pytest.mark.parametrize("make", [_plain_env, _named_dbs_env, _meta_key_env])
def test_foreign_lmdb_environment_is_refused_and_left_alone(make, cli, tmp_path):
    other = tmp_path / "other"
    make(other)
    before = snapshot(other)
    # a process of the other program could hold it open: lock.mdb must not be reset either
    for verb in ("images", "gc", "verify", "df"):
        line = one_line(cli("--store", str(other), verb, check=False), 1)
        assert "not a layerfs store" in line
    line = one_line(cli("--store", str(other), "import", str(tmp_path / "nothing"), check=False), 1)
    assert "not a layerfs store" in line
    assert snapshot(other) == before


def test_directory_with_other_files_is_refused(cli, tmp_path):
    d = tmp_path / "home"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    line = one_line(cli("--store", str(d), "images", check=False), 1)
    assert "not a layerfs store" in line and "notes.txt" in line
    assert sorted(os.listdir(d)) == ["notes.txt"]


def test_empty_or_missing_directory_becomes_a_store(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "a" / "b"
    for d in (empty, missing):
        assert cli("--store", str(d), "images", "-q").out == ""
        assert (d / "data.mdb").exists()
        assert cli("--store", str(d), "verify", "-q").code == 0  # and it is one now


def test_store_created_by_an_interrupted_open_is_adopted(cli, tmp_path):
    """An environment holding only (some of) our databases, without the schema (a process
    killed between creating them and writing the schema), is a store being created."""
    d = tmp_path / "store"
    env = lmdb.open(str(d), max_dbs=4)
    env.open_db(b"meta")
    env.open_db(b"objects")
    env.close()
    res = cli("--store", str(d), "images", "-q")
    assert res.out == res.err == ""
    assert cli("--store", str(d), "verify", "-q").code == 0


# -- item 2: references ------------------------------------------------------------------------
LONG = "a" * 5000


@pytest.fixture
def layout(tmp_path):
    return make_layout(tmp_path / "img", [tar_bytes([member("f", b"data")])], ref="test:latest")


@pytest.mark.parametrize("ref", [f"x:{LONG}", LONG, f"{LONG}:1", "u/" + "b" * 300 + ":1"])
def test_long_references_give_one_short_line(ref, cli, layout, tmp_path):
    cli("import", "-q", layout)
    for args, code in (
        (["import", "-q", "-t", ref, layout], 1),
        (["tag", "test", ref], 1),
        (["rmi", ref], 1),
        (["inspect", ref], 1),
        (["mount", ref, str(tmp_path)], 1),
        (["save", ref, "-o", str(tmp_path / "out.tar")], 1),
        (["run", "--rm", ref, "true"], 125),  # docker run's code for a container never set up
    ):
        line = one_line(cli(*args, check=False), code)
        assert len(line) < 300, line
    assert cli("images", "--json").json()[0]["repo_tags"] == ["test:latest"]  # type: ignore[index]


# every verb that names an image checks the name with tools.refs.normalize, as docker does
NAMES = {
    "test2": "test2:latest",
    "docker.io/library/x:1": "x:1",
    "Registry/x:1": "Registry/x:1",  # an upper case first component is a registry host
    "localhost:5000/a/b:v1.0-rc_1": "localhost:5000/a/b:v1.0-rc_1",
    "a" * 247: "a" * 247 + ":latest",  # library/ + 247 = 255
    "u/" + "a" * 253: "u/" + "a" * 253 + ":latest",
    "x:" + "t" * 128: "x:" + "t" * 128,
    "Upper:1": None,
    "x/Upper:1": None,
    "a" * 248: None,
    "u/" + "a" * 254: None,
    "x:" + "t" * 129: None,
    "x:\u00e9": None,  # docker's \w is ASCII
    "x:.hidden": None,
    "0" * 64: None,  # an image id is not a name
    "x:a\nb": None,
    "": None,
}


def test_new_names_are_checked_alike_by_every_verb(cli, layout):
    cli("import", "-q", layout)
    for name, stored in NAMES.items():
        tagged = cli("tag", "test", name, check=False)
        imported = cli("import", "-q", "-t", name, layout, check=False)
        if stored is None:
            line = one_line(tagged, 1)
            assert "invalid reference format" in line or "invalid repository name" in line, line
            assert one_line(imported, 1).startswith("layerfs: import of "), imported.err
        else:
            assert tagged.code == 0 and imported.code == 0, (name, tagged.err, imported.err)
            tags = cli("images", "--json").json()[0]["repo_tags"]  # type: ignore[index]
            assert stored in tags, (name, tags)
            assert cli("rmi", stored).code == 0


def test_lowercase_message_names_the_repository(cli, layout):
    cli("import", "-q", layout)
    for args in (["tag", "test", "Upper:1"], ["import", "-q", "-t", "x/Upper:1", layout]):
        line = one_line(cli(*args, check=False), 1)
        assert "must be lowercase" in line, line


# -- item 4: rmi of what is not there, import of what is not an image ---------------------------
def test_rmi_of_a_missing_image_is_one_line(cli, layout):
    line = one_line(cli("rmi", "nosuch", check=False), 1)
    assert line == "layerfs: no such image: nosuch"
    cli("import", "-q", layout)
    # as docker: a line for each image not removed, no summary; the others are removed
    res = cli("rmi", "nosuch", "test", "other:1", check=False)
    assert res.code == 1
    assert res.err.splitlines() == ["layerfs: no such image: nosuch", "layerfs: no such image: other:1"]
    assert "Untagged: test:latest" in res.out
    assert cli("images", "-q").out == ""


@pytest.mark.parametrize("kind", ["random", "empty", "json", "truncated-tar", "truncated-gzip"])
def test_import_of_what_is_not_an_image_is_one_line(kind, cli, sample_layout, tmp_path):
    path = tmp_path / f"input-{kind}"
    if kind == "random":
        path.write_bytes(os.urandom(10000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "json":
        path.write_text('{"schemaVersion": 2}')
    else:
        whole = tmp_path / "whole.tar"
        with tarfile.open(whole, "w:gz" if kind == "truncated-gzip" else "w") as t:
            t.add(sample_layout, arcname=".")
        path.write_bytes(whole.read_bytes()[:30000])
    line = one_line(cli("import", str(path), check=False), 1)
    assert line.startswith(f"layerfs: import of {path} refused: ")
    if kind in ("random", "empty", "json"):
        assert line.endswith(
            f"{path} is {'an empty file, so ' if kind == 'empty' else ''}not an image archive "
            "(OCI archive, docker save archive) or layout"
        ), line
    else:
        assert "damaged or truncated archive" in line, line
    df = cli("df", "--json").json()
    assert df["images"] == df["objects"] == 0  # type: ignore[index]


# -- item 5: a store whose LMDB pages are damaged -----------------------------------------------
_W = struct.calcsize("N")  # LMDB's page numbers and ids are size_t
_N = "Q" if _W == 8 else "I"
_HDR = _W + 8  # page header: pgno, pad, flags, lower, upper
_DBREC = struct.Struct(f"=IHH{5 * _N}")  # MDB_db: pad, flags, depth, 3 page counts, entries, root


def page_of(store_path: str) -> dict[str, int]:
    """Where the databases' root pages are: read from the meta pages and the main database's
    root page (one leaf in a small store), as LMDB lays them out."""
    data = Path(store_path, "data.mdb").read_bytes()
    metas = []
    for pgno in (0, 1):
        psize = _DBREC.unpack_from(data, _HDR + 8 + 2 * _W)[0]  # the free db's pad: the page size
        at = pgno * psize + _HDR + 8 + 2 * _W
        free, main = _DBREC.unpack_from(data, at), _DBREC.unpack_from(data, at + _DBREC.size)
        (txnid,) = struct.unpack_from("=" + _N, data, at + 2 * _DBREC.size + _W)
        metas.append((txnid, free[-1], main[-1], psize))
    _, free_root, main_root, psize = max(metas)
    roots = {"(free)": free_root, "(main)": main_root}
    page = data[main_root * psize : (main_root + 1) * psize]
    _, _, flags, lower, _ = struct.unpack_from(f"={_N}HHHH", page)
    assert flags & 2, "the main database is one leaf page in a small store"
    for i in range((lower - _HDR) // 2):
        (off,) = struct.unpack_from("=H", page, _HDR + 2 * i)
        _, _, _, ksize = struct.unpack_from("=HHHH", page, off)
        name = page[off + 8 : off + 8 + ksize].decode()
        roots[name] = _DBREC.unpack_from(page, off + 8 + ksize)[-1]
    roots["psize"] = psize
    return roots


@pytest.fixture
def damaged(request, cli, sample_layout, store_path):
    """A store holding the sample image, then ``request.param`` damaged with random bytes."""
    cli("import", "-q", sample_layout)
    where = page_of(store_path)
    psize = where["psize"]
    garbage = random.Random(request.param).randbytes
    with open(Path(store_path, "data.mdb"), "r+b") as f:
        if request.param == "meta-pages":  # bytes 0..8192: both meta pages
            f.write(garbage(2 * psize))
        elif request.param == "meta-fields":  # the meta pages keep their magic number and version
            for pgno in (0, 1):
                f.seek(pgno * psize + _HDR + 8)
                f.write(garbage(psize - _HDR - 8))
        else:
            assert where[request.param] != 2 ** (8 * _W) - 1, "the database has a root page"
            f.seek(where[request.param] * psize)
            f.write(garbage(psize))
    return request.param


DAMAGE = ["meta-pages", "meta-fields", "(main)", "(free)", "meta", "images", "tags", "layers", "objects"]


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True)
def test_verify_finds_damaged_pages(damaged, cli, store_path):
    res = cli("verify", check=False)
    assert res.code == 3, (res.out, res.err)
    if damaged in ("meta-pages", "meta-fields", "(main)", "meta"):  # the store does not open: one line
        assert res.out == ""
        assert "is damaged" in one_line(res, 3)
    else:
        assert res.err == ""
        assert any(line.startswith("CORRUPT: ") for line in res.out.splitlines())
        assert res.out.splitlines()[-1].startswith("FAILED: ")
    js = cli("verify", "--json", check=False)
    assert js.code == 3 and js.json()["ok"] is False and js.json()["errors"]  # type: ignore[index]


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True)
def test_gc_and_rmi_refuse_a_damaged_store(damaged, cli, store_path):
    data = Path(store_path, "data.mdb")
    before = (data.read_bytes(), data.stat().st_mtime_ns)
    for args in (["gc"], ["rmi", "layerfs-sample"], ["rmi", "--no-prune", "-f", "layerfs-sample"]):
        line = one_line(cli(*args, check=False), 1)
        assert "is damaged" in line and "run 'layerfs verify'" in line, line
    assert (data.read_bytes(), data.stat().st_mtime_ns) == before


@pytest.mark.parametrize("damaged", DAMAGE, indirect=True)
def test_other_verbs_say_one_line_on_a_damaged_store(damaged, cli):
    for args in (
        ["images"],
        ["inspect", "layerfs-sample"],
        ["layers"],
        ["df"],
        ["tag", "layerfs-sample", "x"],
    ):
        res = cli(*args, check=False)
        assert "Traceback" not in res.err
        if res.code:
            one_line(res, 1)


def test_page_check_finds_nothing_on_healthy_stores_under_writes(tmp_path, store_path):
    """No false alarm: a store with a large freelist (records in overflow pages), checked while
    another process imports, removes and collects (pages freed and reused under the check)."""
    from layerfs.store import Store
    from layerfs.store.pages import check

    rnd = random.Random(5)
    layouts = []
    for i in range(6):
        files = [
            member(f"d{j % 9}/f{i}-{j}", rnd.randbytes(rnd.choice([50, 3000, 70000]))) for j in range(300)
        ]
        layouts.append(make_layout(tmp_path / f"l{i}", [tar_bytes(files)], ref=f"img{i}:latest"))
    churn = "\n".join(
        [
            "import sys",
            "from layerfs.store import Store, collect",
            "from layerfs.tools.image import import_path",
            "with Store(sys.argv[1]) as s:",
            "    for n in range(int(sys.argv[2])):",
            "        for layout in sys.argv[3:]:",
            "            import_path(s, layout)",
            "        for image_id, _ in s.images()[: len(sys.argv) // 2]:",
            "            s.remove_image(image_id)",
            "        collect(s)",
        ]
    )
    subprocess.run([sys.executable, "-c", churn, store_path, "2", *layouts], check=True)
    with Store(store_path, readonly=True) as store:
        assert check(store) == []
        writer = subprocess.Popen([sys.executable, "-c", churn, store_path, "4", *layouts])
        try:
            checks = 0
            while writer.poll() is None:
                assert check(store) == []
                checks += 1
        finally:
            writer.wait()
        assert writer.returncode == 0 and checks > 10
        assert check(store) == []
