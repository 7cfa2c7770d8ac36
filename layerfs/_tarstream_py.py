"""Only for ``ext/ctar.c``: the C tar parser imports this name when it loads, to raise the very
``TarError`` class of its pure-Python twin.  The twin is ``layerfs.tar._pyreader``; this module
goes once ctar.c imports that name instead."""

from layerfs.tar._pyreader import TarError

__all__ = ["TarError"]
