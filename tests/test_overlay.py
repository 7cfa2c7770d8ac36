"""layerfs-overlay against the kernel overlay filesystem over the same directories.

The lower directories are the layers of the union test images extracted in the kernel
format (``unionutil.extract_layers``); the same operation sequences run on the kernel's
mount and on ``layerfs-overlay``'s, and the kernel's answers are the expected ones.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import make_layout, tar_bytes
from test_union_kernel import CASES, Case
from unionutil import (
    Ops,
    _copy_meta,
    abort_mount,
    assert_same,
    assert_same_steps,
    extract_layers,
    force_unmount,
    fuse_unavailable,
    kernel_overlay,
    mount_devices,
    mounted,
    overlay_unavailable,
    snapshot,
    upper_snapshot,
)

# each core serves every case: the twin and the C core must not drift
pytestmark = pytest.mark.usefixtures("fuse_core")

HELPER = [sys.executable, "-m", "layerfs.overlay"]


@contextmanager
def overlay_mount(argv: list[str], mnt: str) -> Iterator[subprocess.CompletedProcess[str]]:
    """Run the helper with ``argv``; it must return with the mount ready; unmounted after."""
    os.makedirs(mnt, exist_ok=True)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    try:
        assert res.returncode == 0, f"{argv} exited {res.returncode}: {res.stderr}"
        assert mounted(mnt), "the helper returned before the mount was ready"
        yield res
    finally:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        force_unmount(mnt)


def opts(lowers: list[str], upper: str | None = None, work: str | None = None, extra: str = "") -> str:
    """fuse-overlayfs options: leftmost lowerdir on top (``lowers`` is bottom first)."""
    o = "lowerdir=" + ":".join(reversed(lowers))
    if upper:
        o += f",upperdir={upper},workdir={work}"
    return o + ("," + extra if extra else "")


@dataclass
class Layers:
    case: Case
    lowers: list[str]
    tmp: str


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def layers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Layers:
    reason = fuse_unavailable() or overlay_unavailable(str(tmp_path_factory.getbasetemp()))
    if reason:
        pytest.skip(reason)
    case: Case = request.param
    tmp = str(tmp_path_factory.mktemp("ovl-" + case.name))
    if case.layers is None:
        layout = request.getfixturevalue("sample_layout")
    else:
        layout = make_layout(os.path.join(tmp, "layout"), [tar_bytes(layer) for layer in case.layers()])
    return Layers(case, extract_layers(layout, os.path.join(tmp, "layers")), tmp)


def fresh_upper(layers: Layers, name: str) -> tuple[str, str]:
    """An upper directory whose root carries the image root's attributes (for both sides)."""
    upper, work = os.path.join(layers.tmp, name + "-upper"), os.path.join(layers.tmp, name + "-work")
    for d in (upper, work):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    _copy_meta(layers.lowers[-1], upper)
    return upper, work


def test_readonly_matches_kernel(layers: Layers) -> None:
    t = layers.tmp
    upper, work = fresh_upper(layers, "ro-k")
    with kernel_overlay(layers.lowers, upper, work, os.path.join(t, "ro-kmnt")) as km:
        expected = snapshot(km)
    mnt = os.path.join(t, "ro-lmnt")
    with overlay_mount([*HELPER, "-o", opts(layers.lowers), mnt], mnt):
        assert_same(expected, snapshot(mnt), "read-only tree of layerfs-overlay")


@dataclass
class Run:
    kernel_log: list[tuple[str, Any]]
    ours_log: list[tuple[str, Any]]
    kernel: dict[str, Any]
    ours: dict[str, Any]
    kernel_upper: dict[str, str]
    ours_upper: dict[str, str]


@pytest.fixture(scope="module")
def run(layers: Layers, fuse_core: str) -> Run:
    """The case's operations on the kernel overlay and on layerfs-overlay, once per FUSE core
    (a parameter here: a module fixture without it would be shared by both cores' tests)."""
    t = os.path.join(layers.tmp, fuse_core)
    os.makedirs(t)
    k = Ops(os.path.join(t, "rw-kmnt"))
    kupper, kwork = fresh_upper(layers, "rw-k")
    with kernel_overlay(layers.lowers, kupper, kwork, k.root):
        layers.case.ops(k)
        kernel = snapshot(k.root, volatile=k.volatile)
    o = Ops(os.path.join(t, "rw-lmnt"))
    upper, work = fresh_upper(layers, "rw-l")
    with overlay_mount([*HELPER, "-o", opts(layers.lowers, upper, work), o.root], o.root):
        layers.case.ops(o)
        ours = snapshot(o.root, volatile=o.volatile)
    return Run(k.log, o.log, kernel, ours, upper_snapshot(kupper), upper_snapshot(upper))


