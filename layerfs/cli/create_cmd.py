"""``layerfs create IMAGE [CMD...]``: a container, ready for ``start``."""

from __future__ import annotations

import argparse
import sys

from layerfs.cli.common import with_store
from layerfs.cli.containers import EXIT_SETUP, add_process_options, errors, process_options
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("create", help="create a container from an image (start runs it)")
    add_process_options(p)
    p.add_argument("image", help="NAME[:TAG] or image id")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (default: the image's)")
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    from layerfs.containers import lifecycle

    with errors(EXIT_SETUP):
        c = lifecycle.create(store, args.image, process_options(args), args.name)
        for warning in lifecycle.warnings(store, c):  # as docker: said, and created anyway
            print(f"WARNING: {warning}", file=sys.stderr)
    print(c.id)
    return 0
