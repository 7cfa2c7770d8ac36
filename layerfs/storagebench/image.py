"""The bench image: a base (the project's sample image, or the image ``--image`` names) with
data layers on top, sized by the mode, written as one uncompressed OCI image layout that
every system imports from.

The data layers hold what the workloads need: a tree of small files (``bench/small``), one
large file (``bench/big/blob``, half random, half text), a few large files to copy up
(``bench/copyup``); a top layer rewrites some small files, whites some out and makes one
directory opaque, as image layers do.  Not thread-safe (writes files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

from layerfs.storagebench.layers import Content, KiB, MiB, Op, layout_layers, write_layout, write_tar

SEED = 20261130
REF = "layerfs-bench:image"


class BenchError(Exception):
    """One line for the user."""


@dataclass(frozen=True)
class Sizes:
    """How much each workload does; ``scaled`` shrinks the counts and sizes together."""

    rounds: int
    small_dirs: int
    small_files: int  # in the image, below bench/small
    small_size: int
    big_size: int
    copyup_files: int
    copyup_size: int
    install_files: int  # created through a writable mount
    install_size: int
    fio_write_size: int  # sequential write of a new file
    fio_rand_file: int  # random writes land in a new file of this size
    fio_rand_io: int  # bytes of 4 KiB random reads, and of random writes (at most)
    fio_runtime: int  # seconds: a random fio job stops there if it has not done its bytes

    def scaled(self, scale: float) -> Sizes:
        if scale == 1:
            return self

        def n(v: int, least: int = 1) -> int:
            return max(least, int(v * scale))

        return dataclasses.replace(
            self,
            small_dirs=n(self.small_dirs, 2),
            small_files=n(self.small_files, 20),
            big_size=n(self.big_size, MiB),
            copyup_files=n(self.copyup_files, 2),
            copyup_size=n(self.copyup_size, 256 * KiB),
            install_files=n(self.install_files, 20),
            fio_write_size=n(self.fio_write_size, MiB),
            fio_rand_file=n(self.fio_rand_file, MiB),
            fio_rand_io=n(self.fio_rand_io, 256 * KiB),
            fio_runtime=n(self.fio_runtime, 1),
        )


# --quick: under 5 minutes on a Raspberry Pi 4 with an SD card; the full run under 20.  Estimated
# from SD-card rates (about 40 MB/s reads, 15 MB/s writes, 2000 random 4 KiB reads and 200 random
# writes a second) and a Python start of about a second per layerfs mount; random writes are the
# slowest piece there (fio's final fsync flushes every dirtied page), hence their small sizes.
QUICK = Sizes(
    rounds=1,
    small_dirs=20,
    small_files=2000,
    small_size=4 * KiB,
    big_size=32 * MiB,
    copyup_files=4,
    copyup_size=2 * MiB,
    install_files=1000,
    install_size=4 * KiB,
    fio_write_size=32 * MiB,
    fio_rand_file=8 * MiB,
    fio_rand_io=2 * MiB,
    fio_runtime=3,
)
FULL = Sizes(
    rounds=3,
    small_dirs=100,
    small_files=10000,
    small_size=4 * KiB,
    big_size=128 * MiB,
    copyup_files=8,
    copyup_size=8 * MiB,
    install_files=5000,
    install_size=4 * KiB,
    fio_write_size=128 * MiB,
    fio_rand_file=32 * MiB,
    fio_rand_io=8 * MiB,
    fio_runtime=10,
)


def sizes(quick: bool, scale: float = 1.0) -> Sizes:
    return (QUICK if quick else FULL).scaled(scale)


@dataclass
class BenchImage:
    layout: str  # uncompressed OCI layout: every system imports from it
    ref: str
    base: str  # what the base is ("the layerfs sample image", or what --image named)
    layers: list[str]  # the layer tars, bottom first
    small_files: list[str]  # below bench/small in the merged tree
    big: str
    big_size: int
    copyup: list[str]
    copyup_size: int
    config: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        total = sum(os.path.getsize(p) for p in self.layers)
        return {
            "base": self.base,
            "layers": len(self.layers),
            "tar_bytes": total,
            "small_files": len(self.small_files),
            "big_file_bytes": self.big_size,
            "copyup_files": len(self.copyup),
            "copyup_file_bytes": self.copyup_size,
        }


def data_layers(s: Sizes) -> tuple[list[list[Op]], dict[str, Any]]:
    c = Content(SEED)
    rng = random.Random(SEED)
    dirs = [f"bench/small/d{i:03d}" for i in range(s.small_dirs)]
    files = [f"{dirs[i % len(dirs)]}/f{i:05d}" for i in range(s.small_files)]
    data: list[Op] = [("dir", "bench", 0o755), ("dir", "bench/small", 0o755)]
    data += [("dir", d, 0o755) for d in dirs]
    data += [("file", f, c.small(rng, f, s.small_size), 0o644) for f in files]
    data += [("dir", "bench/big", 0o755)]
    data.append(("file", "bench/big/blob", (s.big_size, lambda: c.big(SEED + 1, s.big_size)), 0o644))
    data.append(("dir", "bench/copyup", 0o755))
    copyup = [f"bench/copyup/f{k:02d}" for k in range(s.copyup_files)]
    for k, f in enumerate(copyup):
        data.append(("file", f, (s.copyup_size, lambda k=k: c.big(SEED + 2 + k, s.copyup_size)), 0o644))
    # the top layer: rewrites, whiteouts and an opaque directory, as image layers have
    top: list[Op] = [("dir", "bench", 0o755), ("dir", "bench/small", 0o755)]
    opaque = dirs[-1]
    others = [f for f in files if not f.startswith(opaque + "/")]
    picked = rng.sample(others, max(1, len(others) // 10))
    rewrites, gone = sorted(picked[: len(picked) // 2 or 1]), sorted(picked[len(picked) // 2 or 1 :])
    for d in sorted({f.rpartition("/")[0] for f in rewrites + gone}):
        top.append(("dir", d, 0o755))
    top += [("file", f, c.small(rng, "top " + f, s.small_size), 0o644) for f in rewrites]
    top += [("whiteout", f) for f in gone]
    top += [("dir", opaque, 0o755), ("opaque", opaque)]
    refilled = [f for f in files if f.startswith(opaque + "/")]
    top += [("file", f, c.small(rng, "opq " + f, s.small_size), 0o644) for f in refilled]
    gone_set = set(gone)
    merged = sorted(f for f in files if f not in gone_set)
    return [data, top], {"small_files": merged, "copyup": copyup}


def sample_layers(out: str) -> tuple[list[str], dict[str, Any]]:
    """The sample image's layers as uncompressed tars in ``out``, and its config."""
    from layerfs.tools import sample

    try:
        busybox = sample.find_busybox()
    except SystemExit as exc:  # the sample's own message
        raise BenchError(str(exc)) from None
    with open(busybox, "rb") as f:
        layers = sample.build_layers(f.read())
    paths = []
    for i, layer in enumerate(layers):
        path = os.path.join(out, f"base{i}.tar")
        with open(path, "wb") as f:
            f.write(layer.blob()[1])
        paths.append(path)
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(
        os.uname().machine, os.uname().machine
    )
    config = {"architecture": arch, "os": "linux", "config": {"Env": ["PATH=/bin"], "Cmd": ["/app/run.sh"]}}
    return paths, config