def test_operations_give_what_the_kernel_gives(run: Run) -> None:
    assert_same_steps(run.kernel_log, run.ours_log, "layerfs-overlay")


def test_readwrite_tree_matches_kernel(run: Run) -> None:
    assert_same(run.kernel, run.ours, "tree after the operations")


def test_whiteouts_in_upper_match_kernel(run: Run, layers: Layers) -> None:
    # a renamed lower directory: the kernel (redirect_dir) keeps it merged and needs whiteouts
    # inside it; layerfs copied it up whole and made it opaque (as in test_union_kernel)
    moved = [
        p + "/"
        for p, v in run.ours_upper.items()
        if v == "opaque dir" and not any(os.path.isdir(lower + p) for lower in layers.lowers)
    ]
    wk = sorted(p for p, v in run.kernel_upper.items() if v == "whiteout" and not p.startswith(tuple(moved)))
    wl = sorted(p for p, v in run.ours_upper.items() if v == "whiteout")
    assert wk == wl


def test_mount8_helper_form_and_unknown_options(sample_layout: str, tmp_path: Any) -> None:
    """``layerfs-overlay SOURCE MOUNTPOINT -o ...`` (what mount.fuse3 runs) with options podman
    passes that layerfs does not use: warned about, never fatal."""
    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    lowers = extract_layers(sample_layout, str(tmp_path / "layers"))
    upper, work, mnt = (str(tmp_path / n) for n in ("upper", "work", "mnt"))
    os.makedirs(upper)
    extra = "volatile,userxattr,noacl,nodev,nosuid"
    argv = [*HELPER, "my-source", mnt, "-o", opts(lowers, upper, work, extra)]
    with overlay_mount(argv, mnt) as res:
        assert "volatile" in res.stderr and "userxattr" in res.stderr and "noacl" in res.stderr
        with open(os.path.join(mnt, "etc/hostname"), "rb") as f:
            assert f.read() == b"layerfs-sample\n"
        with open("/proc/self/mountinfo") as f:
            line = next(x for x in f if f" {os.path.realpath(mnt)} " in x)
        assert "nodev" in line and "nosuid" in line
        assert "fuse.layerfs-overlay" in line and "my-source" in line
        with open(os.path.join(mnt, "new"), "w") as f:
            f.write("x")
    assert os.path.exists(os.path.join(upper, "new"))


