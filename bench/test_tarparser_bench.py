"""Tar parser throughput: the C extension against its pure-Python twin on the same bytes.

The input is one of the generated image's layers, decompressed into memory before timing.
Each round creates a parser over ``io.BytesIO(data).read`` and iterates every event,
taking the length of every data piece (the parser itself hashes each file's data, as it
does on import).  The C rows are skipped when ``layerfs._ctar`` is not built.

Both parsers compute the SHA-256 of every file's data and hand it out as 64 KiB ``bytes``
pieces; the ``sha256`` row does only that (cut the stream into 64 KiB pieces, hash them):
a floor no parser can go below, which bounds the C/Python ratio on data-heavy layers.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest
from benchlib import timing
from imagegen import GeneratedImage

from layerfs.store import CHUNK_SIZE
from layerfs.tar._pyreader import EV_DATA

LAYERS = ("base", "python")  # base: large binaries and libraries; python: small sources
ROUNDS = {"c": 5, "python": 3, "sha256": 5}


@pytest.fixture(scope="module")
def raw_layers(bench_image: GeneratedImage) -> dict[str, bytes]:
    return {name: bench_image.raw_layer(name) for name in LAYERS}


def _parser_class(impl: str) -> Any:
    if impl == "python":
        from layerfs.tar._pyreader import TarParser

        return TarParser
    try:
        from layerfs._ctar import TarParser  # type: ignore[import-not-found]
    except ImportError as exc:
        return exc
    return TarParser


def hash_only(data: bytes) -> tuple[int, int]:
    """Cut the stream into 64 KiB bytes pieces and hash them: what every parser must do."""
    h = hashlib.sha256()
    for i in range(0, len(data), CHUNK_SIZE):
        h.update(data[i : i + CHUNK_SIZE])
    return 0, len(data)


def consume(parser_class: Any, data: bytes) -> tuple[int, int]:
    events = nbytes = 0
    for ev, val in parser_class(io.BytesIO(data).read, CHUNK_SIZE):
        events += 1
        if ev == EV_DATA:
            nbytes += len(val)
    return events, nbytes


@pytest.mark.parametrize("impl", ["c", "python", "sha256"])
@pytest.mark.parametrize("layer", LAYERS)
def test_tar_parser(
    benchmark: Any, layer: str, impl: str, raw_layers: dict[str, bytes], bench_results: dict
) -> None:
    data = raw_layers[layer]
    benchmark.group = f"tar parser: {layer} layer"
    if impl == "sha256":
        benchmark.pedantic(hash_only, args=(data,), rounds=ROUNDS[impl], warmup_rounds=1)
        bench_results["parser"][(layer, impl)] = {
            "timing": timing(benchmark),
            "events": 0,
            "bytes": len(data),
        }
        return
    cls = _parser_class(impl)
    if isinstance(cls, ImportError):
        bench_results["parser"][(layer, impl)] = {"skipped": f"layerfs._ctar is not built ({cls})"}
        pytest.skip(f"C tar parser not available: import layerfs._ctar failed: {cls}")
    events, _ = benchmark.pedantic(consume, args=(cls, data), rounds=ROUNDS[impl], warmup_rounds=1)
    t = timing(benchmark)
    entry = {"timing": t, "events": events, "bytes": len(data)}
    bench_results["parser"][(layer, impl)] = entry
    if t is not None:
        benchmark.extra_info["MB_per_s"] = round(len(data) / t["min"] / 1e6, 1)
        benchmark.extra_info["events_per_s"] = round(events / t["min"])
    other = bench_results["parser"].get((layer, "python" if impl == "c" else "c"))
    if t is not None and other and other.get("timing"):
        c_t, py_t = (t, other["timing"]) if impl == "c" else (other["timing"], t)
        ratio = round(py_t["min"] / c_t["min"], 2)
        benchmark.extra_info["c_over_python_speed"] = ratio
        other_extra = other.get("extra_info")
        if other_extra is not None:
            other_extra["c_over_python_speed"] = ratio
    entry["extra_info"] = benchmark.extra_info
