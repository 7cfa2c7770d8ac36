"""``layerfs diff CONTAINER``: A/C/D lines, as ``docker diff`` prints them."""

from __future__ import annotations

import argparse

from layerfs.cli.common import add_json, print_json, with_store
from layerfs.cli.containers import errors
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("diff", help="files a container added (A), changed (C) or deleted (D)")
    p.add_argument("container", help="name or id")
    add_json(p)
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    from layerfs.containers.lifecycle import diff
    from layerfs.containers.model import find

    with errors():
        found = diff(store, find(store, args.container))
    if args.json:
        print_json([{"kind": ch.kind, "path": ch.path} for ch in found])
    else:
        for ch in found:
            print(ch.kind, ch.path)
    return 0