def test_mount_command_runs_the_helper(sample_layout: str, tmp_path: Any) -> None:
    """``mount -t fuse.layerfs-overlay`` exactly as a user (or a test suite) would type it."""
    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    if shutil.which("layerfs-overlay") is None or shutil.which("mount.fuse3") is None:
        pytest.skip("layerfs-overlay or mount.fuse3 is not on PATH (.ci/install puts both there)")
    lowers = extract_layers(sample_layout, str(tmp_path / "layers"))
    upper, work, mnt = (str(tmp_path / n) for n in ("upper", "work", "mnt"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    res = subprocess.run(
        ["mount", "-t", "fuse.layerfs-overlay", "overlay", mnt, "-o", opts(lowers, upper, work)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert res.returncode == 0, res.stderr
        assert sorted(os.listdir(mnt)) == ["app", "bin", "etc", "home", "tmp", "usr", "var"]
        out = subprocess.run(["chroot", mnt, "/app/run.sh"], capture_output=True, text=True)
        assert out.stdout.startswith("hello from the layerfs sample image")
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        force_unmount(mnt)


@pytest.mark.parametrize("writable", [True, False], ids=["rw", "ro"])
def test_lower_mounts_are_free_once_unmounted_and_keep_their_atimes(tmp_path: Any, writable: bool) -> None:
    """A lowerdir on a mount of its own can be unmounted right after the overlay is, as after
    the kernel overlay: unionmount-testsuite does so after every test, and got EBUSY now and
    then (the daemon held the lowerdir open for the millisecond it takes to exit after
    umount(2) returns).  Reading a lower file leaves its atime alone, as the kernel overlay's
    O_NOATIME opens of lower files do."""
    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    libc = ctypes.CDLL(None, use_errno=True)
    low, upper, work, mnt = (str(tmp_path / n) for n in ("low", "upper", "work", "mnt"))
    for d in (low, upper, work, mnt):
        os.makedirs(d)
    for _ in range(5):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "relatime", "lower", low], check=True)
        try:
            with open(os.path.join(low, "f"), "w") as f:
                f.write("lower\n")
            os.utime(os.path.join(low, "f"), (1_000_000, 2_000_000))  # relatime would update it
            o = opts([low], upper, work) if writable else opts([low])
            subprocess.run([*HELPER, "-o", o, mnt], check=True)
            try:
                with open(os.path.join(mnt, "f")) as f:
                    assert f.read() == "lower\n"
                assert os.stat(os.path.join(low, "f")).st_atime == 1_000_000
            finally:  # the two umount(2)s back to back, as a script's two umount commands race
                mnt_gone = libc.umount2(os.fsencode(mnt), 0) == 0
                err = 0 if libc.umount2(os.fsencode(low), 0) == 0 else ctypes.get_errno()
            assert mnt_gone
            assert err == 0, f"umount {low}: {os.strerror(err)}"
        finally:
            subprocess.run(["umount", low], capture_output=True)
        if writable:
            shutil.rmtree(upper)
            shutil.rmtree(work)
            os.makedirs(upper)
            os.makedirs(work)


def test_bad_command_lines(tmp_path: Any) -> None:
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    res = subprocess.run([*HELPER, mnt], capture_output=True, text=True)
    assert res.returncode == 2 and "lowerdir" in res.stderr
    res = subprocess.run([*HELPER, "-o", f"lowerdir={tmp_path}/missing", mnt], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr == f"layerfs-overlay: cannot mount {mnt}: lowerdir {tmp_path}/missing does not exist\n"
    gone = str(tmp_path / "no-mnt")
    res = subprocess.run([*HELPER, "-o", f"lowerdir={tmp_path}", gone], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr == f"layerfs-overlay: cannot mount {gone}: mountpoint {gone} does not exist\n"
    res = subprocess.run(
        [*HELPER, "-o", f"lowerdir={tmp_path},upperdir={tmp_path}", mnt], capture_output=True, text=True
    )
    assert res.returncode == 1 and "workdir" in res.stderr
    assert not mounted(mnt)


OVERLAPS = {
    # case: (mount point, options, the error after "cannot mount MNT: ")
    "lower-is-mountpoint": ("m", "lowerdir={m}", "lowerdir {m} is the mount point"),
    "lower-inside": ("m", "lowerdir={m}/sub:{t}/low", "lowerdir {m}/sub lies inside the mount point {m}"),
    "upper-inside": (
        "m",
        "lowerdir={t}/low,upperdir={m}/up,workdir={t}/work",
        "upperdir {m}/up lies inside the mount point {m}",
    ),
    "work-inside": (
        "m",
        "lowerdir={t}/low,upperdir={t}/up,workdir={m}/work",
        "workdir {m}/work lies inside the mount point {m}",
    ),
    "mountpoint-inside-upper": (
        "up/m",
        "lowerdir={t}/low,upperdir={t}/up,workdir={t}/work",
        "the mount point {m} lies inside upperdir {t}/up",
    ),
    "mountpoint-inside-lower": (
        "low/m",
        "lowerdir={t}/low",
        "the mount point {m} lies inside lowerdir {t}/low",
    ),
}


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_directories_overlapping_the_mount_point_are_refused(tmp_path: Any, case: str) -> None:
    """As ``layerfs mount``: a layer the daemon would reach through its own mount hung every
    access and the unmount; refused with one line, nothing mounted."""
    where, options, error = OVERLAPS[case]
    t = str(tmp_path)
    mnt = os.path.join(t, where)
    for d in (
        os.path.join(mnt, "sub"),
        os.path.join(mnt, "up"),
        os.path.join(t, "low"),
        os.path.join(t, "up"),
    ):
        os.makedirs(d, exist_ok=True)
    before = sorted(os.listdir(mnt))
    try:
        res = subprocess.run(
            [*HELPER, "-o", options.format(m=mnt, t=t), mnt], capture_output=True, text=True, timeout=60
        )
        assert not mount_devices(mnt), "mounted (and hung)"
    finally:
        abort_mount(mnt)
    assert res.returncode == 1, res.stderr
    assert res.stderr == f"layerfs-overlay: cannot mount {mnt}: {error.format(m=mnt, t=t)}\n"
    assert sorted(os.listdir(mnt)) == before
