"""What a bench times, on each system: a workload's ``measure(bed, system)`` prepares what it
needs (a mount), drops the caches, times the work and undoes what it prepared.

Cold means cold: before every timed piece ``drop_caches`` syncs and drops the page cache,
dentries and inodes (``echo 3 > /proc/sys/vm/drop_caches``), and every mount is fresh (a FUSE
daemon's own caches start empty; layerfs's file cache in the store is emptied first).  Write workloads end with a sync, inside the time: what is
measured is the disk's work, not the page cache's.  fio runs the sequential and random I/O
(``--output-format=json``; its figures include the final fsync).  Not thread-safe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from layerfs.storagebench.image import BenchError, BenchImage, Sizes
from layerfs.storagebench.systems import OVERLAYS, Bed, Mounted

DROP_CACHES = "/proc/sys/vm/drop_caches"
COLD = (
    "sync; echo 3 > /proc/sys/vm/drop_caches before every timed piece, a fresh mount every time, "
    "layerfs's file cache emptied"
)


def drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


@dataclass
class Figure:
    """One timed piece: ``value`` in the workload's unit; ``extra``: what else was measured."""

    value: float
    extra: dict[str, Any] = field(default_factory=dict)


class Skip(Exception):
    """This workload does not apply to this system (the reason is the message)."""


@dataclass
class Workload:
    name: str
    label: str
    unit: str  # "s" (lower is better) or "MB/s" (higher is better)
    measure: Callable[[Bed, str], Figure]
    writes: bool = False
    needs_fio: bool = False

    @property
    def higher_is_better(self) -> bool:
        return self.unit != "s"


def timed(fn: Callable[[], Any], *, sync: bool = False) -> float:
    """Seconds ``fn`` takes from cold caches (and, with ``sync``, until its writes are on disk)."""
    drop_caches()
    t0 = time.perf_counter()
    fn()
    if sync:
        os.sync()
    return time.perf_counter() - t0


class Context:
    """What the workloads need beyond the bed: the sizes, the start command, fio."""

    def __init__(self, sizes: Sizes, image: BenchImage | None, fio: str | None) -> None:
        self.sizes = sizes
        self.image = image
        self.fio = fio
        self.start_cmd: list[str] = []  # run in a chroot of the tree (chosen from the native tree)
        self.entries = 0  # the tree's entries below its root (counted on the native tree)


def _with_mount(bed: Bed, system: str, rw: bool, work: Callable[[Mounted], Figure]) -> Figure:
    m = bed.mount(system, rw=rw)
    try:
        return work(m)
    finally:
        bed.umount(m)


# -- the work ---------------------------------------------------------------------------------------
def walk_stat(root: str) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def read_files(root: str, rels: list[str]) -> int:
    total = 0
    for rel in rels:
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        try:
            while True:
                b = os.read(fd, 65536)
                if not b:
                    break
                total += len(b)
        finally:
            os.close(fd)
    return total


def read_big(path: str) -> int:
    buf = bytearray(1 << 20)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
    return total


