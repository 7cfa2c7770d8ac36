"""``layerfs rmi IMAGE...``: untag and remove images, then reclaim what nothing uses.

As with ``docker rmi``: a name removes that tag and the image only once no
tag is left; an id removes an image with several tags only with ``--force``.
"""

from __future__ import annotations

import argparse
import sys

from layerfs.cli.common import EXIT_ERROR, open_store
from layerfs.store import collect
from layerfs.tools.refs import RefError, normalize, resolve


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rmi", help="remove images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-f", "--force", action="store_true", help="remove an image id with several tags")
    p.add_argument("--no-prune", action="store_true", help="leave unused layers and data for a later gc")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.containers.model import users_of

    failed = False
    with open_store(args) as store:
        store.refuse_if_damaged()  # nothing is removed from a store that does not read whole
        for ref in args.images:
            try:
                image_id = resolve(store, ref)
            except RefError as exc:
                print(f"layerfs: {exc}", file=sys.stderr)
                failed = True
                continue
            tags = sorted(n for n, i in store.tags().items() if i == image_id)
            by_name = _is_name(ref, tags)
            if by_name and len(tags) > 1:
                store.remove_tag(by_name)
                print(f"Untagged: {by_name}")
                continue
            if not by_name and len(tags) > 1 and not args.force:
                print(
                    f"layerfs: unable to delete {image_id.hex()[:12]} (must be forced) - "
                    f"image is referenced in multiple repositories",
                    file=sys.stderr,
                )
                failed = True
                continue
            users = users_of(store, image_id)
            if users and not args.force:
                print(
                    f"layerfs: conflict: unable to remove {ref} (must be forced) - container "
                    f"{users[0].id[:12]} ({users[0].name}) is using its referenced image {image_id.hex()[:12]}",
                    file=sys.stderr,
                )
                failed = True
                continue
            if users:  # forced: untagged, but kept for the containers (docker keeps it dangling too)
                for t in tags:
                    store.remove_tag(t)
                    print(f"Untagged: {t}")
                continue
            for t in store.remove_image(image_id):
                print(f"Untagged: {t}")
            print(f"Deleted: sha256:{image_id.hex()}")
        if not args.no_prune:
            collect(store)
    # each image that was not removed has its line above, as docker prints them: no summary line
    return EXIT_ERROR if failed else 0


def _is_name(ref: str, tags: list[str]) -> str | None:
    try:
        name = normalize(ref)
    except RefError:
        return None
    return name if name in tags else None
