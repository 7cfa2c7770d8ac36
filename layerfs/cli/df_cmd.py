"""``layerfs df``: what the store holds and what deduplication and compression save."""

from __future__ import annotations

import argparse

from layerfs.cli.common import add_json, human_size, print_json, with_store
from layerfs.store import Store
from layerfs.store.usage import usage


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("df", help="show store disk usage, dedup and compression ratios")
    add_json(p)
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    u = usage(store)
    if args.json:
        print_json(u)
        return 0
    print(f"Store:              {u['path']}")
    print(f"Images:             {u['images']} ({u['tags']} tags)")
    print(f"Layers:             {u['layers']}")
    print(f"Logical bytes:      {human_size(u['logical_bytes'])}  (file data of all layers)")
    print(
        f"Unique bytes:       {human_size(u['unique_bytes'])}  ({u['unique_files']} distinct file contents)"
    )
    other = u["object_bytes"] - u["unique_bytes"]
    print(f"Other objects:      {human_size(other)}  (tar headers, entry tables, manifests, configs)")
    print(
        f"Stored bytes:       {human_size(u['stored_bytes'])}  (compressed payload {human_size(u['payload_bytes'])}"
        f" + metadata {human_size(u['metadata_bytes'])})"
    )
    where = "data.mdb and pack files" if u["payload"] == "files" else "data.mdb"
    print(f"On disk:            {human_size(u['file_bytes'])}  ({where})")
    print(f"Dedup ratio:        {u['dedup_ratio']:.2f}x")
    print(f"Compression ratio:  {u['compression_ratio']:.2f}x")
    return 0
