"""``layerfs inspect IMAGE...``: the image as JSON, shaped like ``docker image inspect``."""

from __future__ import annotations

import argparse

from layerfs.cli.common import print_json, resolve_image, with_store
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("inspect", help="show image details as JSON")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    from layerfs.images import inspect

    print_json([inspect(store, resolve_image(store, ref)) for ref in args.images])
    return 0
