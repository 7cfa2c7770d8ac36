"""The ``layerfs`` command line: one module per verb (``VERB_cmd.py``: its options and ``run``).

A verb parses, calls the library and prints: it gets its open store and resolved image from
``common.with_store``/``common.with_image``, and turns errors into one line with
``common.failures``; what it decides is the library's (``layerfs.images``,
``layerfs.containers``, ``layerfs.tools``).

Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error,
3 ``verify`` found corruption, 4 a verb that needs root run without it (``bench``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import lmdb

from layerfs.cli.common import EXIT_ERROR, EXIT_USAGE, CLIError
from layerfs.store.store import DAMAGE, StoreDamaged, StoreError, default_path

VERBS = [
    "import",
    "images",
    "inspect",
    "history",
    "tag",
    "rmi",
    "layers",
    "df",
    "gc",
    "verify",
    "version",
    "mount",
    "umount",
    "mounts",
    "save",
    "load",
    "create",
    "run",
    "start",
    "stop",
    "rm",
    "ps",
    "logs",
    "diff",
    "commit",
    "bundle",
    "pull",
    "push",
    "login",
    "logout",
    "bench",
]


def _chosen_verb(argv: list[str]) -> str | None:
    """The verb of a command line, if it names one (``--store DIR`` may come first)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--store":
            i += 2
        elif arg.startswith("--store="):
            i += 1
        else:
            return arg if arg in VERBS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; for a command line that names its verb, only that verb's module is loaded
    (every command starts faster: containers' start latency is mostly interpreter start)."""
    parser = argparse.ArgumentParser(prog="layerfs", description="Container layer store and union filesystem")
    parser.add_argument(
        "--store",
        metavar="DIR",
        default=None,
        help="store directory (default: $LAYERFS_STORE or $XDG_DATA_HOME/layerfs)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    chosen = _chosen_verb(sys.argv[1:] if argv is None else argv)
    for verb in VERBS:
        if chosen is None or verb == chosen:
            importlib.import_module(f"layerfs.cli.{verb}_cmd").register(sub)
        else:
            sub.add_parser(verb)  # a name for argparse's choices; never parsed
    return parser


def one_line(message: str) -> str:
    """A failure is one line on stderr, whatever a library put in its message."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    if args.store == "":
        # not the default store: an empty --store is a mistake (an unset variable, say)
        print("layerfs: --store needs a directory; it was given an empty name", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"layerfs: {one_line(str(exc))}", file=sys.stderr)
        return exc.code
    except StoreError as exc:  # the store's messages are for the user
        print(f"layerfs: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except lmdb.Error as exc:  # met while reading: the write paths say StoreError
        path = os.path.abspath(args.store or default_path())
        why = StoreDamaged(path, str(exc)) if isinstance(exc, DAMAGE) else f"store {path}: {exc}"
        print(f"layerfs: {one_line(str(why))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("layerfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
