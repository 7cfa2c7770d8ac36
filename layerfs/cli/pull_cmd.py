"""``layerfs pull [--platform P] REF``: an image from a registry, as ``docker pull``."""

from __future__ import annotations

import argparse
import sys

from layerfs.cli.common import EXIT_USAGE, CLIError, add_json, open_store, print_json


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {value!r} (true or false)")


def add_tls_options(p: argparse.ArgumentParser) -> None:
    """The options every registry verb takes, spelt as podman spells them."""
    p.add_argument(
        "--tls-verify",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="verify the registry's TLS certificate (--tls-verify=false also allows plain HTTP)",
    )
    p.add_argument(
        "--cert-dir", metavar="DIR", help="CA (*.crt) and client certificates (*.cert, *.key) to use"
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("pull", help="pull an image from a registry")
    p.add_argument(
        "reference", metavar="REF", help="[REGISTRY/]NAME[:TAG][@DIGEST] (docker.io and :latest by default)"
    )
    p.add_argument("--platform", help="platform to pick from a multi-platform image, e.g. linux/arm64")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    add_tls_options(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.store import StoreError
    from layerfs.tools.refs import RefError
    from layerfs.tools.registry.auth import AuthError
    from layerfs.tools.registry.pull import PullError, pull
    from layerfs.tools.sources import PlatformError, normalize_platform

    try:
        platform = None if args.platform is None else normalize_platform(args.platform)
    except PlatformError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    with open_store(args) as store:
        try:
            res = pull(
                store,
                args.reference,
                platform=platform,
                tls_verify=args.tls_verify,
                cert_dir=args.cert_dir,
                progress=not (args.quiet or args.json),
            )
        except RefError as exc:
            raise CLIError(str(exc)) from None
        except (PullError, AuthError, StoreError, OSError) as exc:
            raise CLIError(f"pull of {args.reference} failed: {exc}") from None
    if args.json:
        print_json(res.__dict__)
        return 0
    shown = res.names[0] if res.names else res.image_id
    print(f"Digest: {res.digest}")
    print(f"Status: {'Image is up to date' if res.up_to_date else 'Downloaded newer image'} for {shown}")
    print(res.reference)
    if not args.quiet:
        print(
            f"  {res.layers_new} new layers, {res.layers_known} already stored, {res.bytes_downloaded} bytes downloaded",
            file=sys.stderr,
        )
    return 0
