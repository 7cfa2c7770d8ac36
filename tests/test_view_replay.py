"""The kernel-comparison operation sequences (tests/test_union_kernel.py) replayed against the
union view itself, without a FUSE mount: the union rules (lookup order, whiteouts, opaque
directories, copy-up, rename) checked on a machine without /dev/fuse, and in a fraction of the
time a mount takes.

``ViewOps`` runs a case's operations on a ``UnionView`` over the stored image: what the kernel
would do before calling a file system (the VFS's checks: unlink of a directory, rmdir of a file,
rename over the wrong type or into itself) is done here, the rest is the view's.  Its log and
the tree it leaves are compared with the kernel overlay's (where this machine can mount one,
which needs root but no FUSE), and with the case's known results everywhere.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import make_layout, tar_bytes
from test_union_kernel import CASES, Case
from unionutil import (
    HARDLINKS,
    SNAP_XATTR_PREFIXES,
    Ops,
    _type,
    assert_same,
    assert_same_steps,
    extract_layers,
    kernel_overlay,
    overlay_unavailable,
    snapshot,
)

from layerfs.store import Store
from layerfs.tools.image import import_path
from layerfs.union.index import ChainIndex, build
from layerfs.union.lower import ChainLayer
from layerfs.union.view import UnionView

ROOT = "/@view"  # what ViewOps.p() puts before a path: never a host path


class ViewOps(Ops):
    """Ops on a UnionView: the same labels and results as on a mount, as root with the
    process's umask (what the kernel would pass on)."""

    def __init__(self, view: UnionView) -> None:
        super().__init__(ROOT)
        self.view = view
        self.umask = os.umask(0)
        os.umask(self.umask)
        self.calls: dict[Callable[..., Any], Callable[..., Any]] = {
            os.mkdir: lambda p, mode=0o777: self._mkdir(p, mode),
            os.makedirs: self._makedirs,
            os.unlink: self._unlink,
            os.rmdir: self._rmdir,
            shutil.rmtree: self._rmtree,
            os.mknod: lambda p, mode=0o600, device=0: view.mknod(p, mode, device, 0, 0, self.umask),
            os.chmod: lambda p, mode: view.chmod(p, mode),
            os.chown: lambda p, uid, gid: view.chown(p, uid, gid),
            os.utime: lambda p, ns: view.utimens(p, ns[0], ns[1]),
            os.setxattr: lambda p, name, value, flags=0: view.setxattr(p, os.fsencode(name), value, flags),
            os.removexattr: lambda p, name: view.removexattr(p, os.fsencode(name)),
            os.rename: self._rename,
        }

    def rel(self, path: str, follow: bool = False) -> bytes:
        assert path == ROOT or path.startswith(ROOT + "/"), path
        return self.walk(os.fsencode(path[len(ROOT) + 1 :]), follow)

    def walk(self, path: bytes, follow: bool) -> bytes:
        """``path`` with the symlinks the kernel would follow resolved (every one on the way;
        the last name's with ``follow``), relative to the root of the view."""
        todo = [p for p in path.split(b"/") if p]
        done: list[bytes] = []
        hops = 0
        while todo:
            name = todo.pop(0)
            if name == b"..":
                done = done[:-1]
                continue
            here = b"/".join([*done, name])
            if todo or follow:
                try:
                    kind = stat.S_IFMT(self.view.getattr(here)["st_mode"])
                except FileNotFoundError:
                    kind = 0
                if kind == stat.S_IFLNK:
                    hops += 1
                    if hops > 40:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                    target = self.view.readlink(here)
                    done = [] if target.startswith(b"/") else done
                    todo = [p for p in target.split(b"/") if p and p != b"."] + todo
                    continue
            if name != b".":
                done.append(name)
        return b"/".join(done)

    def do(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = self.calls.get(fn, fn)
        follow = fn in (os.chmod, os.chown, os.utime, os.setxattr, os.removexattr, os.truncate)
        try:
            args = tuple(
                self.rel(a, follow) if isinstance(a, str) and a.startswith(ROOT) else a for a in args
            )
        except OSError as exc:
            self.note(label, errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            return None
        return super().do(label, call, *args, **kwargs)

    def path(self, rel: str, follow: bool) -> bytes:
        return self.walk(os.fsencode(rel), follow)

    # -- what the kernel checks before the file system is asked -------------------------------
    def _kind(self, path: bytes) -> int:
        return stat.S_IFMT(self.view.getattr(path)["st_mode"])

    def _mkdir(self, path: bytes, mode: int) -> None:
        self.view.mkdir(path, mode, 0, 0, self.umask)

    def _makedirs(self, path: bytes) -> None:
        parts = path.split(b"/")
        for i in range(1, len(parts) + 1):
            sub = b"/".join(parts[:i])
            try:
                self.view.getattr(sub)
            except FileNotFoundError:
                self._mkdir(sub, 0o777)

    def _unlink(self, path: bytes) -> None:
        if self._kind(path) == stat.S_IFDIR:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        self.view.unlink(path)

    def _rmdir(self, path: bytes) -> None:
        if self._kind(path) != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self.view.rmdir(path)

    def _rmtree(self, path: bytes) -> None:
        pending, dirs = [path], []
        while pending:
            d = pending.pop()
            dirs.append(d)
            for name, _, kind in self.view.readdir(d):
                child = d + b"/" + name
                if kind == stat.S_IFDIR:
                    pending.append(child)
                else:
                    self.view.unlink(child)
        for d in reversed(dirs):
            self.view.rmdir(d)

    def _rename(self, old: bytes, new: bytes) -> None:
        src = self._kind(old)
        try:
            dst: int | None = self._kind(new)
        except FileNotFoundError:
            dst = None
        if src == stat.S_IFDIR and (new + b"/").startswith(old + b"/") and new != old:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if dst is not None and src == stat.S_IFDIR and dst != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if dst is not None and src != stat.S_IFDIR and dst == stat.S_IFDIR:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        self.view.rename(old, new, 0)

    # -- the Ops steps that open files or stat -------------------------------------------------
    def _with_open(self, rel: str, flags: int, fn: Callable[[int], Any]) -> Any:
        fh = self.view.open(self.path(rel, True), flags)
        try:
            return fn(fh)
        finally:
            self.view.release(fh)

    def _read_all(self, fh: int) -> bytes:
        out, off = [], 0
        while piece := self.view.read(fh, 1 << 20, off):
            out.append(piece)
            off += len(piece)
        return b"".join(out)

    def write(self, rel: str, data: bytes, offset: int) -> None:
        self.do(
            f"write {rel}@{offset}",
            self._with_open,
            rel,
            os.O_WRONLY,
            lambda fh: self.view.write(fh, data, offset),
        )
        self.changed(rel)

    def append(self, rel: str, data: bytes) -> None:
        def fn(fh: int) -> None:
            self.view.write(fh, data, self.view.fgetattr(fh)["st_size"])

        self.do(f"append {rel}", self._with_open, rel, os.O_WRONLY | os.O_APPEND, fn)
        self.changed(rel)

    def truncate(self, rel: str, size: int) -> None:
        self.do(f"truncate {rel} {size}", lambda: self.view.truncate(self.path(rel, True), size))
        self.changed(rel)

    def create(self, rel: str, data: bytes = b"", mode: int = 0o644) -> None:
        def fn() -> None:
            path = self.path(rel, False)
            try:
                self.view.getattr(path)
            except FileNotFoundError:
                pass
            else:
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
            fh = self.view.create(path, stat.S_IFREG | mode, os.O_WRONLY, 0, 0, self.umask)
            try:
                self.view.write(fh, data, 0)
            finally:
                self.view.release(fh)

        self.do(f"create {rel}", fn)
        self.changed(rel)

    def mkfifo(self, rel: str) -> None:
        self.do(f"mkfifo {rel}", self.view.mknod, os.fsencode(rel), stat.S_IFIFO | 0o666, 0, 0, 0, self.umask)
        self.changed(rel)

    def symlink(self, target: str, rel: str) -> None:
        self.do(f"symlink {rel}", self.view.symlink, os.fsencode(rel), os.fsencode(target), 0, 0)
        self.changed(rel)

    def link(self, src: str, dst: str) -> None:
        def fn() -> None:
            if self._kind(os.fsencode(src)) == stat.S_IFDIR:
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
            self.view.link(os.fsencode(src), os.fsencode(dst))

        self.do(f"link {src} {dst}", fn)
        if "/" + src in self.volatile:
            self.changed(dst)
        self.nlink(src)
        self.nlink(dst)

    def _stat(self, label: str, rel: str, pick: Callable[[dict[str, int]], Any]) -> None:
        try:
            self.note(label, pick(self.view.getattr(self.path(rel, False))))
        except OSError as exc:
            self.note(label, errno.errorcode.get(exc.errno or 0))

    def attrs(self, rel: str) -> None:
        self._stat(f"size,nlink {rel}", rel, lambda a: (a["st_size"], a["st_nlink"]))

    def nlink(self, rel: str) -> None:
        self._stat(f"nlink {rel}", rel, lambda a: a["st_nlink"])

    def stat(self, rel: str) -> None:
        def pick(a: dict[str, int]) -> Any:
            mode = a["st_mode"]
            return (_type(mode), oct(stat.S_IMODE(mode)), a["st_uid"], a["st_gid"])

        self._stat(f"stat {rel}", rel, pick)

    def read(self, rel: str) -> None:
        try:
            self.note(f"read {rel}", self._with_open(rel, os.O_RDONLY, self._read_all))
        except OSError as exc:
            self.note(f"read {rel}", errno.errorcode.get(exc.errno or 0))

    def listdir(self, rel: str) -> None:
        try:
            names = sorted(os.fsdecode(n) for n, _, _ in self.view.readdir(self.path(rel, True)))
            self.note(f"ls {rel or '/'}", names)
        except OSError as exc:
            self.note(f"ls {rel or '/'}", errno.errorcode.get(exc.errno or 0))


def view_snapshot(o: ViewOps) -> dict[str, Any]:
    """unionutil.snapshot of the view: what a mount of it would show."""
    view = o.view
    out: dict[str, Any] = {}
    by_ino: dict[int, list[str]] = {}
    pending = [b""]
    while pending:
        path = pending.pop()
        a = view.getattr(path)
        rel = "/" + os.fsdecode(path)
        kind = _type(a["st_mode"])
        rec: dict[str, Any] = {
            "type": kind,
            "mode": oct(stat.S_IMODE(a["st_mode"])),
            "uid": a["st_uid"],
            "gid": a["st_gid"],
        }
        if kind != "dir":
            rec["nlink"] = a["st_nlink"]
            by_ino.setdefault(a["st_ino"], []).append(rel)
        if kind == "file":
            rec["size"] = a["st_size"]
            rec["sha256"] = hashlib.sha256(
                o._with_open(os.fsdecode(path), os.O_RDONLY, o._read_all)
            ).hexdigest()
        elif kind == "symlink":
            rec["target"] = os.fsdecode(view.readlink(path))
        elif kind in ("chr", "blk"):
            rec["rdev"] = (os.major(a["st_rdev"]), os.minor(a["st_rdev"]))
        if kind != "dir" and rel not in o.volatile:
            rec["mtime_ns"] = a["st_mtime"]
        xattrs = {
            os.fsdecode(n): view.getxattr(path, n).hex()
            for n in sorted(view.listxattr(path))
            if os.fsdecode(n).startswith(SNAP_XATTR_PREFIXES)
        }
        if xattrs:
            rec["xattrs"] = xattrs
        out[rel] = rec
        if kind == "dir":
            pending += [path + b"/" + n if path else n for n, _, _ in view.readdir(path)]
    out[HARDLINKS] = sorted(sorted(paths) for paths in by_ino.values() if len(paths) > 1)
    return out


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def replay(case: Case, tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[tuple[ViewOps, str]]:
    """The case's image imported into a store, a view over it with an empty upper directory."""
    if case.layers is None:
        layout = request.getfixturevalue("sample_layout")
    else:
        layers = [tar_bytes(layer) for layer in case.layers()]
        layout = make_layout(str(tmp_path / "layout"), layers, ref="img:1")
    store = Store(str(tmp_path / "store"))
    try:
        (res,) = import_path(store, layout)
        chain = build(store, [bytes.fromhex(d[7:]) for d in res.layer_ids])
        upper, work = tmp_path / "upper", tmp_path / "work"
        upper.mkdir()
        work.mkdir()
        view = UnionView(store, ChainLayer(store, ChainIndex(store, chain)), str(upper), str(work))
        yield ViewOps(view), layout
    finally:
        store.close()


def test_view_gives_the_known_results(case: Case, replay: tuple[ViewOps, str]) -> None:
    o, _ = replay
    case.ops(o)
    missing = [step for step in case.expect if step not in o.log]
    assert not missing, f"the view did not give {missing}"


def test_view_gives_what_the_kernel_overlay_gives(
    case: Case, replay: tuple[ViewOps, str], tmp_path: Any
) -> None:
    """Step by step and the tree left: the kernel overlay (root, no FUSE) is the reference."""
    reason = overlay_unavailable(str(tmp_path))
    if reason:
        pytest.skip(reason)
    o, layout = replay
    lowers = extract_layers(layout, str(tmp_path / "layers"))
    k = Ops(str(tmp_path / "k-mnt"))
    with kernel_overlay(lowers, str(tmp_path / "k-upper"), str(tmp_path / "k-work"), k.root):
        case.ops(k)
        kernel = snapshot(k.root, volatile=k.volatile)
    case.ops(o)
    assert_same_steps(k.log, o.log, "the view")
    assert_same(kernel, view_snapshot(o), "tree after the operations, through the view")
