"""``layerfs save`` / ``layerfs load`` against real tools.

The archives' shape (``docker save`` and OCI layout in one tar), round trips through a
fresh store (the image id, every diff_id and the archive bytes survive: a fixed point),
what skopeo, umoci and podman make of our output (compared with a layerfs mount of the
same image), several images in one archive, refusals that leave nothing behind, and layers
stored without a skeleton (regenerated from their entry tables).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import make_layout, member, tar_bytes
from test_podman import Podman
from unionutil import (  # noqa: F401 - need_fuse and no_mount_left_behind are fixtures
    HARDLINKS,
    assert_same,
    force_unmount,
    fuse_unavailable,
    layerfs_mount,
    make_cli,
    mounts_below,
    need_fuse,
    no_mount_left_behind,
    snapshot,
)

from layerfs.store import Store, skeleton

SAMPLE = "layerfs-sample:latest"
FORMATS = ("docker", "oci-archive", "oci-dir")
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"

needs_skopeo = pytest.mark.skipif(
    shutil.which("skopeo") is None, reason="skopeo is not installed (.ci/install installs it)"
)
needs_umoci = pytest.mark.skipif(
    shutil.which("umoci") is None, reason="umoci is not installed (.ci/install installs it)"
)
needs_podman = pytest.mark.skipif(
    shutil.which("podman") is None, reason="podman is not installed (.ci/install installs it)"
)

CLI = Callable[..., Any]


# -- helpers ------------------------------------------------------------------------------------
def run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr}")
    return p.stdout


def skopeo(*args: str) -> str:
    return run("skopeo", "--insecure-policy", *args)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layout_files(path: str) -> dict[str, bytes]:
    """The regular files of an archive or layout directory: name -> contents.  A tar may hold
    nothing else than regular files and directories, and no name twice."""
    out: dict[str, bytes] = {}
    if os.path.isdir(path):
        for dirpath, _, files in os.walk(path):
            for name in files:
                p = os.path.join(dirpath, name)
                out[os.path.relpath(p, path)] = Path(p).read_bytes()
        return out
    with tarfile.open(path) as t:
        for m in t:
            if m.isdir():
                continue
            assert m.isfile(), f"{path}: unexpected member {m.name} of type {m.type!r}"
            assert m.name not in out, f"{path}: {m.name} appears twice"
            f = t.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
    return out


def file_tree(path: str) -> dict[str, Any]:
    """A layout directory as names, types, modes and contents (for byte-identity checks)."""
    out: dict[str, Any] = {".": (oct(os.lstat(path).st_mode), None)}
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = None if name in dirs else hashlib.sha256(Path(p).read_bytes()).hexdigest()
            out[os.path.relpath(p, path)] = (oct(st.st_mode), data)
    return out


def same_output(a: str, b: str) -> bool:
    if os.path.isdir(a):
        return file_tree(a) == file_tree(b)
    return Path(a).read_bytes() == Path(b).read_bytes()


def check_blobs(files: dict[str, bytes]) -> dict[str, bytes]:
    """Every blob is named by its sha256; returns digest -> contents."""
    blobs = {}
    for name, data in files.items():
        if name.startswith("blobs/"):
            _, algo, hexd = name.split("/")
            assert algo == "sha256", name
            assert hashlib.sha256(data).hexdigest() == hexd, f"{name} does not hash to its name"
            blobs["sha256:" + hexd] = data
    return blobs


@dataclass
class LayoutImage:
    annotations: dict[str, str]
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]


def layout_images(files: dict[str, bytes]) -> list[LayoutImage]:
    """index.json's descriptors, resolved through the blobs."""
    blobs = check_blobs(files)
    index = json.loads(files["index.json"])
    assert index["schemaVersion"] == 2 and index["mediaType"] == MT_INDEX
    out = []
    for desc in index["manifests"]:
        data = blobs[desc["digest"]]
        assert desc["size"] == len(data)
        manifest = json.loads(data)
        assert manifest["mediaType"] == desc["mediaType"]
        cfg = blobs[manifest["config"]["digest"]]
        assert manifest["config"]["size"] == len(cfg)
        for layer in manifest["layers"]:
            assert len(blobs[layer["digest"]]) == layer["size"]
        out.append(
            LayoutImage(desc.get("annotations", {}), desc["digest"], manifest, sha(cfg), json.loads(cfg))
        )
    return out


def outputs_in(directory: str | Path) -> list[str]:
    return sorted(os.listdir(directory))


