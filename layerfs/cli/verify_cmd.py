"""``layerfs verify``: re-hash every object and check every reference.  Exit 3 on corruption."""

from __future__ import annotations

import argparse
import sys

from layerfs.cli.common import EXIT_CORRUPT, CLIError, add_json, print_json
from layerfs.store import Store, StoreDamaged, StoreError, VerifyResult, verify


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("verify", help="re-hash every stored object and check references")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bar = None
    if not (args.quiet or args.json) and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit=" objects", desc="verifying", file=sys.stderr, leave=False)
    try:
        store = Store(args.store, readonly=True)
    except StoreDamaged as exc:  # the environment does not even open: corruption found
        if bar:
            bar.close()
        if args.json:
            print_json(dict(VerifyResult(errors=[exc.cause]).__dict__, ok=False))
            return EXIT_CORRUPT
        raise CLIError(f"the store at {exc.path} is damaged: {exc.cause}", EXIT_CORRUPT) from None
    except StoreError as exc:
        raise CLIError(str(exc)) from None
    with store:
        res = verify(store, progress=(lambda n: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    if args.json:
        print_json(dict(res.__dict__, ok=not res.errors))
    else:
        for e in res.errors:
            print(f"CORRUPT: {e}")
        status = "FAILED" if res.errors else "ok"
        print(
            f"{status}: {res.objects} objects ({res.bytes} bytes), {res.layers} layers, {res.images} images checked, "
            f"{len(res.errors)} errors"
        )
    return EXIT_CORRUPT if res.errors else 0
