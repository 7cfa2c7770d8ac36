"""``layerfs-overlay``: a drop-in for fuse-overlayfs, on layerfs's union view.

Command lines accepted (as fuse-overlayfs accepts them)::

    layerfs-overlay -o lowerdir=L1:L2,upperdir=U,workdir=W[,opt...] MOUNTPOINT
    layerfs-overlay SOURCE MOUNTPOINT -o lowerdir=...     # how mount(8) / mount.fuse3 run a helper

Lower directories are host trees in the kernel overlay format, the leftmost on
top; without ``upperdir`` the mount is read-only.  Options layerfs does not use
are ignored with a warning, never fatal (podman passes ``volatile``,
``userxattr``, ``noacl`` and others).  The command returns once the mount is
ready (it daemonizes), unless ``-f`` keeps it in the foreground.

Exit codes: 0 mounted, 1 the mount failed (one line on stderr), 2 usage.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from layerfs.mount import MountError, check_overlaps, daemonize, need_dir
from layerfs.union.lower import DirLayer, Stack

# generic mount flags handed on to the FUSE mount (name -> the flag they set)
MOUNT_FLAGS = {
    "dev": ("dev", True),
    "nodev": ("dev", False),
    "suid": ("suid", True),
    "nosuid": ("suid", False),
    "exec": ("exec", True),
    "noexec": ("exec", False),
    "atime": ("atime", True),
    "noatime": ("atime", False),
    "diratime": ("diratime", True),
    "nodiratime": ("diratime", False),
    "strictatime": ("strictatime", True),
    "relatime": ("relatime", True),
}
# accepted silently: what the layout implies or what layerfs always does
QUIET = {"rw", "default_permissions", "fsname", "subtype", "suid", "dev", "exec", "async"}


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> tuple[dict[str, str], list[str], bool, bool]:
    """(options, positional arguments, foreground, debug); ``-o`` may come anywhere."""
    options: dict[str, str] = {}
    positional: list[str] = []
    foreground = debug = False
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            try:
                value = next(args)
            except StopIteration:
                raise UsageError("-o needs an argument") from None
            _split_options(value, options)
        elif arg.startswith("-o") and len(arg) > 2:
            _split_options(arg[2:], options)
        elif arg in ("-f", "--foreground"):
            foreground = True
        elif arg in ("-d", "--debug"):
            debug = foreground = True
        elif arg in ("-h", "--help"):
            raise UsageError(__doc__ or "")
        elif arg.startswith("-") and arg != "-":
            print(f"layerfs-overlay: ignoring unknown argument {arg}", file=sys.stderr)
        else:
            positional.append(arg)
    return options, positional, foreground, debug


def _split_options(value: str, into: dict[str, str]) -> None:
    # lowerdir paths may not contain ',' unescaped: fuse-overlayfs splits the same way
    for item in value.split(","):
        if not item:
            continue
        key, _, val = item.partition("=")
        into[key] = val


def main(argv: list[str] | None = None) -> int:
    try:
        options, positional, foreground, debug = parse(sys.argv[1:] if argv is None else argv)
        if len(positional) == 2:
            source, mountpoint = positional
        elif len(positional) == 1:
            source, mountpoint = "layerfs-overlay", positional[0]
        else:
            raise UsageError(
                "usage: layerfs-overlay -o lowerdir=DIR[:DIR...][,upperdir=DIR,workdir=DIR] MOUNTPOINT"
            )
        lowers = [d for d in options.pop("lowerdir", "").split(":") if d]
        if not lowers:
            raise UsageError("no lowerdir given (-o lowerdir=DIR[:DIR...])")
    except UsageError as exc:
        print(f"layerfs-overlay: {exc}", file=sys.stderr)
        return 2
    upper = options.pop("upperdir", None) or None
    work = options.pop("workdir", None) or None
    read_only = "ro" in options
    options.pop("ro", None)
    # as fuse-overlayfs: a mount made by root is for every user (the kernel's permission checks
    # still apply through default_permissions)
    allow_other = "allow_other" in options or os.geteuid() == 0
    options.pop("allow_other", None)
    flags: dict[str, bool] = {}
    for key in list(options):
        if key in MOUNT_FLAGS:
            name, on = MOUNT_FLAGS[key]
            flags[name] = on
            options.pop(key)
        elif key in QUIET:
            options.pop(key)
    for key in options:
        print(f"layerfs-overlay: ignoring unsupported option {key}", file=sys.stderr)
    try:
        for d in lowers:
            need_dir(d, "lowerdir")
        if upper is not None:
            need_dir(upper, "upperdir")
            if work is None:
                raise MountError("upperdir needs a workdir on the same filesystem")
        need_dir(mountpoint, "mountpoint")
        named = [("upperdir", upper, True), ("workdir", work, True)] if upper is not None and work else []
        check_overlaps(mountpoint, [*named, *(("lowerdir", d, True) for d in lowers)])
        if upper is not None and work is not None:
            os.makedirs(work, exist_ok=True)
            if os.stat(upper).st_dev != os.stat(work).st_dev:
                raise MountError("workdir must be on the same filesystem as upperdir")
        if not os.path.exists("/dev/fuse"):
            raise MountError("/dev/fuse is missing: FUSE is not available on this machine")
        writable_upper = None if read_only else upper
        lower_dirs = [os.path.realpath(d) for d in lowers]
        if read_only and upper is not None:
            # as the kernel: `ro` with an upper directory shows it, read-only, above the lowers
            lower_dirs.insert(0, os.path.abspath(upper))
        abs_work = os.path.abspath(work) if work else None

        def run(ready: Callable[[], None]) -> None:
            from layerfs.fuse import serve
            from layerfs.privmount import MOUNT_ATTR_NOATIME, atime_attr, private_paths
            from layerfs.union.view import UnionView

            # the upper directory under the mount's atime rule (layerfs/privmount.py)
            up, wk = writable_upper, abs_work if writable_upper else None
            if up is not None and wk is not None:
                up, wk = private_paths([up, wk], atime_attr(flags))
            # every lower layer (and the upper of a read-only mount) through a clone of its mount
            # where reads change no atime, as the kernel overlay opens lower files O_NOATIME;
            # the layers' own mounts are then not pinned by the daemon, and can be unmounted
            # right after this one (the daemon exits a moment after umount returns)
            lows = [private_paths([d], MOUNT_ATTR_NOATIME)[0] for d in lower_dirs]
            view = UnionView(None, Stack([DirLayer(d, i) for i, d in enumerate(lows)]), up, wk)
            serve(
                view,
                mountpoint,
                fsname=source,
                subtype="layerfs-overlay",
                allow_other=allow_other,
                on_ready=ready,
                debug=debug,
                mount_options=flags,
            )

        daemonize(run, foreground=foreground, log=None)
    except (MountError, OSError) as exc:
        print(f"layerfs-overlay: cannot mount {mountpoint}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
