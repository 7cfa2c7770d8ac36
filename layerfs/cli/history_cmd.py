"""``layerfs history IMAGE``: the image's build history from its config."""

from __future__ import annotations

import argparse

from layerfs.cli.common import (
    add_json,
    human_age,
    human_size,
    parse_time,
    print_json,
    table,
    with_image,
    with_store,
)
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("history", help="show the history of an image")
    p.add_argument("image")
    p.add_argument("--no-trunc", action="store_true", help="do not truncate output")
    add_json(p)
    p.set_defaults(func=run)


@with_store
@with_image
def run(args: argparse.Namespace, store: Store, image_id: bytes) -> int:
    from layerfs.images import history

    items = history(store, image_id)
    if args.json:
        print_json(items)
        return 0
    rows = []
    for i, it in enumerate(items):
        by = it["created_by"]
        if not args.no_trunc and len(by) > 45:
            by = by[:44] + "…"
        ident = image_id.hex()[:12] if i == 0 else "<missing>"
        rows.append([ident, human_age(parse_time(it["created"])), by, human_size(it["size"]), it["comment"]])
    table(rows, ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"])
    return 0
