"""Deterministic images for the union filesystem benchmarks, written twice from one spec:
as an OCI image layout (uncompressed tar layers, for ``layerfs import``) and as one
directory per layer in the kernel overlayfs format (for ``fuse-overlayfs`` and
``mount -t overlay``): a whiteout is a 0/0 character device, an opaque directory carries
``trusted.overlay.opaque=y``.  Both come from the same list of operations, so the three
mounts show the same tree (``test_union_bench.py`` checks that before timing anything).

Images:

* ``main`` (3 layers): ``base`` = ``bin/busybox`` (the host's busybox-static) with
  ``bin/true`` and ``bin/sh`` symlinks to it, and ``data/`` = 100 dirs x 200 files of
  1 KiB; ``bulk`` = ``big/blob`` (256 MiB, 64 KiB pieces alternating random and
  text-like, so half of it compresses) and ``cu/`` (2000 files of 16 KiB) plus 500
  rewritten ``data`` files; ``top`` = 1000 rewritten ``data`` files, 100 whiteouts,
  one opaque directory re-filled with 200 files, 100 new files;
* ``many`` (50 small layers): each adds 20 files, rewrites ``common/`` and whites out a
  file of the layer below;
* ``wide`` (1 layer): 1000 dirs x 100 files (most empty), about 101k entries.

Generated once into ``CACHE/union-<key>/<image>/{layout,layers/N}`` (under an flock) and
reused afterwards.  Run as a script to generate: ``python bench/uniongen.py [CACHE]``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

# the layer writers are the package's (``layerfs bench`` generates its images with them too)
from layerfs.storagebench.layers import Content, KiB, MiB, Op, write_layout, write_overlay_dir, write_tar

GENERATOR_VERSION = 1
# one layer = a list of operations, applied in order (layerfs.storagebench.layers says which)


@dataclass(frozen=True)
class UnionParams:
    seed: int = 424242
    dirs: int = 100
    files_per_dir: int = 200
    small_size: int = 1 * KiB
    big_size: int = 256 * MiB
    copyup_files: int = 2000
    copyup_size: int = 16 * KiB
    mid_rewrites: int = 500  # data files rewritten by the middle layer
    top_rewrites: int = 1000  # ... and by the top layer
    whiteouts: int = 100
    new_files: int = 100
    many_layers: int = 50
    many_files: int = 20
    wide_dirs: int = 1000
    wide_files: int = 100
    busybox: str = "/bin/busybox"

    def key(self) -> str:
        blob = json.dumps([GENERATOR_VERSION, dataclasses.asdict(self)], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def scaled(self, scale: float) -> UnionParams:
        if scale == 1:
            return self
        n = lambda v: max(1, int(v * scale))  # noqa: E731
        return dataclasses.replace(
            self,
            dirs=n(self.dirs),
            big_size=max(MiB, int(self.big_size * scale)),
            copyup_files=n(self.copyup_files),
            mid_rewrites=n(self.mid_rewrites),
            top_rewrites=n(self.top_rewrites),
            whiteouts=n(self.whiteouts),
            new_files=n(self.new_files),
            wide_dirs=n(self.wide_dirs),
        )


# -- the images ----------------------------------------------------------------------------------
def main_image(p: UnionParams, c: Content) -> tuple[list[list[Op]], dict[str, Any]]:
    rng = random.Random(p.seed)
    with open(p.busybox, "rb") as f:
        busybox = f.read()
    dirs = [f"data/d{i:03d}" for i in range(p.dirs)]
    names = [f"f{j:03d}" for j in range(p.files_per_dir)]
    base: list[Op] = [("dir", "bin", 0o755), ("file", "bin/busybox", busybox, 0o755)]
    base += [("symlink", "bin/true", "busybox"), ("symlink", "bin/sh", "busybox"), ("dir", "data", 0o755)]
    for d in dirs:
        base.append(("dir", d, 0o755))
        base += [("file", f"{d}/{n}", c.small(rng, f"{d}/{n}", p.small_size), 0o644) for n in names]
    all_files = [f"{d}/{n}" for d in dirs for n in names]

    bulk: list[Op] = [("dir", "big", 0o755)]
    bulk.append(("file", "big/blob", (p.big_size, lambda: c.big(p.seed + 1, p.big_size)), 0o644))
    bulk.append(("dir", "cu", 0o755))
    copyup = [f"cu/f{k:04d}" for k in range(p.copyup_files)]
    bulk += [("file", f, c.small(rng, f, p.copyup_size), 0o644) for f in copyup]
    for f in sorted(rng.sample(all_files, p.mid_rewrites)):
        bulk.append(("file", f, c.small(rng, "mid " + f, p.small_size), 0o644))

    top: list[Op] = []
    opaque_dir = dirs[-1]
    others = [f for f in all_files if not f.startswith(opaque_dir + "/")]
    picked = rng.sample(others, p.top_rewrites + p.whiteouts)
    for f in sorted(picked[: p.top_rewrites]):
        top.append(("file", f, c.small(rng, "top " + f, p.small_size), 0o644))
    gone = sorted(picked[p.top_rewrites :])
    top += [("whiteout", f) for f in gone]
    top += [("dir", opaque_dir, 0o755), ("opaque", opaque_dir)]
    top += [("file", f"{opaque_dir}/{n}", c.small(rng, "opq " + n, p.small_size), 0o644) for n in names]
    new = [f"{dirs[k % len(dirs)]}/new{k:03d}" for k in range(p.new_files)]
    top += [("file", f, c.small(rng, f, p.small_size), 0o644) for f in new]

    gone_set = set(gone)
    small = sorted([f for f in all_files if f not in gone_set] + new)
    info = {
        "small_files": small,  # every regular file below data/ in the merged tree
        "copyup_files": copyup,
        "big": "big/blob",
        "big_size": p.big_size,
        "rm_tree": "data",
    }
    return [base, bulk, top], info


def many_image(p: UnionParams, c: Content) -> tuple[list[list[Op]], dict[str, Any]]:
    rng = random.Random(p.seed + 50)
    layers: list[list[Op]] = []
    for i in range(p.many_layers):
        ops: list[Op] = [("dir", "common", 0o755), ("dir", f"l{i:02d}", 0o755)]
        ops += [
            ("file", f"l{i:02d}/f{j:03d}", c.small(rng, f"{i}/{j}", p.small_size), 0o644)
            for j in range(p.many_files)
        ]
        ops += [("file", f"common/c{j}", c.small(rng, f"c{i}/{j}", p.small_size), 0o644) for j in range(10)]
        if i:
            ops.append(("whiteout", f"l{i - 1:02d}/f000"))
        layers.append(ops)
    return layers, {}


def wide_image(p: UnionParams, c: Content) -> tuple[list[list[Op]], dict[str, Any]]:
    rng = random.Random(p.seed + 100)
    ops: list[Op] = [("dir", "w", 0o755)]
    for i in range(p.wide_dirs):
        d = f"w/d{i:04d}"
        ops.append(("dir", d, 0o755))
        for j in range(p.wide_files):
            data = c.small(rng, f"{d}/{j}", 100) if j % 10 == 0 else b""
            ops.append(("file", f"{d}/f{j:03d}", data, 0o644))
    return [ops], {"entries": 2 + p.wide_dirs * (1 + p.wide_files)}


IMAGES = {"main": main_image, "many": many_image, "wide": wide_image}


@dataclass
class UnionImage:
    name: str
    root: str
    info: dict[str, Any]

    @property
    def layout(self) -> str:
        return os.path.join(self.root, "layout")

    @property
    def layers(self) -> list[str]:
        """The overlayfs layer directories, bottom first."""
        n = int(self.info["layers"])
        return [os.path.join(self.root, "layers", str(i)) for i in range(n)]

    @property
    def ref(self) -> str:
        return f"union-{self.name}:bench"


def _generate(name: str, p: UnionParams, out: str) -> dict[str, Any]:
    layers, info = IMAGES[name](p, Content(p.seed))
    tars = []
    for i, ops in enumerate(layers):
        write_overlay_dir(ops, os.path.join(out, "layers", str(i)))
        tar = os.path.join(out, f"layer{i}.tar")
        write_tar(ops, tar)
        tars.append(tar)
    write_layout(tars, os.path.join(out, "layout"), f"union-{name}:bench")
    info = dict(info, layers=len(layers), params=dataclasses.asdict(p))
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f)
    return info


def cache_root() -> str:
    return os.environ.get("LAYERFS_BENCH_CACHE") or os.path.join(tempfile.gettempdir(), "layerfs-bench-cache")


def ensure(name: str, p: UnionParams, cache: str | None = None) -> UnionImage:
    """Generate image ``name`` once (layout and overlay dirs); later calls reuse it."""
    cache = cache or cache_root()
    base = os.path.join(cache, f"union-{p.key()}")
    root = os.path.join(base, name)
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(root, "info.json")):
            tmp = f"{root}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            _generate(name, p, tmp)
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)
        with open(os.path.join(root, "info.json")) as f:
            return UnionImage(name, root, json.load(f))


DEBIAN_MIRROR = os.environ.get("LAYERFS_BENCH_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SUITE = "bookworm"


def debian_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "debootstrap needs root"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (apt-get install debootstrap)"
    return None


def ensure_debian(cache: str | None = None) -> UnionImage:
    """An image nobody generated: a Debian rootfs with python3 (``debootstrap --variant=minbase
    --include=python3``), as one layer, the way ``debian:bookworm`` images are one layer.  Built
    once into the cache (it needs the Debian mirror, ``LAYERFS_BENCH_DEBIAN_MIRROR``, or a
    rootfs debootstrap made before, ``LAYERFS_BENCH_DEBIAN_ROOTFS``); its layer directory is the
    rootfs itself (no whiteouts to write)."""
    cache = cache or cache_root()
    root = os.path.join(cache, f"debian-{DEBIAN_SUITE}-python3")
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".debian.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(root, "info.json")):
            tmp = f"{root}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            rootfs = os.path.join(tmp, "layers", "0")
            os.makedirs(os.path.dirname(rootfs))
            import subprocess

            given = os.environ.get("LAYERFS_BENCH_DEBIAN_ROOTFS")  # one debootstrap made already
            cmd = [
                "debootstrap",
                "--variant=minbase",
                "--include=python3",
                DEBIAN_SUITE,
                rootfs,
                DEBIAN_MIRROR,
            ]
            res = subprocess.run(
                ["cp", "-a", given, rootfs] if given else cmd, capture_output=True, text=True
            )
            if res.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"debootstrap failed: {(res.stderr or res.stdout).strip()[-500:]}")
            # what a container image leaves out: the package caches and the host's device nodes
            for rel in ("var/cache/apt/archives", "var/lib/apt/lists", "dev"):
                shutil.rmtree(os.path.join(rootfs, rel), ignore_errors=True)
                os.makedirs(os.path.join(rootfs, rel), mode=0o755)
            files = []
            for dirpath, _, filenames in os.walk(rootfs):
                for name in filenames:
                    path = os.path.join(dirpath, name)
                    if stat.S_ISREG(os.lstat(path).st_mode):
                        files.append(os.path.relpath(path, rootfs))
            tar = os.path.join(tmp, "layer0.tar")
            subprocess.run(
                ["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", rootfs, "-cf", tar, "."],
                check=True,
            )
            write_layout([tar], os.path.join(tmp, "layout"), "union-debian:bench")
            info = {
                "layers": 1,
                "files": sorted(files),
                "bytes": sum(os.lstat(os.path.join(rootfs, f)).st_size for f in files),
            }
            with open(os.path.join(tmp, "info.json"), "w") as f:
                json.dump(info, f)
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)
        with open(os.path.join(root, "info.json")) as f:
            return UnionImage("debian", root, json.load(f))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cache = args[0] if args else None
    for name in IMAGES:
        img = ensure(name, UnionParams(), cache)
        print(name, img.root, img.info["layers"], "layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
