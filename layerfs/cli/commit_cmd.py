"""``layerfs commit CONTAINER [NAME[:TAG]]``: a container's changes as a new image."""

from __future__ import annotations

import argparse
import shlex

from layerfs.cli.common import add_json, open_store, print_json
from layerfs.cli.containers import errors


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


def run(args: argparse.Namespace) -> int:
    from layerfs.containers.commit import commit
    from layerfs.containers.lifecycle import paused
    from layerfs.containers.model import find
    from layerfs.tools.refs import normalize

    with open_store(args) as store, errors():
        c = find(store, args.container)
        name = normalize(args.name) if args.name is not None else None
        cmd = c.options.get("command") or []
        with paused(c):
            res = commit(
                store,
                bytes.fromhex(c.image),
                c.upper,
                name,
                message=args.message,
                author=args.author,
                created_by=shlex.join(cmd) if cmd else f"layerfs commit {c.name}",
                changes=args.change,
                skip=c.skip,
            )
    if args.json:
        print_json(res.__dict__)
    else:
        print(res.image_id)
    return 0
