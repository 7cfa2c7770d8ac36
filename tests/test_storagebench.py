"""``layerfs bench`` for real: real mounts of the kernel overlay, fuse-overlayfs and both
layerfs cores, real fio (where installed), dropped caches; at a tiny scale
(``LAYERFS_STORAGEBENCH_SCALE``) so a whole ``--quick`` run takes seconds.

The runs need root (the bench refuses anyone else: that is tested too, as ``nobody``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from unionutil import fuse_unavailable, no_mount_left_behind  # noqa: F401 - a fixture

from layerfs.storagebench.run import SCHEMA

TINY = "0.05"  # of --quick: about 100 small files, 1.6 MiB large file


def _bench(
    *args: str, env: dict[str, str] | None = None, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "layerfs", "bench", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    e = dict(os.environ, LAYERFS_STORAGEBENCH_SCALE=TINY)
    e.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)


def _need_root_and_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("layerfs bench needs root")
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    for tool in ("tar", "chroot"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not any(os.path.exists(p) for p in ("/bin/busybox", "/usr/bin/busybox")):
        pytest.skip("busybox-static is not installed (the sample image needs it)")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One ``--quick --json`` run on a directory of the disk; its report, files and output."""
    _need_root_and_fuse()
    base = tmp_path_factory.mktemp("bench")
    disk = base / "disk"
    disk.mkdir()
    out = base / "report.json"
    res = _bench("--dir", str(disk), "--quick", "--json", "-o", str(out))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    yield {"report": report, "path": str(out), "dir": str(disk), "stderr": res.stderr}


def _finite_positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and v > 0 and math.isfinite(v)


def test_quick_run_measures_every_workload_on_every_system(quick_run: dict[str, Any]) -> None:
    report = quick_run["report"]
    assert report["schema"] == SCHEMA
    assert report["mode"] == "quick" and report["rounds"] == 1
    assert "drop_caches" in report["cold"]
    with open(quick_run["path"]) as f:
        assert json.load(f) == report  # --json printed what the file holds
    systems = ["native", "overlay", "fuse-overlayfs", "layerfs", "layerfs-py"]
    assert report["order"]["systems"] == systems and set(report["systems"]) == set(systems)
    workloads = report["order"]["workloads"]
    assert set(workloads) == {
        "import",
        "ready",
        "walk",
        "read-small",
        "read-large",
        "start",
        "install",
        "copy-up",
        "rand-read",
        "seq-write",
        "rand-write",
    }
    fio = shutil.which("fio") is not None
    fuse_overlayfs = shutil.which("fuse-overlayfs") is not None
    for w in workloads:
        assert report["workloads"][w]["unit"] in ("s", "MB/s")
        for s in systems:
            cell = report["results"][w][s]
            assert "failed" not in cell, (w, s, cell)
            if w == "ready" and s == "native":
                assert cell["skipped"] == "nothing to mount: the directory is there"
            elif (not fio and report["workloads"][w]["label"].endswith("(fio)")) or (
                s == "fuse-overlayfs" and not fuse_overlayfs
            ):
                assert cell["skipped"]
            else:
                assert len(cell["values"]) == 1, (w, s, cell)
                assert all(_finite_positive(v) for v in cell["values"]), (w, s, cell)
                assert cell["value"] == cell["values"][0]
    # every mount showed the tree the image has (the walk checks the count against native's)
    entries = report["image"]["entries"]
    assert entries > report["image"]["small_files"]
    for s in systems:
        assert report["results"]["walk"][s]["extra"][0]["entries"] == entries
    assert report["image"]["start_command"] == "/app/run.sh"  # the sample image's program
    # the fuse-overlayfs import is the overlay's: the same layer directories
    assert report["results"]["import"]["fuse-overlayfs"]["extra"][0] == {"shared_with": "overlay"}
    assert "first_mount_s" in report["results"]["import"]["layerfs"]["extra"][0]


