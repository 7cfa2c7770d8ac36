"""``layerfs tag SOURCE TARGET``: give an image another name."""

from __future__ import annotations

import argparse

from layerfs.cli.common import CLIError, open_store
from layerfs.tools.refs import RefError, normalize, resolve


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tag", help="create a tag TARGET that refers to SOURCE")
    p.add_argument("source", metavar="SOURCE_IMAGE[:TAG]")
    p.add_argument("target", metavar="TARGET_IMAGE[:TAG]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        try:
            store.set_tag(normalize(args.target), resolve(store, args.source))
        except RefError as exc:
            raise CLIError(str(exc)) from None
    return 0
