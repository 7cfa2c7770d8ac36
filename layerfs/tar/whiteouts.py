"""The OCI whiteout names: how a layer says that something of the layers below is gone.

``.wh.<name>`` deletes ``<name>``; ``.wh..wh..opq`` in a directory hides everything the
layers below have in it; other ``.wh..wh.`` names are aufs bookkeeping that importers drop.
Layer import, export and commit read and write these names; the overlay directory format
uses the same ones as its fallback where a char 0/0 device cannot be made (the kernel's own
markers, devices and ``trusted.overlay.opaque``, belong to the union's overlay format).
"""

from __future__ import annotations

from layerfs.tar import writer as T

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"


def whiteout_member(path: bytes) -> T.Member:
    """The member that deletes ``path`` from lower layers: an empty ``.wh.<name>`` file."""
    parent, _, base = path.rpartition(b"/")
    return T.Member((parent + b"/" if parent else b"") + WHITEOUT_PREFIX + base, T.REG, 0o644)


def opaque_member(dir_path: bytes) -> T.Member:
    """The member that hides everything lower layers have below ``dir_path``."""
    return T.Member(dir_path + b"/" + OPAQUE_MARKER, T.REG, 0o644)
