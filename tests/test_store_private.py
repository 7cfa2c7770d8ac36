"""The store is private: 0700 directory, 0600 files, whatever the umask (issue 11)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import make_layout, member, tar_bytes

NOBODY = 65534


def modes(store_path: str) -> dict[str, int]:
    """The permission bits of the store directory and of everything in it."""
    out = {".": stat.S_IMODE(os.stat(store_path).st_mode)}
    for root, dirs, files in os.walk(store_path):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, store_path)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


@pytest.fixture
def open_umask():
    """Run with umask 0 (the subprocesses inherit it): privacy must not depend on the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_new_store_is_private(open_umask, cli, store_path, tmp_path):
    layout = make_layout(tmp_path / "img", [tar_bytes([member("secret", b"not for others")])])
    cli("import", "-q", layout)
    cli("gc")
    cli("ps", "-a")  # makes the containers directory
    found = modes(store_path)
    assert found["."] == 0o700 and found["data.mdb"] == found["lock.mdb"] == 0o600, found
    assert all(mode & 0o077 == 0 for mode in found.values()), found


def test_existing_store_is_made_private_when_opened_for_writing(cli, store_path):
    cli("images", "-q")
    os.chmod(store_path, 0o755)
    for name in ("data.mdb", "lock.mdb"):
        os.chmod(os.path.join(store_path, name), 0o644)
    packs = os.path.join(store_path, "packs")  # a store with file packs (LAYERFS_STORE_PAYLOAD=files)
    if os.path.isdir(packs):
        os.chmod(packs, 0o755)
    assert cli("verify", "-q").code == 0  # read-only: works, changes nothing
    assert modes(store_path) == {".": 0o755, "data.mdb": 0o644, "lock.mdb": 0o644} | (
        {"packs": 0o755} if os.path.isdir(packs) else {}
    )
    cli("images", "-q")
    assert modes(store_path) == {".": 0o700, "data.mdb": 0o600, "lock.mdb": 0o600} | (
        {"packs": 0o700} if os.path.isdir(packs) else {}
    )
    assert cli("verify", "-q").code == 0  # and readers of the same user still use lock.mdb


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_other_users_cannot_read_the_store(cli, tmp_path):
    # under a directory anyone may pass through (pytest's own temporary directories are 0700)
    outer = tempfile.mkdtemp(prefix="layerfs-private-")
    try:
        os.chmod(outer, 0o755)
        store = os.path.join(outer, "store")
        layout = make_layout(tmp_path / "img", [tar_bytes([member("secret", b"x")])])
        cli("--store", store, "import", "-q", layout)
        assert subprocess.run(["ls", outer], user=NOBODY, capture_output=True).returncode == 0
        for args in (["ls", store], ["cat", os.path.join(store, "data.mdb")]):
            res = subprocess.run(args, user=NOBODY, capture_output=True)
            assert res.returncode != 0 and b"Permission denied" in res.stderr, res
    finally:
        shutil.rmtree(outer)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a store of another user")
def test_a_store_of_another_user_is_left_as_it_is(cli, store_path):
    cli("images", "-q")
    for p in (store_path, *(os.path.join(store_path, n) for n in ("data.mdb", "lock.mdb"))):
        os.chown(p, NOBODY, NOBODY)
        os.chmod(p, 0o755 if p == store_path else 0o644)
    before = modes(store_path)
    cli("images", "-q")
    assert modes(store_path) == before
    assert Path(store_path).stat().st_uid == NOBODY
