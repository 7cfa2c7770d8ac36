"""``layerfs rm CONTAINER...``: remove containers and their changes."""

from __future__ import annotations

import argparse

from layerfs.cli.common import open_store
from layerfs.cli.containers import errors


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rm", help="remove containers")
    p.add_argument("-f", "--force", action="store_true", help="stop (kill) a running container first")
    p.add_argument("containers", nargs="+", metavar="CONTAINER", help="name or id")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.tools import container as C

    with open_store(args) as store, errors():
        for ref in args.containers:
            C.remove(store, C.find(store, ref), force=args.force)
            print(ref)
    return 0
