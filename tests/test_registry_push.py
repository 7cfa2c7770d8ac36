"""Push against the real registry server: what layerfs pushes is pulled back by skopeo and by podman
(same image id; it runs there), pushing twice uploads nothing, an image goes back where it came from
without an upload and to another repository by a cross-repository mount, and our compression is
deterministic (gzip and zstd)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from registryutil import (
    RegistryServer,
    needs_podman,
    needs_registry,
    needs_skopeo,
    registry,
    run,
    skopeo_copy,
)
from test_podman import Podman

pytestmark = [needs_registry, needs_skopeo]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with registry(tmp_path_factory.mktemp("push-registry")) as server:
        yield server


@pytest.fixture
def imported(cli: Any, sample_layout: str) -> dict[str, Any]:
    return dict(cli("import", "--json", sample_layout).json()[0])


def raw_manifest(ref: str) -> dict[str, Any]:
    return dict(json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}")))


def test_pushed_image_is_pulled_back_by_skopeo(
    plain: RegistryServer, imported: dict[str, Any], cli: Any, tmp_path: Path
) -> None:
    dest = f"{plain.host}/pushed/sample:1"
    res = cli("push", "--tls-verify=false", "--json", "layerfs-sample", dest).json()
    assert res["layers_uploaded"] == 3 and res["config_uploaded"]
    manifest = raw_manifest(dest)
    assert manifest["config"]["digest"] == imported["image_id"]
    assert [d["mediaType"] for d in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"] * 3
    layout = tmp_path / "copied"
    skopeo_copy(f"docker://{dest}", f"oci:{layout}:latest", "--src-tls-verify=false")
    again = cli("import", "--json", str(layout), env={"LAYERFS_STORE": str(tmp_path / "other")}).json()[0]
    assert again["image_id"] == imported["image_id"] and again["layer_ids"] == imported["layer_ids"]
    # and layerfs pulls it back to the same image
    pulled = cli(
        "pull", "--tls-verify=false", "--json", dest, env={"LAYERFS_STORE": str(tmp_path / "third")}
    ).json()
    assert pulled["image_id"] == imported["image_id"] and pulled["layer_ids"] == imported["layer_ids"]
    assert pulled["digest"] == res["digest"]
    assert cli("verify").code == 0


@needs_podman
def test_pushed_image_runs_in_podman(plain: RegistryServer, imported: dict[str, Any], cli: Any) -> None:
    dest = f"{plain.host}/pushed/podman:1"
    cli("push", "--tls-verify=false", "-q", "layerfs-sample", dest)
    podman = Podman(tempfile.mkdtemp(prefix="lfpush-", dir="/tmp"), ["--storage-driver", "vfs"])
    try:
        podman("pull", "--tls-verify=false", "-q", dest)
        (img,) = json.loads(podman("image", "inspect", dest))
        assert "sha256:" + img["Id"] == imported["image_id"]
        assert img["RootFS"]["Layers"] == imported["layer_ids"]
        # ulimits this sandbox allows (podman's defaults exceed its hard limits)
        out = podman(
            "run", "--rm", "--net=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", dest
        )
        assert "hello from the layerfs sample image" in out
    finally:
        podman.close()
        shutil.rmtree(podman.base, ignore_errors=True)


def test_push_twice_uploads_nothing(plain: RegistryServer, imported: dict[str, Any], cli: Any) -> None:
    dest = f"{plain.host}/twice:1"
    first = cli("push", "--tls-verify=false", "--json", "layerfs-sample", dest).json()
    mark = plain.mark()
    second = cli("push", "--tls-verify=false", "--json", "layerfs-sample", dest).json()
    assert plain.uploads(mark) == []
    assert (second["layers_uploaded"], second["layers_existing"], second["bytes_uploaded"]) == (0, 3, 0)
    assert second["digest"] == first["digest"]
    assert cli("push", "--tls-verify=false", "layerfs-sample", dest).out.startswith(
        f"1: digest: {first['digest']}"
    )


def test_pulled_image_goes_back_and_elsewhere_without_uploads(
    plain: RegistryServer, sample_layout: str, cli: Any
) -> None:
    src = f"{plain.host}/origin/app"
    skopeo_copy(f"oci:{sample_layout}:latest", f"docker://{src}:latest", "--dest-tls-verify=false")
    skopeo_digest = json.loads(run("skopeo", "inspect", "--tls-verify=false", f"docker://{src}:latest"))[
        "Digest"
    ]
    cli("pull", "--tls-verify=false", "-q", src)
    # back where it came from: nothing uploaded, the very manifest (same digest)
    mark = plain.mark()
    back = cli("push", "--tls-verify=false", "--json", f"{src}:latest", f"{src}:again").json()
    assert plain.uploads(mark) == []
    assert back["digest"] == skopeo_digest and back["layers_existing"] == 3
    # another repository of the same registry: cross-repository mounts, no bytes
    mark = plain.mark()
    other = cli(
        "push", "--tls-verify=false", "--json", f"{src}:latest", f"{plain.host}/elsewhere/app:1"
    ).json()
    assert other["layers_mounted"] == 3 and other["bytes_uploaded"] == 0 and not other["config_uploaded"]
    uploads = plain.uploads(mark)
    assert uploads and all(m == "POST" and "mount=" in p and s == 201 for m, p, s in uploads), uploads
    assert other["digest"] == skopeo_digest


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compression_is_deterministic(
    compression: str, plain: RegistryServer, sample_layout: str, cli: Any, tmp_path: Path
) -> None:
    digests = []
    for n in (1, 2):
        store = str(tmp_path / f"store{n}")
        env = {"LAYERFS_STORE": store}
        cli("import", "-q", sample_layout, env=env)
        dest = f"{plain.host}/det-{compression}/n{n}:1"
        res = cli(
            "push",
            "--tls-verify=false",
            "--json",
            "--compression-format",
            compression,
            "layerfs-sample",
            dest,
            env=env,
        ).json()
        assert res["layers_uploaded"] == 3
        digests.append((res["digest"], [d["digest"] for d in res["layers"]]))
        manifest = raw_manifest(dest)
        assert {d["mediaType"] for d in manifest["layers"]} == {
            f"application/vnd.oci.image.layer.v1.tar+{compression}"
        }
    assert digests[0] == digests[1]
    pulled = cli("pull", "--tls-verify=false", "--json", f"{plain.host}/det-{compression}/n1:1").json()
    layers = {layer["id"]: layer for layer in cli("layers", "--json").json()}
    assert {layers[i]["compression"] for i in pulled["layer_ids"]} == {compression}
    assert cli("verify").code == 0


def test_push_refusals(plain: RegistryServer, imported: dict[str, Any], cli: Any) -> None:
    bad = cli("push", "--tls-verify=false", "nothere", f"{plain.host}/x:1", check=False)
    assert bad.code == 1 and bad.err == "layerfs: no such image: nothere\n"
    bad = cli("push", "--tls-verify=false", imported["image_id"][7:19], check=False)
    assert bad.code == 1 and "say where to push it" in bad.err
    bad = cli("push", "layerfs-sample", f"{plain.host}/x:1", check=False)  # TLS by default
    assert bad.code == 1 and "does not answer HTTPS" in bad.err and "--tls-verify=false" in bad.err
