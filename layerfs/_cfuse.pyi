"""Stubs for ``layerfs._cfuse``, the C FUSE core (ext/fusecore.c); its Python half and the
calls it makes are in ``layerfs.fuse.lowlevel``."""

from typing import Any, Final

PROTOCOL_MINOR: Final[int]

class Session:
    def __init__(
        self,
        fd: int,
        ops: Any,
        writable: bool = False,
        entry_timeout: float = 1.0,
        attr_timeout: float = 1.0,
        negative_timeout: float = 1.0,
        debug: bool = False,
        store: str | None = None,
        chain_prefix: bytes = b"",
        statfs: tuple[int, ...] | None = None,
        threads: int = 1,
        passthrough: bool = False,
        file_cache: str | None = None,
        file_cache_size: int = 0,
        file_cache_min: int = 0,
        label: str = "the image",
    ) -> None: ...
    def run(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def read_ahead(self) -> int: ...
