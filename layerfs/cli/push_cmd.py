"""``layerfs push IMAGE [REF]``: an image to a registry, as ``docker push`` / ``podman push``."""

from __future__ import annotations

import argparse

from layerfs.cli.common import CLIError, add_json, open_store, print_json
from layerfs.cli.pull_cmd import add_tls_options


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("push", help="push an image to a registry")
    p.add_argument("image", metavar="IMAGE", help="a stored image: NAME[:TAG] or id")
    p.add_argument(
        "destination",
        nargs="?",
        metavar="REF",
        help="where to push it: [REGISTRY/]NAME[:TAG] (default: IMAGE)",
    )
    p.add_argument(
        "--compression-format",
        choices=["gzip", "zstd"],
        help="compression of layers the registry does not have yet (default gzip; given, only blobs "
        "compressed so are reused)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    add_tls_options(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.store import StoreError
    from layerfs.tools.refs import RefError
    from layerfs.tools.registry.auth import AuthError
    from layerfs.tools.registry.push import PushError, push

    with open_store(args) as store:
        try:
            res = push(
                store,
                args.image,
                args.destination,
                compression=args.compression_format,
                tls_verify=args.tls_verify,
                cert_dir=args.cert_dir,
                progress=not (args.quiet or args.json),
            )
        except RefError as exc:
            raise CLIError(str(exc)) from None
        except (PushError, AuthError, StoreError, OSError) as exc:
            raise CLIError(f"push of {args.image} failed: {exc}") from None
    if args.json:
        print_json(res.__dict__)
        return 0
    tag = res.reference.rpartition(":")[2]
    print(f"{tag}: digest: {res.digest} size: {res.size}")
    return 0
