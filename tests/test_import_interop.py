"""Image import against what real tools write: umoci, skopeo, ``docker save`` (both formats),
every layer compression, multi-platform indexes, and sources that lie about their digests.

Every image is built inside the test (umoci and skopeo run locally; nothing is pulled)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import member, tar_bytes

from layerfs.store import Store
from layerfs.store import entries as E
from layerfs.store import store as store_mod
from layerfs.store.usage import usage
from layerfs.tools.image import ImportError_, import_path
from layerfs.tools.sources import host_platform, normalize_platform

needs_umoci = pytest.mark.skipif(
    shutil.which("umoci") is None, reason="umoci is not installed (.ci/install installs it)"
)
needs_skopeo = pytest.mark.skipif(
    shutil.which("skopeo") is None, reason="skopeo is not installed (.ci/install installs it)"
)

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"


# -- helpers ------------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def raw(digest: str) -> bytes:
    return bytes.fromhex(digest.removeprefix("sha256:"))


def run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr}")
    return p.stdout


def put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    return {"digest": sha(data), "size": len(data)}


def compress(data: bytes, how: str) -> bytes:
    if how == "tar":
        return data
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "gzip-multimember":  # what pigz and concatenating writers produce
        half = len(data) // 2
        return gzip.compress(data[:half], mtime=0) + gzip.compress(data[half:], mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if how == "zstd-multiframe":
        half = len(data) // 2
        c = zstandard.ZstdCompressor(level=3)
        return c.compress(data[:half]) + c.compress(data[half:])
    raise ValueError(how)


def layer_media_type(how: str, docker: bool = False) -> str:
    if docker:
        assert how == "gzip"
        return MT_DOCKER_LAYER_GZIP
    return MT_LAYER + {"tar": "", "gzip": "+gzip", "zstd": "+zstd"}[how.split("-")[0]]


def write_image(
    layout: Path,
    layers: list[bytes],
    *,
    how: str = "gzip",
    arch: str = "amd64",
    docker: bool = False,
    config_extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """Write the blobs of one image into ``layout``; returns (manifest descriptor, image id)."""
    descs = []
    for raw_tar in layers:
        d = put_blob(layout, compress(raw_tar, how))
        descs.append(dict(d, mediaType=layer_media_type(how, docker)))
    config: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]},
    }
    config.update(config_extra or {})
    cfg = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_DOCKER_MANIFEST if docker else MT_MANIFEST,
        "config": dict(put_blob(layout, cfg), mediaType=MT_DOCKER_CONFIG if docker else MT_CONFIG),
        "layers": descs,
    }
    mdesc = dict(put_blob(layout, json.dumps(manifest).encode()), mediaType=manifest["mediaType"])
    return mdesc, sha(cfg)


def write_index(layout: Path, manifests: list[dict[str, Any]]) -> Path:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests})
    )
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return layout


def oci_layout(path: Path, layers: list[bytes], ref: str | None = "latest", **kw: Any) -> tuple[Path, str]:
    mdesc, image_id = write_image(path, layers, **kw)
    if ref:
        mdesc["annotations"] = {REF_NAME: ref}
    return write_index(path, [mdesc]), image_id


def tar_dir(src: Path, out: Path, *, prefix: str = "", gz: bool = False) -> Path:
    """Tar a directory's contents (as skopeo, docker and ``tar -C dir .`` do)."""
    with tarfile.open(out, "w:gz" if gz else "w") as t:
        for p in sorted(src.rglob("*")):
            t.add(p, arcname=prefix + str(p.relative_to(src)), recursive=False)
    return out


