"""``layerfs bundle IMAGE DIR``: an OCI runtime bundle for any runtime, without running it.

``DIR/config.json`` is written from the image config (as ``run`` writes it) and
the image is mounted writable on ``DIR/rootfs``, its changes kept in
``DIR/upper``.  ``layerfs umount DIR/rootfs`` releases it.  layerfs connects no
network for another runtime: the default gives the container a namespace with
loopback only (``--network host`` shares the host's).
"""

from __future__ import annotations

import argparse

from layerfs.cli.common import with_image, with_store
from layerfs.cli.containers import add_process_options, errors, process_options
from layerfs.store import Store


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bundle", help="write an OCI runtime bundle (config.json + mounted rootfs)")
    add_process_options(p)
    p.add_argument("image", help="NAME[:TAG] or image id")
    p.add_argument("dir", help="bundle directory (created)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (default: the image's)")
    p.set_defaults(func=run)


@with_store
@with_image
def run(args: argparse.Namespace, store: Store, image_id: bytes) -> int:
    from layerfs.containers.lifecycle import bundle

    with errors():
        opts = process_options(args)
        opts.hostname = opts.hostname or args.name or image_id.hex()[:12]
        print(bundle(store, image_id, args.dir, opts, args.image))
    return 0
