"""Progress bars for long work (import, pull, push, save, bench), drawn by tqdm on a terminal only:
a script reading our stderr gets no bar, and ``--json`` output stays clean."""

from __future__ import annotations

import sys
from typing import Any


def byte_bar(total: int | None, desc: str, *, enabled: bool = True, position: int | None = None) -> Any:
    """A bar counting bytes, or None (not asked for, nothing to count, or stderr no terminal)."""
    if not enabled or (total is not None and total <= 0) or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        position=position,
        leave=False,
    )


def step_bar(total: int, desc: str, *, enabled: bool = True) -> Any:
    """A bar counting steps of long work (the bench's workloads), or None (not asked for, or
    stderr no terminal)."""
    if not enabled or total <= 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)
