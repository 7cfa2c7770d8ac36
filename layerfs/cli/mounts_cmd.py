"""``layerfs mounts``: active mounts with their image and upper directory."""

from __future__ import annotations

import argparse

from layerfs.cli.common import add_json, print_json, table, with_store
from layerfs.mount import mounts
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("mounts", help="list active mounts")
    add_json(p)
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    active = mounts(store)
    if args.json:
        print_json(active)
        return 0
    table(
        [
            [
                m["mountpoint"],
                m["name"] or m["image"][:12],
                m["image"][:12],
                m.get("upper") or "(read-only)",
                str(m.get("pid", "")),
            ]
            for m in active
        ],
        ["MOUNTPOINT", "IMAGE", "IMAGE ID", "UPPER", "PID"],
    )
    return 0
