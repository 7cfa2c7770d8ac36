"""``bundle DIR`` writes DIR/config.json as root: a symlink planted there by whoever can write
to DIR is replaced, never followed (its target was overwritten with the runtime spec)."""

from __future__ import annotations

import json
import os

import pytest
from unionutil import mounted, need_fuse  # noqa: F401 - need_fuse is a fixture

pytestmark = pytest.mark.usefixtures("need_fuse")


def test_bundle_does_not_follow_a_planted_config_json(cli, sample_layout, tmp_path):
    cli("import", "-q", sample_layout)
    bundle, target = tmp_path / "bundle", tmp_path / "precious"
    bundle.mkdir()
    target.write_text("keep me\n")
    os.symlink(target, bundle / "config.json")
    try:
        cli("bundle", "layerfs-sample:latest", str(bundle))
        assert target.read_text() == "keep me\n"
        assert not (bundle / "config.json").is_symlink()
        with open(bundle / "config.json") as f:
            assert json.load(f)["root"]["path"] == "rootfs"
        assert [p for p in os.listdir(bundle) if p.endswith(".tmp")] == []
    finally:
        cli("umount", str(bundle / "rootfs"), check=False)
    assert not mounted(str(bundle / "rootfs"))


def test_a_system_error_of_run_is_one_plain_line(cli, sample_layout, store_path):
    """`run` said "[Errno 1] Operation not permitted: ..." (an unprivileged user saw that); the
    system's words now, without Python's prefix.  An immutable containers directory makes
    creating the container fail even for root."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    cli("import", "-q", sample_layout)
    containers = os.path.join(store_path, "containers")
    os.makedirs(containers, exist_ok=True)
    if subprocess.run(["chattr", "+i", containers], capture_output=True).returncode != 0:
        pytest.skip("the filesystem has no immutable attribute")
    try:
        res = cli("run", "--rm", "layerfs-sample:latest", "true", check=False)
    finally:
        subprocess.run(["chattr", "-i", containers], check=True)
    assert res.code == 125, res.err
    (line,) = res.err.strip().splitlines()
    assert "Operation not permitted" in line and "Errno" not in line, line