def add_file(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    t.addfile(info, io.BytesIO(data))


def table(store: Store, layer_id: str) -> dict[str, E.Entry]:
    return {e.path.decode(): e for e in store.layer_entries(raw(layer_id))}


def content(store: Store, e: E.Entry) -> bytes:
    if e.size == 0:
        assert e.content is None
        return b""
    assert e.content is not None
    return store.read_object(e.content)


def assert_empty_store(cli: Any) -> None:
    df = cli("df", "--json").json()
    assert (df["images"], df["tags"], df["layers"], df["objects"], df["payload_bytes"]) == (0, 0, 0, 0, 0), df
    assert cli("verify").code == 0


# -- 1. an image built by umoci -----------------------------------------------------------------

BIG = random.Random(7).randbytes(256 * 1024)  # incompressible, several store chunks
LONG = "sub/nested/deep/" + "n" * 120  # needs a PAX / GNU long name
LAYER1_FILES = {
    "etc/hello.txt": b"hello\n",
    "etc/del.txt": b"deleted by the second layer\n",
    "etc/empty": b"",
    "etc/sp\u00e4ce name.txt": b"unicode and a space\n",
    "sub/a": b"hardlinked data\n",
    "bin/suidbin": b"#!/bin/sh\necho setuid\n",
    "sub/nested/deep/f": b"deep\n",
    LONG: b"long name\n",
    "gone/x": b"x\n",
    "gone/y/z": b"z\n",
    "opt/big.bin": BIG,
}
NEW_FILE = ("etc/new.txt", b"added by the second layer\n")
HELLO_MTIME = 1_600_000_000


@dataclass
class UmociImage:
    layout: Path
    image_id: str
    diff_ids: list[str]
    as_root: bool


def layout_image(layout: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    manifest = json.loads((layout / "blobs/sha256" / desc["digest"][7:]).read_bytes())
    cfg_bytes = (layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes()
    return manifest, json.loads(cfg_bytes), sha(cfg_bytes)


@pytest.fixture(scope="session")
def umoci_image(tmp_path_factory: pytest.TempPathFactory) -> UmociImage:
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed")
    base = tmp_path_factory.mktemp("umoci")
    layout, bundle = base / "umoci-img", base / "bundle"
    ref = f"{layout}:latest"
    as_root = os.geteuid() == 0
    unpack = ["umoci", "unpack"] + ([] if as_root else ["--rootless"]) + ["--image", ref, str(bundle)]
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", ref)

    run(*unpack)
    rootfs = bundle / "rootfs"
    for name, data in LAYER1_FILES.items():
        (rootfs / name).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / name).write_bytes(data)
    os.chmod(rootfs / "bin/suidbin", 0o4755)
    os.link(rootfs / "sub/a", rootfs / "sub/b")
    os.symlink("../etc/hello.txt", rootfs / "sub/link")
    os.makedirs(rootfs / "lib")
    os.symlink("/etc/hello.txt", rootfs / "lib/abs-link")
    os.mkfifo(rootfs / "sub/fifo")
    os.makedirs(rootfs / "var/empty-dir", mode=0o700)
    os.chmod(rootfs / "var/empty-dir", 0o700)
    os.utime(rootfs / "etc/hello.txt", (HELLO_MTIME, HELLO_MTIME))
    if as_root:
        os.chown(rootfs / "sub/nested/deep/f", 1000, 2000)
    run("umoci", "repack", "--image", ref, str(bundle))
    shutil.rmtree(bundle)

    run(*unpack)
    (rootfs / "etc/del.txt").unlink()
    shutil.rmtree(rootfs / "gone")
    (rootfs / NEW_FILE[0]).write_bytes(NEW_FILE[1])
    run("umoci", "repack", "--image", ref, str(bundle))
    shutil.rmtree(bundle)

    run(
        "umoci",
        "config",
        "--image",
        ref,
        "--config.cmd",
        "/bin/sh",
        "--config.env",
        "FOO=bar",
        "--config.workingdir",
        "/sub",
        "--author",
        "interop-test",
    )
    manifest, config, image_id = layout_image(layout)
    assert [d["mediaType"] for d in manifest["layers"]] == [MT_LAYER + "+gzip"] * 2
    return UmociImage(layout, image_id, config["rootfs"]["diff_ids"], as_root)


def check_umoci_tables(store: Store, img: UmociImage) -> None:
    """The two layers umoci wrote, entry by entry, with contents read back from the store."""
    l1 = table(store, img.diff_ids[0])
    assert l1[""].kind == E.DIR
    for name, data in LAYER1_FILES.items():
        e = l1[name]
        assert e.kind == E.REG, name
        assert e.size == len(data) and content(store, e) == data, name
    for d in ("bin", "etc", "sub", "sub/nested", "sub/nested/deep", "gone", "gone/y", "opt", "lib"):
        assert l1[d].kind == E.DIR and l1[d].mode & 0o7777 == 0o755, d
    assert l1["var/empty-dir"].kind == E.DIR and l1["var/empty-dir"].mode & 0o7777 == 0o700
    assert l1["bin/suidbin"].mode & 0o7777 == 0o4755
    assert l1["etc/hello.txt"].mode & 0o7777 == 0o644
    assert l1["etc/hello.txt"].mtime_ns == HELLO_MTIME * 10**9
    # the hardlink pair: one regular file, one HARDLINK entry naming it and sharing its content
    a, b = l1["sub/a"], l1["sub/b"]
    assert {a.kind, b.kind} == {E.REG, E.HARDLINK}
    link, target = (b, a) if b.kind == E.HARDLINK else (a, b)
    assert link.link == target.path and link.content == target.content
    assert content(store, link) == LAYER1_FILES["sub/a"]
    assert l1["sub/link"].kind == E.SYMLINK and l1["sub/link"].link == b"../etc/hello.txt"
    assert l1["lib/abs-link"].kind == E.SYMLINK and l1["lib/abs-link"].link == b"/etc/hello.txt"
    assert l1["sub/fifo"].kind == E.FIFO
    if img.as_root:
        f = l1["sub/nested/deep/f"]
        assert (f.uid, f.gid) == (1000, 2000)
    assert not any(e.kind == E.WHITEOUT for e in l1.values())

    l2 = table(store, img.diff_ids[1])
    assert {p for p, e in l2.items() if e.kind != E.DIR} == {"etc/del.txt", "gone", NEW_FILE[0]}
    assert l2["etc/del.txt"].kind == E.WHITEOUT
    assert l2["gone"].kind == E.WHITEOUT
    assert not any(p.startswith("gone/") or ".wh." in p for p in l2)
    assert content(store, l2[NEW_FILE[0]]) == NEW_FILE[1]
    assert not any(e.opaque for e in l2.values())


@needs_umoci
def test_umoci_image_via_cli(cli: Any, store: Store, umoci_image: UmociImage) -> None:
    res = cli("import", str(umoci_image.layout))
    assert "Loaded image: umoci-img:latest" in res.out
    (image,) = cli("images", "--json").json()
    assert image["id"] == umoci_image.image_id
    assert image["repo_tags"] == ["umoci-img:latest"]
    assert image["layers"] == umoci_image.diff_ids
    _, config, _ = layout_image(umoci_image.layout)
    assert image["platform"] == f"{config['os']}/{config['architecture']}"
    layers = cli("layers", "--json").json()
    assert sorted(layer["id"] for layer in layers) == sorted(umoci_image.diff_ids)
    assert all(layer["compression"] == "gzip" and layer["images"] == 1 for layer in layers)

    (info,) = cli("inspect", "umoci-img").json()
    assert info["Config"]["Cmd"] == ["/bin/sh"]
    assert "FOO=bar" in info["Config"]["Env"]
    assert info["Config"]["WorkingDir"] == "/sub"
    assert info["Author"] == "interop-test"

    check_umoci_tables(store, umoci_image)
    assert cli("verify").code == 0


@needs_umoci
def test_umoci_image_in_process(backend: str, store: Store, umoci_image: UmociImage) -> None:
    (res,) = import_path(store, str(umoci_image.layout))
    assert res.names == ["umoci-img:latest"]
    assert res.image_id == umoci_image.image_id and res.layer_ids == umoci_image.diff_ids
    assert (res.layers_new, res.layers_known) == (2, 0)
    check_umoci_tables(store, umoci_image)
    assert store.tags() == {"umoci-img:latest": raw(umoci_image.image_id)}


# -- 2. the umoci image converted by skopeo ------------------------------------------------------


@needs_umoci
@needs_skopeo
def test_skopeo_conversions_share_one_image(
    cli: Any, store: Store, umoci_image: UmociImage, tmp_path: Path
) -> None:
    src = f"oci:{umoci_image.layout}:latest"
    targets = [
        (f"docker-archive:{tmp_path / 'docker.tar'}:interop/app:docker", tmp_path / "docker.tar"),
        (f"oci-archive:{tmp_path / 'oci.tar'}:interop/app:ociarchive", tmp_path / "oci.tar"),
        (f"oci:{tmp_path / 'ocidir'}:interop/app:ocidir", tmp_path / "ocidir"),
    ]
    for dest, _ in targets:
        run("skopeo", "--insecure-policy", "copy", "--quiet", src, dest)
    # skopeo passes the config through untouched, so every copy is the very same image
    with tarfile.open(tmp_path / "docker.tar") as t:
        (entry,) = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert entry["Config"].split(".")[0] == umoci_image.image_id[7:]

    expected_tags = []
    first_df: dict[str, Any] | None = None
    for (_, path), tag in zip(targets, ("docker", "ociarchive", "ocidir")):
        (res,) = cli("import", "--json", str(path)).json()
        expected_tags.append(f"interop/app:{tag}")
        assert res["names"] == [f"interop/app:{tag}"]
        assert res["image_id"] == umoci_image.image_id
        assert res["layers_new"] == (2 if first_df is None else 0)
        (image,) = cli("images", "--json").json()
        assert image["id"] == umoci_image.image_id
        assert image["repo_tags"] == sorted(expected_tags)
        layers = cli("layers", "--json").json()
        assert sorted(layer["id"] for layer in layers) == sorted(umoci_image.diff_ids)
        df = cli("df", "--json").json()
        if first_df is None:
            first_df = df
            # docker-archive layers are uncompressed tars (skopeo decompresses them)
            assert {layer["compression"] for layer in layers} == {"tar"}
        else:
            # at most a new manifest blob: the layers and their files are never stored twice
            assert df["objects"] <= first_df["objects"] + 1
            assert df["stored_bytes"] - first_df["stored_bytes"] < first_df["stored_bytes"] / 100, (
                df,
                first_df,
            )
    check_umoci_tables(store, umoci_image)
    assert cli("verify").code == 0


# -- 3. docker save archives, built by hand ------------------------------------------------------

BASE = tar_bytes(
    [
        member("bin/", kind=tarfile.DIRTYPE, mode=0o755),
        member("bin/sh", b"#!shell\n", mode=0o755),
        member("etc/", kind=tarfile.DIRTYPE, mode=0o755),
        member("etc/os-release", b"ID=test\n"),
    ]
)
TOP1 = tar_bytes([member("app/", kind=tarfile.DIRTYPE, mode=0o755), member("app/v", b"1\n")])
TOP2 = tar_bytes(
    [member("app/", kind=tarfile.DIRTYPE, mode=0o755), member("app/v", b"2\n"), member("etc/.wh.os-release")]
)


def docker_config(layers: list[bytes], created: str) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]},
        }
    ).encode()


