"""Pull against the real registry server (plain HTTP, no auth): interop with skopeo and with
``layerfs import`` of the same image, manifests and indexes, gzip and zstd layers, incremental
pulls."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_layout, member, tar_bytes
from registryutil import RegistryServer, needs_registry, needs_skopeo, registry, skopeo_copy

from layerfs.tools.sources import host_platform, normalize_platform

pytestmark = [needs_registry, needs_skopeo]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with registry(tmp_path_factory.mktemp("plain-registry")) as server:
        yield server


def push_layout(
    layout: str | Path, server: RegistryServer, repo: str, *extra: str, ref: str = "latest"
) -> str:
    """Put an OCI layout's image into the registry with skopeo; the reference pushed."""
    dest = f"{server.host}/{repo}"
    skopeo_copy(
        f"oci:{layout}:{ref}" if ref else f"oci:{layout}",
        f"docker://{dest}",
        "--dest-tls-verify=false",
        *extra,
    )
    return dest


def image_of(cli: Any, name: str) -> dict[str, Any]:
    images = cli("images", "--json").json()
    found = [i for i in images if name in i["repo_tags"]]
    assert len(found) == 1, images
    return found[0]


def layers_of(n: int, seed: str, big: int = 0) -> list[bytes]:
    out = []
    for i in range(n):
        data = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (1 + big // 32)
        out.append(tar_bytes([member(f"d{i}/", kind=b"5", mode=0o755), member(f"d{i}/f-{seed}", data)]))
    return out


def decompressed_layout(src: str, dst: Path) -> Path:
    """``src`` (one image, gzip layers) with its layers uncompressed: the same config, so the
    same image id; skopeo compresses such layers as it pushes them (gzip, or zstd if asked)."""
    blobs = Path(src) / "blobs/sha256"
    index = json.loads((Path(src) / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    (dst / "blobs/sha256").mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (dst / "blobs/sha256" / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    layers = [
        dict(
            put(gzip.decompress((blobs / d["digest"][7:]).read_bytes())),
            mediaType="application/vnd.oci.image.layer.v1.tar",
        )
        for d in manifest["layers"]
    ]
    shutil.copy(blobs / manifest["config"]["digest"][7:], dst / "blobs/sha256")
    new = dict(manifest, layers=layers)
    desc = dict(put(json.dumps(new).encode()), mediaType=manifest["mediaType"])
    desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (dst / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    (dst / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return dst


# -- 1. what skopeo put there pulls to the image `layerfs import` makes ---------------------------------
@pytest.mark.parametrize("compression", ["as-is", "gzip", "zstd"])
def test_pull_matches_import(
    compression: str,
    plain: RegistryServer,
    sample_layout: str,
    cli: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """as-is: the sample's own gzip layers; gzip, zstd: skopeo compresses uncompressed layers."""
    repo = f"sample-{compression}"
    if compression == "as-is":
        ref = push_layout(sample_layout, plain, repo)
    else:
        plain_layout = decompressed_layout(sample_layout, tmp_path / "uncompressed")
        # a registry of its own: skopeo would reuse a gzip blob it knows the registry has
        # for these layers instead of compressing them with zstd
        server = RegistryServer(tmp_path / "own-registry") if compression == "zstd" else plain
        if server is not plain:
            request.addfinalizer(server.stop)
        ref = push_layout(plain_layout, server, repo, "--dest-compress-format", compression)
    res = cli("pull", "--tls-verify=false", "--json", ref).json()
    assert res["names"] == [f"{ref}:latest"]
    assert res["layers_new"] == 3 and res["layers_known"] == 0

    other = tmp_path / "imported"
    imported = cli("import", "--json", sample_layout, env={"LAYERFS_STORE": str(other)}).json()[0]
    assert res["image_id"] == imported["image_id"]
    assert res["layer_ids"] == imported["layer_ids"]
    pulled = image_of(cli, f"{ref}:latest")
    assert pulled["id"] == imported["image_id"] and pulled["layers"] == imported["layer_ids"]
    if compression == "zstd":
        layers = cli("layers", "--json").json()
        assert {layer["compression"] for layer in layers} == {"zstd"}
    assert cli("verify").code == 0
    # the same layers' tables: a mount of either is the same tree
    assert cli("inspect", f"{ref}:latest").json()[0]["RootFS"]["Layers"] == imported["layer_ids"]


def test_pull_again_downloads_nothing(plain: RegistryServer, sample_layout: str, cli: Any) -> None:
    ref = push_layout(sample_layout, plain, "again")
    cli("pull", "--tls-verify=false", "-q", ref)
    mark = plain.mark()
    out = cli("pull", "--tls-verify=false", ref).out
    assert "Status: Image is up to date for" in out
    blobs = [r for r in plain.requests(mark) if "/blobs/sha256:" in r[1] and r[0] == "GET"]
    assert len(blobs) == 1  # the config; no layer


def test_pull_by_digest_and_docker_reference_rules(
    plain: RegistryServer, sample_layout: str, cli: Any
) -> None:
    ref = push_layout(sample_layout, plain, "team/app", ref="latest")
    digest = json.loads(
        os.popen(f"skopeo inspect --tls-verify=false docker://{ref}:latest").read()  # noqa: S605
    )["Digest"]
    res = cli("pull", "--tls-verify=false", "--json", f"{ref}@{digest}").json()
    assert res["digest"] == digest
    assert res["names"] == []  # a digest alone names no tag, as with docker
    assert cli("inspect", res["image_id"]).code == 0
    wrong = "sha256:" + "0" * 64
    bad = cli("pull", "--tls-verify=false", f"{ref}@{wrong}", check=False)
    assert bad.code == 1 and "not found" in bad.err and bad.err.count("\n") == 1
    bad = cli("pull", "--tls-verify=false", f"{plain.host}/Team/App", check=False)
    assert bad.code == 1 and "must be lowercase" in bad.err


def test_pull_incremental_moves_only_the_new_layer(plain: RegistryServer, cli: Any, tmp_path: Path) -> None:
    shared = layers_of(3, "shared", big=200_000)
    new = layers_of(1, "new", big=300_000)
    make_layout(tmp_path / "a", shared, ref="latest")
    make_layout(tmp_path / "b", shared + new, ref="latest")
    ref_a = push_layout(tmp_path / "a", plain, "incr-a")
    ref_b = push_layout(tmp_path / "b", plain, "incr-b")
    cli("pull", "--tls-verify=false", "-q", ref_a)
    mark = plain.mark()
    res = cli("pull", "--tls-verify=false", "--json", ref_b).json()
    assert (res["layers_new"], res["layers_known"]) == (1, 3)
    manifest = json.loads(
        os.popen(f"skopeo inspect --raw --tls-verify=false docker://{ref_b}:latest").read()  # noqa: S605
    )
    assert res["bytes_downloaded"] == manifest["layers"][3]["size"]
    gets = [r[1] for r in plain.requests(mark) if r[0] == "GET" and "/blobs/" in r[1]]
    assert sorted(gets) == sorted(
        [
            f"/v2/incr-b/blobs/{manifest['config']['digest']}",
            f"/v2/incr-b/blobs/{manifest['layers'][3]['digest']}",
        ]
    )
    assert cli("verify").code == 0


def _arch_layout(path: Path, archs: list[tuple[str, str]]) -> dict[str, str]:
    """An OCI layout with an index of one image per (architecture, variant); image ids by platform."""
    ids = {}
    manifests = []
    for arch, variant in archs:
        sub = path.parent / f"{path.name}-{arch}{variant}"
        extra: dict[str, object] = {"architecture": arch}
        if variant:
            extra["variant"] = variant
        make_layout(sub, layers_of(2, f"{arch}{variant}"), ref=None, config_extra=extra)
        index = json.loads((sub / "index.json").read_text())
        desc = index["manifests"][0]
        manifest = json.loads((sub / "blobs/sha256" / desc["digest"][7:]).read_bytes())
        cfg = (sub / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes()
        plat = f"linux/{arch}" + (f"/{variant}" if variant else "")
        ids[plat] = "sha256:" + hashlib.sha256(cfg).hexdigest()
        desc["platform"] = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        manifests.append(desc)
        shutil.copytree(sub / "blobs", path / "blobs", dirs_exist_ok=True)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }
    idx = json.dumps(index).encode()
    (path / "blobs/sha256" / hashlib.sha256(idx).hexdigest()).write_bytes(idx)
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": index["mediaType"],
                "digest": "sha256:" + hashlib.sha256(idx).hexdigest(),
                "size": len(idx),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (path / "index.json").write_text(json.dumps(top))
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return ids


def test_multi_arch_index_pulls_the_right_variant(plain: RegistryServer, cli: Any, tmp_path: Path) -> None:
    ids = _arch_layout(tmp_path / "multi", [("amd64", ""), ("arm64", "v8"), ("arm", "v7"), ("arm", "v6")])
    ref = push_layout(tmp_path / "multi", plain, "multi", "--all")
    for platform, expected in [
        ("linux/arm64", "linux/arm64/v8"),
        ("linux/arm/v6", "linux/arm/v6"),
        ("arm", "linux/arm/v7"),
    ]:
        res = cli("pull", "--tls-verify=false", "--json", "--platform", platform, ref).json()
        assert res["image_id"] == ids[expected], platform
        assert res["platform"] == expected
    host = normalize_platform(host_platform())  # without --platform: the host's, whatever it is
    res = cli("pull", "--tls-verify=false", "--json", ref, check=False)
    if host in ids:
        assert res.code == 0 and res.json()["image_id"] == ids[host]
    else:
        assert res.code == 1 and f"no image for platform {host_platform()}" in res.err
    bad = cli("pull", "--tls-verify=false", "--platform", "linux/s390x", ref, check=False)
    assert bad.code == 1
    assert "no image for platform linux/s390x" in bad.err and "linux/arm64/v8" in bad.err
    assert cli("verify").code == 0


def test_blob_sources_are_remembered_and_dropped_by_gc(
    plain: RegistryServer, sample_layout: str, cli: Any, store_path: str
) -> None:
    from layerfs.store import Store, blobsources

    ref = push_layout(sample_layout, plain, "sources")
    res = cli("pull", "--tls-verify=false", "--json", ref).json()
    with Store(store_path, readonly=True) as store:
        found = [blobsources.lookup(store, bytes.fromhex(d[7:])) for d in res["layer_ids"]]
    assert all(len(f) == 1 and f[0].registry == plain.host and f[0].repository == "sources" for f in found)
    cli("rmi", f"{ref}:latest")
    cli("gc")
    with Store(store_path, readonly=True) as store:
        assert blobsources.count(store) == 0
    assert cli("verify").code == 0


def test_a_store_without_blob_sources_reads_as_none(store_path: str, sample_layout: str, cli: Any) -> None:
    from layerfs.store import Store, blobsources

    cli("import", "-q", sample_layout)  # no pull: the database was never made
    with Store(store_path, readonly=True) as store:
        layer = next(k for k, _ in store.layers())
        assert blobsources.lookup(store, layer) == [] and blobsources.count(store) == 0
    assert cli("gc").code == 0 and cli("verify").code == 0


def test_short_names_through_a_mirror(plain: RegistryServer, sample_layout: str, cli: Any) -> None:
    """LAYERFS_REGISTRY_MIRROR: Docker Hub names are pulled from the mirror (docker's
    registry-mirrors); the image keeps its Docker Hub name."""
    push_layout(sample_layout, plain, "library/mirrored")
    env = {"LAYERFS_REGISTRY_MIRROR": f"http://{plain.host}"}
    res = cli("pull", "--json", "mirrored", env=env).json()
    assert res["names"] == ["mirrored:latest"] and res["reference"] == "docker.io/library/mirrored:latest"
    assert image_of(cli, "mirrored:latest")["id"] == res["image_id"]
    assert cli("verify").code == 0
