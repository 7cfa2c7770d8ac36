"""``layerfs diff CONTAINER``: A/C/D lines, as ``docker diff`` prints them."""

from __future__ import annotations

import argparse

from layerfs.cli.common import add_json, open_store, print_json
from layerfs.cli.containers import errors


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("diff", help="files a container added (A), changed (C) or deleted (D)")
    p.add_argument("container", help="name or id")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.containers import ContainerError
    from layerfs.containers.commit import changes
    from layerfs.containers.model import find

    with open_store(args) as store, errors():
        c = find(store, args.container)
        image = store.get_image(bytes.fromhex(c.image))
        if image is None:
            raise ContainerError(f"the image of container {c.name} is no longer in the store")
        found = changes(store, list(image.layers), c.upper, c.skip)
    if args.json:
        print_json([{"kind": ch.kind, "path": ch.path} for ch in found])
    else:
        for ch in found:
            print(ch.kind, ch.path)
    return 0
