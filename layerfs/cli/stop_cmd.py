"""``layerfs stop CONTAINER...``: SIGTERM, then SIGKILL after a grace period."""

from __future__ import annotations

import argparse

from layerfs.cli.containers import each_container


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("stop", help="stop running containers")
    p.add_argument("-t", "--time", type=float, default=10, help="seconds to wait before killing (default 10)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER", help="name or id")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.containers.lifecycle import stop

    return each_container(args, lambda store, c: stop(store, c, timeout=args.time))
