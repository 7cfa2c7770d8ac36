"""The C FUSE core's Python boundary, without a mount."""

from __future__ import annotations

import gc
import os
import sys

import pytest

cfuse = pytest.importorskip("layerfs._cfuse", reason="C extension not built")


class Ops:
    """Stands in for CoreOps: the session only keeps it until a request comes."""


def test_a_session_that_fails_to_open_its_store_leaves_ops_alone(tmp_path):
    """Session() raised after parsing its arguments (the store did not open: under qemu-aarch64
    every time), and its dealloc dropped a reference to ``ops`` it had never taken: the mount
    code's CoreOps was freed under it, and the daemon died of SIGSEGV in its error path."""
    ops = Ops()
    before = sys.getrefcount(ops)
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        for _ in range(3):
            with pytest.raises(OSError):
                cfuse.Session(
                    fd,
                    ops,
                    store=str(tmp_path / "no-store"),
                    chain_prefix=b"12345678",
                    statfs=(0, 0, 0, 0, 0, 4096, 255, 4096),
                    threads=1,
                )
            gc.collect()
    finally:
        os.close(fd)
    assert sys.getrefcount(ops) == before
