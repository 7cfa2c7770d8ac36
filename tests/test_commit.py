"""``commit`` and ``diff``: a container's upper directory as A/C/D lines and as a new OCI layer.

The changes are made the way a container makes them: through a real writable layerfs mount
of the sample image.  The committed image is then checked by tools that know nothing of
layerfs: umoci unpacks our OCI layout (and so applies our whiteouts and opaque markers),
the kernel's overlay filesystem mounts the layers Python's ``tarfile`` extracted, skopeo
reads our ``docker save`` archive, and ``tarfile`` reads the layer member by member.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from unionutil import (  # noqa: F401 - no_mount_left_behind is an autouse fixture
    HARDLINKS,
    assert_same,
    extract_layers,
    fuse_unavailable,
    kernel_overlay,
    layerfs_mount,
    make_cli,
    no_mount_left_behind,
    overlay_unavailable,
    snapshot,
)

from layerfs.containers import commit as C
from layerfs.store import Store
from layerfs.tar import writer as T
from layerfs.tools.image import import_path

SAMPLE = "layerfs-sample:latest"
COMMITTED = "committed:latest"
MT = 1_700_000_000
NS = 1_000_000_000

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
needs_umoci = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="whiteout devices and trusted.* xattrs need root")


# -- helpers ------------------------------------------------------------------------------------
def run(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr}")
    return p.stdout


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put(path: str, data: bytes, mode: int = 0o644) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def normalised(snap: dict[str, Any], *, dir_mtimes: bool = True, root_mtime: bool = True) -> dict[str, Any]:
    """A snapshot with every mtime cut to whole seconds (what a tar layer keeps); optionally
    without directory mtimes, or without the root's (a layer has no member for the root)."""
    out: dict[str, Any] = {}
    for path, rec in snap.items():
        if isinstance(rec, dict) and "mtime_ns" in rec:
            rec = dict(rec, mtime_ns=rec["mtime_ns"] // NS * NS)
            if rec["type"] == "dir" and (not dir_mtimes or (path == "/" and not root_mtime)):
                del rec["mtime_ns"]
        out[path] = rec
    return out


def layout_manifest(layout: Path) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    return json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_bytes())


def layer_tar(layout: Path, i: int = -1) -> bytes:
    digest = layout_manifest(layout)["layers"][i]["digest"]
    return (layout / "blobs" / "sha256" / digest[7:]).read_bytes()


def members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return t.getmembers()


def layer_bytes(upper: str | Path, skip: list[bytes] | None = None) -> bytes:
    return b"".join(T.write(C.layer_members(str(upper), skip or [])))


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    run("umoci", "unpack", *rootless, "--image", f"{layout}:{tag}", str(bundle))
    return bundle / "rootfs"


def image_layers(store: Store, image_id: bytes) -> list[bytes]:
    rec = store.get_image(image_id)
    assert rec is not None
    return list(rec.layers)


def stored_config(store: Store, image_id: str) -> dict[str, Any]:
    rec = store.get_image(bytes.fromhex(image_id.removeprefix("sha256:")))
    assert rec is not None
    return json.loads(store.read_object(rec.config))


def set_times(root: str | Path, mtime: int = MT) -> None:
    """Every entry below ``root`` (children before their directory) gets mtime ``mtime``."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(mtime * NS, mtime * NS), follow_symlinks=False)
    os.utime(root, ns=(mtime * NS, mtime * NS))


@pytest.fixture
def parent(store: Store, sample_layout: str) -> bytes:
    """The sample image imported into the test's store (in process); its image id."""
    (res,) = import_path(store, sample_layout)
    return bytes.fromhex(res.image_id[7:])


