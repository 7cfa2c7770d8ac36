"""Helpers shared by the benchmark modules and ``conftest.py`` (targets, results, timings)."""

from __future__ import annotations

from typing import Any

import pytest

# The project's targets: reported in the summary, never asserted.
TARGET_IMPORT_VS_UMOCI = 0.5  # layerfs import wall <= 0.5 x umoci unpack
TARGET_STORE_VS_GZIP = 0.8  # stored bytes <= 0.8 x the gzip'd layer blobs
TARGET_REIMPORT = 0.01  # importing again adds < 1 %
TARGET_C_VS_PYTHON = 5.0  # C tar parser >= 5 x the pure-Python twin

# Where the tests leave their figures for the end-of-session summary.
RESULTS = pytest.StashKey[dict]()


def timing(benchmark: Any) -> dict[str, float] | None:
    """min/median/mean seconds of a finished benchmark; None when benchmarks are disabled."""
    if getattr(benchmark, "disabled", False) or not benchmark.stats:
        return None
    s = benchmark.stats.stats
    return {"min": s.min, "median": s.median, "mean": s.mean, "rounds": s.rounds}
