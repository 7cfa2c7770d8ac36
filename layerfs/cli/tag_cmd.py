"""``layerfs tag SOURCE TARGET``: give an image another name."""

from __future__ import annotations

import argparse

from layerfs.cli.common import failures, resolve_image, with_store
from layerfs.store import Store
from layerfs.tools.refs import RefError, normalize


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tag", help="create a tag TARGET that refers to SOURCE")
    p.add_argument("source", metavar="SOURCE_IMAGE[:TAG]")
    p.add_argument("target", metavar="TARGET_IMAGE[:TAG]")
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    with failures(RefError):
        target = normalize(args.target)  # checked first: its error is the one said
    store.set_tag(target, resolve_image(store, args.source))
    return 0