def one_line_error(res: Any) -> str:
    assert res.code == 1, (res.code, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{res.err}"
    assert lines[0].startswith("layerfs: "), lines[0]
    return lines[0]


def open_env(store_path: str) -> lmdb.Environment:
    size = os.path.getsize(os.path.join(store_path, "data.mdb"))
    return lmdb.open(store_path, max_dbs=32, map_size=max(1 << 30, 2 * size))


def strip_skeletons(store_path: str, layers: list[str]) -> None:
    """Rewrite layer records as a layerfs from before skeletons wrote them."""
    env = open_env(store_path)
    try:
        db = env.open_db(b"layers", create=False)
        with env.begin(write=True) as txn:
            for lid in layers:
                key = bytes.fromhex(lid.removeprefix("sha256:"))
                rec = json.loads(bytes(txn.get(key, db=db)))
                del rec["skeleton"]
                txn.put(key, json.dumps(rec).encode(), db=db)
    finally:
        env.close()


def mount_tree(cli: CLI, ref: str, mnt: str, **kw: Any) -> dict[str, Any]:
    with layerfs_mount(cli, ref, mnt):
        return snapshot(mnt, **kw)


def without_root(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if k != "/"}


# -- the sample, imported and saved once per module ---------------------------------------------
@dataclass
class Saved:
    base: Path
    store: str
    cli: CLI
    image: dict[str, Any]  # images --json
    layers: dict[str, dict[str, Any]]  # layers --json by id
    inspect: dict[str, Any]
    outputs: dict[str, str]  # format -> path
    results: dict[str, dict[str, Any]]  # format -> save --json
    config: bytes  # the config blob

    @property
    def image_id(self) -> str:
        return str(self.image["id"])

    @property
    def diff_ids(self) -> list[str]:
        return list(self.image["layers"])


@pytest.fixture(scope="module")
def saved(sample_layout: str, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    base = tmp_path_factory.mktemp("save")
    store = str(base / "store")
    cli = make_cli(store)
    cli("import", "-q", sample_layout)
    (image,) = cli("images", "--json").json()
    layers = {rec["id"]: rec for rec in cli("layers", "--json").json()}
    (inspect,) = cli("inspect", SAMPLE).json()
    outputs, results = {}, {}
    for fmt in FORMATS:
        out = str(base / f"sample.{fmt}")
        res = cli("save", "--format", fmt, "--json", SAMPLE, "-o", out)
        assert res.err == "", res.err
        outputs[fmt], results[fmt] = out, res.json()
    config = Path(outputs["oci-dir"], "blobs", "sha256", image["id"][7:]).read_bytes()
    return Saved(base, store, cli, image, layers, inspect, outputs, results, config)


@pytest.fixture(scope="module")
def sample_tree(saved: Saved) -> dict[str, Any]:
    """The sample as a layerfs mount shows it (directory mtimes included)."""
    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    tree = mount_tree(saved.cli, SAMPLE, str(saved.base / "mnt"), dir_mtimes=True)
    assert len(tree) > 50 and "/app/run.sh" in tree
    return tree


@pytest.fixture
def other(tmp_path: Path, cli: CLI) -> tuple[str, CLI]:
    """A second, fresh store, and a runner for it."""
    path = str(tmp_path / "other-store")

    def run_other(*args: str, **kw: Any) -> Any:
        return cli(*args, env={"LAYERFS_STORE": path}, **kw)

    return path, run_other


# -- 1. the archive ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_save_writes_a_layout(saved: Saved, fmt: str) -> None:
    path = saved.outputs[fmt]
    assert os.path.isdir(path) == (fmt == "oci-dir")
    files = layout_files(path)
    blobs = check_blobs(files)
    extra = {"manifest.json", "repositories"} if fmt == "docker" else set()
    assert set(files) == {"index.json", "oci-layout", *extra} | {"blobs/sha256/" + d[7:] for d in blobs}
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}

    (img,) = layout_images(files)
    assert img.annotations == {
        "io.containerd.image.name": "docker.io/library/layerfs-sample:latest",
        "org.opencontainers.image.ref.name": "latest",
    }
    # uncompressed layers: blob digests are the diff_ids, the config is the stored one
    assert img.config_digest == saved.image_id
    assert img.config["rootfs"]["diff_ids"] == saved.diff_ids
    assert [d["digest"] for d in img.manifest["layers"]] == saved.diff_ids
    assert {d["mediaType"] for d in img.manifest["layers"]} == {MT_LAYER}
    assert img.manifest["config"]["mediaType"] == MT_CONFIG
    assert img.manifest["mediaType"] == MT_MANIFEST
    # exactly the image's blobs: three layers, the config, the manifest
    assert set(blobs) == {*saved.diff_ids, saved.image_id, img.manifest_digest}
    for diff_id in saved.diff_ids:
        assert len(blobs[diff_id]) == saved.layers[diff_id]["tar_size"]
        with tarfile.open(fileobj=io.BytesIO(blobs[diff_id])) as t:
            assert t.getmembers(), diff_id  # a tar Python can read

    if fmt == "docker":
        (entry,) = json.loads(files["manifest.json"])
        assert entry["RepoTags"] == [SAMPLE]
        assert entry["Config"] == "blobs/sha256/" + saved.image_id[7:]
        assert entry["Layers"] == ["blobs/sha256/" + d[7:] for d in saved.diff_ids]
        repos = json.loads(files["repositories"])
        assert list(repos) == ["layerfs-sample"] and list(repos["layerfs-sample"]) == ["latest"]

    res = saved.results[fmt]
    assert res["format"] == fmt and res["output"] == path
    (ri,) = res["images"]
    assert ri == {
        "id": saved.image_id,
        "names": [SAMPLE],
        "manifest": img.manifest_digest,
        "layers": saved.diff_ids,
    }
    archive_size = os.path.getsize(path) if fmt != "oci-dir" else sum(map(len, files.values()))
    assert sum(map(len, files.values())) <= res["bytes"] <= archive_size


@pytest.mark.parametrize("fmt", ["docker", "oci-archive"])
def test_save_to_stdout_is_the_same_archive(saved: Saved, fmt: str, tmp_path: Path) -> None:
    out = tmp_path / "stdout.tar"
    with open(out, "wb") as f:
        p = subprocess.run(
            [sys.executable, "-m", "layerfs", "save", "--format", fmt, SAMPLE],
            stdout=f,
            stderr=subprocess.PIPE,
            env=dict(os.environ, LAYERFS_STORE=saved.store),
        )
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == Path(saved.outputs[fmt]).read_bytes()


# -- 2. round trip through a second store --------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_a_fixed_point(saved: Saved, other: tuple[str, CLI], fmt: str, tmp_path: Path) -> None:
    _, cli2 = other
    res = cli2("load", "-i", saved.outputs[fmt])
    assert res.out.splitlines() == [f"Loaded image: {SAMPLE}"]

    # the same image: id (config digest), names, layers and their contents
    assert cli2("images", "--json").json() == [saved.image]
    (info,) = cli2("inspect", SAMPLE).json()
    manifest = saved.results[fmt]["images"][0]["manifest"]
    assert info["Manifest"]["Digest"] == manifest
    assert {k: v for k, v in info.items() if k != "Manifest"} == {
        k: v for k, v in saved.inspect.items() if k != "Manifest"
    }
    layers = {rec["id"]: rec for rec in cli2("layers", "--json").json()}
    assert sorted(layers) == sorted(saved.diff_ids)
    for lid, rec in layers.items():
        orig = saved.layers[lid]
        assert rec["compression"] == "tar" and rec["blob_digest"] == lid
        for key in ("diff_id", "tar_size", "size", "files", "entries", "table", "skeleton"):
            assert rec[key] == orig[key], (lid, key)
    assert cli2("verify").code == 0

    # saving again from the second store gives the very same bytes
    again = str(tmp_path / f"again.{fmt}")
    res2 = cli2("save", "--format", fmt, "--json", SAMPLE, "-o", again)
    assert res2.err == ""
    assert res2.json()["images"] == saved.results[fmt]["images"]
    assert same_output(saved.outputs[fmt], again), f"{fmt}: the second save differs from the first"


# -- 3. skopeo ----------------------------------------------------------------------------------
SKOPEO_SOURCES = [
    ("docker", "docker-archive:{}"),
    ("docker", "docker-archive:{}:layerfs-sample:latest"),
    ("docker", "oci-archive:{}:latest"),  # the default format is an OCI archive too
    ("oci-archive", "oci-archive:{}"),
    ("oci-archive", "oci-archive:{}:latest"),
    ("oci-dir", "oci:{}"),
    ("oci-dir", "oci:{}:latest"),
]


@needs_skopeo
@pytest.mark.parametrize(("fmt", "source"), SKOPEO_SOURCES)
def test_skopeo_reads_our_output(saved: Saved, fmt: str, source: str, tmp_path: Path) -> None:
    src = source.format(saved.outputs[fmt])
    info = json.loads(skopeo("inspect", src))
    assert info["Layers"] == saved.diff_ids
    assert info["Architecture"] == saved.inspect["Architecture"] and info["Os"] == "linux"
    assert sha(skopeo("inspect", "--config", "--raw", src).encode()) == saved.image_id
    if not src.startswith("docker-archive:"):
        assert info["Digest"] == saved.results[fmt]["images"][0]["manifest"]

    # copies to an OCI layout and a docker archive keep the image (config and layers)
    config = json.loads(saved.config)
    copies = [f"oci:{tmp_path / 'copy'}:copied", f"docker-archive:{tmp_path / 'copy.tar'}:copy/of:sample"]
    for dest in copies:
        skopeo("copy", "--quiet", src, dest)
        raw = skopeo("inspect", "--config", "--raw", dest).encode()
        assert json.loads(raw) == config, dest
        if not (src.startswith("docker-archive:") and dest.startswith("oci:")):
            # (skopeo re-serializes a docker-archive's config when it converts it to OCI)
            assert sha(raw) == saved.image_id, dest
        if dest.startswith("docker-archive:"):
            assert json.loads(skopeo("inspect", dest))["Layers"] == saved.diff_ids
        else:  # skopeo compresses the layers it writes to a layout: they unpack to our diff_ids
            manifest = json.loads(skopeo("inspect", "--raw", dest))
            blobs = tmp_path / "copy" / "blobs" / "sha256"
            unpacked = []
            for desc in manifest["layers"]:
                data = (blobs / desc["digest"][7:]).read_bytes()
                if desc["mediaType"].endswith("+gzip"):
                    data = gzip.decompress(data)
                unpacked.append(sha(data))
            assert unpacked == saved.diff_ids


# -- 4. umoci ----------------------------------------------------------------------------------
@needs_umoci
def test_umoci_unpack_equals_mount(saved: Saved, sample_tree: dict[str, Any], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    as_root = os.geteuid() == 0
    rootless = [] if as_root else ["--rootless"]
    run("umoci", "unpack", *rootless, "--image", f"{saved.outputs['oci-dir']}:latest", str(bundle))
    got = snapshot(str(bundle / "rootfs"), dir_mtimes=True)
    expected = sample_tree
    if not as_root:
        # rootless umoci owns everything itself and cannot set every xattr
        def strip(tree: dict[str, Any]) -> dict[str, Any]:
            return {
                k: v if k == HARDLINKS else {f: x for f, x in v.items() if f not in ("uid", "gid", "xattrs")}
                for k, v in tree.items()
            }

        expected, got = strip(expected), strip(got)
    assert_same(expected, got, "umoci unpack of our oci-dir", ("layerfs mount", "umoci"))


# -- 5. podman --------------------------------------------------------------------------------------
@pytest.fixture
def podman() -> Iterator[Podman]:
    # vfs: no mount helper needed; runroot paths must be short
    p = Podman(tempfile.mkdtemp(prefix="lfsave-", dir="/tmp"), ["--storage-driver", "vfs"])
    try:
        yield p
    finally:
        p.close()
        shutil.rmtree(p.base, ignore_errors=True)


def export_tree(path: str) -> dict[str, Any]:
    """A ``podman export`` tar as ``snapshot`` records: a hardlink member reads as its target's
    file and joins it in ``#hardlinks``; link counts are left to that list."""
    out: dict[str, Any] = {}
    groups: dict[str, list[str]] = {}
    with tarfile.open(path) as t:
        for m in t:
            rel = "/" + m.name.removeprefix("./").rstrip("/")
            if rel == "/":
                continue
            kind = {
                tarfile.DIRTYPE: "dir",
                tarfile.REGTYPE: "file",
                tarfile.AREGTYPE: "file",
                tarfile.LNKTYPE: "file",
                tarfile.SYMTYPE: "symlink",
                tarfile.FIFOTYPE: "fifo",
                tarfile.CHRTYPE: "chr",
                tarfile.BLKTYPE: "blk",
            }[m.type]
            rec: dict[str, Any] = {"type": kind, "mode": oct(m.mode & 0o7777), "uid": m.uid, "gid": m.gid}
            if m.islnk():
                target = "/" + m.linkname.removeprefix("./")
                rec.update(size=out[target]["size"], sha256=out[target]["sha256"])
                groups.setdefault(target, [target]).append(rel)
            elif m.isfile():
                f = t.extractfile(m)
                assert f is not None
                data = f.read()
                rec.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
            elif m.issym():
                rec["target"] = m.linkname
            elif m.ischr() or m.isblk():
                rec["rdev"] = (m.devmajor, m.devminor)
            rec["mtime_ns"] = int(m.mtime) * 1_000_000_000
            xattrs = {
                k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape").hex()
                for k, v in m.pax_headers.items()
                if k.startswith(("SCHILY.xattr.user.", "SCHILY.xattr.security."))
            }
            if xattrs:
                rec["xattrs"] = dict(sorted(xattrs.items()))
            out[rel] = rec
    out[HARDLINKS] = sorted(sorted(g) for g in groups.values())
    return out


@needs_podman
def test_podman_loads_our_docker_archive(
    saved: Saved, sample_tree: dict[str, Any], podman: Podman, tmp_path: Path
) -> None:
    assert "Loaded image: docker.io/library/layerfs-sample:latest" in podman(
        "load", "-i", saved.outputs["docker"]
    )
    (img,) = json.loads(podman("image", "inspect", "docker.io/library/layerfs-sample:latest"))
    assert img["Id"] == saved.image_id[7:]
    assert img["RootFS"]["Layers"] == saved.diff_ids
    container = podman("create", "docker.io/library/layerfs-sample:latest")
    export = str(tmp_path / "export.tar")
    podman("export", "-o", export, container)

    expected = copy.deepcopy(without_root(sample_tree))
    for rec in expected.values():
        if isinstance(rec, dict):
            rec.pop("nlink", None)
    got = export_tree(export)
    assert_same(expected, got, "podman export of our archive", ("layerfs mount", "podman"))


# -- 6. several images in one archive -------------------------------------------------------------
def test_two_images_in_one_archive(saved: Saved, cli: CLI, other: tuple[str, CLI], tmp_path: Path) -> None:
    cli("import", "-q", saved.outputs["oci-dir"])
    cli("tag", SAMPLE, "other/copy:v2")
    # a second image on the sample's base layer (the very bytes, so the blob is shared)
    base_layer = check_blobs(layout_files(saved.outputs["oci-dir"]))[saved.diff_ids[0]]
    top = tar_bytes([member("second/", kind=tarfile.DIRTYPE, mode=0o755), member("second/hi.txt", b"hi\n")])
    make_layout(tmp_path / "second", [base_layer, top], ref="second:latest")
    cli("import", "-q", str(tmp_path / "second"))
    second = next(i for i in cli("images", "--json").json() if i["repo_tags"] == ["second:latest"])
    assert second["layers"][0] == saved.diff_ids[0]

    out = str(tmp_path / "two.tar")
    res = cli("save", "--json", SAMPLE, "other/copy:v2", "second", "-o", out).json()
    assert [(i["id"], i["names"]) for i in res["images"]] == [
        (saved.image_id, [SAMPLE, "other/copy:v2"]),
        (second["id"], ["second:latest"]),
    ]
    files = layout_files(out)  # refuses a name that appears twice
    blobs = check_blobs(files)
    imgs = layout_images(files)
    assert [(i.annotations["io.containerd.image.name"], i.config_digest) for i in imgs] == [
        ("docker.io/library/layerfs-sample:latest", saved.image_id),
        ("docker.io/other/copy:v2", saved.image_id),
        ("docker.io/library/second:latest", second["id"]),
    ]
    assert [i.annotations["org.opencontainers.image.ref.name"] for i in imgs] == ["latest", "v2", "latest"]
    # four layers, two configs, two manifests: each once
    assert set(blobs) == {*saved.diff_ids, *second["layers"], saved.image_id, second["id"]} | {
        i.manifest_digest for i in imgs
    }
    assert len(blobs) == 8
    entries = json.loads(files["manifest.json"])
    assert [(e["Config"], e["RepoTags"]) for e in entries] == [
        ("blobs/sha256/" + saved.image_id[7:], [SAMPLE, "other/copy:v2"]),
        ("blobs/sha256/" + second["id"][7:], ["second:latest"]),
    ]
    assert entries[0]["Layers"][0] == entries[1]["Layers"][0]
    assert json.loads(files["repositories"]).keys() == {"layerfs-sample", "other/copy", "second"}

    # loading it restores both images under all three names
    _, cli2 = other
    cli2("load", "-i", out)
    got = {tuple(i["repo_tags"]): (i["id"], i["layers"]) for i in cli2("images", "--json").json()}
    assert got == {
        (SAMPLE, "other/copy:v2"): (saved.image_id, saved.diff_ids),
        ("second:latest",): (second["id"], second["layers"]),
    }
    assert len(cli2("layers", "--json").json()) == 4

    # by id, save names the image with every tag it has (as docker save does)
    by_id = str(tmp_path / "by-id.tar")
    res = cli("save", "--json", saved.image_id, "-o", by_id).json()
    assert res["images"][0]["names"] == [SAMPLE, "other/copy:v2"]
    (entry,) = json.loads(layout_files(by_id)["manifest.json"])
    assert entry["RepoTags"] == [SAMPLE, "other/copy:v2"]


# -- 7. refusals ----------------------------------------------------------------------------------
def test_unknown_image_writes_nothing(saved: Saved, tmp_path: Path) -> None:
    for fmt in FORMATS:
        out = tmp_path / f"out-{fmt}"
        res = saved.cli("save", "--format", fmt, SAMPLE, "nosuch:tag", "-o", str(out), check=False)
        line = one_line_error(res)
        assert "nosuch:tag" in line
        assert res.out == ""
        assert outputs_in(tmp_path) == [], fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_existing_directory_is_left_alone(saved: Saved, tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious\n")
    os.utime(target / "keep.txt", (1_600_000_000, 1_600_000_000))
    before = snapshot(str(target))
    res = saved.cli("save", "--format", fmt, SAMPLE, "-o", str(target), check=False)
    line = one_line_error(res)
    if fmt == "oci-dir":
        assert "not empty" in line
    assert snapshot(str(target)) == before
    assert outputs_in(tmp_path) == ["out"]  # and no .layerfs-save-* beside it


def test_empty_directory_takes_an_oci_layout(saved: Saved, tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    saved.cli("save", "--format", "oci-dir", SAMPLE, "-o", str(target))
    assert file_tree(str(target)) == file_tree(saved.outputs["oci-dir"])
    assert outputs_in(tmp_path) == ["empty"]


def _corrupt(store_path: str, how: str) -> bytes:
    """Damage the object holding the top layer's largest file (one its skeleton splices in).
    Returns the object's sha256."""
    with Store(store_path, readonly=True) as store:
        (image_id,) = [k for k, _ in store.images()]
        rec = store.get_image(image_id)
        assert rec is not None
        top = rec.layers[-1]
        entries = {e.path: e for e in store.layer_entries(top)}
        victim, donor = entries[b"app/data.bin"].content, entries[b"app/run.sh"].content
        assert victim is not None and donor is not None
        layer = store.get_layer(top)
        assert layer is not None
        if layer.skeleton is not None:
            assert victim in skeleton.referenced(store, layer.skeleton)
    env = open_env(store_path)
    try:
        db = env.open_db(b"objects", create=False)
        with env.begin(write=True) as txn:
            if how == "missing":
                assert txn.delete(victim, db=db)
            else:  # the record of a smaller object under the victim's name
                txn.put(victim, bytes(txn.get(donor, db=db)), db=db)
    finally:
        env.close()
    return victim


@pytest.mark.parametrize(
    ("how", "fmt", "skeletons"),
    [
        ("missing", "docker", True),
        ("missing", "oci-archive", True),
        ("missing", "oci-dir", True),
        ("wrong-size", "docker", True),
        ("wrong-size", "oci-dir", True),
        ("missing", "docker", False),
        ("wrong-size", "docker", False),
    ],
)
def test_corrupt_store_is_refused_without_leftovers(
    cli: CLI, store_path: str, saved: Saved, tmp_path: Path, how: str, fmt: str, skeletons: bool
) -> None:
    cli("import", "-q", saved.outputs["oci-dir"])
    if not skeletons:
        strip_skeletons(store_path, saved.diff_ids)
    victim = _corrupt(store_path, how)
    assert cli("verify", check=False).code == 3  # the damage is real

    outdir = tmp_path / "out"
    outdir.mkdir()
    res = cli("save", "--format", fmt, SAMPLE, "-o", str(outdir / "sample"), check=False)
    line = one_line_error(res)
    assert "save refused" in line and victim.hex() in line, line
    assert outputs_in(outdir) == []  # neither the output nor a .layerfs-save-* temporary


# -- killed saves ----------------------------------------------------------------------------------
BIG = "big:1"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, CLI]:
    """A store holding a 128 MiB image (text: imported quickly, saved in about half a second)."""
    base = tmp_path_factory.mktemp("big")
    data = b"".join(b"%015d\n" % i for i in range(8 << 20))
    make_layout(base / "layout", [tar_bytes([member("big", data)])], ref=BIG, compress=False)
    store = str(base / "store")
    cli = make_cli(store)
    cli("import", "-q", str(base / "layout"))
    return store, cli


def _written(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def start_save(store: str, out: str, fmt: str = "docker") -> subprocess.Popen[bytes]:
    """A save of BIG to ``out``, stopped (SIGSTOP) once it has written 8 MiB of it."""
    env = dict(os.environ, LAYERFS_STORE=store)
    cmd = [sys.executable, "-m", "layerfs", "save", "-q", "--format", fmt, BIG, "-o", out]
    before = os.stat(out).st_ino if os.path.exists(out) else None
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while p.poll() is None and _written(p.pid) < 8 << 20 and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(p.pid, signal.SIGSTOP)
    except BaseException:
        p.kill()
        p.wait()
        raise
    if p.poll() is not None or (os.stat(out).st_ino if os.path.exists(out) else None) != before:
        p.kill()
        p.wait()
        pytest.fail(f"the save ended before it could be stopped halfway: {p.stderr.read()!r}")  # type: ignore[union-attr]
    return p


def kill(p: subprocess.Popen[bytes]) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL


@pytest.mark.parametrize("fmt", ["docker", "oci-archive"])
@pytest.mark.parametrize("existing", [False, True])
def test_killed_save_leaves_nothing(big: tuple[str, CLI], tmp_path: Path, fmt: str, existing: bool) -> None:
    """kill -9 halfway through ``save -o F``: no F (or the F there was), and nothing beside it
    (the archive is written to an unnamed O_TMPFILE and linked in once complete)."""
    store, cli = big
    out = tmp_path / "out"
    out.mkdir()
    target = out / "big.tar"
    if existing:
        target.write_bytes(b"an older archive")
    p = start_save(store, str(target), fmt)
    links = [os.readlink(f"/proc/{p.pid}/fd/{n}") for n in os.listdir(f"/proc/{p.pid}/fd")]
    unnamed = [link for link in links if link.startswith(f"{out}/#") and link.endswith(" (deleted)")]
    assert len(unnamed) == 1, links  # it writes to an unnamed file in the output's directory
    kill(p)
    assert outputs_in(out) == (["big.tar"] if existing else [])
    if existing:
        assert target.read_bytes() == b"an older archive"
    cli("save", "--format", fmt, BIG, "-o", str(target))  # now whole, over what was there
    assert outputs_in(out) == ["big.tar"]
    assert {m.name for m in tarfile.open(target)} >= {"index.json", "oci-layout"}


@pytest.mark.usefixtures("need_fuse")
@pytest.mark.parametrize("where", ["oci-dir", "no-tmpfile"])
def test_the_next_save_removes_what_a_killed_save_left(
    big: tuple[str, CLI], tmp_path: Path, where: str
) -> None:
    """Where O_TMPFILE cannot help (a directory output; a filesystem without it: a writable
    mount of the pure-Python FUSE core, which has no tmpfile call), a killed save leaves its
    temporary beside the output; the next save into that directory removes it, but not the
    temporary of a save still running."""
    store, cli = big
    if where == "oci-dir":
        out, fmt = tmp_path / "out", "oci-dir"
        out.mkdir()
    else:
        out, fmt = tmp_path / "mnt", "docker"
        out.mkdir()
        cli("mount", "--rw", BIG, str(out), env={"LAYERFS_FUSE": "python"})
    try:
        there = set(outputs_in(out))  # the mount shows the image's file

        def new() -> list[str]:
            return sorted(set(outputs_in(out)) - there)

        kill(start_save(store, str(out / "killed"), fmt))
        (left,) = new()
        assert left.startswith(".layerfs-save-")
        running = start_save(store, str(out / "running"), fmt)  # stopped halfway, alive
        try:
            (kept,) = [n for n in new() if n != left]
            cli("save", "--format", fmt, BIG, "-o", str(out / "next"))
            assert new() == sorted([kept, "next"])  # the killed save's temporary is gone
        finally:
            os.kill(running.pid, signal.SIGCONT)
            _, err = running.communicate(timeout=120)
        assert running.returncode == 0, err
        assert new() == ["next", "running"]
        assert same_output(str(out / "next"), str(out / "running"))
    finally:
        if where == "no-tmpfile":
            cli("umount", str(out))


def save_to_terminal(store: str, *args: str) -> tuple[int, str, bytes]:
    """``layerfs save`` with its stdout on a pseudo-terminal (drained, so a save that goes
    ahead anyway cannot block): exit status, stderr, what reached the terminal."""
    leader, follower = pty.openpty()
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "layerfs", "save", *args],
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=subprocess.PIPE,
            env=dict(os.environ, LAYERFS_STORE=store),
        )
        os.close(follower)
        follower = -1
        written = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            assert ready, "layerfs save neither wrote nor exited within 60 s"
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            written += chunk
        assert p.stderr is not None
        err = p.stderr.read().decode()
        return p.wait(timeout=60), err, written
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)


def test_refuses_to_write_to_a_terminal(saved: Saved) -> None:
    for args in ([], ["-o", "-"]):
        code, err, written = save_to_terminal(saved.store, SAMPLE, *args)
        assert code == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "terminal" in lines[0], lines
        assert written == b""


# -- 8. layers stored without a skeleton ----------------------------------------------------------
@pytest.mark.usefixtures("need_fuse")
@pytest.mark.parametrize("which", ["middle", "all"])
def test_layer_without_skeleton_is_regenerated(
    saved: Saved,
    sample_tree: dict[str, Any],
    cli: CLI,
    store_path: str,
    other: tuple[str, CLI],
    tmp_path: Path,
    which: str,
) -> None:
    cli("import", "-q", saved.outputs["docker"])
    # the middle layer has the whiteout, the opaque directory, a hardlink and long names
    stripped = saved.diff_ids[1:2] if which == "middle" else saved.diff_ids
    strip_skeletons(store_path, stripped)
    assert all(("skeleton" in rec) == (rec["id"] not in stripped) for rec in cli("layers", "--json").json())

    out = str(tmp_path / "regen.tar")
    res = cli("save", "--json", SAMPLE, "-o", out)
    (img,) = res.json()["images"]
    assert "warning" in res.err and "regenerated" in res.err, res.err
    assert img["id"][:19] in res.err  # the new image id is said
    assert img["id"] != saved.image_id
    for old, new in zip(saved.diff_ids, img["layers"]):
        assert (old == new) == (old not in stripped), (old, new)

    files = layout_files(out)
    (limg,) = layout_images(files)
    assert limg.config_digest == img["id"]
    assert limg.config["rootfs"]["diff_ids"] == img["layers"]
    assert [d["digest"] for d in limg.manifest["layers"]] == img["layers"]
    # the config is the original one but for its diff_ids
    orig = json.loads(saved.config)
    assert limg.config == dict(orig, rootfs=dict(orig["rootfs"], diff_ids=img["layers"]))
    (entry,) = json.loads(files["manifest.json"])
    assert entry["RepoTags"] == [SAMPLE] and entry["Config"] == "blobs/sha256/" + img["id"][7:]

    # a fresh store loads it, and mounts the same tree as the original image
    _, cli2 = other
    cli2("load", "-i", out)
    (loaded,) = cli2("images", "--json").json()
    assert (loaded["id"], loaded["layers"], loaded["repo_tags"]) == (img["id"], img["layers"], [SAMPLE])
    assert cli2("verify").code == 0
    tree = mount_tree(cli2, SAMPLE, str(tmp_path / "mnt"), dir_mtimes=True)
    assert_same(without_root(sample_tree), without_root(tree), "regenerated image", ("original", "reloaded"))

    # from there on the layers have skeletons again: saving is a fixed point, without warning
    again = str(tmp_path / "again.tar")
    res2 = cli2("save", SAMPLE, "-o", again)
    assert res2.err == ""
    assert Path(again).read_bytes() == Path(out).read_bytes()


def test_regenerated_hardlink_follows_its_target(
    cli: CLI, store_path: str, other: tuple[str, CLI], tmp_path: Path
) -> None:
    layer = tar_bytes(
        [member("z-target", b"shared\n"), member("a-link", kind=tarfile.LNKTYPE, link="z-target")]
    )
    make_layout(tmp_path / "hl", [layer], ref="hl:latest")
    cli("import", "-q", str(tmp_path / "hl"))
    strip_skeletons(store_path, cli("images", "--json").json()[0]["layers"])
    out = str(tmp_path / "hl.tar")
    assert "regenerated" in cli("save", "hl", "-o", out).err
    _, cli2 = other
    res = cli2("load", "-i", out, check=False)
    assert res.code == 0, res.err
    (loaded,) = cli2("images", "--json").json()
    assert loaded["repo_tags"] == ["hl:latest"]


# -- images that came from a docker archive ---------------------------------------------------------
@needs_skopeo
@needs_umoci
def test_docker_sourced_image_saved_as_oci_layout(
    sample_layout: str, cli: CLI, saved: Saved, tmp_path: Path
) -> None:
    archive = str(tmp_path / "skopeo.tar")
    skopeo("copy", "--quiet", f"oci:{sample_layout}:latest", f"docker-archive:{archive}:{SAMPLE}")
    cli("load", "-i", archive)
    assert cli("images", "--json").json()[0]["id"] == saved.image_id
    out = str(tmp_path / "layout")
    cli("save", "--format", "oci-dir", SAMPLE, "-o", out)
    assert json.loads(skopeo("inspect", f"oci:{out}:latest"))["Layers"] == saved.diff_ids
    run("umoci", "unpack", "--image", f"{out}:latest", str(tmp_path / "bundle"))


def test_reimport_gives_an_old_layer_its_skeleton(
    saved: Saved, cli: CLI, store_path: str, tmp_path: Path
) -> None:
    # a store from before skeletons: importing the image again reads those layers once more
    cli("import", "-q", saved.outputs["docker"])
    strip_skeletons(store_path, saved.diff_ids[1:2])
    res = cli("import", "--json", saved.outputs["docker"]).json()
    assert res[0]["layers_new"] == 1
    assert all("skeleton" in rec for rec in cli("layers", "--json").json())
    out = str(tmp_path / "again.tar")
    res = cli("save", SAMPLE, "-o", out)
    assert "regenerated" not in res.err
    assert Path(out).read_bytes() == Path(saved.outputs["docker"]).read_bytes()
    assert cli("verify", check=False).code == 0
