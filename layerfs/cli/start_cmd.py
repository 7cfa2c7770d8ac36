"""``layerfs start CONTAINER...``: run stopped containers again, with their changes."""

from __future__ import annotations

import argparse
import os
import sys

from layerfs.cli.common import with_store
from layerfs.cli.containers import each_container, errors
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("start", help="start one or more stopped containers")
    p.add_argument(
        "-a", "--attach", action="store_true", help="run in the foreground: output and exit code are ours"
    )
    p.add_argument("containers", nargs="+", metavar="CONTAINER", help="name or id")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.containers import lifecycle

    if not args.attach:
        return each_container(args, lifecycle.start)
    return _start_attached(args)


@with_store
def _start_attached(args: argparse.Namespace, store: Store) -> int:
    from layerfs.containers import ContainerError, lifecycle
    from layerfs.containers.model import find

    with errors():
        if len(args.containers) != 1:
            raise ContainerError("start -a takes one container")
        sys.stdout.flush()
        return lifecycle.execute(
            store, find(store, args.containers[0]), stdin=os.open(os.devnull, os.O_RDONLY)
        )
