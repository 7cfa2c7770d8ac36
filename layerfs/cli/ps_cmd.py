"""``layerfs ps``: containers, as ``docker ps`` lists them."""

from __future__ import annotations

import argparse
import shlex

from layerfs.cli.common import add_json, human_age, print_json, table, with_store
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ps", help="list containers (running ones; -a for all)")
    p.add_argument("-a", "--all", action="store_true", help="also stopped and created containers")
    p.add_argument("-q", "--quiet", action="store_true", help="only ids")
    add_json(p)
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    from layerfs.containers.lifecycle import existing

    shown = [c for c in existing(store) if args.all or c.running()]
    if args.json:
        print_json(
            [
                {
                    "id": c.id,
                    "name": c.name,
                    "image": c.image_ref,
                    "image_id": "sha256:" + c.image,
                    "command": c.options.get("command") or [],
                    "created": c.created,
                    "state": "running" if c.running() else c.state.get("status"),
                    "exit_code": c.state.get("exit_code"),
                    "status": c.status(),
                }
                for c in shown
            ]
        )
        return 0
    if args.quiet:
        for c in shown:
            print(c.id[:12])
        return 0
    rows = []
    for c in shown:
        cmd = shlex.join(c.options.get("command") or []) or "(image default)"
        rows.append([c.id[:12], c.image_ref, f'"{cmd[:20]}"', human_age(c.created), c.status(), c.name])
    table(rows, ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"])
    return 0
