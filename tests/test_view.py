"""The union view called directly, without a mount (the tier between units and real mounts).

These cover what a root-run mount test cannot reach: an upper directory where mknod and
trusted.* xattrs are refused (unprivileged users) must fall back to ``.wh.`` files and
``user.overlay.opaque``/``.wh..wh..opq``, and read back the same tree.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from layerfs.store import Store
from layerfs.tools.image import import_path
from layerfs.union.index import ChainIndex, build
from layerfs.union.lower import ChainLayer
from layerfs.union.view import UnionView


@pytest.fixture
def view(store: Store, sample_layout: str, tmp_path: Path) -> UnionView:
    (res,) = import_path(store, sample_layout)
    layers = [bytes.fromhex(d[7:]) for d in res.layer_ids]
    chain = build(store, layers)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    return UnionView(store, ChainLayer(store, ChainIndex(store, chain)), str(upper), str(work))


def names(view: UnionView, path: bytes) -> set[bytes]:
    return {n for n, _, _ in view.readdir(path)}


def test_unprivileged_upper_falls_back_to_wh_files(view: UnionView, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_mknod(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "mknod not permitted")

    real_setxattr = os.setxattr

    def no_trusted(path: bytes, name: bytes, *args: object, **kwargs: object) -> None:
        if bytes(name).startswith(b"trusted."):
            raise PermissionError(errno.EPERM, "trusted.* needs CAP_SYS_ADMIN")
        real_setxattr(path, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mknod", no_mknod)
    monkeypatch.setattr(os, "setxattr", no_trusted)
    view.unlink(b"etc/passwd")
    assert b"passwd" not in names(view, b"etc")
    with pytest.raises(FileNotFoundError):
        view.getattr(b"etc/passwd")
    assert os.path.exists(os.path.join(view.upper, b"etc/.wh.passwd"))  # type: ignore[arg-type]
    assert b".wh.passwd" not in names(view, b"etc")  # bookkeeping, never shown

    view.rmdir(b"home")
    view.mkdir(b"home", 0o755, 0, 0)  # over the whiteout: must be opaque, via the fallback
    up_home = os.path.join(view.upper, b"home")  # type: ignore[arg-type]
    assert os.getxattr(up_home, "user.overlay.opaque") == b"y"
    assert names(view, b"home") == set()

    # a file re-created where the .wh. whiteout was: the whiteout goes, the file shows
    fh = view.create(b"etc/passwd", 0o100644, os.O_WRONLY, 0, 0)
    view.write(fh, b"new\n", 0)
    view.release(fh)
    assert b"passwd" in names(view, b"etc")
    assert not os.path.exists(os.path.join(view.upper, b"etc/.wh.passwd"))  # type: ignore[arg-type]


def test_copy_up_keeps_metadata_and_lower_inode(view: UnionView) -> None:
    before = view.getattr(b"bin/su-demo")
    xattrs_before = {n: view.getxattr(b"etc/tagged", n) for n in view.listxattr(b"etc/tagged")}
    view.setxattr(b"bin/su-demo", b"user.note", b"y", 0)  # forces a copy-up, changes nothing else
    after = view.getattr(b"bin/su-demo")
    for key in ("st_ino", "st_mode", "st_uid", "st_gid", "st_size", "st_mtime"):
        assert after[key] == before[key], key
    assert after["st_mode"] & 0o4000  # setuid survives the copy-up's own chown
    view.setxattr(b"etc/tagged", b"user.more", b"x", 0)
    got = {n: view.getxattr(b"etc/tagged", n) for n in view.listxattr(b"etc/tagged")}
    assert got == {**xattrs_before, b"user.more": b"x"}
    assert not [n for n in got if n.startswith(b"trusted.")]  # our bookkeeping stays hidden


def test_read_only_view_refuses_writes(store: Store, sample_layout: str) -> None:
    (res,) = import_path(store, sample_layout)
    chain = build(store, [bytes.fromhex(d[7:]) for d in res.layer_ids])
    ro = UnionView(store, ChainLayer(store, ChainIndex(store, chain)))
    for call in (
        lambda: ro.unlink(b"etc/passwd"),
        lambda: ro.mkdir(b"x", 0o755, 0, 0),
        lambda: ro.open(b"etc/passwd", os.O_WRONLY),
        lambda: ro.rename(b"etc/passwd", b"etc/p2"),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EROFS
    assert ro.read_path(b"etc/hostname", 100, 0) == b"layerfs-sample\n"


@pytest.mark.parametrize("target", [b"etc/passwd", b"etc/mine"], ids=["over-lower", "over-upper"])
def test_rename_over_a_file_replaces_it_in_one_step(
    view: UnionView, monkeypatch: pytest.MonkeyPatch, target: bytes
) -> None:
    """Write a new copy, rename it over the old: the name is never missing, for a reader or
    after a crash (the view removed the old file first, then renamed)."""
    fh = view.create(b"etc/mine", 0o644, os.O_WRONLY, 0, 0)
    view.write(fh, b"old", 0)
    view.release(fh)
    fh = view.create(b"etc/new", 0o644, os.O_WRONLY, 0, 0)
    view.write(fh, b"new contents", 0)
    view.release(fh)
    up = os.fsencode(view.upper or b"")
    real_rename, real_unlink = os.rename, os.unlink
    seen: list[str] = []

    def unlink(path: bytes, *args: object, **kwargs: object) -> None:
        seen.append("unlink " + os.fsdecode(os.path.relpath(path, up)))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    def rename(src: bytes, dst: bytes, *args: object, **kwargs: object) -> None:
        seen.append("rename")
        real_rename(src, dst, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "rename", rename)
    view.rename(b"etc/new", target)
    monkeypatch.undo()
    assert seen == ["rename"]
    fh = view.open(target, os.O_RDONLY)
    assert view.read(fh, 100, 0) == b"new contents"
    view.release(fh)
    assert b"new" not in names(view, b"etc")