def legacy_docker_save(out: Path, *, gz: bool = False) -> dict[str, str]:
    """``docker save`` before Docker 25: ``<id>/layer.tar`` (a shared layer is a symlink
    to the first copy), ``<config hex>.json``, ``manifest.json``, ``repositories``."""
    images = {"app:1.0": [BASE, TOP1], "app:2.0": [BASE, TOP2]}
    ids = {}
    manifest = []
    with tarfile.open(out, "w:gz" if gz else "w") as t:
        for n, (name, layers) in enumerate(images.items()):
            cfg = docker_config(layers, f"2024-01-0{n + 1}T00:00:00Z")
            add_file(t, sha(cfg)[7:] + ".json", cfg)
            ids[name] = sha(cfg)
            paths = []
            for i, layer in enumerate(layers):
                v1 = hashlib.sha256(f"{name}/{i}".encode()).hexdigest()
                add_file(t, f"{v1}/VERSION", b"1.0")
                add_file(t, f"{v1}/json", json.dumps({"id": v1}).encode())
                if n == 1 and i == 0:  # same layer again: docker writes a symlink
                    first = hashlib.sha256(b"app:1.0/0").hexdigest()
                    link = tarfile.TarInfo(f"{v1}/layer.tar")
                    link.type = tarfile.SYMTYPE
                    link.linkname = f"../{first}/layer.tar"
                    t.addfile(link)
                else:
                    add_file(t, f"{v1}/layer.tar", layer)
                paths.append(f"{v1}/layer.tar")
            tags = [name] + (["app:latest"] if n == 1 else [])
            manifest.append({"Config": sha(cfg)[7:] + ".json", "RepoTags": tags, "Layers": paths})
        add_file(t, "manifest.json", json.dumps(manifest).encode())
        add_file(t, "repositories", json.dumps({"app": {"1.0": "x", "2.0": "y", "latest": "y"}}).encode())
    return ids


