"""``layerfs load -i FILE``: docker's name for ``layerfs import``."""

from __future__ import annotations

import argparse

from layerfs.cli import import_cmd
from layerfs.cli.common import CLIError, add_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("load", help="load images from an archive or layout (alias of import)")
    p.add_argument("-i", "--input", required=True, help="docker save archive, OCI archive or OCI layout")
    p.add_argument("--platform", help="platform to pick from a multi-platform image, e.g. linux/arm64")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.input == "-":
        raise CLIError("loading from stdin is not supported: use -i FILE")
    args.path, args.tag = args.input, None
    return import_cmd.run(args)
