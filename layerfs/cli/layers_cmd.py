"""``layerfs layers``: every stored layer, its size and which images use it."""

from __future__ import annotations

import argparse

from layerfs.cli.common import add_json, human_size, print_json, table, with_store
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("layers", help="list stored layers")
    p.add_argument("--no-trunc", action="store_true", help="full layer ids")
    add_json(p)
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    layers = store.layers()
    users: dict[bytes, int] = {}
    for _, image in store.images():
        for layer_id in set(image.layers):
            users[layer_id] = users.get(layer_id, 0) + 1
    if args.json:
        print_json([dict(rec.as_json(), id="sha256:" + k.hex(), images=users.get(k, 0)) for k, rec in layers])
        return 0
    rows = []
    for k, rec in layers:
        ident = "sha256:" + k.hex() if args.no_trunc else k.hex()[:12]
        rows.append(
            [
                ident,
                human_size(rec.size),
                str(rec.files),
                str(rec.entries),
                rec.compression,
                str(users.get(k, 0)),
            ]
        )
    table(rows, ["LAYER ID", "SIZE", "FILES", "ENTRIES", "BLOB", "IMAGES"])
    return 0
