"""``layerfs rmi IMAGE...``: untag and remove images, then reclaim what nothing uses.

As with ``docker rmi`` (the rules are ``layerfs.images.remove``'s): a name removes that tag
and the image only once no tag is left; an id removes an image with several tags only with
``--force``.
"""

from __future__ import annotations

import argparse
import sys

from layerfs.cli.common import EXIT_ERROR, with_store
from layerfs.store import Store, collect


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rmi", help="remove images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-f", "--force", action="store_true", help="remove an image id with several tags")
    p.add_argument("--no-prune", action="store_true", help="leave unused layers and data for a later gc")
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    from layerfs.images import RemoveRefused, remove
    from layerfs.tools.refs import RefError

    store.refuse_if_damaged()  # nothing is removed from a store that does not read whole
    failed = False
    for ref in args.images:
        try:
            for line in remove(store, ref, force=args.force):
                print(line)
        except (RefError, RemoveRefused) as exc:
            print(f"layerfs: {exc}", file=sys.stderr)
            failed = True
    if not args.no_prune:
        collect(store)
    # each image that was not removed has its line above, as docker prints them: no summary line
    return EXIT_ERROR if failed else 0
