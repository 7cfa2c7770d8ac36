"""``layerfs run IMAGE [CMD...]``: create a container and run it with runc.

In the foreground (the default) the container's stdout, stderr and exit code
are ours; ``-i`` passes stdin on, ``-t`` gives it a terminal.  ``-d`` starts it
in the background and prints its id (``--rm`` then removes it when it exits).
As with docker, 125 means the container could not be set up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from layerfs.cli.common import CLIError, open_store
from layerfs.cli.containers import EXIT_SETUP, add_process_options, errors, process_options


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
    from layerfs.containers import ContainerError, lifecycle
    from layerfs.containers.model import load
    from layerfs.containers.runc import runtime

    if args.tty and args.interactive and not args.detach and not sys.stdin.isatty():
        raise CLIError("the input device is not a TTY")  # docker's words and status
    with open_store(args) as store, errors(EXIT_SETUP):
        runtime()  # say it is missing before creating anything
        c = lifecycle.create(store, args.image, process_options(args), args.name, auto_remove=args.rm)
        for warning in lifecycle.warnings(store, c):  # as docker: said, then run anyway
            print(f"WARNING: {warning}", file=sys.stderr)
        if args.detach:
            try:
                lifecycle.start(store, c)
            except BaseException:
                if args.rm:
                    with contextlib.suppress(ContainerError, OSError):
                        lifecycle.remove(store, load(c.dir), force=True)
                raise
            print(c.id)
            return 0
        try:
            stdin = None if args.interactive else os.open(os.devnull, os.O_RDONLY)
            sys.stdout.flush()
            return lifecycle.execute(store, c, stdin=stdin)
        finally:
            if args.rm:
                lifecycle.remove(store, load(c.dir), force=True)
