"""Shared fixtures: real LMDB stores in tmp dirs, the CLI as a subprocess, image builders."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerfs.store import Store
from layerfs.tools import layer as layer_mod
from layerfs.tools.sample import write_layout

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"


# -- test tiers: what a test needs ------------------------------------------------------------
# Every test gets the tier of its module (a module not listed: ``mount``, so that
# ``-m "not mount"`` stays safe until it is); a test of a ``unit`` module that takes a store is
# ``store``; a test that mounts is ``mount`` as well (by the fixtures it uses, or listed below);
# one that hands images to other tools is ``interop`` as well.  Markers, not directories: a test
# file keeps its place and its history when its tier is refined, and parallel work on the
# tests does not collide with moved files.
MODULE_TIERS = {
    "test_tarstream": "unit",
    "test_platform": "unit",
    "test_procfs": "unit",
    "test_cfuse": "unit",
    "test_records": "unit",
    "test_skeleton": "store",
    "test_store": "store",
    "test_store_private": "store",
    "test_store_files": "store",
    "test_usage": "store",
    "test_hostile": "store",
    "test_cli": "store",
    "test_cli_errors": "store",
    "test_crash": "store",
    "test_commit": "store",
    "test_save": "store",
    "test_import_interop": "store",
    "test_registry": "store",
    "test_registry_auth": "store",
    "test_registry_faults": "store",
    "test_registry_parallel": "store",
    "test_registry_push": "store",
    "test_view": "view",
    "test_view_replay": "view",
    "test_mount": "mount",
    "test_arch32": "mount",
    "test_conformance": "mount",
    "test_union_kernel": "mount",
    "test_overlay": "mount",
    "test_filecache": "mount",
    "test_deep": "mount",
    "test_containers": "mount",
    "test_bundle_safety": "mount",
    "test_fuse_device": "mount",
    "test_packaging": "mount",
    "test_podman": "mount",
    "test_storagebench": "mount",
    "test_storagebench_report": "unit",
}
# modules whose tests hand layerfs's input or output to other image tools (skopeo, umoci, podman)
INTEROP_MODULES = {
    "test_import_interop",
    "test_save",
    "test_podman",
    "test_commit",
    # the real registry server, and skopeo and podman on the other end
    "test_registry",
    "test_registry_auth",
    "test_registry_faults",
    "test_registry_parallel",
    "test_registry_push",
}
STORE_FIXTURES = {"store", "store_path", "cli"}
# fixtures that mean a FUSE mount (or a container, which is one)
MOUNT_FIXTURES = {"need_fuse", "fuse_core", "scenario", "sample_tree"}
# tests of store-tier modules that mount all the same (they skip without FUSE themselves)
MOUNT_TESTS = {
    "test_commit.py::test_long_and_non_ascii_names_round_trip",
    "test_crash.py::test_gc_returns_space_only_when_no_one_else_has_the_store",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        fixtures = set(getattr(item, "fixturenames", ()))
        tier = MODULE_TIERS.get(module, "mount")
        if tier == "unit" and fixtures & STORE_FIXTURES:
            tier = "store"
        item.add_marker(tier)
        name = item.originalname if isinstance(item, pytest.Function) else item.name
        if tier != "mount" and (fixtures & MOUNT_FIXTURES or f"{item.path.name}::{name}" in MOUNT_TESTS):
            item.add_marker("mount")
        if module in INTEROP_MODULES:
            item.add_marker("interop")


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def store(store_path: str) -> Iterator[Store]:
    s = Store(store_path)
    yield s
    s.close()


@pytest.fixture(params=["c", "python"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with each tar parser backend (the import path uses whichever is set)."""
    if request.param == "c":
        ctar = pytest.importorskip("layerfs._ctar", reason="C extension not built")
        monkeypatch.setattr(layer_mod, "TarParser", ctar.TarParser)
    else:
        from layerfs.tar import _pyreader

        monkeypatch.setattr(layer_mod, "TarParser", _pyreader.TarParser)
    return str(request.param)


def _fuse_cores() -> list[str]:
    try:
        from layerfs import _cfuse  # noqa: F401
    except ImportError:
        return ["python"]
    return ["c", "python"]


@pytest.fixture(scope="module", params=_fuse_cores())
def fuse_core(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module's mounts once with each FUSE core (the daemons inherit LAYERFS_FUSE)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAYERFS_FUSE", request.param)
        yield str(request.param)


@dataclass
class CLIResult:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@pytest.fixture
def cli(store_path: str) -> Callable[..., CLIResult]:
    """Run ``layerfs`` as a user would (a subprocess) on the test's store."""

    def run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> CLIResult:
        e = dict(os.environ, LAYERFS_STORE=store_path)
        if env:
            e.update(env)
        p = subprocess.run([sys.executable, "-m", "layerfs", *args], capture_output=True, text=True, env=e)
        if check and p.returncode != 0:
            raise AssertionError(f"layerfs {' '.join(args)} exited {p.returncode}: {p.stderr}")
        return CLIResult(p.returncode, p.stdout, p.stderr)

    return run


@pytest.fixture(scope="session")
def sample_layout(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The project's sample image (busybox-static based) as an OCI layout."""
    busybox = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)
    if busybox is None:
        pytest.skip("busybox-static is not installed (.ci/install installs it)")
    out = str(tmp_path_factory.mktemp("sample") / "layout")
    write_layout(out, busybox)
    return out


SAMPLE = "layerfs-sample:latest"


@pytest.fixture
def sample(cli: Callable[..., CLIResult], sample_layout: str) -> str:
    """The sample image, imported into the test's store: its name."""
    cli("import", sample_layout)
    return SAMPLE


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    return buf.getvalue()


def member(
    name: str,
    data: bytes = b"",
    *,
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    link: str = "",
    mtime: int = 1_700_000_000,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = link
    info.mtime = mtime
    return info, data


def make_layout(
    path: str | Path,
    layers: list[bytes],
    *,
    ref: str | None = "test:latest",
    compress: bool = True,
    diff_ids: list[str] | None = None,
    layer_digests: list[str] | None = None,
    layer_sizes: list[int] | None = None,
    config_extra: dict[str, object] | None = None,
) -> str:
    """Write an OCI image layout from raw layer tars.  The keyword arguments let a test
    lie about digests and sizes (to check that the importer refuses the lie)."""
    path = str(path)
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, h), "wb") as f:
            f.write(data)
        return "sha256:" + h

    descs, real_diff_ids = [], []
    for i, raw in enumerate(layers):
        blob = gzip.compress(raw, mtime=0) if compress else raw
        digest = put(blob)
        descs.append(
            {
                "mediaType": MT_LAYER + ("+gzip" if compress else ""),
                "digest": layer_digests[i] if layer_digests else digest,
                "size": layer_sizes[i] if layer_sizes else len(blob),
            }
        )
        real_diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids or real_diff_ids},
    }
    config.update(config_extra or {})
    cfg = json.dumps(config).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": put(cfg), "size": len(cfg)},
            "layers": descs,
        }
    ).encode()
    desc: dict[str, object] = {"mediaType": MT_MANIFEST, "digest": put(manifest), "size": len(manifest)}
    if ref:
        desc["annotations"] = {"org.opencontainers.image.ref.name": ref}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [desc]}, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return path
