"""``layerfs images``: list stored images like ``docker images``."""

from __future__ import annotations

import argparse

from layerfs.cli.common import add_json, human_age, human_size, parse_time, print_json, table, with_store
from layerfs.store import Store
from layerfs.tools.refs import split


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("images", help="list images")
    p.add_argument("-q", "--quiet", action="store_true", help="only image ids")
    p.add_argument("--no-trunc", action="store_true", help="full image ids")
    add_json(p)
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    images = store.images()
    tags = store.tags()
    names: dict[bytes, list[str]] = {}
    for name, image_id in sorted(tags.items()):
        names.setdefault(image_id, []).append(name)
    images.sort(key=lambda kv: kv[1].imported, reverse=True)
    if args.json:
        print_json(
            [
                {
                    "id": "sha256:" + k.hex(),
                    "repo_tags": names.get(k, []),
                    "created": v.created,
                    "size": v.size,
                    "platform": v.platform,
                    "layers": ["sha256:" + h.hex() for h in v.layers],
                }
                for k, v in images
            ]
        )
        return 0
    rows = []
    for image_id, rec in images:
        short = ("sha256:" + image_id.hex()) if args.no_trunc else image_id.hex()[:12]
        if args.quiet:
            print(short)
            continue
        created = human_age(parse_time(rec.created))
        for name in names.get(image_id) or ["<none>:<none>"]:
            repo, tag = split(name) if name != "<none>:<none>" else ("<none>", "<none>")
            rows.append([repo, tag, short, created, human_size(rec.size)])
    if not args.quiet:
        table(rows, ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"])
    return 0
