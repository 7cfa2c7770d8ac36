"""podman with ``overlay.mount_program=layerfs-overlay`` against fuse-overlayfs.

containers/storage runs the mount program exactly as it runs fuse-overlayfs (lowerdirs as
short symlinks, cwd in the storage directory, options it alone uses).  ``podman run`` may
fail in a sandbox for cgroup reasons, so the tree is checked through ``create`` + ``mount``
and ``export``; fuse-overlayfs on the same image in the same run gives the expected tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from typing import Any

import pytest
from unionutil import force_unmount, fuse_unavailable, mounts_below, snapshot

pytestmark = [
    pytest.mark.usefixtures("fuse_core"),
    pytest.mark.skipif(
        shutil.which("podman") is None
        or shutil.which("skopeo") is None
        or shutil.which("fuse-overlayfs") is None,
        reason="podman, skopeo and fuse-overlayfs are needed (.ci/install installs them)",
    ),
]


def overlay_helper() -> str:
    path = shutil.which("layerfs-overlay")
    if path is None:
        pytest.skip("layerfs-overlay is not on PATH (pip install puts it there)")
    return path


class Podman:
    """podman on its own storage under ``base`` (``storage``: driver options), events and cgroups
    kept local."""

    def __init__(self, base: str, storage: list[str]) -> None:
        self.base = base
        self.args = [
            "podman",
            "--root",
            os.path.join(base, "root"),
            "--runroot",
            os.path.join(base, "run"),
            *storage,
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]

    def __call__(self, *args: str) -> str:
        res = subprocess.run([*self.args, *args], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"podman {' '.join(args)}: {res.stderr}"
        return res.stdout.strip()

    def close(self) -> None:
        subprocess.run([*self.args, "rm", "-af"], capture_output=True, timeout=120)
        subprocess.run([*self.args, "rmi", "-af"], capture_output=True, timeout=120)
        for m in sorted(mounts_below(self.base), reverse=True):
            force_unmount(m)


@pytest.fixture(scope="module")
def docker_archive(sample_layout: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("podman") / "sample.tar")
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--insecure-policy",
            f"oci:{sample_layout}:latest",
            f"docker-archive:{out}:layerfs-sample:latest",
        ],
        check=True,
        capture_output=True,
    )
    return out


def podman_tree(docker_archive: str, program: str) -> dict[str, Any]:
    """A container of the sample made by podman with ``program`` as its mount program: its
    file system type, tree and ``podman export``."""
    base = tempfile.mkdtemp(prefix="lfpm-", dir="/tmp")  # podman: runroot <= 50 characters
    p = Podman(base, ["--storage-driver", "overlay", "--storage-opt", f"overlay.mount_program={program}"])
    try:
        p("load", "-i", docker_archive)
        container = p("create", "docker.io/library/layerfs-sample:latest")
        merged = p("mount", container)
        with open("/proc/self/mountinfo") as f:
            line = next(x for x in f if f" {merged} " in x)
        fstype = line.split(" - ")[1].split()[0]
        tree = snapshot(merged)
        p("umount", container)
        export = os.path.join(base, "export.tar")
        p("export", "-o", export, container)
        return {"fstype": fstype, "tree": tree, "export": tar_listing(export)}
    finally:
        p.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def peer_tree(docker_archive: str) -> dict[str, Any]:
    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    return podman_tree(docker_archive, shutil.which("fuse-overlayfs") or "")


@pytest.fixture(scope="module")
def trees(docker_archive: str, peer_tree: dict[str, Any], fuse_core: str) -> dict[str, Any]:
    """fuse-overlayfs's container and ours, made again with each FUSE core (``fuse_core`` is a
    parameter here: a module fixture without it would be shared by both cores' tests)."""
    return {"fuse-overlayfs": peer_tree, "layerfs": podman_tree(docker_archive, overlay_helper())}


def tar_listing(path: str) -> dict[str, tuple[Any, ...]]:
    entries: dict[str, tuple[Any, ...]] = {}
    with tarfile.open(path) as t:
        for m in t:
            data = b""
            if m.isfile():
                f = t.extractfile(m)
                assert f is not None
                data = f.read()
            entries[m.name.rstrip("/")] = (
                m.type,
                m.mode,
                m.uid,
                m.gid,
                m.linkname,
                hashlib.sha256(data).hexdigest(),
                m.devmajor,
                m.devminor,
            )
    return entries


def test_podman_mounts_through_layerfs_overlay(trees: dict[str, Any]) -> None:
    assert trees["layerfs"]["fstype"] == "fuse.layerfs-overlay"
    assert trees["fuse-overlayfs"]["fstype"] == "fuse.fuse-overlayfs"


def test_mounted_tree_equals_fuse_overlayfs(trees: dict[str, Any]) -> None:
    expected, got = trees["fuse-overlayfs"]["tree"], trees["layerfs"]["tree"]
    assert sorted(got) == sorted(expected)
    diffs = {p: (expected[p], got[p]) for p in expected if expected[p] != got[p]}
    assert not diffs, diffs


def test_exported_tree_equals_fuse_overlayfs(trees: dict[str, Any]) -> None:
    expected, got = trees["fuse-overlayfs"]["export"], trees["layerfs"]["export"]
    assert len(got) > 40 and "app/run.sh" in got
    assert got == expected
