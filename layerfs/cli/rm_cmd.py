"""``layerfs rm CONTAINER...``: remove containers and their changes."""

from __future__ import annotations

import argparse

from layerfs.cli.containers import each_container


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rm", help="remove containers")
    p.add_argument("-f", "--force", action="store_true", help="stop (kill) a running container first")
    p.add_argument("containers", nargs="+", metavar="CONTAINER", help="name or id")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.containers.lifecycle import remove

    return each_container(args, lambda store, c: remove(store, c, force=args.force))
