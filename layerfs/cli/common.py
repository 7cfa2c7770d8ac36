"""What every verb shares: the opened store and the resolved image (``with_store``,
``with_image``, as borg's ``with_repository``/``with_archive``), errors as one line
(``failures``), output helpers.

A verb is ``run(args) -> exit status``; decorated, it is written as ``run(args, store)`` or
``run(args, store, image_id)`` and does not open, resolve or close anything itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from layerfs.store import Store, StoreError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CORRUPT = 0, 1, 2, 3
EXIT_NEEDS_ROOT = 4  # a verb that only root can run (bench: drops caches, mounts the overlay)


class CLIError(Exception):
    """A one-line error for the user; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def open_store(args: argparse.Namespace) -> Store:
    try:
        return Store(args.store)
    except StoreError as exc:
        raise CLIError(str(exc)) from None


def with_store(fn: Callable[..., int]) -> Callable[..., int]:
    """The verb is called as ``fn(args, store, ...)`` with the store ``--store`` names, open for
    as long as it runs (other arguments it is called with follow the store)."""

    @functools.wraps(fn)
    def verb(args: argparse.Namespace, *more: Any) -> int:
        with open_store(args) as store:
            return fn(args, store, *more)

    return verb


def with_image(fn: Callable[..., int]) -> Callable[..., int]:
    """Under ``with_store``: the verb also gets the id of the image ``args.image`` names (after
    the store, before any other arguments it is called with); a reference that names none ends
    it with one line (``no such image: REF``)."""

    @functools.wraps(fn)
    def verb(args: argparse.Namespace, store: Store, *more: Any) -> int:
        return fn(args, store, resolve_image(store, args.image), *more)

    return verb


def resolve_image(store: Store, ref: str) -> bytes:
    """The image id ``ref`` names, or CLIError with why it names none."""
    from layerfs.tools.refs import RefError, resolve

    try:
        return resolve(store, ref)
    except RefError as exc:
        raise CLIError(str(exc)) from None


@contextmanager
def failures(*kinds: type[BaseException], prefix: str = "", code: int = EXIT_ERROR) -> Iterator[None]:
    """An error of one of ``kinds`` ends the verb as one line: ``prefix`` and its message."""
    try:
        yield
    except kinds as exc:
        raise CLIError(prefix + str(exc), code) from None


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def human_size(n: float) -> str:
    """Sizes as docker prints them (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}B"


def human_age(ts: float) -> str:
    if not ts:
        return "N/A"
    s = time.time() - ts
    for unit, secs in (
        ("years", 31536000),
        ("months", 2592000),
        ("weeks", 604800),
        ("days", 86400),
        ("hours", 3600),
        ("minutes", 60),
    ):
        if s >= 2 * secs:
            return f"{int(s // secs)} {unit} ago"
    if s >= 3600:
        return "About an hour ago"
    if s >= 60:
        return "About a minute ago"
    if s < 1:
        return "Less than a second ago"
    return "1 second ago" if int(s) == 1 else f"{int(s)} seconds ago"


def parse_time(value: str) -> float:
    """RFC 3339 timestamps of image configs (nanosecond fractions allowed) -> epoch seconds."""
    if not value:
        return 0.0
    from datetime import datetime

    v = value.rstrip("Z").split("+")[0]
    if "." in v:
        head, frac = v.split(".", 1)
        v = head + "." + frac[:6]
    try:
        fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in v else "%Y-%m-%dT%H:%M:%S"
        from datetime import timezone

        return datetime.strptime(v, fmt).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return 0.0


def table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for r in [headers, *rows]:
        print("   ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