def given_layers(image: str, out: str, store_path: str | None) -> tuple[list[str], dict[str, Any]]:
    """The layers of the image ``--image`` names (an OCI layout or archive, a docker save
    archive, or an image in the store) as uncompressed tars in ``out``, and its config.
    Rebuilt by ``save`` from a store: a path is imported into a scratch store first."""
    from layerfs.store import Store, StoreError
    from layerfs.tools.export import ExportError, save
    from layerfs.tools.image import ImportError_, import_path
    from layerfs.tools.refs import RefError

    layout = os.path.join(out, "given")
    try:
        if os.path.exists(image):
            scratch = Store(os.path.join(out, "given-store"))
            try:
                results = import_path(scratch, image)
                if len(results) != 1:
                    raise BenchError(f"{image} holds {len(results)} images; the bench takes one")
                save(scratch, [results[0].image_id], layout, "oci-dir")
            finally:
                scratch.close()
            shutil.rmtree(os.path.join(out, "given-store"), ignore_errors=True)
        else:
            store = Store(store_path)
            try:
                save(store, [image], layout, "oci-dir")
            finally:
                store.close()
    except (ImportError_, ExportError, RefError, StoreError, OSError) as exc:
        raise BenchError(f"cannot use image {image}: {exc}") from None
    blobs, config = layout_layers(layout)
    paths = []
    for i, blob in enumerate(blobs):
        path = os.path.join(out, f"base{i}.tar")
        os.rename(blob, path)
        paths.append(path)
    shutil.rmtree(layout, ignore_errors=True)
    keep: dict[str, Any] = {k: config[k] for k in ("architecture", "os", "variant", "config") if k in config}
    return paths, keep


def build(out: str, s: Sizes, image: str | None = None, store_path: str | None = None) -> BenchImage:
    """Write the bench image's layout below ``out`` (a new directory)."""
    os.makedirs(out)
    if image is None:
        base_tars, config = sample_layers(out)
        base = "the layerfs sample image (tools/sample.py)"
    else:
        base_tars, config = given_layers(image, out, store_path)
        base = image
    ops, info = data_layers(s)
    tars = list(base_tars)
    for i, layer in enumerate(ops):
        path = os.path.join(out, f"data{i}.tar")
        write_tar(layer, path)
        tars.append(path)
    layout = write_layout(tars, os.path.join(out, "layout"), REF, config)
    layers, _ = layout_layers(layout)
    return BenchImage(
        layout=layout,
        ref=REF,
        base=base,
        layers=layers,
        small_files=info["small_files"],
        big="bench/big/blob",
        big_size=s.big_size,
        copyup=info["copyup"],
        copyup_size=s.copyup_size,
        config=config,
    )


def describe_sizes(s: Sizes) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(s)))
