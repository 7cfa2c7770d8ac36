"""Stubs for ``layerfs._ctar``, the C twin of ``layerfs.tar._pyreader``.

Same API and same events as the pure-Python module (whose docstring is the
contract); ``TarError`` is the very class defined there.
"""

from collections.abc import Callable
from typing import Final

from layerfs.tar._pyreader import TarError as TarError

EV_ENTRY: Final[int]
EV_DATA: Final[int]
EV_END: Final[int]
BLOCK: Final[int]
MAX_EXT: Final[int]
READ_SIZE: Final[int]

class TarParser:
    def __init__(self, read: Callable[[int], bytes], chunk_size: int = 65536) -> None: ...
    def __iter__(self) -> TarParser: ...
    def __next__(self) -> tuple[int, object]: ...
