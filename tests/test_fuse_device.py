"""A /dev/fuse this process cannot use is refused in one sentence that says what is needed,
by both cores (the twin printed libfuse's status, "4"; the C core "[Errno 22] Invalid argument").
The device is replaced in a mount namespace of the test's own (``unshare -m``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.parametrize("core", ["c", "python"])
def test_a_device_that_is_not_fuse(core, cli, sample_layout, store_path, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1)")
    cli("import", "-q", sample_layout)
    fake, mnt = tmp_path / "not-fuse", tmp_path / "m"
    fake.write_text("")
    mnt.mkdir()
    script = f"mount --bind {fake} /dev/fuse && exec {sys.executable} -m layerfs mount layerfs-sample {mnt}"
    env = dict(os.environ, LAYERFS_STORE=store_path, LAYERFS_FUSE=core)
    res = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert "/dev/fuse is not the FUSE device" in line and "Errno" not in line, line
