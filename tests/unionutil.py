"""Helpers for comparing a layerfs mount with the kernel's overlay filesystem.

The expected answer comes from the kernel: the layers of an OCI layout are
extracted here (with Python's ``tarfile``, independently of layerfs) into one
directory each, in the overlayfs format, and mounted with ``mount -t overlay``.
``snapshot`` turns a mounted tree into a plain dict, so two trees compare with
``==`` and ``diff`` says where they differ.

Extraction rules (what a container runtime's overlay snapshotter produces):

* ``.wh.NAME`` -> a 0/0 character device ``NAME``; ``.wh..wh..opq`` ->
  ``trusted.overlay.opaque=y`` on its directory.  A whiteout only hides lower
  layers: a path the same layer also creates keeps that entry (a directory
  becomes opaque);
* duplicates: the last member wins;
* a hardlink to a file of the same layer is a real hardlink; one to a file of a
  lower layer becomes a copy of that file (layerfs documents this in
  docs/FORMAT.md; a containerd-style snapshotter would copy the target up and
  link the two instead);
* a directory the layer needs but has no member for (an implicit parent, or the
  layer root) takes the attributes of the directory the lower layers show there,
  else 0755 root:root;
* mode, uid, gid, mtime in nanoseconds (PAX ``mtime``), ``SCHILY.xattr.*``
  records, symlinks, FIFOs and device nodes are preserved.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from layerfs import procfs

OPAQUE_XATTR = "trusted.overlay.opaque"
SNAP_XATTR_PREFIXES = ("user.", "security.")
HARDLINKS = "#hardlinks"


# -- environment --------------------------------------------------------------------------------
def mounted(mnt: str) -> bool:
    """Is ``mnt`` a mount point now (per /proc/self/mountinfo)?"""
    return bool(procfs.mounts_on(mnt))


def mounts_below(base: str) -> list[str]:
    return [m.mountpoint for m in procfs.mounts_below(base)]


def force_unmount(mnt: str) -> None:
    """Last resort: detach whatever is mounted on ``mnt`` (FUSE or not)."""
    for cmd in (["fusermount3", "-u", "-z", mnt], ["umount", "-l", mnt]):
        if not mounted(mnt):
            return
        subprocess.run(cmd, capture_output=True)


def mount_devices(mnt: str) -> list[str]:
    """The device numbers of what is mounted on ``mnt``, found without touching ``mnt`` (on a
    hung mount even a stat of it never returns)."""
    target = os.path.join(os.path.realpath(os.path.dirname(mnt)), os.path.basename(mnt))
    return [m.device for m in procfs.mounts_on(target, resolved=True)]


def abort_mount(mnt: str) -> None:
    """Undo a mount whose every access hangs: abort its FUSE connection (fusectl), detach it."""
    for dev in mount_devices(mnt):
        with (
            contextlib.suppress(OSError),
            open(f"/sys/fs/fuse/connections/{dev.split(':')[1]}/abort", "w") as a,
        ):
            a.write("1")
        force_unmount(mnt)


_checked: dict[str, str | None] = {}


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent: FUSE mounts are not possible here"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


def overlay_unavailable(tmp: str) -> str | None:
    """Why the kernel overlay filesystem cannot be mounted here (None if it can)."""
    if "overlay" not in _checked:
        base = os.path.join(tmp, "overlay-probe")
        dirs = [os.path.join(base, d) for d in ("l", "u", "w", "m")]
        for d in dirs:
            os.makedirs(d, exist_ok=True)
        res = subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={dirs[0]},upperdir={dirs[1]},workdir={dirs[2]}",
                dirs[3],
            ],
            capture_output=True,
            text=True,
        )
        if res.returncode == 0:
            subprocess.run(["umount", dirs[3]], capture_output=True)
            force_unmount(dirs[3])
            _checked["overlay"] = None
        else:
            _checked["overlay"] = f"the kernel overlay filesystem cannot be mounted: {res.stderr.strip()}"
    return _checked["overlay"]


@pytest.fixture
def need_fuse() -> None:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True, scope="module")
def no_mount_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After a module's tests: nothing may stay mounted below pytest's temporary directory."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    left = mounts_below(base)
    for mp in sorted(left, key=len, reverse=True):
        force_unmount(mp)
    assert not left, f"mounts left behind: {left}"


# -- extracting an OCI layout into overlayfs layer directories ------------------------------------
def _blob(layout: str, digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    return os.path.join(layout, "blobs", algo, hexd)


def _manifest(layout: str) -> dict[str, Any]:
    with open(os.path.join(layout, "index.json")) as f:
        desc = json.load(f)["manifests"][0]
    while True:
        with open(_blob(layout, desc["digest"])) as f:
            doc = json.load(f)
        if "manifests" in doc:  # a nested index: take its first manifest
            desc = doc["manifests"][0]
            continue
        return doc


def _norm(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    assert ".." not in parts, name
    return "/".join(parts)


def _mtime_ns(info: tarfile.TarInfo) -> int:
    text = info.pax_headers.get("mtime")
    if text is None:
        return int(info.mtime) * 1_000_000_000
    neg = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if neg else ns


def _xattrs(info: tarfile.TarInfo) -> dict[str, bytes]:
    out = {}
    for k, v in info.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            # tarfile decodes values as UTF-8, falling back to surrogateescape: lossless
            out[k[len("SCHILY.xattr.") :]] = v.encode("utf-8", "surrogateescape")
    return out


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def lower_lookup(layers: list[str], rel: str) -> str | None:
    """The host path of what the merged ``layers`` (bottom first) show at ``rel``, or None."""
    parts = rel.split("/") if rel else []
    for d in reversed(layers):
        blocked = False
        for i in range(len(parts) + 1):
            p = os.path.join(d, *parts[:i])
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                break
            if _is_whiteout(st):
                return None
            if i == len(parts):
                return p
            if not stat.S_ISDIR(st.st_mode):
                return None
            if _is_opaque(p):
                blocked = True  # nothing below shows through this layer's opaque dir
        if blocked:
            return None
    return None


def _copy_meta(src: str, dst: str) -> None:
    st = os.lstat(src)
    os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        if not name.startswith("trusted.overlay."):
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _apply_meta(path: str, info: tarfile.TarInfo) -> None:
    os.lchown(path, info.uid, info.gid)  # before chmod and xattrs: chown drops setuid and caps
    if not info.issym():
        os.chmod(path, info.mode & 0o7777)
    for name, value in _xattrs(info).items():
        os.setxattr(path, name, value, follow_symlinks=False)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _extract_layer(blob: str, dest: str, lowers: list[str]) -> None:
    os.makedirs(dest)
    dir_times: dict[str, int] = {}
    created: set[str] = {""}

    def implicit_dir(rel: str) -> None:
        """Make directory ``rel`` (and its parents) as the runtime would for a member below it."""
        if rel in created:
            return
        if rel:
            implicit_dir(rel.rpartition("/")[0])
        p = os.path.join(dest, rel)
        if os.path.lexists(p) and not os.path.isdir(p) or os.path.islink(p):
            os.unlink(p)
        if not os.path.isdir(p):
            os.mkdir(p)
            low = lower_lookup(lowers, rel)
            if low is not None and stat.S_ISDIR(os.lstat(low).st_mode):
                _copy_meta(low, p)
                dir_times[rel] = os.lstat(low).st_mtime_ns
            else:
                os.chmod(p, 0o755)
        created.add(rel)

    # the layer root: the lower root's attributes unless a "./" member says otherwise
    if lowers:
        _copy_meta(lowers[-1], dest)
        dir_times[""] = os.lstat(lowers[-1]).st_mtime_ns
    else:
        os.chown(dest, 0, 0)
        os.chmod(dest, 0o755)
    whiteouts: list[str] = []
    opaque: list[str] = []
    with tarfile.open(blob, "r:*") as tar:
        for info in tar:
            rel = _norm(info.name)
            parent, _, name = rel.rpartition("/")
            if name == ".wh..wh..opq":
                opaque.append(parent)
                continue
            if name.startswith(".wh..wh."):
                continue  # aufs bookkeeping
            if name.startswith(".wh."):
                whiteouts.append(f"{parent}/{name[4:]}" if parent else name[4:])
                continue
            implicit_dir(parent)
            p = os.path.join(dest, rel)
            if info.isdir():
                if not (os.path.isdir(p) and not os.path.islink(p)):
                    if rel:
                        _remove(p)
                        os.mkdir(p)
                _apply_meta(p, info)
                dir_times[rel] = _mtime_ns(info)
                created.add(rel)
                continue
            _remove(p)
            dir_times.pop(rel, None)
            if info.islnk():
                target = _norm(info.linkname)
                tp = os.path.join(dest, target)
                if os.path.isfile(tp) and not os.path.islink(tp):
                    os.link(tp, p)
                    continue
                low = lower_lookup(lowers, target)
                assert low is not None and stat.S_ISREG(os.lstat(low).st_mode), info.name
                shutil.copyfile(low, p)
                _copy_meta(low, p)
                continue
            if info.isreg():
                with open(p, "wb") as f:
                    src = tar.extractfile(info)
                    assert src is not None
                    shutil.copyfileobj(src, f)
            elif info.issym():
                os.symlink(info.linkname, p)
            elif info.isfifo():
                os.mkfifo(p)
            elif info.ischr() or info.isblk():
                kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
                os.mknod(p, kind | 0o600, os.makedev(info.devmajor, info.devminor))
            else:
                raise AssertionError(f"unexpected member type {info.type!r} for {info.name}")
            _apply_meta(p, info)
            t = _mtime_ns(info)
            os.utime(p, ns=(t, t), follow_symlinks=False)
    for rel in whiteouts:
        p = os.path.join(dest, rel)
        if os.path.lexists(p):
            if os.path.isdir(p) and not os.path.islink(p):
                opaque.append(rel)  # deleted and re-created in one layer
            continue
        implicit_dir(rel.rpartition("/")[0])
        os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    for rel in opaque:
        implicit_dir(rel)
        os.setxattr(os.path.join(dest, rel), OPAQUE_XATTR, b"y")
    for rel in sorted(dir_times, key=lambda r: -r.count("/") - (r != "")):
        t = dir_times[rel]
        os.utime(os.path.join(dest, rel), ns=(t, t))


def extract_layers(layout_dir: str, dest: str | None = None) -> list[str]:
    """Extract every layer of an OCI layout into ``dest/<n>`` in the kernel overlayfs format;
    returns the layer directories, bottom first."""
    dest = dest or layout_dir.rstrip("/") + "-layers"
    os.makedirs(dest, exist_ok=True)
    out: list[str] = []
    for i, desc in enumerate(_manifest(layout_dir)["layers"]):
        d = os.path.join(dest, str(i))
        _extract_layer(_blob(layout_dir, desc["digest"]), d, out)
        out.append(d)
    return out


# -- the CLI ------------------------------------------------------------------------------------
def make_cli(store_path: str) -> Callable[..., Any]:
    """A ``layerfs`` runner like conftest's ``cli`` fixture, for longer-lived fixtures."""
    from conftest import CLIResult

    def run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> CLIResult:
        e = dict(os.environ, LAYERFS_STORE=store_path, **(env or {}))
        p = subprocess.run([sys.executable, "-m", "layerfs", *args], capture_output=True, text=True, env=e)
        if check and p.returncode != 0:
            raise AssertionError(f"layerfs {' '.join(args)} exited {p.returncode}: {p.stderr}")
        return CLIResult(p.returncode, p.stdout, p.stderr)

    return run


