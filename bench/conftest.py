"""Shared fixtures of the benchmark suites and the end-of-session summary of ratios.

Run: ``python -m pytest bench -q --benchmark-enable`` (the project's pytest config disables
benchmarks by default).  Every figure is compared with a peer measured in the same run;
nothing asserts an absolute time or a target.  The summary at the end of the terminal output
lists the times, the ratios and whether the project's targets are met.

Environment:

* ``LAYERFS_BENCH_CACHE``: where generated images are kept (default
  ``$TMPDIR/layerfs-bench-cache``; keyed by the generator parameters);
* ``LAYERFS_BENCH_SCALE``: shrink the image for a quick try (``0.2``); the targets are
  only meaningful at the default ``1``;
* ``LAYERFS_BENCH_WORKDIR``: where stores, bundles and extracted trees are written
  (default: pytest's tmp dir, i.e. the disk; ``/dev/shm`` takes the disk out of it).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (  # noqa: E402
    RESULTS,
    TARGET_C_VS_PYTHON,
    TARGET_IMPORT_VS_UMOCI,
    TARGET_REIMPORT,
    TARGET_STORE_VS_GZIP,
)
from imagegen import GeneratedImage, ImageParams, ensure_image  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RESULTS] = {"image": None, "import": {}, "size": {}, "parser": {}}


@pytest.fixture(scope="session")
def bench_results(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.config.stash[RESULTS]


@pytest.fixture(scope="session")
def bench_image(bench_results: dict[str, Any]) -> GeneratedImage:
    """The generated image layouts (generated once per parameter set, then cached)."""
    scale = float(os.environ.get("LAYERFS_BENCH_SCALE", "1"))
    cache = os.environ.get("LAYERFS_BENCH_CACHE") or os.path.join(
        tempfile.gettempdir(), "layerfs-bench-cache"
    )
    img = ensure_image(cache, ImageParams().scaled(scale))
    bench_results["image"] = img
    bench_results["scale"] = scale
    return img


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Scratch space for stores, bundles and extracted trees; removed at the end."""
    base = os.environ.get("LAYERFS_BENCH_WORKDIR")
    path = (
        tempfile.mkdtemp(prefix="layerfs-bench-", dir=base) if base else str(tmp_path_factory.mktemp("work"))
    )
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- summary --------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    res = config.stash.get(RESULTS, None)
    if not res or res["image"] is None:
        return
    tr = terminalreporter
    img: GeneratedImage = res["image"]
    tr.write_sep("=", "layerfs bench summary (ratios against peers measured in this run)")
    tr.write_line(f"image: {img.describe()}")
    tr.write_line(f"       cached at {img.root}")
    if res.get("scale", 1) != 1:
        tr.write_line(f"       LAYERFS_BENCH_SCALE={res['scale']}: targets are only meaningful at scale 1")

    imp = res["import"]
    if imp:
        tr.write_line("")
        tr.write_line(
            "import of image-a into a fresh store / bundle / directory (wall seconds, best [median])"
        )
    tar_bytes = sum(layer["tar_bytes"] for layer in img.layers())
    for key, label in (
        ("layerfs", "layerfs import_path"),
        ("umoci", "umoci unpack"),
        ("tar", "tar -xzf per layer (no wh.)"),
    ):
        r = imp.get(key)
        if r is None:
            continue
        t = r["timing"]
        if t is None:
            tr.write_line(f"  {label:<28} ran once; timings disabled (pass --benchmark-enable)")
            continue
        extra = f"  ({r['note']})" if r.get("note") else ""
        tr.write_line(
            f"  {label:<28} {t['min']:7.3f} s [{t['median']:.3f}]  {tar_bytes / t['min'] / 1e6:7.1f} MB/s{extra}"
        )
    ratios = res.get("import_ratios", {})
    lf_extra = imp["layerfs"]["extra_info"] if "layerfs" in imp else {}
    if "umoci" in ratios:
        r = ratios["umoci"]
        tr.write_line(
            f"  layerfs / umoci = {r:.2f} best, {lf_extra.get('layerfs_over_umoci_median', 0):.2f} median  "
            f"(target <= {TARGET_IMPORT_VS_UMOCI}: {_verdict(r <= TARGET_IMPORT_VS_UMOCI)})"
        )
    if "tar" in ratios:
        tr.write_line(
            f"  layerfs / tar   = {ratios['tar']:.2f} best, {lf_extra.get('layerfs_over_tar_median', 0):.2f} median"
            "  (no target)"
        )

    size = res["size"]
    if size:
        tr.write_line("")
        tr.write_line("store size (one fresh store: image-a, image-a again, then image-b)")
        a = size["a"]
        tr.write_line(
            f"  gzip'd layer blobs of image-a {_mb(a['gz']):>10}; uncompressed tar {_mb(a['tar'])}, "
            f"file data {_mb(a['logical'])}, unique file data {_mb(a['unique'])}"
        )
        ratio = a["stored"] / a["gz"]
        tr.write_line(
            f"  usage()['stored_bytes']        {_mb(a['stored']):>10} = {ratio:.3f} x gzip  "
            f"(target <= {TARGET_STORE_VS_GZIP}: {_verdict(ratio <= TARGET_STORE_VS_GZIP)})"
        )
        tr.write_line(
            f"    payload {_mb(a['payload'])} + metadata {_mb(a['metadata'])}; data.mdb on disk "
            f"{_mb(a['file'])} = {a['file'] / a['gz']:.3f} x gzip"
        )
        if "again" in size:
            g = size["again"]
            tr.write_line(
                f"  import image-a again           {g['delta']:+11,d} B = {g['pct']:.4f} % of stored  "
                f"(target < {TARGET_REIMPORT:.0%}: {_verdict(g['pct'] < TARGET_REIMPORT * 100)})"
            )
        if "b" in size:
            b = size["b"]
            tr.write_line(
                f"  import image-b (shares {b['known']} layers, 1 new layer of {b['own_gz']:,d} B gzip)"
                f" {b['delta']:+,d} B = {b['pct']:.4f} % of stored "
                f"(target < {TARGET_REIMPORT:.0%}: {_verdict(b['pct'] < TARGET_REIMPORT * 100)})"
            )

    parser = res["parser"]
    if parser:
        tr.write_line("")
        tr.write_line("tar parser, in-memory uncompressed layer, all events iterated (best of rounds)")
        for layer in sorted({k[0] for k in parser}):
            for impl in ("c", "python", "sha256"):
                r = parser.get((layer, impl))
                if r is None:
                    continue
                if r.get("skipped"):
                    tr.write_line(f"  {layer:<7} {impl:<6} skipped: {r['skipped']}")
                    continue
                t = r["timing"]
                if t is None:
                    tr.write_line(
                        f"  {layer:<7} {impl:<6} ran once; timings disabled (pass --benchmark-enable)"
                    )
                    continue
                if impl == "sha256":
                    tr.write_line(
                        f"  {layer:<7} {impl:<6} {t['min']:7.3f} s  {r['bytes'] / t['min'] / 1e6:8.1f} MB/s  "
                        "(hashing alone: the floor for both parsers)"
                    )
                    continue
                tr.write_line(
                    f"  {layer:<7} {impl:<6} {t['min']:7.3f} s  {r['bytes'] / t['min'] / 1e6:8.1f} MB/s  "
                    f"{r['events'] / t['min']:12,.0f} events/s  ({_mb(r['bytes'])}, {r['events']:,d} events)"
                )
            c, py = parser.get((layer, "c")), parser.get((layer, "python"))
            if c and py and c.get("timing") and py.get("timing"):
                ratio = py["timing"]["min"] / c["timing"]["min"]
                tr.write_line(
                    f"  {layer:<7} C / Python speed = {ratio:.2f} x  "
                    f"(target >= {TARGET_C_VS_PYTHON:g} x: {_verdict(ratio >= TARGET_C_VS_PYTHON)})"
                )
                floor = parser.get((layer, "sha256"))
                if floor and floor.get("timing"):
                    f = floor["timing"]["min"]
                    c_over, py_over = c["timing"]["min"] - f, py["timing"]["min"] - f
                    best = py["timing"]["min"] / f
                    tr.write_line(
                        f"  {layer:<7} beyond hashing: C {c_over * 1e3:.1f} ms, Python {py_over * 1e3:.1f} ms"
                        + (f" ({py_over / c_over:.1f} x)" if c_over > 0 else "")
                        + f"; a parser that only hashed would be {best:.2f} x Python"
                    )
