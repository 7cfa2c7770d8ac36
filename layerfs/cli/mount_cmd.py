"""``layerfs mount IMAGE MOUNTPOINT``: serve an image as a directory (read-only, or --rw)."""

from __future__ import annotations

import argparse
import os

from layerfs.cli.common import CLIError, failures, with_image, with_store
from layerfs.mount import MountError, mount, need_dir
from layerfs.store import Store, StoreError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("mount", help="mount an image as a directory through FUSE")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("--rw", action="store_true", help="writable, with a copy-on-write upper directory")
    p.add_argument(
        "--upper",
        metavar="DIR",
        help="upper directory to keep changes in (implies --rw; default: a fresh one that umount deletes)",
    )
    p.add_argument(
        "--work",
        metavar="DIR",
        help="work directory on the upper's filesystem (default: beside the upper directory)",
    )
    p.add_argument(
        "--lower",
        metavar="DIR",
        action="append",
        default=[],
        help="a host directory in the overlay format stacked above the image's layers "
        "(repeatable; the first is topmost)",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground until unmounted")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT",
        help="mount options, comma-separated: allow_other; suid and dev allow setuid bits and "
        "device nodes (the default is nosuid,nodev); ro, rw",
    )
    p.add_argument("--debug", action="store_true", help="log every FUSE request (with --foreground)")
    p.set_defaults(func=run)


# Generic mount flags: off unless asked for.  mount(8) gives user mounts nosuid,nodev, and so
# does layerfs: with allow_other, a setuid-root file of an image would give any local user
# euid 0, a device node its device.  Containers (layerfs run) keep both on their root
# filesystem, as docker does: they mount through MountSpec, whose default is the FUSE core's.
FLAGS = {"suid": ("suid", True), "nosuid": ("suid", False), "dev": ("dev", True), "nodev": ("dev", False)}


def run(args: argparse.Namespace) -> int:
    listed = [o for opt in args.options for o in opt.split(",") if o]
    options = set(listed)
    unknown = options - {"allow_other", "ro", "rw", *FLAGS}
    if unknown:
        raise CLIError(f"unsupported mount option(s): {', '.join(sorted(unknown))}", 2)
    flags = {"suid": False, "dev": False}
    for o in listed:  # the last one said wins, as with mount(8)
        if o in FLAGS:
            name, on = FLAGS[o]
            flags[name] = on
    return _mount(args, options, flags)


@with_store
@with_image
def _mount(
    args: argparse.Namespace, store: Store, image_id: bytes, options: set[str], flags: dict[str, bool]
) -> int:
    from layerfs.images import mount_spec

    spec = mount_spec(
        store,
        image_id,
        args.mountpoint,
        name=args.image,
        writable=args.rw or args.upper is not None or "rw" in options,
        upper=args.upper,
        work=args.work,
        lower_dirs=[os.path.abspath(d) for d in args.lower],
        allow_other="allow_other" in options,
        mount_options=flags,
    )
    with failures(MountError):
        for d in spec.lower_dirs:
            need_dir(d, "lower directory")
    with failures(
        MountError, StoreError, OSError, prefix=f"cannot mount {args.image} on {args.mountpoint}: "
    ):
        mount(store, spec, foreground=args.foreground, debug=args.debug)
    return 0