# -- 1, 2: changes made through a writable mount --------------------------------------------------
def container_ops(root: str) -> None:
    """What the container does, through the mount."""

    def p(rel: str) -> str:
        return os.path.join(root, rel)

    os.unlink(p("etc/hostname"))  # delete a file
    shutil.rmtree(p("usr/share/doc/a-rather-long-directory-name-00"))  # delete a tree
    shutil.rmtree(p("app"))  # replace a directory wholesale: opaque
    os.mkdir(p("app"))
    put(p("app/run.sh"), b"#!/bin/sh\necho replaced\n", 0o755)
    put(p("app/new.txt"), b"new in the replaced directory\n")
    with open(p("etc/os-release"), "r+b") as f:  # replace a file's contents
        f.truncate(0)
        f.write(b'NAME="changed"\n')
    os.chmod(p("bin/su-demo"), 0o750)  # metadata only
    os.chmod(p("usr/share/doc/README"), 0o600)  # one name of a lower hardlink pair
    put(p("etc/added.txt"), b"added\n")  # a new file with a user xattr
    os.setxattr(p("etc/added.txt"), "user.test", b"hello")
    os.chown(p("etc/added.txt"), 1234, 5678)
    put(p("home/a"), b"a hardlinked pair\n")  # a new hardlink pair
    os.link(p("home/a"), p("home/b"))
    os.symlink("a", p("home/link"))
    os.mkfifo(p("home/fifo"), 0o640)
    os.chmod(p("home/fifo"), 0o640)
    os.mknod(p("home/null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a device, not a whiteout
    os.chmod(p("home/null"), 0o666)
    os.makedirs(p("opt/tree"))  # new directories
    put(p("opt/tree/f.txt"), b"deep\n")
    shutil.rmtree(p("var/lib/app"))  # a directory replaced by a file
    put(p("var/lib/app"), b"now a file\n")
    os.unlink(p("etc/tagged"))  # a file replaced by a directory
    os.mkdir(p("etc/tagged"))
    put(p("etc/tagged/x"), b"x\n")
    put(p("etc/tagged.bak"), b"sorts after etc/tagged/x in a layer\n")


EXPECTED_CHANGES = [
    ("C", "/app"),
    ("D", "/app/data.bin"),
    ("A", "/app/new.txt"),
    ("C", "/app/run.sh"),
    ("C", "/bin"),
    ("C", "/bin/su-demo"),
    ("C", "/etc"),
    ("A", "/etc/added.txt"),
    ("D", "/etc/hostname"),
    ("C", "/etc/os-release"),
    ("C", "/etc/tagged"),
    ("A", "/etc/tagged/x"),
    ("A", "/etc/tagged.bak"),
    ("C", "/home"),
    ("A", "/home/a"),
    ("A", "/home/b"),
    ("A", "/home/fifo"),
    ("A", "/home/link"),
    ("A", "/home/null"),
    ("A", "/opt"),
    ("A", "/opt/tree"),
    ("A", "/opt/tree/f.txt"),
    ("C", "/usr"),
    ("C", "/usr/share"),
    ("C", "/usr/share/doc"),
    ("C", "/usr/share/doc/README"),
    ("C", "/usr/share/doc/README.link"),
    ("D", "/usr/share/doc/a-rather-long-directory-name-00"),
    ("C", "/var"),
    ("C", "/var/lib"),
    ("C", "/var/lib/app"),
]

# the committed layer's members, in order (tarfile drops a directory's trailing slash)
EXPECTED_MEMBERS = [
    "app",
    "app/.wh..wh..opq",
    "app/new.txt",
    "app/run.sh",
    "bin",
    "bin/su-demo",
    "etc",
    "etc/.wh.hostname",
    "etc/added.txt",
    "etc/os-release",
    "etc/tagged",
    "etc/tagged/.wh..wh..opq",
    "etc/tagged/x",
    "etc/tagged.bak",
    "home",
    "home/a",
    "home/b",
    "home/fifo",
    "home/link",
    "home/null",
    "opt",
    "opt/tree",
    "opt/tree/f.txt",
    "usr",
    "usr/share",
    "usr/share/doc",
    "usr/share/doc/.wh.a-rather-long-directory-name-00",
    "usr/share/doc/README",
    "usr/share/doc/README.link",
    "var",
    "var/lib",
    "var/lib/app",
]


@dataclass
class Scenario:
    tmp: Path
    store_path: str
    cli: Callable[..., Any]
    parent_id: bytes
    upper: Path
    upper_copy: Path  # taken right after unmount, for the kernel (which may write to an upper)
    before: dict[str, Any]  # the writable mount's tree just before unmounting
    changes: list[C.Change]
    result: C.CommitResult
    oci: Path  # ``layerfs save --format oci-dir`` of the committed image
    committed_tree: dict[str, Any]  # a read-only layerfs mount of the committed image


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, sample_layout: str) -> Scenario:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("commit")
    store_path = str(tmp / "store")
    cli = make_cli(store_path)
    cli("import", sample_layout)
    upper = tmp / "upper"
    with layerfs_mount(cli, SAMPLE, str(tmp / "rw"), upper=str(upper)) as mnt:
        container_ops(mnt)
        before = snapshot(mnt, dir_mtimes=True)
    upper_copy = tmp / "upper-copy"
    run("cp", "-a", str(upper), str(upper_copy))
    store = Store(store_path)
    try:
        parent_id = bytes.fromhex(cli("inspect", SAMPLE).json()[0]["Id"][7:])
        found = C.changes(store, image_layers(store, parent_id), str(upper))
        result = C.commit(
            store,
            parent_id,
            str(upper),
            COMMITTED,
            message="the test's changes",
            author="tester <t@example.com>",
            created_by="container_ops()",
            changes=["CMD /app/run.sh --committed"],
        )
    finally:
        store.close()
    oci = tmp / "oci"
    cli("save", COMMITTED, "--format", "oci-dir", "-o", str(oci))
    with layerfs_mount(cli, COMMITTED, str(tmp / "ro")) as mnt:
        committed_tree = snapshot(mnt, dir_mtimes=True)
    return Scenario(
        tmp, store_path, cli, parent_id, upper, upper_copy, before, found, result, oci, committed_tree
    )


def test_changes_lists_what_the_container_did(scenario: Scenario) -> None:
    assert [tuple(c) for c in scenario.changes] == EXPECTED_CHANGES


def test_commit_result_and_image_record(scenario: Scenario) -> None:
    r = scenario.result
    assert r.layer_new and r.layer is not None
    store = Store(scenario.store_path)
    try:
        parent = store.get_image(scenario.parent_id)
        assert parent is not None
        rec = store.get_image(bytes.fromhex(r.image_id[7:]))
        assert rec is not None
        assert rec.layers == (*parent.layers, bytes.fromhex(r.layer[7:]))
        assert store.tags()[COMMITTED] == bytes.fromhex(r.image_id[7:])
        config = stored_config(store, r.image_id)
        parent_config = json.loads(store.read_object(parent.config))
    finally:
        store.close()
    # the image id is the digest of the config as stored
    assert sha(json.dumps(config, separators=(",", ":")).encode()) == r.image_id
    assert config["rootfs"]["diff_ids"] == ["sha256:" + h.hex() for h in parent.layers] + [r.layer]
    assert config["history"][:-1] == parent_config["history"]
    last = config["history"][-1]
    assert last["comment"] == "the test's changes"
    assert last["author"] == config["author"] == "tester <t@example.com>"
    assert last["created_by"] == "container_ops()"
    assert "empty_layer" not in last
    assert config["config"]["Cmd"] == ["/bin/sh", "-c", "/app/run.sh --committed"]
    assert config["config"]["Env"] == parent_config["config"]["Env"]  # the rest is kept
    # the saved layout names exactly that layer, and its bytes hash to the diff_id
    manifest = layout_manifest(scenario.oci)
    assert manifest["layers"][-1]["digest"] == r.layer
    assert sha(layer_tar(scenario.oci)) == r.layer
    assert manifest["config"]["digest"] == r.image_id


@needs_umoci
def test_umoci_unpacks_what_the_container_saw(scenario: Scenario, tmp_path: Path) -> None:
    """umoci applies the committed layer (whiteouts, opaque markers, hardlinks, xattrs) over
    the sample's layers: the tree is the committed image's mount and the container's tree."""
    index = json.loads((scenario.oci / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "latest"
    rootfs = umoci_unpack(scenario.oci, "latest", tmp_path / "bundle")
    unpacked = snapshot(str(rootfs), dir_mtimes=True)
    assert_same(unpacked, scenario.committed_tree, "committed image", ("umoci", "layerfs mount"))
    # what the container showed, to the second (a layer has no member for the root)
    assert_same(
        normalised(scenario.before, root_mtime=False),
        normalised(unpacked, root_mtime=False),
        "the container's tree",
        ("writable mount", "umoci"),
    )
    # the edge cases really are in it (so that the comparison means something)
    assert "/etc/hostname" not in unpacked and "/app/data.bin" not in unpacked
    assert "/usr/share/doc/a-rather-long-directory-name-00" not in unpacked
    assert "/var/lib/app/state.db" not in unpacked and unpacked["/var/lib/app"]["type"] == "file"
    assert unpacked["/etc/tagged"]["type"] == "dir" and "/etc/tagged/x" in unpacked
    assert unpacked["/etc/added.txt"]["xattrs"] == {"user.test": b"hello".hex()}
    assert unpacked["/home/fifo"]["type"] == "fifo"
    assert unpacked["/home/null"]["type"] == "chr" and unpacked["/home/null"]["rdev"] == (1, 3)
    assert unpacked["/bin/su-demo"]["mode"] == "0o750"
    assert ["/home/a", "/home/b"] in unpacked[HARDLINKS]
    assert ["/usr/share/doc/README", "/usr/share/doc/README.link"] in unpacked[HARDLINKS]
    assert unpacked["/usr/share/doc/README.link"]["mode"] == "0o600"


def test_kernel_overlay_agrees(scenario: Scenario) -> None:
    """(i) the kernel overlay of the saved layers, extracted by tarfile, is the committed
    image's mount; (ii) the kernel overlay of the sample's layers with the container's upper
    directory is the container's tree."""
    reason = overlay_unavailable(str(scenario.tmp))
    if reason:
        pytest.skip(reason)
    t = scenario.tmp
    lowers = extract_layers(str(scenario.oci), str(t / "k-layers"))
    assert len(lowers) == 4
    with kernel_overlay(lowers, str(t / "k1-up"), str(t / "k1-work"), str(t / "k1")) as km:
        kernel_committed = snapshot(km, dir_mtimes=True)
    # the root's mtime is the extraction's moment on the kernel side: a layer has no root member
    assert_same(
        normalised(kernel_committed, root_mtime=False),
        normalised(scenario.committed_tree, root_mtime=False),
        "committed image",
        ("kernel", "layerfs"),
    )
    with kernel_overlay(
        lowers[:3], str(scenario.upper_copy), str(t / "k2-work"), str(t / "k2"), index=False
    ) as km:
        kernel_container = snapshot(km)
    assert_same(
        kernel_container,
        snapshot_without_dir_mtimes(scenario.before),
        "the container's tree",
        ("kernel", "writable mount"),
    )


def snapshot_without_dir_mtimes(snap: dict[str, Any]) -> dict[str, Any]:
    return {
        p: {k: v for k, v in rec.items() if not (k == "mtime_ns" and rec["type"] == "dir")}
        if isinstance(rec, dict)
        else rec
        for p, rec in snap.items()
    }


def test_copied_up_parents_keep_their_mtime(scenario: Scenario) -> None:
    """/bin, /usr, /usr/share and /var were only copied up as parents of changed entries:
    the container saw their image mtime, and so must the committed layer."""
    by = {m.name: m for m in members(layer_tar(scenario.oci))}
    for d in ("bin", "usr", "usr/share", "var"):
        assert scenario.before["/" + d]["mtime_ns"] == MT * NS, d  # what the container saw
    assert {d: by[d].mtime for d in ("bin", "usr", "usr/share", "var")} == dict.fromkeys(
        ("bin", "usr", "usr/share", "var"), MT
    )
    # and then every directory of the committed image has the mtime the container saw
    assert_same(
        normalised(scenario.before, root_mtime=False),
        normalised(scenario.committed_tree, root_mtime=False),
        "the container's tree with directory mtimes",
        ("writable mount", "committed image"),
    )


def test_committed_layer_members(scenario: Scenario) -> None:
    tar = layer_tar(scenario.oci)
    infos = members(tar)
    names = [m.name for m in infos]
    assert names == EXPECTED_MEMBERS
    by = {m.name: m for m in infos}
    # parents first, siblings in byte order
    for i, n in enumerate(names):
        parent = n.rpartition("/")[0]
        assert not parent or names.index(parent) < i, f"{n} comes before its directory"
    keys = [n.encode().split(b"/") for n in names]
    assert keys == sorted(keys)
    # deletions: empty regular .wh. members; the opaque marker right after its directory
    for wh in ("etc/.wh.hostname", "usr/share/doc/.wh.a-rather-long-directory-name-00"):
        assert by[wh].isreg() and by[wh].size == 0
    for d in ("app", "etc/tagged"):
        assert by[d].isdir()
        assert names[names.index(d) + 1] == d + "/.wh..wh..opq"
    assert not any(".wh." in n for n in names if n.rpartition("/")[2] == "data.bin")
    # the second name of each hardlink pair is a hardlink member to the first
    assert by["home/a"].isreg() and by["home/a"].size == len(b"a hardlinked pair\n")
    assert by["home/b"].type == tarfile.LNKTYPE and by["home/b"].linkname == "home/a"
    assert by["usr/share/doc/README"].isreg() and by["usr/share/doc/README"].mode == 0o600
    link = by["usr/share/doc/README.link"]
    assert link.type == tarfile.LNKTYPE and link.linkname == "usr/share/doc/README"
    assert by["home/link"].issym() and by["home/link"].linkname == "a"
    assert by["home/fifo"].isfifo() and by["home/fifo"].mode == 0o640
    null = by["home/null"]
    assert null.ischr() and (null.devmajor, null.devminor, null.mode) == (1, 3, 0o666)
    assert by["bin/su-demo"].mode == 0o750 and by["bin/su-demo"].mtime == MT  # copy-up kept it
    assert by["var/lib/app"].isreg() and by["etc/tagged"].isdir()
    assert (by["etc/added.txt"].uid, by["etc/added.txt"].gid) == (1234, 5678)
    # every other member has the upper entry's owner and mtime (whole seconds)
    for m in infos:
        if m.name.rpartition("/")[2].startswith(".wh."):
            assert (m.mtime, m.uid, m.gid, m.mode) == (0, 0, 0, 0o644), m.name
            continue
        st = os.lstat(scenario.upper / m.name)
        assert (m.mtime, m.uid, m.gid) == (st.st_mtime_ns // NS, st.st_uid, st.st_gid), m.name
        assert m.mode == stat.S_IMODE(st.st_mode), m.name
    # xattrs: the user one as a PAX record; none of overlayfs's or layerfs's bookkeeping
    assert by["etc/added.txt"].pax_headers == {"SCHILY.xattr.user.test": "hello"}
    for m in infos:
        bad = [k for k in m.pax_headers if "overlay." in k or "layerfs." in k]
        assert not bad, f"{m.name}: {bad}"
        assert m.uname == m.gname == ""
        assert "mtime" not in m.pax_headers  # whole seconds
    assert b"trusted." not in tar and b"layerfs.ino" not in tar
    # contents
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        f = t.extractfile("etc/os-release")
        assert f is not None and f.read() == b'NAME="changed"\n'
    # the writer's own rules: no global header, ends with two zero blocks, nothing after
    assert tar.endswith(bytes(1024)) and len(tar) % 512 == 0
    assert all(m.type != tarfile.XGLTYPE for m in infos)
    assert layer_bytes(scenario.upper) == tar  # the saved blob is the commit's bytes


@needs_skopeo
def test_docker_save_round_trip(scenario: Scenario, tmp_path: Path) -> None:
    """save (docker) -> import into a fresh store keeps the image id and the layer's diff_id;
    skopeo reads the archive."""
    archive = tmp_path / "committed.tar"
    scenario.cli("save", COMMITTED, "-o", str(archive))
    r = scenario.result
    other = str(tmp_path / "other-store")
    other_cli = make_cli(other)
    other_cli("import", str(archive))
    (image,) = other_cli("images", "--json").json()
    assert image["id"] == r.image_id
    assert image["repo_tags"] == [COMMITTED]
    assert image["layers"][-1] == r.layer and len(image["layers"]) == 4
    info = json.loads(run("skopeo", "inspect", f"docker-archive:{archive}"))
    assert info["Layers"][-1] == r.layer and len(info["Layers"]) == 4
    raw_manifest = json.loads(run("skopeo", "inspect", "--raw", f"docker-archive:{archive}"))
    assert raw_manifest["config"]["digest"] == r.image_id
    config = json.loads(run("skopeo", "inspect", "--config", f"docker-archive:{archive}"))
    assert config["rootfs"]["diff_ids"][-1] == r.layer
    assert config["history"][-1]["comment"] == "the test's changes"
    # and saved again from the other store: the same layer bytes
    again = tmp_path / "again"
    other_cli("save", COMMITTED, "--format", "oci-dir", "-o", str(again))
    assert layer_tar(again) == layer_tar(scenario.oci)


# -- 3. reproducibility ------------------------------------------------------------------------
def build_upper(root: Path, *, reverse: bool, kernel_format: bool = True) -> Path:
    """One tree of changes, its entries made in either order (another readdir order)."""
    creations: list[Callable[[], None]] = [
        lambda: put(str(root / "etc/os-release"), b'NAME="changed"\n'),
        lambda: put(str(root / "etc/added.txt"), b"added\n", 0o600),
        lambda: put(str(root / "home/a"), b"pair\n"),
        lambda: os.symlink("a", root / "home/link"),
        lambda: os.mkfifo(root / "home/fifo"),
        lambda: put(str(root / "app/new.txt"), b"new\n", 0o755),
        lambda: put(str(root / "app/zz.txt"), b"zz\n"),
        lambda: os.makedirs(root / "usr/share/doc/kept"),
    ]
    if kernel_format:
        creations += [
            lambda: os.mknod(root / "etc/hostname", stat.S_IFCHR, os.makedev(0, 0)),
            lambda: os.mknod(root / "usr/share/doc/gone", stat.S_IFCHR, os.makedev(0, 0)),
        ]
    dirs = ["etc", "home", "app", "usr/share/doc"]
    for d in reversed(dirs) if reverse else dirs:
        os.makedirs(root / d)
    for step in reversed(creations) if reverse else creations:
        step()
    os.link(root / "home/a", root / "home/b")
    os.setxattr(root / "etc/added.txt", "user.note", b"\x00binary\xff")
    if kernel_format:
        os.setxattr(root / "app", "trusted.overlay.opaque", b"y")
    set_times(root)
    return root


@needs_root
def test_same_tree_same_bytes_and_diff_id(store: Store, parent: bytes, tmp_path: Path) -> None:
    one = build_upper(tmp_path / "one", reverse=False)
    two = build_upper(tmp_path / "two", reverse=True)
    tar = layer_bytes(one)
    assert tar == layer_bytes(two)
    assert [m.name for m in members(tar)][:3] == ["app", "app/.wh..wh..opq", "app/new.txt"]
    assert b" SCHILY.xattr.user.note=\x00binary\xff\n" in tar  # binary values kept as they are
    r1 = C.commit(store, parent, str(one), "one:latest")
    r2 = C.commit(store, parent, str(two), "two:latest")
    assert r1.layer == r2.layer == sha(tar)
    assert r1.layer_new and not r2.layer_new
    assert r2.bytes_stored < r1.bytes_stored
    # sub-second mtimes do not reach the layer
    os.utime(two / "home/a", ns=(MT * NS + NS // 2, MT * NS + NS // 2))
    assert layer_bytes(two) == tar
    # a different mtime is a different layer
    os.utime(two / "home/a", ns=((MT + 1) * NS, (MT + 1) * NS))
    changed = layer_bytes(two)
    assert changed != tar
    r3 = C.commit(store, parent, str(two), "three:latest")
    assert r3.layer == sha(changed) != r1.layer and r3.layer_new
    # so is a directory's
    os.utime(one / "home", ns=((MT + 1) * NS, (MT + 1) * NS))
    assert layer_bytes(one) not in (tar, changed)


def test_whole_seconds_are_cut_not_rounded(tmp_path: Path) -> None:
    up = tmp_path / "up"
    up.mkdir()
    put(str(up / "f"), b"x")
    put(str(up / "g"), b"y")
    os.utime(up / "f", ns=(MT * NS + NS - 1, MT * NS + NS - 1))  # 0.999999999 s past MT
    os.utime(up / "g", ns=(MT * NS + NS // 2, MT * NS + NS // 2))
    got = {m.name: m.mtime for m, _ in C.layer_members(str(up))}
    assert got == {b"f": MT, b"g": MT}


# -- 4. nothing changed --------------------------------------------------------------------------
def test_unchanged_upper_adds_no_layer(store: Store, parent: bytes, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert C.changes(store, image_layers(store, parent), str(empty)) == []
    layers_before = len(store.layers())
    r = C.commit(store, parent, str(empty), "same:latest", message="nothing")
    assert r.layer is None and not r.layer_new
    assert r.image_id != "sha256:" + parent.hex()  # a new config (history, created)
    assert 0 < r.bytes_stored < 16 * 1024
    assert image_layers(store, bytes.fromhex(r.image_id[7:])) == image_layers(store, parent)
    assert len(store.layers()) == layers_before
    config = stored_config(store, r.image_id)
    parent_config = stored_config(store, parent.hex())
    assert config["rootfs"]["diff_ids"] == parent_config["rootfs"]["diff_ids"]
    assert config["history"][-1]["empty_layer"] is True
    assert config["history"][-1]["comment"] == "nothing"
    assert len(config["history"]) == len(parent_config["history"]) + 1
    # no name: an untagged image
    tags = store.tags()
    r_untagged = C.commit(store, parent, str(empty), None)
    assert store.tags() == tags and store.get_image(bytes.fromhex(r_untagged.image_id[7:])) is not None
    # an empty mount point the runtime made (``skip``) is no change either ...
    (empty / "proc").mkdir()
    r2 = C.commit(store, parent, str(empty), "same2:latest", skip=[b"proc"])
    assert r2.layer is None
    assert C.changes(store, image_layers(store, parent), str(empty), [b"proc"]) == []
    # ... until something is in it
    (empty / "proc" / "f").write_bytes(b"x")
    set_times(empty)
    assert [m.name for m, _ in C.layer_members(str(empty), [b"proc"])] == [b"proc", b"proc/f"]
    r3 = C.commit(store, parent, str(empty), "same3:latest", skip=[b"proc"])
    assert r3.layer is not None and r3.layer_new


# -- 5. the fallback upper format ------------------------------------------------------------------
@needs_root
def test_fallback_whiteout_files_equal_kernel_format(store: Store, parent: bytes, tmp_path: Path) -> None:
    """``.wh.NAME`` files and a ``.wh..wh..opq`` file (what an unprivileged overlay writes)
    mean what 0/0 devices and trusted.overlay.opaque mean: same changes, same layer bytes."""
    kernel = build_upper(tmp_path / "kernel", reverse=False)
    fallback = build_upper(tmp_path / "fallback", reverse=False, kernel_format=False)
    put(str(fallback / "etc/.wh.hostname"), b"")
    put(str(fallback / "usr/share/doc/.wh.gone"), b"")
    put(str(fallback / "app/.wh..wh..opq"), b"")
    set_times(fallback)
    userx = build_upper(tmp_path / "user-xattr", reverse=False, kernel_format=False)
    put(str(userx / "etc/.wh.hostname"), b"")
    put(str(userx / "usr/share/doc/.wh.gone"), b"")
    os.setxattr(userx / "app", "user.overlay.opaque", b"y")
    set_times(userx)
    layers = image_layers(store, parent)
    expected = C.changes(store, layers, str(kernel))
    assert ("D", "/etc/hostname") in expected and ("D", "/app/data.bin") in expected
    assert C.changes(store, layers, str(fallback)) == expected
    assert C.changes(store, layers, str(userx)) == expected
    tar = layer_bytes(kernel)
    assert layer_bytes(fallback) == tar
    assert layer_bytes(userx) == tar
    assert b"user.overlay" not in tar
    # a stale entry beside its .wh. file does not count
    put(str(fallback / "etc/hostname"), b"stale\n")
    set_times(fallback)
    assert layer_bytes(fallback) == tar
    assert C.changes(store, layers, str(fallback)) == expected


# -- 6. --change instructions --------------------------------------------------------------------
def test_apply_change() -> None:
    config: dict[str, Any] = {"Env": ["PATH=/bin", "KEEP=1"], "Labels": {"a": "1"}}
    C.apply_change(config, 'CMD ["/bin/echo", "hi there"]')
    assert config["Cmd"] == ["/bin/echo", "hi there"]
    C.apply_change(config, "CMD echo $HOME && ls")
    assert config["Cmd"] == ["/bin/sh", "-c", "echo $HOME && ls"]
    C.apply_change(config, 'ENTRYPOINT ["/app/run.sh"]')
    assert config["Entrypoint"] == ["/app/run.sh"]
    C.apply_change(config, "entrypoint /app/run.sh --flag")
    assert config["Entrypoint"] == ["/bin/sh", "-c", "/app/run.sh --flag"]
    C.apply_change(config, 'ENV PATH=/usr/bin:/bin NEW="two words"')
    assert config["Env"] == ["KEEP=1", "PATH=/usr/bin:/bin", "NEW=two words"]
    C.apply_change(config, "ENV NEW one value with spaces")
    assert config["Env"] == ["KEEP=1", "PATH=/usr/bin:/bin", "NEW=one value with spaces"]
    C.apply_change(config, "ENV OPTS a=b")  # ``K V``: the value may hold "="
    assert config["Env"][-1] == "OPTS=a=b"
    C.apply_change(config, "WORKDIR /srv/app")
    assert config["WorkingDir"] == "/srv/app"
    C.apply_change(config, "USER 1000:1000")
    assert config["User"] == "1000:1000"
    C.apply_change(config, 'LABEL b=2 "c d"="e f"')
    assert config["Labels"] == {"a": "1", "b": "2", "c d": "e f"}
    C.apply_change(config, "LABEL a=replaced")
    assert config["Labels"]["a"] == "replaced"
    C.apply_change(config, "EXPOSE 80 53/udp")
    C.apply_change(config, "EXPOSE 8080/tcp")
    assert config["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}, "8080/tcp": {}}
    C.apply_change(config, 'VOLUME ["/data", "/logs"]')
    C.apply_change(config, "VOLUME /cache")
    assert config["Volumes"] == {"/data": {}, "/logs": {}, "/cache": {}}
    C.apply_change(config, "STOPSIGNAL SIGTERM")
    assert config["StopSignal"] == "SIGTERM"
    snapshot_of = json.dumps(config, sort_keys=True)
    for bad in (
        "FROM busybox",
        "RUN echo hi",
        "CMD",
        "ENV",
        "CMD [not json",
        "CMD [1, 2]",
        "LABEL novalue",
        "LABEL =x",
        "",
    ):
        with pytest.raises(C.CommitError):
            C.apply_change(config, bad)
    assert json.dumps(config, sort_keys=True) == snapshot_of  # a refused change changes nothing


@pytest.mark.parametrize(
    "bad", ["ENV ONLYKEY", 'LABEL a="unclosed', "EXPOSE [80", "EXPOSE [80]", "VOLUME [1]"]
)
def test_malformed_change_is_a_commit_error(bad: str) -> None:
    try:
        C.apply_change({}, bad)
    except C.CommitError:
        return
    except Exception as exc:
        raise AssertionError(f"{bad!r}: {type(exc).__name__}: {exc}") from None
    raise AssertionError(f"{bad!r} was accepted")


def test_commit_changes_reach_the_config(store: Store, parent: bytes, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = C.commit(
        store,
        parent,
        str(empty),
        "changed:latest",
        changes=["ENV PATH /usr/bin", "WORKDIR /", 'CMD ["sh"]', "LABEL x=y", "EXPOSE 80"],
    )
    inner = stored_config(store, r.image_id)["config"]
    assert inner["Env"] == ["PATH=/usr/bin"]
    assert inner["WorkingDir"] == "/" and inner["Cmd"] == ["sh"]
    assert inner["Labels"] == {"org.opencontainers.image.title": "layerfs sample", "x": "y"}
    assert inner["ExposedPorts"] == {"80/tcp": {}}
    # a bad instruction: refused before anything is stored
    (tmp_path / "empty" / "f").write_bytes(b"x")
    images, layers, tags = len(store.images()), len(store.layers()), store.tags()
    with pytest.raises(C.CommitError):
        C.commit(store, parent, str(empty), "bad:latest", changes=["ENV A=1", "ADD . /"])
    assert (len(store.images()), len(store.layers()), store.tags()) == (images, layers, tags)


# -- 8. odd upper content ----------------------------------------------------------------------------
def test_socket_is_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    up = tmp_path / "up"
    (up / "run").mkdir(parents=True)
    put(str(up / "run/keep.txt"), b"kept\n")
    monkeypatch.chdir(up / "run")  # a short path for bind()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("app.sock")
        assert stat.S_ISSOCK(os.lstat(up / "run/app.sock").st_mode)
        set_times(up)
        tar = layer_bytes(up)
    assert [m.name for m in members(tar)] == ["run", "run/keep.txt"]


@pytest.mark.parametrize("kind", ["fifo", "symlink", "socket"])
def test_hardlinked_special_files_commit(
    kind: str, store: Store, parent: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ln fifo fifo2`` (or the same for a symlink or a socket) through the mount leaves two
    names of one inode in the upper directory; the commit must still make a valid layer."""
    up = tmp_path / "up"
    (up / "d").mkdir(parents=True)
    put(str(up / "d/keep.txt"), b"kept\n")
    monkeypatch.chdir(up / "d")
    with socket.socket(socket.AF_UNIX) as sock:
        if kind == "fifo":
            os.mkfifo("one")
        elif kind == "symlink":
            os.symlink("target", "one")
        else:
            sock.bind("one")
        os.link("one", "two", follow_symlinks=False)
        set_times(up)
        infos = members(layer_bytes(up))
        names = [m.name for m in infos]
        for m in infos:
            if m.type == tarfile.LNKTYPE:
                target = infos[names.index(m.linkname)]
                assert names.index(m.linkname) < names.index(m.name) and target.isreg(), m.name
        expected = {"fifo": ["d/one", "d/two"], "symlink": ["d/one", "d/two"], "socket": []}[kind]
        assert names == ["d", "d/keep.txt", *expected]
        r = C.commit(store, parent, str(up), "links:latest")
    assert r.layer is not None and r.layer_new


def test_file_changing_while_committing_is_refused(
    store: Store, parent: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = tmp_path / "up"
    (up / "data").mkdir(parents=True)
    put(str(up / "data/a"), b"a\n")
    put(str(up / "data/growing"), b"x" * 1000)
    real = C._contents

    def grows_while_read(path: bytes) -> Iterator[bytes]:
        if path.endswith(b"growing"):
            with open(path, "ab") as f:  # the container writes after the scan saw the size
                f.write(b"more")
        yield from real(path)

    monkeypatch.setattr(C, "_contents", grows_while_read)
    images, layers, tags = len(store.images()), len(store.layers()), store.tags()
    with pytest.raises(C.CommitError, match="changed while committing"):
        C.commit(store, parent, str(up), "racy:latest")
    assert (len(store.images()), len(store.layers()), store.tags()) == (images, layers, tags)
    # shrinking is caught too
    monkeypatch.setattr(C, "_contents", lambda path: iter([b"short"]))
    with pytest.raises(C.CommitError, match="changed while committing"):
        C.commit(store, parent, str(up), "racy:latest")
    assert (len(store.images()), len(store.layers()), store.tags()) == (images, layers, tags)


LONG_DIR = "uni/" + "\u00fc" * 40  # 84 bytes
LONG_NAME = LONG_DIR + "/" + "\u00df" * 30 + ".txt"  # 149 bytes, not ASCII
LONG_TARGET = "/" + "t" * 150


@needs_fuse
def test_long_and_non_ascii_names_round_trip(
    store: Store, parent: bytes, cli: Callable[..., Any], tmp_path: Path
) -> None:
    up = tmp_path / "up"
    os.makedirs(up / LONG_DIR)
    put(str(up / LONG_NAME), b"long name\n")
    os.symlink(LONG_TARGET, up / "uni/longlink")
    put(os.fsencode(up / "uni") + b"/bad\xffname", b"not utf-8\n")
    put(str(up / "uni/big-ids"), b"ids beyond ustar's 7 octal digits\n")
    os.chown(up / "uni/big-ids", 4_000_000, 4_000_001)
    set_times(up)
    tar = layer_bytes(up)
    by = {m.name: m for m in members(tar)}
    assert by[LONG_NAME].pax_headers["path"] == LONG_NAME and by[LONG_NAME].size == 10
    assert by[LONG_DIR].isdir() and by[LONG_DIR].pax_headers["path"] == LONG_DIR + "/"
    assert by["uni/longlink"].linkname == LONG_TARGET
    assert by["uni/longlink"].pax_headers == {"linkpath": LONG_TARGET}
    assert "uni/bad\udcffname" in by
    big = by["uni/big-ids"]
    assert big.pax_headers == {"uid": "4000000", "gid": "4000001"}
    assert (big.uid, big.gid) == (4_000_000, 4_000_001)
    r = C.commit(store, parent, str(up), "names:latest")
    assert r.layer == sha(tar)
    archive = tmp_path / "names.tar"
    cli("save", "names:latest", "-o", str(archive))
    other = str(tmp_path / "other")
    other_cli = make_cli(other)
    other_cli("import", str(archive))
    assert other_cli("images", "--json").json()[0]["id"] == r.image_id
    with layerfs_mount(other_cli, "names:latest", str(tmp_path / "mnt")) as mnt:
        assert sorted(os.listdir(os.path.join(os.fsencode(mnt), b"uni"))) == sorted(
            [b"bad\xffname", b"big-ids", b"longlink", os.fsencode(LONG_DIR.split("/")[1])]
        )
        with open(os.path.join(mnt, LONG_NAME), "rb") as f:
            assert f.read() == b"long name\n"
        assert os.readlink(os.path.join(mnt, "uni/longlink")) == LONG_TARGET
        st = os.lstat(os.path.join(mnt, "uni/big-ids"))
        assert (st.st_uid, st.st_gid) == (4_000_000, 4_000_001)
        with open(os.path.join(os.fsencode(mnt), b"uni/bad\xffname"), "rb") as f:
            assert f.read() == b"not utf-8\n"
