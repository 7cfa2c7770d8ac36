"""``layerfs run IMAGE [CMD...]``: create a container and run it with runc.

In the foreground (the default) the container's stdout, stderr and exit code
are ours; ``-i`` passes stdin on, ``-t`` gives it a terminal.  ``-d`` starts it
in the background and prints its id (``--rm`` then removes it when it exits).
As with docker, 125 means the container could not be set up.
"""

from __future__ import annotations

import argparse
import os
import sys

from layerfs.cli.common import CLIError, with_store
from layerfs.cli.containers import EXIT_SETUP, add_process_options, errors, process_options
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run a command in a new container")
    add_process_options(p)
    p.add_argument("-d", "--detach", action="store_true", help="run in the background and print the id")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open for the container")
    p.add_argument("-t", "--tty", action="store_true", help="give the container a terminal")
    p.add_argument("image", help="NAME[:TAG] or image id")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (default: the image's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tty and args.interactive and not args.detach and not sys.stdin.isatty():
        raise CLIError("the input device is not a TTY")  # docker's words and status
    return _run(args)


@with_store
def _run(args: argparse.Namespace, store: Store) -> int:
    from layerfs.containers import lifecycle
    from layerfs.containers.runc import runtime

    with errors(EXIT_SETUP):
        runtime()  # say it is missing before creating anything
        c = lifecycle.create(store, args.image, process_options(args), args.name, auto_remove=args.rm)
        for warning in lifecycle.warnings(store, c):  # as docker: said, then run anyway
            print(f"WARNING: {warning}", file=sys.stderr)
        if args.detach:
            lifecycle.run_detached(store, c)
            print(c.id)
            return 0
        stdin = None if args.interactive else os.open(os.devnull, os.O_RDONLY)
        sys.stdout.flush()
        return lifecycle.run_attached(store, c, stdin=stdin)