def docker25_save(out: Path, layout: Path) -> tuple[Path, dict[str, str]]:
    """``docker save`` of Docker 25+: an OCI layout (uncompressed layers) that also carries
    ``manifest.json`` with ``blobs/sha256/<hex>`` paths and ``RepoTags``."""
    images = {
        "dock25/app:1.0": ([BASE, TOP1], ["dock25/app:1.0", "dock25/app:stable"]),
        "dock25/app:2.0": ([BASE, TOP2], ["dock25/app:2.0"]),
    }
    ids, descs, manifest = {}, [], []
    for n, (name, (layers, repo_tags)) in enumerate(images.items()):
        mdesc, image_id = write_image(
            layout, layers, how="tar", config_extra={"created": f"2024-02-0{n + 1}T00:00:00Z"}
        )
        ids[name] = image_id
        mdesc["annotations"] = {"io.containerd.image.name": "docker.io/" + name, REF_NAME: name.split(":")[1]}
        descs.append(mdesc)
        manifest.append(
            {
                "Config": "blobs/sha256/" + image_id[7:],
                "RepoTags": repo_tags,
                "Layers": ["blobs/sha256/" + sha(t)[7:] for t in layers],
            }
        )
    write_index(layout, descs)
    (layout / "manifest.json").write_text(json.dumps(manifest))
    (layout / "repositories").write_text(json.dumps({"dock25/app": {"1.0": "a", "2.0": "b"}}))
    return tar_dir(layout, out), ids


def check_app_images(cli: Any, store: Store, ids: dict[str, str], tags: dict[str, list[str]]) -> None:
    images = {i["id"]: i for i in cli("images", "--json").json()}
    assert set(images) == {ids[n] for n in tags}
    for name, names in tags.items():
        assert images[ids[name]]["repo_tags"] == sorted(names)
    assert len(cli("layers", "--json").json()) == 3  # BASE is shared
    assert content(store, table(store, sha(TOP2))["app/v"]) == b"2\n"
    assert table(store, sha(TOP2))["etc/os-release"].kind == E.WHITEOUT
    assert content(store, table(store, sha(BASE))["bin/sh"]) == b"#!shell\n"
    assert cli("verify").code == 0


def test_legacy_docker_save(cli: Any, store: Store, tmp_path: Path) -> None:
    archive = tmp_path / "save.tar"
    ids = legacy_docker_save(archive)
    out = cli("import", str(archive)).out
    assert "Loaded image: app:1.0" in out and "Loaded image: app:2.0" in out
    check_app_images(cli, store, ids, {"app:1.0": ["app:1.0"], "app:2.0": ["app:2.0", "app:latest"]})
    (info,) = cli("inspect", "app:latest").json()
    assert info["Id"] == ids["app:2.0"] and info["Created"] == "2024-01-02T00:00:00Z"

    # ``docker save | gzip`` into another store
    gz = tmp_path / "save.tar.gz"
    legacy_docker_save(gz, gz=True)
    res = cli("--store", str(tmp_path / "other"), "import", "--json", str(gz)).json()
    assert sorted(r["image_id"] for r in res) == sorted(ids.values())

    # saved by id: no RepoTags, so no names (docker load prints the id)
    cfg = docker_config([TOP1], "2024-01-03T00:00:00Z")
    with tarfile.open(tmp_path / "by-id.tar", "w") as t:
        add_file(t, sha(cfg)[7:] + ".json", cfg)
        add_file(t, "l/layer.tar", TOP1)
        manifest = [{"Config": sha(cfg)[7:] + ".json", "RepoTags": None, "Layers": ["l/layer.tar"]}]
        add_file(t, "manifest.json", json.dumps(manifest).encode())
    out = cli("import", str(tmp_path / "by-id.tar")).out
    assert out.strip() == f"Loaded image ID: {sha(cfg)}"
    assert len(cli("images", "--json").json()) == 3
    assert set(store.tags()) == {"app:1.0", "app:2.0", "app:latest"}


def test_docker25_save(cli: Any, store: Store, tmp_path: Path) -> None:
    archive, ids = docker25_save(tmp_path / "save25.tar", tmp_path / "layout25")
    out = cli("import", str(archive)).out
    # names come from RepoTags (the extra "stable" tag is nowhere in index.json)
    assert "Loaded image: dock25/app:stable" in out
    check_app_images(
        cli,
        store,
        ids,
        {"dock25/app:1.0": ["dock25/app:1.0", "dock25/app:stable"], "dock25/app:2.0": ["dock25/app:2.0"]},
    )
    assert {layer["compression"] for layer in cli("layers", "--json").json()} == {"tar"}


