"""``layerfs bundle IMAGE DIR``: an OCI runtime bundle for any runtime, without running it.

``DIR/config.json`` is written from the image config (as ``run`` writes it) and
the image is mounted writable on ``DIR/rootfs``, its changes kept in
``DIR/upper``.  ``layerfs umount DIR/rootfs`` releases it.  layerfs connects no
network for another runtime: the default gives the container a namespace with
loopback only (``--network host`` shares the host's).
"""

from __future__ import annotations

import argparse
import os

from layerfs.cli.common import CLIError, open_store
from layerfs.cli.containers import add_process_options, errors, process_options


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bundle", help="write an OCI runtime bundle (config.json + mounted rootfs)")
    add_process_options(p)
    p.add_argument("image", help="NAME[:TAG] or image id")
    p.add_argument("dir", help="bundle directory (created)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (default: the image's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.containers.lifecycle import mount_writable, write_runtime_config
    from layerfs.mount import umount
    from layerfs.tools.refs import resolve

    bundle = os.path.abspath(args.dir)
    rootfs = os.path.join(bundle, "rootfs")
    opts = process_options(args)
    with open_store(args) as store, errors():
        image_id = resolve(store, args.image)
        opts.hostname = opts.hostname or args.name or image_id.hex()[:12]
        # 0700: the image's files (setuid ones too) are reachable through the allow_other mount
        os.makedirs(bundle, mode=0o700, exist_ok=True)
        os.chmod(bundle, 0o700)
        os.makedirs(rootfs, exist_ok=True)
        if os.listdir(rootfs):
            raise CLIError(f"{rootfs} is not empty (already a bundle?)")
        upper, work = os.path.join(bundle, "upper"), os.path.join(bundle, "work")
        mount_writable(store, image_id, rootfs, upper, work, args.image)
        try:
            write_runtime_config(store, image_id, rootfs, opts, os.path.join(bundle, "config.json"))
        except BaseException:
            umount(store, rootfs)
            raise
    print(bundle)
    return 0
