"""``layerfs bench``: measure a disk: the directory itself, the kernel overlay, fuse-overlayfs
and layerfs (both FUSE cores) on it, in one run; ``--compare A.json B.json``: two runs."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime

from layerfs.cli.common import EXIT_NEEDS_ROOT, EXIT_USAGE, CLIError, add_json, failures, print_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench",
        help="benchmark the disk under a directory: native, kernel overlay, fuse-overlayfs, layerfs",
        description="Benchmark the storage under --dir: the directory itself, the kernel overlay, "
        "fuse-overlayfs and layerfs (C and pure-Python FUSE cores), cold (caches dropped), in one run. "
        "Writes a JSON report and an HTML page with charts.",
    )
    p.add_argument(
        "--dir", default=".", metavar="PATH", help="a directory on the disk to measure (default: .)"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one round (minutes on a Raspberry Pi)")
    p.add_argument(
        "--image",
        metavar="IMAGE",
        help="base the bench image on this image (a stored image, or an OCI layout/archive path) "
        "instead of the sample image",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="REPORT",
        help="the JSON report (default: layerfs-bench-HOST-TIME.json here); the HTML page and PNG chart "
        "go beside it; with --compare, the HTML page",
    )
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="put two reports side by side")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.storagebench.report import ReportError

    if args.compare:
        with failures(ReportError, OSError):
            return _compare(args)
    return _bench(args)


def _compare(args: argparse.Namespace) -> int:
    from layerfs.storagebench import report as rep

    a_path, b_path = args.compare
    a, b = rep.load(a_path), rep.load(b_path)
    if args.json:
        print_json({"a": a_path, "b": b_path, "rows": rep.compare_rows(a, b)})
    else:
        sys.stdout.write(rep.compare_text(a, b, (a_path, b_path)))
    out = args.output or "layerfs-bench-compare.html"
    if rep.write_compare_html(a, b, (a_path, b_path), out):
        print(f"layerfs bench: {out}", file=sys.stderr)
    else:
        print(f"layerfs bench: {out} (tables only: install matplotlib for charts)", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from layerfs.progress import step_bar
    from layerfs.storagebench import report as rep
    from layerfs.storagebench.image import BenchError
    from layerfs.storagebench.run import Options, bench, needs_root, total_steps

    why = needs_root()
    if why:
        raise CLIError(why, EXIT_NEEDS_ROOT)
    if not os.path.isdir(args.dir):
        raise CLIError(f"--dir {args.dir} is not a directory", EXIT_USAGE)
    out = args.output or f"layerfs-bench-{os.uname().nodename}-{datetime.now():%Y%m%d-%H%M%S}.json"
    stem = out[:-5] if out.endswith(".json") else out
    bar = step_bar(total_steps(args.quick), "layerfs bench", enabled=not args.json)

    def progress(desc: str, done: int) -> None:
        if bar is not None:
            bar.set_description_str(desc)
            bar.n = done
            bar.refresh()

    try:
        with failures(BenchError, OSError):
            report = bench(
                Options(args.dir, quick=args.quick, image=args.image, store=args.store, progress=progress)
            )
    finally:
        if bar is not None:
            bar.close()
    with failures(OSError):
        with open(out, "w") as f:
            import json

            json.dump(report, f, indent=2, sort_keys=True)
            f.write("\n")
        drawn = rep.write_html(report, stem + ".html", png=stem + ".png")
    if args.json:
        print_json(report)
    else:
        sys.stdout.write(rep.text(report))
    made = [out, stem + ".html"] + ([stem + ".png"] if drawn else [])
    note = "" if drawn else " (no charts: install matplotlib, pip install 'layerfs[bench]')"
    print(f"layerfs bench: {', '.join(made)}{note}", file=sys.stderr)
    return 0