def test_oci_archive_with_dot_prefix_gzipped(cli: Any, tmp_path: Path) -> None:
    """``tar -C layout -czf x.tar.gz .`` writes ``./index.json``: still an OCI archive."""
    layout, image_id = oci_layout(tmp_path / "layout", [BASE, TOP1], ref="v3")
    archive = tar_dir(layout, tmp_path / "dotted.tar.gz", prefix="./", gz=True)
    (res,) = cli("import", "--json", str(archive)).json()
    assert res["image_id"] == image_id and res["names"] == ["dotted:v3"]


# -- 4. layer compressions -----------------------------------------------------------------------


def _rich_layers() -> list[bytes]:
    dev = member("dev/null", kind=tarfile.CHRTYPE, mode=0o666)
    dev[0].devmajor, dev[0].devminor = 1, 3
    xattr = member("etc/capable", b"cap\n", mode=0o755)
    xattr[0].pax_headers = {
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
        "SCHILY.xattr.user.k": "v",
    }
    owned = member("home/user/.profile", b"export A=1\n")
    owned[0].uid, owned[0].gid, owned[0].uname, owned[0].gname = 1000, 1001, "user", "users"
    base = tar_bytes(
        [
            member("./", kind=tarfile.DIRTYPE, mode=0o755),
            member("bin/", kind=tarfile.DIRTYPE, mode=0o755),
            member("bin/tool", b"tool" * 1000, mode=0o4755),
            member("bin/hard", kind=tarfile.LNKTYPE, link="bin/tool"),
            member("bin/sym", kind=tarfile.SYMTYPE, link="tool", mode=0o777),
            member("data/big.bin", random.Random(3).randbytes(200_000)),
            member("data/zeros", bytes(300_000)),
            member("run/fifo", kind=tarfile.FIFOTYPE),
            member("opq/", kind=tarfile.DIRTYPE, mode=0o755),
            member("opq/keep", b"old\n"),
            member("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            member("x" * 40 + "/" + "y" * 150, b"long\n"),
            dev,
            xattr,
            owned,
        ]
    )
    top = tar_bytes(
        [
            member("etc/.wh.passwd"),
            member("opq/.wh..wh..opq"),
            member("opq/new", b"new\n"),
            member("bin/hard2", kind=tarfile.LNKTYPE, link="bin/tool"),  # target in the lower layer
            member("/abs/clamped", b"abs\n"),
        ],
        fmt=tarfile.GNU_FORMAT,
    )
    return [base, top]


COMPRESSIONS = ["tar", "gzip", "zstd", "gzip-multimember", "zstd-multiframe", "docker-gzip"]


def test_layer_compressions_give_identical_tables(backend: str, tmp_path: Path) -> None:
    layers = _rich_layers()
    tables: dict[str, list[list[E.Entry]]] = {}
    for how in COMPRESSIONS:
        docker = how == "docker-gzip"
        layout, image_id = oci_layout(tmp_path / how, layers, how="gzip" if docker else how, docker=docker)
        with Store(str(tmp_path / f"store-{how}")) as s:
            (res,) = import_path(s, str(layout))
            assert res.image_id == image_id and res.layer_ids == [sha(t) for t in layers]
            assert res.names == [f"{how}:latest"]
            recorded = {s.get_layer(raw(d)).compression for d in res.layer_ids}  # type: ignore[union-attr]
            assert recorded == {how.split("-")[-1] if docker else how.split("-")[0]}
            tables[how] = [s.layer_entries(raw(d)) for d in res.layer_ids]
            files = {e.path: e for e in tables[how][0]}
            assert content(s, files[b"data/big.bin"]) == random.Random(3).randbytes(200_000)
            assert content(s, files[b"data/zeros"]) == bytes(300_000)
            assert content(s, files[b"bin/hard"]) == b"tool" * 1000
    reference = tables["tar"]
    for how in COMPRESSIONS[1:]:
        assert tables[how] == reference, how

    base = {e.path: e for e in reference[0]}
    top = {e.path: e for e in reference[1]}
    assert base[b"bin/tool"].mode == 0o4755
    assert base[b"bin/hard"].kind == E.HARDLINK and base[b"bin/hard"].link == b"bin/tool"
    assert base[b"bin/sym"].kind == E.SYMLINK and base[b"bin/sym"].link == b"tool"
    assert base[b"run/fifo"].kind == E.FIFO
    assert (base[b"dev/null"].kind, base[b"dev/null"].devmajor, base[b"dev/null"].devminor) == (E.CHR, 1, 3)
    assert dict(base[b"etc/capable"].xattrs) == {
        b"security.capability": b"\x01\x00\x00\x02",
        b"user.k": b"v",
    }
    assert (base[b"home/user/.profile"].uid, base[b"home/user/.profile"].gid) == (1000, 1001)
    assert ("x" * 40 + "/" + "y" * 150).encode() in base
    assert top[b"etc/passwd"].kind == E.WHITEOUT
    assert top[b"opq"].kind == E.DIR and top[b"opq"].opaque
    assert top[b"bin/hard2"].kind == E.REG and top[b"bin/hard2"].content == base[b"bin/tool"].content
    assert b"abs/clamped" in top


# -- 5. multi-platform indexes -------------------------------------------------------------------

SHARED = tar_bytes([member("etc/os-release", b"ID=multi\n")])


def multi_platform_layout(path: Path, nested: bool) -> dict[str, str]:
    """amd64 and arm64 images under one name, and the host's too when it is neither (arm/v7,
    386...): importing without --platform must find it.  Image ids by normalised platform."""
    _, host_arch, *host_variant = normalize_platform(host_platform()).split("/")
    platforms = [("amd64", None), ("arm64", "v8")]
    if host_arch not in ("amd64", "arm64"):
        platforms.append((host_arch, host_variant[0] if host_variant else None))
    ids, descs = {}, []
    for arch, variant in platforms:
        arch_layer = tar_bytes([member("arch", f"{arch}{variant or ''}".encode())])
        mdesc, image_id = write_image(path, [SHARED, arch_layer], arch=arch)
        mdesc["platform"] = {"os": "linux", "architecture": arch} | ({"variant": variant} if variant else {})
        ids[normalize_platform(f"linux/{arch}/{variant}" if variant else f"linux/{arch}")] = image_id
        descs.append(mdesc)
    if nested:
        index = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": descs}).encode()
        write_index(path, [dict(put_blob(path, index), mediaType=MT_INDEX, annotations={REF_NAME: "latest"})])
    else:  # containerd style: several manifests under one name in index.json itself
        write_index(path, [dict(d, annotations={REF_NAME: "latest"}) for d in descs])
    return ids


@pytest.mark.parametrize("nested", [True, False], ids=["nested-index", "flat-index"])
def test_multi_platform(cli: Any, store: Store, tmp_path: Path, nested: bool) -> None:
    layout = tmp_path / "multi"
    ids = multi_platform_layout(layout, nested)
    host = normalize_platform(host_platform())  # whatever machine runs the test
    (res,) = cli("import", "--json", str(layout)).json()
    assert res["image_id"] == ids[host] and normalize_platform(res["platform"]) == host

    (res,) = cli("import", "--json", "--platform", "linux/arm64", str(layout)).json()
    assert res["image_id"] == ids["linux/arm64/v8"] and res["names"] == ["multi:latest"]
    assert res["platform"] == "linux/arm64/v8"
    # docker semantics: the name moves to the image just imported
    (info,) = cli("inspect", "multi:latest").json()
    assert info["Id"] == ids["linux/arm64/v8"] and info["Architecture"] == "arm64"
    assert content(store, table(store, info["RootFS"]["Layers"][1])["arch"]) == b"arm64v8"
    two = host != "linux/arm64/v8"  # the host's image and arm64's, or arm64's twice
    assert len(cli("images", "--json").json()) == (2 if two else 1)
    assert len(cli("layers", "--json").json()) == (3 if two else 2)  # the shared layer once

    (res,) = cli("import", "--json", "--platform", "linux/arm64/v8", str(layout)).json()
    assert res["image_id"] == ids["linux/arm64/v8"] and res["layers_new"] == 0

    before = cli("df", "--json").json()
    bad = cli("import", "--platform", "linux/s390x", str(layout), check=False)
    assert bad.code == 1 and bad.out == ""
    (line,) = bad.err.strip().splitlines()
    assert line.startswith("layerfs: ") and "linux/s390x" in line
    assert "linux/amd64" in line and "linux/arm64" in line
    assert cli("df", "--json").json() == before


def test_layout_with_two_unnamed_images(store: Store, tmp_path: Path) -> None:
    layout = tmp_path / "two"
    a, id_a = write_image(layout, [BASE])
    b, id_b = write_image(layout, [TOP1])
    write_index(layout, [a, b])
    res = import_path(store, str(layout))
    assert sorted(r.image_id for r in res) == sorted([id_a, id_b])
    assert all(r.names == [] for r in res)


# -- 6. sources that lie ---------------------------------------------------------------------------

LAYER_A = tar_bytes([member("a/", kind=tarfile.DIRTYPE, mode=0o755), member("a/file", b"A" * 5000)])
LAYER_B = tar_bytes([member("b", b"B" * 3000), member("big", random.Random(5).randbytes(100_000))])


def _manifest_of(layout: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    return desc, json.loads((layout / "blobs/sha256" / desc["digest"][7:]).read_bytes())


def _rewrite_manifest(layout: Path, manifest: dict[str, Any]) -> None:
    desc = put_blob(layout, json.dumps(manifest).encode())
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(desc)
    (layout / "index.json").write_text(json.dumps(index))


def broken_source(case: str, tmp: Path) -> tuple[Path, list[str], str]:
    """(path to import, extra args, regex the one-line error must match)"""
    layout = tmp / "bad"
    how = "tar" if case == "layer-digest" else "gzip"
    _, _ = oci_layout(layout, [LAYER_A, LAYER_B], how=how)
    desc, manifest = _manifest_of(layout)
    blobs = layout / "blobs/sha256"
    layer_b = blobs / manifest["layers"][1]["digest"][7:]
    if case == "layer-digest":  # same size, one byte of file data changed: only the digest tells
        data = layer_b.read_bytes()
        layer_b.write_bytes(data.replace(b"BBB", b"BBC", 1))
        return layout, [], r"layer sha256:[0-9a-f]{64}: content hashes to sha256:"
    if case == "layer-size":
        manifest["layers"][1]["size"] += 1
        _rewrite_manifest(layout, manifest)
        return layout, [], r"layer sha256:[0-9a-f]{64}: size is \d+, descriptor says \d+"
    if case == "diff-id":
        cfg_path = blobs / manifest["config"]["digest"][7:]
        config = json.loads(cfg_path.read_bytes())
        config["rootfs"]["diff_ids"][1] = sha(b"something else")
        manifest["config"].update(put_blob(layout, json.dumps(config).encode()))
        _rewrite_manifest(layout, manifest)
        return (
            layout,
            [],
            r"uncompressed content hashes to sha256:[0-9a-f]{64}, config says " + sha(b"something else"),
        )
    if case == "manifest-digest":  # index.json names a blob whose content is another manifest
        wrong = sha(b"not the manifest")
        shutil.copy(blobs / desc["digest"][7:], blobs / wrong[7:])
        index = json.loads((layout / "index.json").read_text())
        index["manifests"][0]["digest"] = wrong
        (layout / "index.json").write_text(json.dumps(index))
        return layout, [], rf"manifest {wrong}: content hashes to {desc['digest']}"
    if case == "manifest-size":
        index = json.loads((layout / "index.json").read_text())
        index["manifests"][0]["size"] -= 1
        (layout / "index.json").write_text(json.dumps(index))
        return layout, [], r"manifest sha256:[0-9a-f]{64}: size is \d+, descriptor says \d+"
    if case == "config-digest":  # the config blob was edited in place (same length)
        cfg_path = blobs / manifest["config"]["digest"][7:]
        cfg_path.write_bytes(cfg_path.read_bytes().replace(b"amd64", b"arm64"))
        return layout, [], r"config sha256:[0-9a-f]{64}: content hashes to sha256:"
    if case == "missing-layer":
        layer_b.unlink()
        return layout, [], rf"blob {manifest['layers'][1]['digest']} is missing from "
    if case == "missing-config":
        (blobs / manifest["config"]["digest"][7:]).unlink()
        return layout, [], rf"blob {manifest['config']['digest']} is missing from "
    if case == "missing-manifest":
        (blobs / desc["digest"][7:]).unlink()
        return layout, [], rf"blob {desc['digest']} is missing from "
    if case == "platform-mismatch":  # index.json claims arm64, the config says amd64
        index = json.loads((layout / "index.json").read_text())
        index["manifests"][0]["platform"] = {"os": "linux", "architecture": "arm64"}
        (layout / "index.json").write_text(json.dumps(index))
        return layout, ["--platform", "linux/arm64"], r"image is for linux/amd64, not linux/arm64"
    if case == "oci-archive-layer-digest":
        manifest["layers"][1]["digest"] = manifest["layers"][0]["digest"]  # a real blob, the wrong one
        _rewrite_manifest(layout, manifest)
        return tar_dir(layout, tmp / "bad.tar"), [], r"(size is \d+, descriptor says|content hashes to)"
    if case == "nested-index-digest":  # the nested index blob was swapped for one naming another image
        other, _ = write_image(layout, [LAYER_B, LAYER_A])
        other["platform"] = {"os": "linux", "architecture": "amd64"}
        index_desc = put_blob(
            layout, json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [desc]}).encode()
        )
        forged = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [other]}).encode()
        (blobs / index_desc["digest"][7:]).write_bytes(forged)
        index_desc.update(mediaType=MT_INDEX, size=len(forged), annotations={REF_NAME: "latest"})
        write_index(layout, [index_desc])
        return layout, [], rf"{index_desc['digest']}.*(content hashes to|does not match)"
    if case == "legacy-diff-id":
        bad_cfg = docker_config([LAYER_A, b"not layer B"], "2024-01-01T00:00:00Z")
        out = tmp / "legacy.tar"
        with tarfile.open(out, "w") as t:
            add_file(t, sha(bad_cfg)[7:] + ".json", bad_cfg)
            add_file(t, "1/layer.tar", LAYER_A)
            add_file(t, "2/layer.tar", LAYER_B)
            add_file(
                t,
                "manifest.json",
                json.dumps(
                    [
                        {
                            "Config": sha(bad_cfg)[7:] + ".json",
                            "RepoTags": ["x:1"],
                            "Layers": ["1/layer.tar", "2/layer.tar"],
                        }
                    ]
                ).encode(),
            )
        return (
            out,
            [],
            rf"layer 2/layer.tar: uncompressed content hashes to {sha(LAYER_B)}, config says {sha(b'not layer B')}",
        )
    if case == "legacy-config-name":
        cfg = docker_config([LAYER_A], "2024-01-01T00:00:00Z")
        out = tmp / "legacy.tar"
        with tarfile.open(out, "w") as t:
            add_file(t, "0" * 64 + ".json", cfg)
            add_file(t, "1/layer.tar", LAYER_A)
            add_file(
                t,
                "manifest.json",
                json.dumps([{"Config": "0" * 64 + ".json", "Layers": ["1/layer.tar"]}]).encode(),
            )
        return out, [], rf"config {'0' * 64}.json: content hashes to {sha(cfg)}"
    raise AssertionError(case)


