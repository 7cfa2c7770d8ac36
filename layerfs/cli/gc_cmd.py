"""``layerfs gc``: remove layers, objects and packs no image needs (and dead imports' leftovers)."""

from __future__ import annotations

import argparse

from layerfs.cli.common import add_json, human_size, print_json, with_store
from layerfs.store import Store, collect


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("gc", help="garbage-collect unused data")
    add_json(p)
    p.set_defaults(func=run)


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    store.refuse_if_damaged()  # nothing is collected on a store that does not read whole
    res = collect(store)
    if args.json:
        print_json(res.as_dict())
        return 0
    print(
        f"Reclaimed {human_size(res.bytes_reclaimed)}: {res.layers_removed} layers, {res.objects_removed} objects, "
        f"{res.packs_removed} packs removed, {res.packs_compacted} compacted, "
        f"{res.leases_reclaimed} abandoned imports cleaned up"
    )
    if res.file_bytes_returned:
        print(
            f"Returned {human_size(res.file_bytes_returned)} to the filesystem (the store's data file was compacted)"
        )
    elif res.file_error:
        print(f"The store's data file keeps its free space: compacting it failed: {res.file_error}")
    elif res.file_in_use:
        print(
            "The store's data file keeps its free space: other processes have the store open "
            "(mounts, containers, imports); run gc again once they are gone"
        )
    return 0
