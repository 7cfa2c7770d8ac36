"""One bench run: the image built, the systems probed, every workload timed on every system
in rounds (systems interleaved within a round, so a disk's drift hits them alike), the
report assembled.  Needs root: it drops the page cache and mounts the kernel overlay.
Not thread-safe; one run at a time per directory.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from layerfs.storagebench import image as image_mod
from layerfs.storagebench import machine
from layerfs.storagebench.image import BenchError
from layerfs.storagebench.systems import SYSTEMS, Bed, probe, remove_work
from layerfs.storagebench.workloads import COLD, Context, Skip, Workload, walk_stat, workloads

SCHEMA = "layerfs-bench/1"
SCALE_ENV = "LAYERFS_STORAGEBENCH_SCALE"  # a hidden knob: even smaller than --quick (the tests)
SYSTEMS_ENV = "LAYERFS_STORAGEBENCH_SYSTEMS"  # a hidden knob: only these systems (the tests)


def needs_root() -> str | None:
    """Why this process cannot run the bench, or None."""
    if os.geteuid() != 0:
        return (
            "bench needs root: it drops the page cache between rounds "
            "(cold means cold) and mounts the kernel overlay; run it with sudo"
        )
    return None


@dataclass
class Options:
    directory: str
    quick: bool = False
    image: str | None = None  # --image: a stored image, or an OCI layout/archive path
    store: str | None = None  # the store --image names a stored image of
    progress: Callable[[str, int], None] = lambda desc, n: None  # (what now, steps done)


def plan_size(quick: bool) -> tuple[image_mod.Sizes, float]:
    scale = float(os.environ.get(SCALE_ENV) or 1)
    return image_mod.sizes(quick, scale), scale


def rounds_of(w: Workload, rounds: int) -> int:
    """Write workloads (and import) run at most 2 rounds: they are the slow ones on an SD card."""
    return min(rounds, 2) if w.writes else rounds


def total_steps(quick: bool) -> int:
    s, _ = plan_size(quick)
    n = len(chosen_systems())
    ctx = Context(s, None, None)  # only the list's shape is needed
    return 1 + sum(rounds_of(w, s.rounds) * n for w in workloads(ctx))


def chosen_systems() -> list[str]:
    only = [x for x in os.environ.get(SYSTEMS_ENV, "").split(",") if x]
    return [x for x in SYSTEMS if not only or x in only]


def _need_space(directory: str, s: image_mod.Sizes) -> None:
    data = s.small_files * (s.small_size + 1024) + s.big_size + s.copyup_files * s.copyup_size
    # the layout, the native tree, the layer directories, two stores, the uppers and fio's files
    need = 6 * data + s.fio_write_size + s.fio_rand_file + 64 * 1024 * 1024
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise BenchError(
            f"{directory} has {free / 1e9:.2f} GB free; this bench needs about {need / 1e9:.2f} GB"
        )


def bench(opts: Options) -> dict[str, Any]:
    directory = os.path.abspath(opts.directory)
    if not os.path.isdir(directory):
        raise BenchError(f"{opts.directory} is not a directory")
    sizes, scale = plan_size(opts.quick)
    _need_space(directory, sizes)
    started = time.time()
    t_start = time.perf_counter()
    throttle_before = machine.throttled()
    temp_before = machine.temperature()
    samples: list[dict[str, Any]] = []
    work = tempfile.mkdtemp(prefix=".layerfs-bench-", dir=directory)
    systems = chosen_systems()
    steps = 0
    results: dict[str, dict[str, Any]] = {}
    try:
        opts.progress("building the bench image", steps)
        img = image_mod.build(os.path.join(work, "image"), sizes, opts.image, opts.store)
        image_info = img.describe()
        steps += 1
        skipped = {x: probe(x, work) for x in systems}
        fio = shutil.which("fio")
        ctx = Context(sizes, img, fio)
        bed = Bed(work, img)
        try:
            wl = workloads(ctx)
            for w in wl:
                results[w.name] = {}
            failed_import: dict[str, str] = {}

            def cell(w: Workload, system: str) -> None:
                nonlocal steps
                opts.progress(f"{w.name} · {system}", steps)
                steps += 1
                res = results[w.name].setdefault(system, {})
                if "skipped" in res or "failed" in res:
                    return
                reason = skipped[system] or failed_import.get(system)
                if reason is None and w.needs_fio and fio is None:
                    reason = "fio is not installed (Debian: apt install fio)"
                if reason is None and w.name == "start" and not ctx.start_cmd:
                    reason = "the image has neither /app/run.sh nor /bin/sh to start"
                if reason:
                    res["skipped"] = reason
                    return
                t0 = time.perf_counter()
                try:
                    fig = w.measure(bed, system)
                except Skip as exc:
                    res["skipped"] = str(exc)
                    return
                except (BenchError, OSError) as exc:
                    res["failed"] = _one_line(exc)
                    if w.name == "import":
                        failed_import[system] = f"the import failed: {res['failed']}"
                    return
                finally:  # the whole piece: mounting, dropping caches, cleaning up
                    res["wall_s"] = round(res.get("wall_s", 0) + time.perf_counter() - t0, 3)
                res.setdefault("values", []).append(round(fig.value, 6))
                if fig.extra:
                    res.setdefault("extra", []).append(fig.extra)

            imp = wl[0]
            for _ in range(rounds_of(imp, sizes.rounds)):
                bed.shared_import = None
                for system in systems:
                    cell(imp, system)
            if bed.native is None:
                raise BenchError(
                    f"the image could not be extracted: {results['import']['native'].get('failed')}"
                )
            ctx.entries = walk_stat(bed.native)
            for cmd, probe_path in (
                (["/app/run.sh"], "app/run.sh"),
                (["/bin/sh", "-c", "echo ready"], "bin/sh"),
            ):
                if os.path.lexists(os.path.join(bed.native, probe_path)):
                    ctx.start_cmd = cmd
                    break
            for r in range(sizes.rounds):
                for w in wl[1:]:
                    if r >= rounds_of(w, sizes.rounds):
                        continue
                    for system in systems:
                        cell(w, system)
                    samples.append(machine.throttled())
        finally:
            bed.close()
    finally:
        remove_work(work)
    opts.progress("done", steps)
    for per_system in results.values():
        for res in per_system.values():
            if res.get("values"):
                res["value"] = statistics.median(res["values"])
    throttle_after = machine.throttled()
    return {
        "schema": SCHEMA,
        "created": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "mode": "quick" if opts.quick else "full",
        "scale": scale,
        "rounds": sizes.rounds,
        "cold": COLD,
        "layerfs": _layerfs_info(),
        "tools": {
            "fio": tool_version(["fio", "--version"]) or "not installed",
            "tar": tool_version(["tar", "--version"]),
        },
        "machine": machine.describe_machine(),
        "disk": machine.describe_disk(directory),
        "throttling": machine.throttling_summary(throttle_before, throttle_after, samples),
        "temperature_c": {"before": temp_before, "after": machine.temperature()},
        "image": dict(image_info, entries=ctx.entries, start_command=" ".join(ctx.start_cmd)),
        "sizes": image_mod.describe_sizes(sizes),
        "systems": {
            x: {
                "label": SYSTEMS[x],
                **({"skipped": skipped[x]} if skipped.get(x) else {}),
                **_version(x, fio),
            }
            for x in systems
        },
        "workloads": {
            w.name: {"label": w.label, "unit": w.unit, "better": "higher" if w.higher_is_better else "lower"}
            for w in wl
        },
        "results": results,
        "order": {"workloads": [w.name for w in wl], "systems": systems},
    }


def _one_line(exc: BaseException) -> str:
    from layerfs.mount import error_text

    return " ".join(error_text(exc).split())[:300]


def _layerfs_info() -> dict[str, Any]:
    from layerfs import __version__
    from layerfs.tar.reader import BACKEND

    return {"version": __version__, "tar_parser": BACKEND}


def _version(system: str, fio: str | None) -> dict[str, str]:
    from layerfs.storagebench.systems import fuse_overlayfs_program

    if system == "fuse-overlayfs":
        found = tool_version([fuse_overlayfs_program(), "--version"])
        return {"version": found} if found else {}
    return {}


def tool_version(cmd: list[str]) -> str | None:
    """The first line a program prints for its version, or None."""
    import subprocess

    if not shutil.which(cmd[0]):
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    line = (res.stdout or res.stderr).strip().splitlines()
    return line[0] if line else None
