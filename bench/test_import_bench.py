"""Import throughput against umoci and tar, and store size against the gzip'd blobs.

Each import round starts from nothing: a new store directory for layerfs, a new bundle for
``umoci unpack``, a new directory for ``tar -xzf`` of each layer blob in order (tar does
not apply whiteouts; it is the lower bound "decompress and write the files").  Creating and
removing those directories is not timed.  The page cache holds the blobs for every peer
(they are read before the first timed round); dirty pages of earlier rounds are flushed
(``sync``) before each round.  Set ``LAYERFS_BENCH_WORKDIR=/dev/shm`` to measure without
the disk.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from typing import Any

import pytest
from benchlib import timing
from imagegen import GeneratedImage

from layerfs.store import Store
from layerfs.store.usage import usage
from layerfs.tar import reader as tar_reader
from layerfs.tools.image import import_path

ROUNDS = 3
_counter = itertools.count()


def _fresh(workdir: str, what: str) -> tuple[tuple[str], dict[str, Any]]:
    """A new target path; the previous rounds' writes are flushed first, so no round pays
    for another's write-back (each still pays for its own fsyncs, if it makes any)."""
    path = os.path.join(workdir, f"{what}-{next(_counter)}")
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    return (path,), {}


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _warm(img: GeneratedImage) -> None:
    for layer in img.layers():
        with open(img.blob_path(layer), "rb") as f:
            while f.read(1 << 20):
                pass


def _record(results: dict[str, Any], key: str, benchmark: Any, note: str = "") -> None:
    results["import"][key] = {"timing": timing(benchmark), "extra_info": benchmark.extra_info, "note": note}
    imp = results["import"]
    lf = imp.get("layerfs")
    if lf is None or lf["timing"] is None:
        return
    ratios = results.setdefault("import_ratios", {})
    for peer in ("umoci", "tar"):
        p = imp.get(peer)
        if p is not None and p["timing"] is not None:
            ratios[peer] = lf["timing"]["min"] / p["timing"]["min"]
            lf["extra_info"][f"layerfs_over_{peer}"] = round(ratios[peer], 3)
            lf["extra_info"][f"layerfs_over_{peer}_median"] = round(
                lf["timing"]["median"] / p["timing"]["median"], 3
            )


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")


@pytest.mark.benchmark(group="import image-a")
def test_import_umoci(benchmark: Any, bench_image: GeneratedImage, workdir: str, bench_results: dict) -> None:
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed")
    _warm(bench_image)
    ref = f"{bench_image.layout_a}:{bench_image.tag}"
    cmd = ["umoci", "unpack"] + (["--rootless"] if os.geteuid() != 0 else []) + ["--image", ref]
    benchmark.pedantic(
        lambda bundle: _run([*cmd, bundle]),
        setup=lambda: _fresh(workdir, "umoci"),
        teardown=_remove,
        rounds=ROUNDS,
    )
    _record(bench_results, "umoci", benchmark)


@pytest.mark.benchmark(group="import image-a")
def test_import_tar(benchmark: Any, bench_image: GeneratedImage, workdir: str, bench_results: dict) -> None:
    _warm(bench_image)
    blobs = [bench_image.blob_path(layer) for layer in bench_image.layers()]

    def extract(root: str) -> None:
        os.mkdir(root)
        for blob in blobs:
            _run(["tar", "-xzf", blob, "-C", root])

    benchmark.pedantic(extract, setup=lambda: _fresh(workdir, "tar"), teardown=_remove, rounds=ROUNDS)
    _record(bench_results, "tar", benchmark)


@pytest.mark.benchmark(group="import image-a")
def test_import_layerfs(
    benchmark: Any, bench_image: GeneratedImage, workdir: str, bench_results: dict
) -> None:
    _warm(bench_image)
    layout = bench_image.layout_a

    def run(path: str) -> None:
        with Store(path) as store:
            (res,) = import_path(store, layout)
        assert res.layers_new == len(bench_image.layers())

    benchmark.extra_info["tar_backend"] = tar_reader.BACKEND
    benchmark.pedantic(run, setup=lambda: _fresh(workdir, "store"), teardown=_remove, rounds=ROUNDS)
    _record(bench_results, "layerfs", benchmark, note=f"{tar_reader.BACKEND} tar parser")


# -- store size ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def size_run(bench_image: GeneratedImage, workdir: str, bench_results: dict) -> dict[str, Any]:
    """One store: image-a, image-a again, then image-b (which shares all but its top layer)."""
    path = os.path.join(workdir, "size-store")
    shutil.rmtree(path, ignore_errors=True)
    out: dict[str, Any] = {}
    with Store(path) as store:
        (ra,) = import_path(store, bench_image.layout_a)
        ua = usage(store)
        (ra2,) = import_path(store, bench_image.layout_a)
        ua2 = usage(store)
        (rb,) = import_path(store, bench_image.layout_b)
        ub = usage(store)
    shutil.rmtree(path, ignore_errors=True)
    layers_a = bench_image.layers("a")
    out["a"] = {
        "gz": sum(layer["gz_bytes"] for layer in layers_a),
        "tar": sum(layer["tar_bytes"] for layer in layers_a),
        "stored": ua["stored_bytes"],
        "payload": ua["payload_bytes"],
        "metadata": ua["metadata_bytes"],
        "file": ua["file_bytes"],
        "logical": ua["logical_bytes"],
        "unique": ua["unique_bytes"],
        "layers": layers_a,
        "result": ra,
    }
    delta = ua2["stored_bytes"] - ua["stored_bytes"]
    out["again"] = {"delta": delta, "pct": 100 * delta / ua["stored_bytes"], "result": ra2}
    delta = ub["stored_bytes"] - ua2["stored_bytes"]
    a_digests = {layer["digest"] for layer in layers_a}
    own = [layer for layer in bench_image.layers("b") if layer["digest"] not in a_digests]
    out["b"] = {
        "delta": delta,
        "pct": 100 * delta / ua2["stored_bytes"],
        "known": rb.layers_known,
        "own_gz": sum(layer["gz_bytes"] for layer in own),
        "result": rb,
    }
    bench_results["size"] = out
    return out


def test_store_size_vs_gzip_blobs(size_run: dict[str, Any]) -> None:
    a = size_run["a"]
    assert a["result"].layers_new == len(a["layers"])
    print(f"\nstored {a['stored']:,d} B vs gzip'd blobs {a['gz']:,d} B: {a['stored'] / a['gz']:.3f}")


def test_reimport_same_image(size_run: dict[str, Any]) -> None:
    again = size_run["again"]
    assert again["result"].layers_new == 0 and again["result"].layers_known == len(size_run["a"]["layers"])
    print(f"\nre-import added {again['delta']:,d} B ({again['pct']:.4f} %)")


def test_import_image_sharing_layers(size_run: dict[str, Any]) -> None:
    b = size_run["b"]
    assert b["result"].layers_new == 1 and b["known"] == len(size_run["a"]["layers"]) - 1
    print(f"\nimage-b added {b['delta']:,d} B ({b['pct']:.4f} %); its own layer is {b['own_gz']:,d} B gzip")
