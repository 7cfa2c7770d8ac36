"""Hostile and mistaken command lines: one line on stderr, the documented exit code, and
nothing written where nothing should be (issue 11)."""

from __future__ import annotations

import os
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
