"""``layerfs logs CONTAINER``: what a detached container wrote to stdout and stderr."""

from __future__ import annotations

import argparse
import shutil
import sys

from layerfs.cli.common import with_store
from layerfs.cli.containers import errors
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("logs", help="output of a container started in the background")
    p.add_argument("container", help="name or id")
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    from layerfs.containers.model import find

    with errors():
        c = find(store, args.container)
        try:
            f = open(c.log, "rb")
        except FileNotFoundError:
            return 0
        with f:
            shutil.copyfileobj(f, sys.stdout.buffer)
    return 0