BROKEN = [
    "layer-digest",
    "layer-size",
    "diff-id",
    "manifest-digest",
    "manifest-size",
    "config-digest",
    "missing-layer",
    "missing-config",
    "missing-manifest",
    "platform-mismatch",
    "oci-archive-layer-digest",
    "nested-index-digest",
    "legacy-diff-id",
    "legacy-config-name",
]


@pytest.mark.parametrize("case", BROKEN)
def test_refused_import_stores_nothing(cli: Any, store: Store, tmp_path: Path, case: str) -> None:
    path, extra, message = broken_source(case, tmp_path)
    res = cli("import", *extra, str(path), check=False)
    assert res.code == 1, (res.out, res.err)
    (line,) = res.err.strip().splitlines()
    assert line.startswith(f"layerfs: import of {path} refused: "), line
    assert re.search(message, line), line
    assert res.out == ""
    assert_empty_store(cli)
    assert store.leases() == []


NOT_REGULAR = [
    "fifo-layer",
    "fifo-config",
    "fifo-manifest",
    "fifo-index",
    "fifo-archive",
    "device-layer",
    "symlink-layer",
]


def _not_regular(case: str, tmp: Path) -> tuple[Path, str]:
    """A source whose blob (or index.json, or the archive itself) is no regular file: (path, what
    the one-line error names)."""
    layout = tmp / "bad"
    oci_layout(layout, [LAYER_A, LAYER_B])
    desc, manifest = _manifest_of(layout)
    blobs = layout / "blobs/sha256"
    path = {
        "fifo-layer": blobs / manifest["layers"][1]["digest"][7:],
        "fifo-config": blobs / manifest["config"]["digest"][7:],
        "fifo-manifest": blobs / desc["digest"][7:],
        "fifo-index": layout / "index.json",
        "fifo-archive": tmp / "bad.tar",
        "device-layer": blobs / manifest["layers"][0]["digest"][7:],
        "symlink-layer": blobs / manifest["layers"][0]["digest"][7:],
    }[case]
    if path.exists():
        target = tmp / "moved"
        path.rename(target)
    if case == "device-layer":
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        kind = "a character device"
    elif case == "symlink-layer":
        path.symlink_to(target)  # the right bytes, behind a link: a layout holds files
        kind = "a symbolic link"
    else:
        os.mkfifo(path)
        kind = "a FIFO"
    if case == "fifo-archive":
        return path, rf"{re.escape(str(path))} is a FIFO, not a regular file"
    if case == "fifo-index":
        return layout, rf"{re.escape(str(layout))}: index.json is a FIFO, not a regular file"
    return layout, rf"blob sha256:{path.name} in {re.escape(str(layout))} is {kind}, not a regular file"


