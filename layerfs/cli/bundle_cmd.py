"""``layerfs bundle IMAGE DIR``: an OCI runtime bundle for any runtime, without running it.

``DIR/config.json`` is written from the image config (as ``run`` writes it) and
the image is mounted writable on ``DIR/rootfs``, its changes kept in
``DIR/upper``.  ``layerfs umount DIR/rootfs`` releases it.
"""

from __future__ import annotations

import argparse
import json
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
    from layerfs.mount import MountError, MountSpec, mount, umount
    from layerfs.tools.refs import resolve
    from layerfs.tools.runtime import prepare_rootfs, spec

    bundle = os.path.abspath(args.dir)
    rootfs = os.path.join(bundle, "rootfs")
    opts = process_options(args)
    with open_store(args) as store, errors():
        image_id = resolve(store, args.image)
        image = store.get_image(image_id)
        assert image is not None
        config = json.loads(store.read_object(bytes.fromhex(image["config"]))).get("config") or {}
        opts.hostname = opts.hostname or args.name or image_id.hex()[:12]
        # 0700: the image's files (setuid ones too) are reachable through the allow_other mount
        os.makedirs(bundle, mode=0o700, exist_ok=True)
        os.chmod(bundle, 0o700)
        os.makedirs(rootfs, exist_ok=True)
        if os.listdir(rootfs):
            raise CLIError(f"{rootfs} is not empty (already a bundle?)")
        m = MountSpec(
            image_id,
            [bytes.fromhex(h) for h in image["layers"]],
            rootfs,
            upper=os.path.join(bundle, "upper"),
            work=os.path.join(bundle, "work"),
            name=args.image,
            allow_other=True,
        )
        try:
            mount(store, m)
        except MountError as exc:
            raise CLIError(f"cannot mount {args.image} on {rootfs}: {exc}") from None
        store.reopen()
        try:
            runtime_spec = spec(config, rootfs, opts)
            prepare_rootfs(rootfs, runtime_spec["process"]["cwd"])
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(runtime_spec, f, indent=1)
        except BaseException:
            umount(store, rootfs)
            raise
    print(bundle)
    return 0
