"""``layerfs umount MOUNTPOINT``: unmount (also after the daemon was killed)."""

from __future__ import annotations

import argparse

from layerfs.cli.common import CLIError, open_store
from layerfs.mount import MountError, umount


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("umount", help="unmount a layerfs mount")
    p.add_argument("mountpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        try:
            umount(store, args.mountpoint)
        except MountError as exc:
            raise CLIError(str(exc)) from None
    return 0
