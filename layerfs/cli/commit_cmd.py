"""``layerfs commit CONTAINER [NAME[:TAG]]``: a container's changes as a new image."""

from __future__ import annotations

import argparse

from layerfs.cli.common import add_json, print_json, with_store
from layerfs.cli.containers import errors
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("commit", help="create a new image from a container's changes")
    p.add_argument("-m", "--message", default="", help="commit message (the history entry's comment)")
    p.add_argument("-a", "--author", default="", help="author")
    p.add_argument(
        "-c",
        "--change",
        action="append",
        default=[],
        metavar="INSTR",
        help="Dockerfile instruction: CMD, ENV, ...",
    )
    p.add_argument("container", help="name or id")
    p.add_argument("name", nargs="?", help="NAME[:TAG] for the new image")
    add_json(p)
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    from layerfs.containers.lifecycle import commit_container
    from layerfs.containers.model import find

    with errors():
        res = commit_container(
            store,
            find(store, args.container),
            args.name,
            message=args.message,
            author=args.author,
            change=args.change,
        )
    if args.json:
        print_json(res.__dict__)
    else:
        print(res.image_id)
    return 0
