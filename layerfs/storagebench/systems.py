"""The systems a bench compares, on one disk, and the trees and mounts they serve:

* ``native``: the directory itself: the image's layers extracted into one directory, applying
  whiteouts (what a container runtime's ``vfs`` driver does);
* ``overlay``: the kernel overlay filesystem over the layers extracted one directory each in
  the overlayfs format (docker's and podman's ``overlay2``/``overlay`` drivers);
* ``fuse-overlayfs``: the same layer directories through fuse-overlayfs (rootless podman);
* ``layerfs``: the image imported into a layerfs store and mounted, C FUSE core;
* ``layerfs-py``: the same with ``LAYERFS_IMPL=python``: the pure-Python tar parser and
  FUSE core (the twin).

A system that cannot run here is skipped with the reason (``probe``).  Everything is made
below one work directory on the measured disk; ``Bed.close`` unmounts and removes it all.
Not thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

from layerfs import procfs
from layerfs.storagebench.image import BenchError, BenchImage
from layerfs.storagebench.layers import OPAQUE_XATTR
from layerfs.store.filecache import DIRNAME as FILE_CACHE_DIR

SYSTEMS: dict[str, str] = {
    "native": "the directory itself (the image extracted into it)",
    "overlay": "the kernel overlay filesystem over the layers extracted to directories",
    "fuse-overlayfs": "fuse-overlayfs over the same layer directories",
    "layerfs": "layerfs, C FUSE core",
    "layerfs-py": "layerfs, the pure-Python twin (LAYERFS_IMPL=python: tar parser and FUSE core)",
}
LAYERFS = ("layerfs", "layerfs-py")
OVERLAYS = ("overlay", "fuse-overlayfs")


def fuse_overlayfs_program() -> str:
    # a hidden knob: another fuse-overlayfs (a build of one's own; the tests name a missing one)
    return os.environ.get("LAYERFS_STORAGEBENCH_FUSE_OVERLAYFS", "fuse-overlayfs")


def layerfs_env(system: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LAYERFS_FUSE", None)
    env.pop("LAYERFS_IMPL", None)
    if system == "layerfs-py":
        env["LAYERFS_IMPL"] = "python"
    else:
        env["LAYERFS_FUSE"] = "c"
    return env


def run(cmd: list[str], *, env: dict[str, str] | None = None, what: str = "") -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        raise BenchError(f"{what or cmd[0]} failed: {err[-1] if err else 'exit ' + str(res.returncode)}")


def mounted(path: str) -> bool:
    return bool(procfs.mounts_on(path))


def force_unmount(path: str) -> None:
    for cmd in (["umount", path], ["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        if not mounted(path):
            return
        subprocess.run(cmd, capture_output=True)


# -- extracting layers -------------------------------------------------------------------------------
def _members(tar: str) -> list[str]:
    res = subprocess.run(["tar", "-tf", tar], capture_output=True, text=True, errors="surrogateescape")
    if res.returncode != 0:
        raise BenchError(f"tar -tf {tar} failed: {res.stderr.strip()}")
    out = []
    for name in res.stdout.splitlines():
        name = name.lstrip("/")
        while name.startswith("./"):
            name = name[2:]
        out.append(name.rstrip("/"))
    return out


def _whiteouts(members: list[str]) -> tuple[list[str], list[str]]:
    """(paths whited out, opaque directories) of a layer, from its member names."""
    gone, opaque = [], []
    for name in members:
        head, _, base = name.rpartition("/")
        if base == ".wh..wh..opq":
            opaque.append(head)
        elif base.startswith(".wh."):
            gone.append(f"{head}/{base[4:]}" if head else base[4:])
    return gone, opaque


TAR_X = ["tar", "--numeric-owner", "--same-owner", "-p", "--xattrs", "--xattrs-include=*"]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def extract_merged(tars: list[str], root: str) -> None:
    """The layers applied in order to one directory: whiteouts remove, opaque directories
    lose what lower layers put in them."""
    os.makedirs(root)
    for tar in tars:
        gone, opaque = _whiteouts(_members(tar))
        for rel in gone:
            _remove(os.path.join(root, rel))
        for rel in opaque:
            d = os.path.join(root, rel)
            if os.path.isdir(d):
                for name in os.listdir(d):
                    _remove(os.path.join(d, name))
        run([*TAR_X, "--exclude=.wh.*", "-xf", tar, "-C", root], what="tar -x")


def extract_layer_dirs(tars: list[str], base: str) -> list[str]:
    """Each layer in its own directory in the kernel overlay format; bottom first."""
    dirs = []
    for i, tar in enumerate(tars):
        d = os.path.join(base, str(i))
        os.makedirs(d)
        run([*TAR_X, "-xf", tar, "-C", d], what="tar -x")
        gone, opaque = _whiteouts(_members(tar))
        for rel in gone:
            head, _, name = rel.rpartition("/")
            os.unlink(os.path.join(d, head, ".wh." + name))
            os.mknod(os.path.join(d, rel), stat.S_IFCHR | 0o000, os.makedev(0, 0))
        for rel in opaque:
            os.unlink(os.path.join(d, rel, ".wh..wh..opq"))
            os.setxattr(os.path.join(d, rel), OPAQUE_XATTR, b"y")
        dirs.append(d)
    return dirs


# -- the bed -----------------------------------------------------------------------------------------
@dataclass
class Mounted:
    system: str
    root: str  # where the workload looks
    upper: str | None = None  # scratch of a writable mount, removed with it


class Bed:
    """The trees and mounts of one run, below ``work``."""

    def __init__(self, work: str, image: BenchImage) -> None:
        self.work = work
        self.image = image
        self.native: str | None = None
        self.layer_dirs: list[str] = []
        self.stores: dict[str, str] = {}
        # seconds the overlay's import of this round took: fuse-overlayfs uses the same directories
        self.shared_import: float | None = None
        self._n = 0
        self.mnt = os.path.join(work, "mnt")
        os.makedirs(self.mnt, exist_ok=True)

    def fresh(self, prefix: str) -> str:
        self._n += 1
        return os.path.join(self.work, f"{prefix}-{self._n}")

    # -- import: each returns nothing; the caller times it
    def import_native(self) -> None:
        root = self.fresh("native")
        extract_merged(self.image.layers, root)
        old, self.native = self.native, root
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def import_layer_dirs(self) -> None:
        base = self.fresh("layers")
        dirs = extract_layer_dirs(self.image.layers, base)
        old, self.layer_dirs = self.layer_dirs, dirs
        if old:
            shutil.rmtree(os.path.dirname(old[0]), ignore_errors=True)

    def import_layerfs(self, system: str) -> None:
        store = self.fresh(f"store-{system}")
        cmd = [sys.executable, "-m", "layerfs", "--store", store, "import", "-q", "-t", self.image.ref]
        run([*cmd, self.image.layout], env=layerfs_env(system), what="layerfs import")
        old, self.stores[system] = self.stores.get(system), store
        if old:
            shutil.rmtree(old, ignore_errors=True)

    # -- mounts
    def mount(self, system: str, *, rw: bool = False) -> Mounted:
        if system == "native":
            if self.native is None:
                raise BenchError("the image was not extracted")
            return Mounted(system, self.native)
        mnt = self.mnt
        if mounted(mnt):
            raise BenchError(f"{mnt} is still mounted")
        upper = self.fresh(f"rw-{system}") if rw else None
        if system in LAYERFS:
            store = self.stores[system]
            # cold for layerfs's own cache too: the decompressed copies a writable mount keeps
            # of the large files it read would make every round after the first a warm one
            shutil.rmtree(os.path.join(store, FILE_CACHE_DIR), ignore_errors=True)
            # as a container's root file system: other users (the start runs as nobody) may enter
            cmd = [
                sys.executable,
                "-m",
                "layerfs",
                "--store",
                store,
                "mount",
                "-o",
                "allow_other",
                self.image.ref,
                mnt,
            ]
            if upper:
                cmd += ["--upper", os.path.join(upper, "upper"), "--work", os.path.join(upper, "work")]
            run(cmd, env=layerfs_env(system), what="layerfs mount")
        else:
            if not self.layer_dirs:
                raise BenchError("the layers were not extracted")
            opts = "lowerdir=" + ":".join(reversed(self.layer_dirs))
            if upper:
                os.makedirs(os.path.join(upper, "upper"))
                os.makedirs(os.path.join(upper, "work"))
                opts += f",upperdir={upper}/upper,workdir={upper}/work"
            if system == "overlay":
                run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], what="mount -t overlay")
            else:
                run([fuse_overlayfs_program(), "-o", opts, mnt], what="fuse-overlayfs")
                deadline = time.monotonic() + 10
                while not mounted(mnt):
                    if time.monotonic() > deadline:
                        raise BenchError("fuse-overlayfs: not mounted after 10 s")
                    time.sleep(0.005)
        return Mounted(system, mnt, upper)

    def umount(self, m: Mounted) -> None:
        if m.system == "native":
            return
        try:
            if m.system in LAYERFS:
                _layerfs_umount(self.stores[m.system], m.root)
            elif m.system == "fuse-overlayfs":
                subprocess.run(["fusermount3", "-u", m.root], capture_output=True)
            else:
                subprocess.run(["umount", m.root], capture_output=True)
            force_unmount(m.root)
        finally:
            if m.upper and not mounted(m.root):
                shutil.rmtree(m.upper, ignore_errors=True)

    def close(self) -> None:
        if mounted(self.mnt):
            for store in self.stores.values():
                _layerfs_umount(store, self.mnt)
        remove_work(self.work)


def remove_work(work: str) -> None:
    """Unmount whatever is still mounted below ``work``, then remove it; never through a mount
    (what cannot be unmounted keeps the directory, and the caller's error says so)."""
    for mp in sorted((x.mountpoint for x in procfs.mounts_below(work)), key=len, reverse=True):
        force_unmount(mp)
    left = procfs.mounts_below(work)
    if left:
        raise BenchError(f"{left[0].mountpoint} is still mounted; {work} was left in place")
    shutil.rmtree(work, ignore_errors=True)


def _layerfs_umount(store_path: str, mountpoint: str) -> None:
    """``layerfs umount``, in this process (a Python start less for every mount: a second on
    a Raspberry Pi); what it cannot do, ``force_unmount`` does."""
    from layerfs.mount import MountError, umount
    from layerfs.store import Store, StoreError

    with contextlib.suppress(MountError, StoreError, OSError):
        store = Store(store_path)
        try:
            umount(store, mountpoint)
        finally:
            store.close()


# -- what can run here --------------------------------------------------------------------------------
def probe(system: str, work: str) -> str | None:
    """Why ``system`` cannot run on this machine and disk, or None."""
    if system == "native":
        return None
    if system == "overlay":
        return _probe_overlay(work, ["mount", "-t", "overlay", "overlay"], "the kernel overlay filesystem")
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: FUSE is not available here (modprobe fuse)"
    if system == "fuse-overlayfs":
        prog = fuse_overlayfs_program()
        if shutil.which(prog) is None:
            return f"{prog} is not installed (Debian: apt install fuse-overlayfs)"
        if shutil.which("fusermount3") is None:
            return "fusermount3 is not installed (Debian: apt install fuse3)"
        return _probe_overlay(work, [prog], "fuse-overlayfs")
    if system == "layerfs":
        try:
            from layerfs import _cfuse  # noqa: F401
        except ImportError as exc:
            return f"the C FUSE core is not built ({exc})"
        return None
    if system == "layerfs-py":
        try:
            import mfusepy  # noqa: F401
        except (ImportError, OSError) as exc:  # OSError: libfuse3 missing
            return f"the pure-Python FUSE core cannot load: {exc}"
        return None
    return f"unknown system {system}"


def _probe_overlay(work: str, cmd: list[str], what: str) -> str | None:
    """Mount a writable union of two tiny layers with its upper on the measured disk."""
    probe_dir = os.path.join(work, f"probe-{cmd[0].rpartition('/')[2]}")
    dirs = {d: os.path.join(probe_dir, d) for d in ("l1", "l2", "upper", "work", "mnt")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    opts = f"lowerdir={dirs['l1']}:{dirs['l2']},upperdir={dirs['upper']},workdir={dirs['work']}"
    try:
        res = subprocess.run([*cmd, "-o", opts, dirs["mnt"]], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{what} cannot be mounted: {exc}"
    try:
        if res.returncode != 0:
            err = (res.stderr or res.stdout).strip().splitlines()
            return f"{what} cannot be mounted here: {err[-1] if err else 'exit ' + str(res.returncode)}"
        deadline = time.monotonic() + 10
        while not mounted(dirs["mnt"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not mounted(dirs["mnt"]):
            return f"{what}: the probe mount did not appear"
        return None
    finally:
        if cmd[0] == "mount":
            subprocess.run(["umount", dirs["mnt"]], capture_output=True)
        else:
            subprocess.run(["fusermount3", "-u", dirs["mnt"]], capture_output=True)
        force_unmount(dirs["mnt"])
        with contextlib.suppress(OSError):
            shutil.rmtree(probe_dir)
