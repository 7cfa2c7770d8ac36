"""The bench report without a run: ratios, the text table, comparisons, the HTML page with
and without matplotlib, what the machine description reads, the sizes of the modes."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pytest

from layerfs.storagebench import image, machine, report
from layerfs.storagebench.run import SCHEMA


def _report(**values: dict[str, float]) -> dict[str, Any]:
    """A minimal report: ``walk`` in seconds, ``read`` in MB/s, for the systems given."""
    systems = ["native", "overlay", "layerfs"]
    return {
        "schema": SCHEMA,
        "created": "2026-11-30T00:00:00+00:00",
        "elapsed_s": 1.0,
        "mode": "quick",
        "scale": 1,
        "rounds": 1,
        "cold": "drop_caches",
        "layerfs": {"version": "0", "tar_parser": "c"},
        "tools": {"fio": "fio-3.33", "tar": "tar 1.34"},
        "machine": machine.describe_machine(),
        "disk": machine.describe_disk("/"),
        "throttling": "not available",
        "temperature_c": {"before": None, "after": None},
        "image": {"base": "sample"},
        "systems": {s: {"label": s} for s in systems},
        "workloads": {
            "walk": {"label": "cold walk", "unit": "s", "better": "lower"},
            "read": {"label": "cold read", "unit": "MB/s", "better": "higher"},
        },
        "results": {w: {s: {"values": [v], "value": v} for s, v in per.items()} for w, per in values.items()},
        "order": {"workloads": ["walk", "read"], "systems": systems},
    }


REPORT = _report(
    walk={"native": 1.0, "overlay": 2.0, "layerfs": 4.0},
    read={"native": 100.0, "overlay": 50.0, "layerfs": 200.0},
)


def test_slowdown_reads_both_units_as_times_slower() -> None:
    assert report.slowdown(REPORT, "walk", "layerfs", "native") == 4.0
    assert report.slowdown(REPORT, "walk", "layerfs", "overlay") == 2.0
    assert report.slowdown(REPORT, "read", "overlay", "native") == 2.0  # half the MB/s
    assert report.slowdown(REPORT, "read", "layerfs", "native") == 0.5  # twice the MB/s: faster
    r = copy.deepcopy(REPORT)
    r["results"]["walk"]["layerfs"] = {"skipped": "why"}
    r["results"]["walk"]["overlay"] = {"values": [float("nan")], "value": float("nan")}
    assert report.slowdown(r, "walk", "layerfs", "native") is None
    assert report.slowdown(r, "walk", "overlay", "native") is None


def test_text_table_has_figures_ratios_and_reasons() -> None:
    r = copy.deepcopy(REPORT)
    r["systems"]["overlay"]["skipped"] = "the kernel overlay filesystem cannot be mounted here: EPERM"
    r["results"]["walk"]["overlay"] = {"skipped": r["systems"]["overlay"]["skipped"]}
    r["results"]["read"]["layerfs"] = {"failed": "fio failed: boom"}
    out = report.text(r)
    assert "cold walk [s]" in out and "4.00 s" in out and "100 MB/s" in out
    assert "times slower than the directory itself (native)" in out
    assert "overlay: skipped: the kernel overlay filesystem cannot be mounted here: EPERM" in out
    assert "read on layerfs: failed: fio failed: boom" in out
    assert "FAILED" in out and "skipped" in out


def test_compare_rows_and_text() -> None:
    b = copy.deepcopy(REPORT)
    b["results"]["walk"]["layerfs"]["value"] = 8.0  # twice the time on B
    b["results"]["read"]["layerfs"]["value"] = 50.0  # a quarter of the speed
    rows = {(r["workload"], r["system"]): r for r in report.compare_rows(REPORT, b)}
    assert rows[("walk", "layerfs")]["b_slowdown"] == 2.0
    assert rows[("read", "layerfs")]["b_slowdown"] == 4.0
    assert rows[("walk", "native")]["b_slowdown"] == 1.0
    out = report.compare_text(REPORT, b, ("a.json", "b.json"))
    assert out.startswith("A = a.json: ") and "\nB = b.json: " in out
    assert any(line.split()[-1] == "4.00" for line in out.splitlines() if "cold read" in line)


def test_html_without_matplotlib_has_the_tables(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    page = str(tmp_path / "r.html")
    assert report.write_html(REPORT, page, png=str(tmp_path / "r.png")) is False
    text = open(page).read()
    assert "matplotlib is not installed" in text and "<svg" not in text
    assert "cold walk" in text and "4.00 s" in text
    assert not os.path.exists(tmp_path / "r.png")
    assert report.write_compare_html(REPORT, REPORT, ("a", "b"), str(tmp_path / "c.html")) is False


def test_html_with_matplotlib_embeds_svg(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    page, png = str(tmp_path / "r.html"), str(tmp_path / "r.png")
    assert report.write_html(REPORT, page, png=png) is True
    assert open(page).read().count("<svg") == 1
    assert open(png, "rb").read(4) == b"\x89PNG"
    assert report.write_compare_html(REPORT, REPORT, ("a", "b"), str(tmp_path / "c.html")) is True


def test_load_refuses_what_is_not_a_report(tmp_path: Any) -> None:
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"schema": "something/9"}))
    with pytest.raises(report.ReportError, match="x.json is not a layerfs bench report$"):
        report.load(str(p))
    p.write_text(json.dumps({"schema": "layerfs-bench/9"}))
    with pytest.raises(
        report.ReportError, match="schema layerfs-bench/9; this layerfs reads layerfs-bench/1"
    ):
        report.load(str(p))
    p.write_text("<html>")
    with pytest.raises(report.ReportError, match="is not JSON"):
        report.load(str(p))
    with pytest.raises(report.ReportError, match="cannot read"):
        report.load(str(tmp_path / "missing.json"))


def test_throttling_words() -> None:
    assert machine.decode_throttled(0x50005) == {
        "now": ["under-voltage", "throttled"],
        "since_boot": ["under-voltage", "throttled"],
    }
    assert machine.throttling_summary({"available": False}, {"available": False}, []) == "not available"
    before = {"available": True, "source": "vcgencmd get_throttled", "value": 0, "now": [], "since_boot": []}
    after = dict(before, value=0x10000, since_boot=["under-voltage"])
    summary = machine.throttling_summary(before, after, [])
    assert summary["seen_during_run"] == ["under-voltage"] and summary["ok"] is False
    assert machine.throttling_summary(before, before, [])["ok"] is True


def test_machine_and_disk_description(tmp_path: Any) -> None:
    m = machine.describe_machine()
    assert m["board"] == machine.board_model()
    assert m["cpu"]["count"] == os.cpu_count()
    d = machine.describe_disk(str(tmp_path))
    assert d["path"] == os.path.realpath(tmp_path)
    assert d["fstype"] != "unknown" and d["mountpoint"]


def test_modes_and_the_tiny_scale() -> None:
    assert image.sizes(True).rounds == 1 and image.sizes(False).rounds == 3
    assert image.sizes(True).big_size < image.sizes(False).big_size
    tiny = image.sizes(True, 0.001)
    assert tiny.small_files == 20 and tiny.big_size == 1 << 20 and tiny.copyup_files == 2


def test_cpu_model_of_arm_boards_and_x86() -> None:
    pi4 = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\nModel\t: Raspberry Pi 4 Model B Rev 1.4\n"
    assert machine.cpu_model(pi4) == "ARM Cortex-A72"
    assert machine.cpu_model("model name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert machine.cpu_model("") == "unknown"