@pytest.mark.parametrize("case", NOT_REGULAR)
def test_blob_that_is_not_a_regular_file_is_refused(
    cli: Any, store_path: str, tmp_path: Path, case: str
) -> None:
    """A FIFO would block the import forever (in open or in read); a device node must not even be
    opened: refused with one line, before anything is read from it."""
    path, message = _not_regular(case, tmp_path)
    env = dict(os.environ, LAYERFS_STORE=store_path)
    res = subprocess.run(
        [sys.executable, "-m", "layerfs", "import", "-q", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 1, (res.stdout, res.stderr)
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"layerfs: import of {path} refused: "), line
    assert re.search(message, line), line
    assert_empty_store(cli)


def test_refused_import_after_flushed_batches_stores_nothing(
    backend: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first layer's files are committed in batches before the second layer fails:
    the abort must still leave nothing behind (no objects, no packs, no lease)."""
    monkeypatch.setattr(store_mod, "BATCH_BYTES", 1)
    layout, _ = oci_layout(tmp_path / "bad", [LAYER_B, LAYER_A])
    _, manifest = _manifest_of(layout)
    cfg_path = layout / "blobs/sha256" / manifest["config"]["digest"][7:]
    config = json.loads(cfg_path.read_bytes())
    config["rootfs"]["diff_ids"][1] = sha(b"lie")
    manifest["config"].update(put_blob(layout, json.dumps(config).encode()))
    _rewrite_manifest(layout, manifest)
    with pytest.raises(ImportError_, match="config says " + sha(b"lie")):
        import_path(store, str(layout))
    u = usage(store)
    assert (u["images"], u["layers"], u["objects"], u["payload_bytes"]) == (0, 0, 0, 0), u
    assert store.leases() == []


# -- 7. re-import is cheap ---------------------------------------------------------------------------


def _reimport(cli: Any, path: Path | str, layers: int) -> None:
    first = cli("import", "--json", str(path)).json()
    assert sum(r["layers_new"] for r in first) == layers
    before = cli("df", "--json").json()
    again = cli("import", "--json", str(path)).json()
    assert [r["image_id"] for r in again] == [r["image_id"] for r in first]
    assert all(r["layers_new"] == 0 and r["bytes_stored"] == 0 and r["bytes_read"] == 0 for r in again), again
    after = cli("df", "--json").json()
    for key in ("stored_bytes", "payload_bytes", "objects", "layers", "images", "tags"):
        assert after[key] == before[key], key


@needs_umoci
def test_reimport_umoci_layout_is_free(cli: Any, umoci_image: UmociImage) -> None:
    _reimport(cli, umoci_image.layout, layers=2)


def test_reimport_docker_saves_is_free(cli: Any, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.tar"
    legacy_docker_save(legacy)
    _reimport(cli, legacy, layers=3)
    archive, _ = docker25_save(tmp_path / "save25.tar", tmp_path / "layout25")
    _reimport(cli, archive, layers=0)  # same layers as the legacy archive


def test_reimport_legacy_archive_with_gzip_layers_is_free(cli: Any, tmp_path: Path) -> None:
    cfg = docker_config([BASE], "2024-01-01T00:00:00Z")
    archive = tmp_path / "legacy-gz.tar"
    with tarfile.open(archive, "w") as t:
        add_file(t, sha(cfg)[7:] + ".json", cfg)
        add_file(t, "l1/layer.tar", gzip.compress(BASE, mtime=0))
        add_file(
            t,
            "manifest.json",
            json.dumps(
                [{"Config": sha(cfg)[7:] + ".json", "RepoTags": ["gz:1"], "Layers": ["l1/layer.tar"]}]
            ).encode(),
        )
    _reimport(cli, archive, layers=1)
