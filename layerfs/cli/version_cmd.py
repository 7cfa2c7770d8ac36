"""``layerfs version``: versions of layerfs, its tar parser backend, FUSE core and libraries."""

from __future__ import annotations

import argparse
import platform

from layerfs import __version__
from layerfs.cli.common import add_json, print_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("version", help="show version and the loaded tar parser backend")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import lmdb
    import zstandard

    from layerfs.fuse import core
    from layerfs.tar.reader import BACKEND

    info = {
        "version": __version__,
        "tar_parser": BACKEND,
        "fuse_core": core(),
        "python": platform.python_version(),
        "lmdb": lmdb.version(),
        "zstandard": zstandard.__version__,
        "machine": platform.machine(),
    }
    if args.json:
        print_json(info)
    else:
        print(
            f"layerfs {__version__} (tar parser: {BACKEND}; fuse core: {info['fuse_core']}; python {info['python']}; "
            f"lmdb {'.'.join(map(str, info['lmdb']))}; zstd {info['zstandard']}; {info['machine']})"
        )
    return 0
