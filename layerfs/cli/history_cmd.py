"""``layerfs history IMAGE``: the image's build history from its config."""

from __future__ import annotations

import argparse
import json

from layerfs.cli.common import (
    CLIError,
    add_json,
    human_age,
    human_size,
    open_store,
    parse_time,
    print_json,
    table,
)
from layerfs.store.records import LayerRecord
from layerfs.tools.refs import RefError, resolve


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("history", help="show the history of an image")
    p.add_argument("image")
    p.add_argument("--no-trunc", action="store_true", help="do not truncate output")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        try:
            image_id = resolve(store, args.image)
        except RefError as exc:
            raise CLIError(str(exc)) from None
        rec = store.get_image(image_id)
        assert rec is not None
        config = json.loads(store.read_object(rec.config))
        layer_sizes = [_size(store.get_layer(layer_id)) for layer_id in rec.layers]
    history = config.get("history") or [{} for _ in layer_sizes]
    rows, items = [], []
    layer = 0
    for h in history:
        size = 0
        if not h.get("empty_layer"):
            size = layer_sizes[layer] if layer < len(layer_sizes) else 0
            layer += 1
        items.append(
            {
                "created": h.get("created", ""),
                "created_by": h.get("created_by", ""),
                "size": size,
                "comment": h.get("comment", ""),
                "empty_layer": bool(h.get("empty_layer")),
            }
        )
    items.reverse()  # newest first, as docker prints it
    if args.json:
        print_json(items)
        return 0
    for i, it in enumerate(items):
        by = it["created_by"]
        if not args.no_trunc and len(by) > 45:
            by = by[:44] + "…"
        ident = image_id.hex()[:12] if i == 0 else "<missing>"
        rows.append([ident, human_age(parse_time(it["created"])), by, human_size(it["size"]), it["comment"]])
    table(rows, ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"])
    return 0


def _size(layer: LayerRecord | None) -> int:
    return layer.size if layer is not None else 0
