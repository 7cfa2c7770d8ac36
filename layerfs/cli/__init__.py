"""The ``layerfs`` command line: one module per verb, each a thin layer over the store and tools.

Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error,
3 ``verify`` found corruption.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from layerfs.cli.common import EXIT_ERROR, CLIError

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
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerfs", description="Container layer store and union filesystem")
    parser.add_argument(
        "--store",
        metavar="DIR",
        default=None,
        help="store directory (default: $LAYERFS_STORE or $XDG_DATA_HOME/layerfs)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for verb in VERBS:
        importlib.import_module(f"layerfs.cli.{verb}_cmd").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"layerfs: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("layerfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
