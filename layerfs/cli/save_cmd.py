"""``layerfs save IMAGE... -o FILE``: export images as docker save / OCI archives or an OCI layout."""

from __future__ import annotations

import argparse
import sys

from layerfs.cli.common import CLIError, add_json, failures, print_json, with_store
from layerfs.store import Store, StoreError
from layerfs.tools.refs import RefError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("save", help="export images (docker save archive, OCI archive or OCI layout)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="NAME[:TAG] or image id")
    p.add_argument("-o", "--output", help="file (or directory for oci-dir) to write; default: stdout")
    p.add_argument(
        "--format",
        default="docker",
        choices=["docker", "oci-archive", "oci-dir"],
        help="docker (default): one tar that is both a docker save archive and an OCI layout",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    output = args.output or "-"
    if output == "-" and sys.stdout.isatty():
        raise CLIError("cowardly refusing to write an archive to a terminal: use -o FILE or a redirect")
    return _save(args, output)


@with_store  # writable: the save pins its layers with a lease
def _save(args: argparse.Namespace, store: Store, output: str) -> int:
    from layerfs.tools.export import ExportError, save

    bar = None
    if not (args.quiet or args.json) and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="saving", file=sys.stderr, leave=False)
    try:
        with failures(ExportError, RefError, StoreError, OSError, prefix="save refused: "):
            res = save(
                store, args.images, output, args.format, progress=bar.update if bar else lambda n: None
            )
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print_json(
            {
                "output": output,
                "format": args.format,
                "bytes": res.bytes,
                "images": [
                    {
                        "id": i.image_id,
                        "names": i.names,
                        "manifest": i.manifest.digest,
                        "layers": [b.digest for b in i.layers],
                    }
                    for i in res.images
                ],
            }
        )
    return 0
