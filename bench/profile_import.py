"""Profile one import of the generated benchmark image into a fresh store.

    python bench/profile_import.py [--sort cumtime] [--top 25] [--image a|b] [--out FILE.prof]

cProfile sees the importing (main) thread only; the zstd pool threads show up as the main
thread waiting in ``Future.result``.  For a whole-process view use py-spy::

    py-spy record --threads --format speedscope -o import.json -- python bench/profile_import.py --no-profile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from imagegen import ImageParams, ensure_image  # noqa: E402

from layerfs.store import Store  # noqa: E402
from layerfs.tar import reader as tar_reader  # noqa: E402
from layerfs.tools.image import import_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sort", default="cumtime")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--image", choices=("a", "b"), default="a")
    ap.add_argument("--out", help="also write the raw profile here")
    ap.add_argument("--no-profile", action="store_true", help="just import (for py-spy)")
    ap.add_argument("--scale", type=float, default=float(os.environ.get("LAYERFS_BENCH_SCALE", "1")))
    args = ap.parse_args(argv)
    cache = os.environ.get("LAYERFS_BENCH_CACHE") or os.path.join(
        tempfile.gettempdir(), "layerfs-bench-cache"
    )
    img = ensure_image(cache, ImageParams().scaled(args.scale))
    layout = img.layout_a if args.image == "a" else img.layout_b
    work = tempfile.mkdtemp(prefix="layerfs-profile-")
    try:
        store = Store(os.path.join(work, "store"))
        prof = None if args.no_profile else cProfile.Profile()
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        import_path(store, layout)
        if prof is not None:
            prof.disable()
        wall = time.perf_counter() - t
        store.close()
        print(f"import of {layout}: {wall:.3f} s wall ({tar_reader.BACKEND} tar parser)", file=sys.stderr)
        if prof is not None:
            if args.out:
                prof.dump_stats(args.out)
            pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