def test_report_describes_the_machine_and_the_disk(quick_run: dict[str, Any]) -> None:
    report = quick_run["report"]
    m = report["machine"]
    assert m["board"]  # "unknown" where there is no device tree
    if not any(os.path.exists(p) for p in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model")):
        assert m["board"] == "unknown"
    assert m["cpu"]["model"] and m["cpu"]["count"] >= 1 and m["cpu"]["governor"]
    assert m["memory"]["total_bytes"] > 0
    assert m["kernel"].startswith("Linux ")
    assert m["python"]["arch"] == os.uname().machine
    d = report["disk"]
    assert d["path"] == os.path.realpath(quick_run["dir"])
    st = os.stat(quick_run["dir"])
    assert d["fstype"] and d["device"] and d["mount_options"]
    assert d["free_bytes"] > 0
    assert isinstance(d["block"], (dict, str))
    if isinstance(d["block"], dict):
        assert d["block"]["rotational"] in (True, False, "unknown")
    assert st.st_dev  # (the directory is still there; the bench's work directory is gone)
    assert os.listdir(quick_run["dir"]) == []
    thr = report["throttling"]
    assert thr == "not available" or set(thr) >= {"source", "before", "after", "seen_during_run", "ok"}
    assert report["layerfs"]["version"] and report["tools"]["tar"]


def test_html_page_embeds_the_charts(quick_run: dict[str, Any]) -> None:
    pytest.importorskip("matplotlib")
    stem = quick_run["path"][: -len(".json")]
    with open(stem + ".html") as f:
        page = f.read()
    assert page.count("<svg") == 1  # one figure: against native and against the kernel overlay
    assert "against the directory itself (native)" in page and "against the kernel overlay" in page
    for w in quick_run["report"]["workloads"].values():
        assert w["label"] in page  # the figures' table
    with open(stem + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert stem + ".html" in quick_run["stderr"]


def test_compare_two_runs(quick_run: dict[str, Any], tmp_path: Any) -> None:
    a = quick_run["path"]
    with open(a) as f:
        report = json.load(f)
    for w, info in report["workloads"].items():  # B: every figure half as good
        factor = 0.5 if info["unit"] == "MB/s" else 2
        for cell in report["results"][w].values():
            if "values" in cell:
                cell["values"] = [v * factor for v in cell["values"]]
                cell["value"] *= factor
    b = str(tmp_path / "b.json")
    with open(b, "w") as f:
        json.dump(report, f)
    html = str(tmp_path / "cmp.html")
    res = _bench("--compare", a, b, "-o", html)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if "layerfs" in line and "cold walk" in line]
    assert lines and all(line.split()[-1] == "2.00" for line in lines), res.stdout
    assert os.path.exists(html)
    res = _bench("--compare", a, b, "--json", "-o", html)
    rows = json.loads(res.stdout)["rows"]
    measured = [r for r in rows if r["a"] is not None]
    assert measured and all(abs(r["b_slowdown"] - 2) < 1e-9 for r in measured)
    # not a report: one line, exit 1
    res = _bench("--compare", a, html)
    assert res.returncode == 1 and res.stderr.startswith("layerfs: ") and res.stderr.count("\n") == 1


def test_refused_without_root(tmp_path: Any) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to become nobody")
    os.chmod(tmp_path, 0o777)
    res = _bench("--dir", str(tmp_path), "--quick", user="nobody")
    assert res.returncode == 4, res.stderr
    assert res.stderr.startswith("layerfs: bench needs root:") and res.stderr.count("\n") == 1
    assert res.stdout == ""
    assert os.listdir(tmp_path) == []


def test_missing_peer_is_skipped_with_its_reason(tmp_path: Any) -> None:
    _need_root_and_fuse()
    out = tmp_path / "r.json"
    env = {
        "LAYERFS_STORAGEBENCH_FUSE_OVERLAYFS": "/nonexistent/fuse-overlayfs",
        "LAYERFS_STORAGEBENCH_SYSTEMS": "native,fuse-overlayfs",
    }
    res = _bench("--dir", str(tmp_path), "--quick", "-o", str(out), env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    reason = report["systems"]["fuse-overlayfs"]["skipped"]
    assert reason == "/nonexistent/fuse-overlayfs is not installed (Debian: apt install fuse-overlayfs)"
    for w in report["workloads"]:
        assert report["results"][w]["fuse-overlayfs"] == {"skipped": reason}
        assert "values" in report["results"][w]["native"] or w == "ready"
    assert f"fuse-overlayfs: skipped: {reason}" in res.stdout  # the text table says why


def test_image_option_takes_an_oci_layout(tmp_path: Any, sample_layout: str) -> None:
    _need_root_and_fuse()
    out = tmp_path / "r.json"
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {"LAYERFS_STORAGEBENCH_SYSTEMS": "native,layerfs"}
    res = _bench("--dir", str(disk), "--quick", "--image", sample_layout, "-o", str(out), env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["image"]["base"] == sample_layout
    assert report["image"]["layers"] == 5  # the sample's three and the bench's two
    assert report["image"]["start_command"] == "/app/run.sh"
    for w in report["workloads"]:
        assert "failed" not in report["results"][w]["layerfs"], report["results"][w]


def test_image_option_takes_a_stored_image(tmp_path: Any, sample_layout: str) -> None:
    _need_root_and_fuse()
    store = str(tmp_path / "store")
    res = subprocess.run(
        [sys.executable, "-m", "layerfs", "--store", store, "import", "-q", sample_layout],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    out = tmp_path / "r.json"
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "layerfs",
        "--store",
        store,
        "bench",
        "--dir",
        str(disk),
        "--quick",
        "-o",
        str(out),
    ]
    env = dict(os.environ, LAYERFS_STORAGEBENCH_SCALE=TINY, LAYERFS_STORAGEBENCH_SYSTEMS="native")
    res = subprocess.run([*cmd, "--image", "layerfs-sample"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["image"]["base"] == "layerfs-sample" and report["image"]["layers"] == 5
    assert report["results"]["start"]["native"]["values"]
    res = subprocess.run([*cmd, "--image", "no-such-image"], capture_output=True, text=True, env=env)
    assert res.returncode == 1
    assert res.stderr == "layerfs: cannot use image no-such-image: no such image: no-such-image\n"
    assert os.listdir(disk) == []  # nothing left behind


def test_start_of_a_program_that_never_ends_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    from layerfs.storagebench import workloads
    from layerfs.storagebench.image import BenchError

    monkeypatch.setattr(workloads, "START_TIMEOUT", 0.5)
    with pytest.raises(BenchError, match="still running after 0.5 s: killed"):
        workloads.first_output("/", ["sleep", "30"])
    first, done = workloads.first_output("/", ["sh", "-c", "echo ready; sleep 0.2"])
    assert 0 < first < done and done >= 0.2
    with pytest.raises(BenchError, match="exit 3"):
        workloads.first_output("/", ["sh", "-c", "echo x; exit 3"])
