"""``layerfs import PATH``: load images from an OCI layout, OCI archive or docker save archive."""

from __future__ import annotations

import argparse
import sys

from layerfs.cli.common import EXIT_USAGE, add_json, failures, print_json, with_store
from layerfs.store import Store, StoreError
from layerfs.tools.refs import RefError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("import", help="import images from an OCI layout, OCI archive or docker save archive")
    p.add_argument("path", help="OCI image layout directory, OCI archive, or docker save archive")
    p.add_argument("--platform", help="platform to pick from a multi-platform image, e.g. linux/arm64")
    p.add_argument("-t", "--tag", help="name the imported image NAME[:TAG]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.tools.sources import PlatformError, normalize_platform

    with failures(PlatformError, code=EXIT_USAGE):
        platform = None if args.platform is None else normalize_platform(args.platform)
    return _import(args, platform)


@with_store
def _import(args: argparse.Namespace, store: Store, platform: str | None) -> int:
    # imported here: the importer's dependencies (tar parser, inflate, zstd) would otherwise
    # load for every command, and be inherited by every mount daemon
    from layerfs.tools.image import ImportError_, import_path

    with failures(ImportError_, RefError, StoreError, OSError, prefix=f"import of {args.path} refused: "):
        results = import_path(
            store, args.path, platform=platform, tag=args.tag, progress=not (args.quiet or args.json)
        )
    if args.json:
        print_json([r.__dict__ for r in results])
        return 0
    for r in results:
        for name in r.names:
            print(f"Loaded image: {name}")
        if not r.names:
            print(f"Loaded image ID: {r.image_id}")
        print(
            f"  {r.layers_new} new layers, {r.layers_known} already stored, "
            f"{r.bytes_read} bytes read, {r.bytes_stored} bytes stored",
            file=sys.stderr,
        )
    return 0