# -- mounting -----------------------------------------------------------------------------------
@contextlib.contextmanager
def kernel_overlay(
    lowers: list[str], upper: str, work: str, mnt: str, *, index: bool = True, extra: str = ""
) -> Iterator[str]:
    """The kernel overlay of ``lowers`` (bottom first) with ``upper``, mounted on ``mnt``.

    With ``redirect_dir`` (renaming a directory that has lower contents works, as it does
    on layerfs) and without ``metacopy``; with ``index=on`` by default, so a copied-up
    lower hardlink keeps all of its names linked (what layerfs does)."""
    for d in (upper, work, mnt):
        os.makedirs(d, exist_ok=True)
    if not os.listdir(upper):  # as layerfs does: a new upper root shows the image root
        _copy_meta(lowers[-1], upper)
    opts = ",".join(
        [
            "lowerdir=" + ":".join(reversed(lowers)),
            f"upperdir={upper}",
            f"workdir={work}",
            "redirect_dir=on",
            "metacopy=off",
            "index=on" if index else "index=off",
            *([extra] if extra else []),
        ]
    )
    res = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, mnt], capture_output=True, text=True
    )
    if res.returncode != 0:
        raise RuntimeError(f"mount -t overlay -o {opts} {mnt}: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        force_unmount(mnt)


@contextlib.contextmanager
def layerfs_mount(
    cli: Callable[..., Any], image: str, mnt: str, upper: str | None = None, *, rw: bool = False
) -> Iterator[str]:
    """``layerfs mount IMAGE MNT`` (``--upper`` makes it writable); always unmounted after."""
    os.makedirs(mnt, exist_ok=True)
    args = ["mount", image, mnt]
    if upper is not None:
        args += ["--upper", upper]
    elif rw:
        args.append("--rw")
    cli(*args)
    try:
        yield mnt
    finally:
        try:
            cli("umount", mnt, check=False)
        finally:
            force_unmount(mnt)


def inode_numbers(root: str) -> dict[str, int]:
    """Every path below ``root`` (relative) -> its inode number."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = os.lstat(p).st_ino
    return out


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# -- snapshots ----------------------------------------------------------------------------------
_TYPES = [
    (stat.S_ISDIR, "dir"),
    (stat.S_ISREG, "file"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISCHR, "chr"),
    (stat.S_ISBLK, "blk"),
    (stat.S_ISSOCK, "sock"),
]


def _type(mode: int) -> str:
    return next(name for test, name in _TYPES if test(mode))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(
    root: str,
    *,
    dir_mtimes: bool = False,
    volatile: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Every path below ``root`` (``"/"`` is the root) -> its inode-independent attributes,
    plus ``"#hardlinks"``: sorted groups of non-directory paths that share an inode.

    ``volatile``: paths whose mtime is "now" (written or created by a test) and so is
    left out.  Directory mtimes are only recorded with ``dir_mtimes``."""
    out: dict[str, Any] = {}
    by_ino: dict[int, list[str]] = {}

    def visit(host: str, rel: str) -> None:
        st = os.lstat(host)
        kind = _type(st.st_mode)
        rec: dict[str, Any] = {
            "type": kind,
            "mode": oct(stat.S_IMODE(st.st_mode)),
            "uid": st.st_uid,
            "gid": st.st_gid,
        }
        if kind != "dir":
            rec["nlink"] = st.st_nlink
            by_ino.setdefault(st.st_ino, []).append(rel)
        if kind == "file":
            rec["size"] = st.st_size
            rec["sha256"] = _sha256(host)
        elif kind == "symlink":
            rec["target"] = os.readlink(host)
        elif kind in ("chr", "blk"):
            rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if (kind != "dir" or dir_mtimes) and rel not in volatile:
            rec["mtime_ns"] = st.st_mtime_ns
        xattrs = {}
        for name in sorted(os.listxattr(host, follow_symlinks=False)):
            if name.startswith(SNAP_XATTR_PREFIXES):
                xattrs[name] = os.getxattr(host, name, follow_symlinks=False).hex()
        if xattrs:
            rec["xattrs"] = xattrs
        out[rel] = rec
        if kind == "dir":
            for name in sorted(os.listdir(host)):
                visit(os.path.join(host, name), rel.rstrip("/") + "/" + name)

    visit(root, "/")
    out[HARDLINKS] = sorted(sorted(paths) for paths in by_ino.values() if len(paths) > 1)
    return out


def upper_snapshot(upper: str) -> dict[str, str]:
    """The overlayfs bookkeeping of an upper directory: path -> ``"whiteout"`` (a 0/0
    character device), ``"opaque dir"`` (``trusted.overlay.opaque=y``), ``"dir"``, or the
    object's type; ``".wh."`` fallback files show as ``"wh-file"``."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        rel_dir = "/" + os.path.relpath(dirpath, upper).removeprefix(".").lstrip("/")
        out[rel_dir] = "opaque dir" if _is_opaque(dirpath) else "dir"
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = rel_dir.rstrip("/") + "/" + name
            if _is_whiteout(st):
                out[rel] = "whiteout"
            elif name.startswith(".wh."):
                out[rel] = "wh-file"
            else:
                out[rel] = _type(st.st_mode)
    return out


def diff(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("expected", "got")) -> str:
    """A readable difference of two snapshots."""
    lines = []
    for path in sorted(set(a) | set(b)):
        if path not in b:
            lines.append(f"only in {names[0]}: {path} {a[path]}")
        elif path not in a:
            lines.append(f"only in {names[1]}: {path} {b[path]}")
        elif a[path] != b[path]:
            if isinstance(a[path], dict) and isinstance(b[path], dict):
                fields = sorted(set(a[path]) | set(b[path]))
                d = [
                    f"{k}: {a[path].get(k)!r} != {b[path].get(k)!r}"
                    for k in fields
                    if a[path].get(k) != b[path].get(k)
                ]
                lines.append(f"{path}: " + "; ".join(d))
            else:
                lines.append(f"{path}: {names[0]} {a[path]!r}\n{' ' * len(path)}  {names[1]} {b[path]!r}")
    return "\n".join(lines)


def assert_same_steps(expected: list[tuple[str, Any]], got: list[tuple[str, Any]], name: str) -> None:
    """Two ``Ops`` logs of one operation sequence give the same result at every step (the
    kernel's log is the expected one)."""
    assert [s for s, _ in expected] == [s for s, _ in got]
    diffs = [
        f"step {i} {k}: kernel {kv!r}, {name} {lv!r}"
        for i, ((k, kv), (_, lv)) in enumerate(zip(expected, got))
        if kv != lv
    ]
    assert not diffs, "steps that differ:\n" + "\n".join(diffs)


def assert_same(
    expected: dict[str, Any],
    got: dict[str, Any],
    what: str = "",
    names: tuple[str, str] = ("kernel", "layerfs"),
) -> None:
    if expected != got:
        raise AssertionError(f"{what} differs ({names[0]} vs {names[1]}):\n{diff(expected, got, names)}")


# -- operation sequences --------------------------------------------------------------------------
class Ops:
    """Runs one operation sequence on a mount root and records what each step gave (``"ok"``
    or the errno name, listings, contents), so the runs on two mounts can be compared.
    ``volatile`` collects the paths whose mtime becomes "now" (left out of snapshots)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.log: list[tuple[str, Any]] = []
        self.volatile: set[str] = set()

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def note(self, label: str, value: Any) -> None:
        self.log.append((label, value))

    def do(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
        except OSError as exc:
            self.note(label, errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            return None
        self.note(label, "ok")
        return result

    def changed(self, *rels: str) -> None:
        self.volatile.update("/" + r for r in rels)

    def write(self, rel: str, data: bytes, offset: int) -> None:
        def fn() -> None:
            fd = os.open(self.p(rel), os.O_WRONLY)
            try:
                assert os.pwrite(fd, data, offset) == len(data)
            finally:
                os.close(fd)

        self.do(f"write {rel}@{offset}", fn)
        self.changed(rel)

    def append(self, rel: str, data: bytes) -> None:
        def fn() -> None:
            with open(self.p(rel), "ab") as f:
                f.write(data)

        self.do(f"append {rel}", fn)
        self.changed(rel)

    def truncate(self, rel: str, size: int) -> None:
        self.do(f"truncate {rel} {size}", os.truncate, self.p(rel), size)
        self.changed(rel)

    def create(self, rel: str, data: bytes = b"", mode: int = 0o644) -> None:
        def fn() -> None:
            fd = os.open(self.p(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

        self.do(f"create {rel}", fn)
        self.changed(rel)

    def mkfifo(self, rel: str) -> None:
        self.do(f"mkfifo {rel}", os.mkfifo, self.p(rel))
        self.changed(rel)

    def symlink(self, target: str, rel: str) -> None:
        self.do(f"symlink {rel}", os.symlink, target, self.p(rel))
        self.changed(rel)

    def link(self, src: str, dst: str) -> None:
        self.do(f"link {src} {dst}", os.link, self.p(src), self.p(dst))
        if "/" + src in self.volatile:
            self.changed(dst)
        self.nlink(src)  # at once: a stale attribute cache shows here
        self.nlink(dst)

    def attrs(self, rel: str) -> None:
        """Size and link count as ``stat`` gives them now (no read that could refresh them)."""
        try:
            st = os.lstat(self.p(rel))
            self.note(f"size,nlink {rel}", (st.st_size, st.st_nlink))
        except OSError as exc:
            self.note(f"size,nlink {rel}", errno.errorcode.get(exc.errno or 0))

    def nlink(self, rel: str) -> None:
        try:
            self.note(f"nlink {rel}", os.lstat(self.p(rel)).st_nlink)
        except OSError as exc:
            self.note(f"nlink {rel}", errno.errorcode.get(exc.errno or 0))

    def rename(self, src: str, dst: str) -> None:
        self.do(f"rename {src} {dst}", os.rename, self.p(src), self.p(dst))
        if self.log[-1][1] != "ok":
            return
        old, new = "/" + src, "/" + dst
        self.volatile = {
            new + v[len(old) :] if v == old or v.startswith(old + "/") else v
            for v in self.volatile
            if v != new and not v.startswith(new + "/")
        } | ({new} if old in self.volatile else set())

    def read(self, rel: str) -> None:
        def fn() -> bytes:
            with open(self.p(rel), "rb") as f:
                return f.read()

        try:
            self.note(f"read {rel}", fn())
        except OSError as exc:
            self.note(f"read {rel}", errno.errorcode.get(exc.errno or 0))

    def listdir(self, rel: str) -> None:
        try:
            self.note(f"ls {rel or '/'}", sorted(os.listdir(self.p(rel))))
        except OSError as exc:
            self.note(f"ls {rel or '/'}", errno.errorcode.get(exc.errno or 0))

    def stat(self, rel: str) -> None:
        try:
            st = os.lstat(self.p(rel))
            self.note(f"stat {rel}", (_type(st.st_mode), oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid))
        except OSError as exc:
            self.note(f"stat {rel}", errno.errorcode.get(exc.errno or 0))


def debug_ops(store_path: str) -> list[tuple[str, str]]:
    """(opcode, node) of every request the ``--debug`` daemons of this store logged, in order
    (FUSE opcodes: 14 OPEN, 15 READ, 18 RELEASE)."""
    out = []
    reg = os.path.join(store_path, "mounts")
    for name in os.listdir(reg):
        if name.endswith(".log"):
            with open(os.path.join(reg, name)) as f:
                out += [(ln.split()[2], ln.split()[4]) for ln in f if ln.startswith("layerfs: op ")]
    return out


def cached_pages(path: str) -> list[bool]:
    """Opens ``path`` for reading and says, page by page, whether the kernel's page cache
    holds its contents right after the open, before anything reads it (mincore(2) of a
    shared map that was never touched: a map reads nothing by itself)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return [bool(b & 1) for b in vec]
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