def create_files(root: str, n: int, size: int) -> None:
    """An install: N files in a new directory tree (100 per directory), then sync."""
    payload = b"x" * size
    base = os.path.join(root, "bench", "installed")
    os.mkdir(base)
    for i in range(n):
        if i % 100 == 0:
            d = os.path.join(base, f"pkg{i // 100:03d}")
            os.mkdir(d)
        fd = os.open(os.path.join(d, f"file{i:05d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
    os.sync()


def append_byte(root: str, rels: list[str]) -> None:
    for rel in rels:
        fd = os.open(os.path.join(root, rel), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"!")
        finally:
            os.close(fd)
    os.sync()


# the image's program runs as nobody: a chroot is no boundary for root, and an image given with
# --image is not ours to trust
START_USER = "65534:65534"


START_TIMEOUT = 60.0  # seconds: a program that neither prints nor exits (a server) is killed


def first_output(root: str, cmd: list[str]) -> tuple[float, float]:
    """``chroot root cmd`` as nobody: seconds to its first byte of output, and to its exit."""
    t0 = time.perf_counter()
    chroot = ["chroot", f"--userspec={START_USER}", root, *cmd]
    proc = subprocess.Popen(chroot, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    watchdog = threading.Timer(START_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        first = proc.stdout.read(1)
        t1 = time.perf_counter()
        _, err = proc.communicate()
        t2 = time.perf_counter()
    finally:
        watchdog.cancel()
    if t2 - t0 >= START_TIMEOUT:
        raise BenchError(f"chroot {' '.join(cmd)}: still running after {START_TIMEOUT:g} s: killed")
    if proc.returncode != 0 or not first:
        why = err.decode(errors="replace").strip().splitlines()
        raise BenchError(f"chroot {' '.join(cmd)}: exit {proc.returncode}" + (f": {why[-1]}" if why else ""))
    return t1 - t0, t2 - t0


def fio(ctx: Context, args: list[str]) -> dict[str, Any]:
    """One fio job; its JSON's first job."""
    assert ctx.fio is not None
    cmd = [ctx.fio, "--name=layerfs-bench", "--ioengine=psync", "--output-format=json", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        raise BenchError(f"fio failed: {err[-1] if err else 'exit ' + str(res.returncode)}")
    text = res.stdout
    job: dict[str, Any] = json.loads(text[text.index("{") :])["jobs"][0]  # fio may print notes first
    if job.get("error"):
        raise BenchError(f"fio: error {job['error']}")
    return job


def fio_figure(job: dict[str, Any], direction: str) -> Figure:
    d = job[direction]
    if not d.get("io_bytes") or not d.get("bw_bytes"):
        raise BenchError(f"fio did no {direction}s")
    return Figure(
        d["bw_bytes"] / 1e6,
        {"iops": round(d["iops"], 1), "io_bytes": d["io_bytes"], "runtime_ms": d["runtime"]},
    )


# -- the workloads -----------------------------------------------------------------------------------
def workloads(ctx: Context) -> list[Workload]:
    s = ctx.sizes

    def do_import(bed: Bed, system: str) -> Figure:
        if system == "native":
            return Figure(timed(bed.import_native, sync=True))
        if system in OVERLAYS:
            if system == "fuse-overlayfs" and bed.layer_dirs and bed.shared_import is not None:
                # the same directories serve both: extracted once per round, by the overlay's turn
                return Figure(bed.shared_import, {"shared_with": "overlay"})
            t = timed(bed.import_layer_dirs, sync=True)
            bed.shared_import = t
            return Figure(t)
        t = timed(lambda: bed.import_layerfs(system), sync=True)
        # the first mount of an image builds its merged index (kept in the store): not a
        # mount to ready, so timed here, on its own
        t0 = time.perf_counter()
        _with_mount(bed, system, False, lambda m: Figure(0))
        return Figure(t, {"first_mount_s": round(time.perf_counter() - t0, 4)})

    def ready(bed: Bed, system: str) -> Figure:
        if system == "native":
            raise Skip("nothing to mount: the directory is there")
        state: dict[str, Mounted] = {}

        def go() -> None:
            state["m"] = bed.mount(system)
            os.listdir(state["m"].root)

        try:
            return Figure(timed(go))
        finally:
            if "m" in state:
                bed.umount(state["m"])

    def walk(bed: Bed, system: str) -> Figure:
        def work(m: Mounted) -> Figure:
            n: list[int] = []
            t = timed(lambda: n.append(walk_stat(m.root)))
            if ctx.entries and n[0] != ctx.entries:
                raise BenchError(f"walked {n[0]} entries; the image has {ctx.entries}")
            return Figure(t, {"entries": n[0]})

        return _with_mount(bed, system, False, work)

    def read_small(bed: Bed, system: str) -> Figure:
        files = bed.image.small_files

        def work(m: Mounted) -> Figure:
            got: list[int] = []
            t = timed(lambda: got.append(read_files(m.root, files)))
            if got[0] != len(files) * s.small_size:
                raise BenchError(f"read {got[0]} bytes of {len(files)} files")
            return Figure(t, {"files": len(files), "MB/s": round(got[0] / t / 1e6, 2)})

        return _with_mount(bed, system, False, work)

    def read_large(bed: Bed, system: str) -> Figure:
        img = bed.image

        def work(m: Mounted) -> Figure:
            path = os.path.join(m.root, img.big)
            if ctx.fio:
                drop_caches()
                args = [f"--filename={path}", "--readonly", "--rw=read", "--bs=1M", f"--size={img.big_size}"]
                return fio_figure(fio(ctx, args), "read")
            got: list[int] = []
            t = timed(lambda: got.append(read_big(path)))
            if got[0] != img.big_size:
                raise BenchError(f"read {got[0]} of {img.big_size} bytes")
            return Figure(img.big_size / t / 1e6, {"tool": "python (fio is not installed)"})

        return _with_mount(bed, system, False, work)

    def start(bed: Bed, system: str) -> Figure:
        def work(m: Mounted) -> Figure:
            drop_caches()
            first, done = first_output(m.root, ctx.start_cmd)
            return Figure(first, {"to_exit_s": round(done, 4), "command": " ".join(ctx.start_cmd)})

        return _with_mount(bed, system, False, work)

    def install(bed: Bed, system: str) -> Figure:
        def work(m: Mounted) -> Figure:
            try:
                return Figure(timed(lambda: create_files(m.root, s.install_files, s.install_size)))
            finally:
                if system == "native":
                    shutil.rmtree(os.path.join(m.root, "bench", "installed"), ignore_errors=True)

        return _with_mount(bed, system, True, work)

    def copy_up(bed: Bed, system: str) -> Figure:
        files = bed.image.copyup

        def work(m: Mounted) -> Figure:
            try:
                t = timed(lambda: append_byte(m.root, files))
            finally:
                if system == "native":  # as it was, for the next round
                    for rel in files:
                        os.truncate(os.path.join(m.root, rel), bed.image.copyup_size)
            return Figure(t, {"MB/s": round(len(files) * bed.image.copyup_size / t / 1e6, 2)})

        return _with_mount(bed, system, True, work)

    def rand_read(bed: Bed, system: str) -> Figure:
        img = bed.image

        def work(m: Mounted) -> Figure:
            drop_caches()
            args = [
                f"--filename={os.path.join(m.root, img.big)}",
                "--readonly",
                "--rw=randread",
                "--bs=4k",
                f"--size={img.big_size}",
                f"--io_size={s.fio_rand_io}",
                f"--runtime={s.fio_runtime}",
                "--randrepeat=1",
                "--norandommap",
            ]
            return fio_figure(fio(ctx, args), "read")

        return _with_mount(bed, system, False, work)

    def new_file(m: Mounted, name: str) -> str:
        path = os.path.join(m.root, "bench", name)
        if m.system == "native" and os.path.exists(path):
            os.unlink(path)
        return path

    def seq_write(bed: Bed, system: str) -> Figure:
        def work(m: Mounted) -> Figure:
            path = new_file(m, "fio-seq")
            try:
                drop_caches()
                args = [
                    f"--filename={path}",
                    "--rw=write",
                    "--bs=1M",
                    f"--size={s.fio_write_size}",
                    "--end_fsync=1",
                ]
                return fio_figure(fio(ctx, args), "write")
            finally:
                if system == "native":
                    os.unlink(path)

        return _with_mount(bed, system, True, work)

    def rand_write(bed: Bed, system: str) -> Figure:
        def work(m: Mounted) -> Figure:
            path = new_file(m, "fio-rand")
            try:
                drop_caches()
                args = [
                    f"--filename={path}",
                    "--rw=randwrite",
                    "--bs=4k",
                    f"--size={s.fio_rand_file}",
                    f"--io_size={s.fio_rand_io}",
                    f"--runtime={s.fio_runtime}",
                    "--randrepeat=1",
                    "--end_fsync=1",
                ]
                return fio_figure(fio(ctx, args), "write")
            finally:
                if system == "native" and os.path.exists(path):
                    os.unlink(path)

        return _with_mount(bed, system, True, work)

    mib = 1 << 20
    n_small = len(ctx.image.small_files) if ctx.image is not None else s.small_files
    return [
        Workload("import", "import the image", "s", do_import, writes=True),
        Workload("ready", "mount to ready", "s", ready),
        Workload("walk", "cold walk + lstat of the tree", "s", walk),
        Workload("read-small", f"cold read of {n_small} small files", "s", read_small),
        Workload("read-large", f"cold sequential read, {s.big_size // mib} MiB file", "MB/s", read_large),
        Workload("start", "container-like start: time to first output", "s", start),
        Workload(
            "install",
            f"install: create {s.install_files} files of {s.install_size // 1024} KiB + sync",
            "s",
            install,
            writes=True,
        ),
        Workload(
            "copy-up",
            f"copy-up: append to {s.copyup_files} files of {s.copyup_size / mib:g} MiB + sync",
            "s",
            copy_up,
            writes=True,
        ),
        Workload(
            "rand-read", "cold 4 KiB random reads of the large file (fio)", "MB/s", rand_read, needs_fio=True
        ),
        Workload(
            "seq-write",
            f"sequential write of a new {s.fio_write_size // mib} MiB file + fsync (fio)",
            "MB/s",
            seq_write,
            writes=True,
            needs_fio=True,
        ),
        Workload(
            "rand-write",
            "4 KiB random writes into a new file + fsync (fio)",
            "MB/s",
            rand_write,
            writes=True,
            needs_fio=True,
        ),
    ]
