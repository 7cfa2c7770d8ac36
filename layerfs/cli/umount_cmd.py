"""``layerfs umount MOUNTPOINT``: unmount (also after the daemon was killed)."""

from __future__ import annotations

import argparse
import sys

from layerfs.cli.common import failures, with_store
from layerfs.mount import UMOUNT_TIMEOUT, MountError, umount
from layerfs.store import Store


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


@with_store
def run(args: argparse.Namespace, store: Store) -> int:
    with failures(MountError):
        warning = umount(store, args.mountpoint, timeout=args.timeout)
    if warning:
        print(f"layerfs: warning: {warning}", file=sys.stderr)
    return 0
