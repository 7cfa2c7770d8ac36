"""Tar, the format layers travel in: reading (``reader``: the C parser or its pure-Python
twin, chosen by ``LAYERFS_IMPL``), writing (``writer``: deterministic bytes) and the OCI
whiteout names a layer uses to delete (``whiteouts``).

The C parser's module keeps its own name, ``layerfs._ctar`` (``ext/ctar.c``).
"""
