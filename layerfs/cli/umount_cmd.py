"""``layerfs umount MOUNTPOINT``: unmount (also after the daemon was killed)."""

from __future__ import annotations

import argparse
import sys

from layerfs.cli.common import CLIError, open_store
from layerfs.mount import UMOUNT_TIMEOUT, MountError, umount


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("umount", help="unmount a layerfs mount")
    p.add_argument("mountpoint")
    p.add_argument(
        "-t",
        "--timeout",
        type=float,
        default=UMOUNT_TIMEOUT,
        metavar="SECS",
        help=f"how long to wait for the mount's daemon to exit (default {UMOUNT_TIMEOUT:g})",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        try:
            warning = umount(store, args.mountpoint, timeout=args.timeout)
        except MountError as exc:
            raise CLIError(str(exc)) from None
    if warning:
        print(f"layerfs: warning: {warning}", file=sys.stderr)
    return 0
