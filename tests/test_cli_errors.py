"""Hostile and mistaken command lines: one line on stderr, the documented exit code, and
nothing written where nothing should be (issue 11)."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb
import pytest


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
