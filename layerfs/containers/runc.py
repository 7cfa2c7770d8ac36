"""The OCI runtime's command line: which binary (runc, or ``$LAYERFS_RUNTIME``), the state
root layerfs keeps its containers under, and what it says of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

from layerfs.containers import ContainerError

RUNC_ROOT = "/run/layerfs/runc"


def runtime() -> str:
    """The runc binary (``$LAYERFS_RUNTIME`` names another OCI runtime with runc's CLI)."""
    name = os.environ.get("LAYERFS_RUNTIME", "runc")
    path = shutil.which(name)
    if path is None:
        raise ContainerError(f"the OCI runtime {name!r} is not installed (Debian: apt install runc)")
    return path


def runc_command(*args: str) -> list[str]:
    """The runtime's command line with layerfs's state root, then ``args``."""
    return [runtime(), "--root", RUNC_ROOT, *args]


def runtime_status(cid: str) -> str | None:
    """What runc says of the container (created, running, paused, stopped), None if it has no
    such container."""
    try:
        res = subprocess.run(runc_command("state", cid), capture_output=True, text=True)
    except ContainerError:
        return None
    if res.returncode != 0:
        return None
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(res.stdout).get("status"))
    return None
