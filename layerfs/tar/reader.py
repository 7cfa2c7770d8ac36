"""The streaming tar parser, from the C extension or its pure-Python twin.

``LAYERFS_IMPL=c`` insists on the C extension (``layerfs._ctar``),
``LAYERFS_IMPL=python`` selects the twin, unset (or ``auto``) takes C when it is
built.  ``BACKEND`` says which one is loaded.  The API is documented in
``layerfs.tar._pyreader``.
"""

from __future__ import annotations

import os

from layerfs.tar._pyreader import EV_DATA, EV_END, EV_ENTRY, MAX_EXT, TarError

_impl = os.environ.get("LAYERFS_IMPL", "auto").lower()
if _impl not in ("auto", "c", "python"):
    raise ImportError(f"LAYERFS_IMPL must be 'c', 'python' or 'auto', not {_impl!r}")

if _impl == "python":
    from layerfs.tar._pyreader import TarParser

    BACKEND = "python"
else:
    try:
        from layerfs._ctar import TarParser  # type: ignore[assignment]

        BACKEND = "c"
    except ImportError:
        if _impl == "c":
            raise
        from layerfs.tar._pyreader import TarParser

        BACKEND = "python"

__all__ = ["BACKEND", "EV_DATA", "EV_END", "EV_ENTRY", "MAX_EXT", "TarError", "TarParser"]
