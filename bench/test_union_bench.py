"""The union filesystem side by side with its peers, on one generated image.

Three mounts of the same tree (``uniongen.py``: 3 layers, 20k small files, a 256 MiB
file, 2k copy-up candidates, busybox; whiteouts and an opaque directory on top):

* ``layerfs``: ``layerfs mount`` of the imported image (``--upper DIR`` for write rows);
* ``fuse-overlayfs``: over the layers extracted to directories in the overlayfs format;
* ``kernel``: ``mount -t overlay`` over the same directories.

Rows ("cold" = a fresh mount for every round; write rows get a new empty upper directory
every round): cold walk+lstat, cold open+read of 20k files, cold sequential read of
256 MiB, create 10k files, copy-up of 2k x 16 KiB, ``rm -rf`` of a 20k-entry lower tree,
200 program starts in a chroot, warm walk and warm read (already-walked mount), mount to
ready for a 3-layer and a 50-layer image, and the layerfs daemon's RSS after walking a
101k-entry image.  And on an image nobody generated, where ``debootstrap`` can make one (a
Debian bookworm rootfs with python3, one layer, built once into the cache): cold walk and
reading every file, through read-only and writable mounts.  Nothing global is dropped (``drop_caches`` would disturb other jobs): the
backing files (layer directories, the store's ``data.mdb``) are read once beforehand so all
three read them from the host page cache; a FUSE mount's own page cache and the overlay's
dentries start empty with every mount.

Run (a full run takes about 3 minutes on 2 idle cores, plus about 10 s to generate the images
the first time)::

    python -m pytest bench/test_union_bench.py --benchmark-enable

The end of the terminal output has a table of the best-of-rounds wall times, the ratios
layerfs/fuse-overlayfs and layerfs/kernel (also in each benchmark's ``extra_info``) and
the CPU seconds the daemon spent per round.  Times are compared only within one run;
nothing asserts a time.

Environment: ``LAYERFS_UNION_ROUNDS`` (default 3; the slow write rows use at most 2),
``LAYERFS_UNION_SCALE`` (e.g. ``0.2`` for a quick try), ``LAYERFS_UNION_CPU=N`` (pin the
benchmark and every daemon to CPU ``N``: on a VM each FUSE request that wakes the other CPU
costs tens of microseconds more, and whether the scheduler keeps client and daemon on one
CPU varies from mount to mount, so the FUSE rows are bimodal without it),
``LAYERFS_UNION_PROFILE=DIR`` (``py-spy record`` every layerfs daemon of a row into
``DIR/<row>.txt``, collapsed stacks; timings taken while profiling are not comparable),
``LAYERFS_BENCH_CACHE`` / ``LAYERFS_BENCH_WORKDIR`` as for the other suites.  To measure a
fixed commit while the tree is being edited, run from outside the checkout with
``PYTHONPATH`` on an exported copy (``git archive``; a ``COMMIT`` file beside the package
names it in the summary).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from uniongen import UnionImage, UnionParams, debian_unavailable, ensure, ensure_debian  # noqa: E402

from layerfs import procfs  # noqa: E402
from layerfs.storagebench.workloads import read_big, read_files, walk_stat  # noqa: E402

# layerfs-overlay: layerfs's fuse-overlayfs drop-in over the very directories fuse-overlayfs gets;
# layerfs and layerfs-overlay run the C FUSE core, layerfs-py the same mount on the pure-Python twin
FS = ("kernel", "fuse-overlayfs", "layerfs", "layerfs-overlay", "layerfs-py")
DAEMONS = ("fuse-overlayfs", "layerfs", "layerfs-overlay", "layerfs-py")
LAYERFS_MOUNTS = ("layerfs", "layerfs-py")  # `layerfs mount` of the stored image
CORE = {"layerfs": "c", "layerfs-overlay": "c", "layerfs-py": "python"}


def _env(fs: str) -> dict[str, str]:
    return dict(os.environ, LAYERFS_FUSE=CORE.get(fs, "c"))


OVERLAY_CMD = {
    "fuse-overlayfs": ["fuse-overlayfs"],
    "layerfs-overlay": [sys.executable, "-m", "layerfs.overlay"],
}
ROUNDS = int(os.environ.get("LAYERFS_UNION_ROUNDS", "3"))
SLOW_ROUNDS = min(ROUNDS, 2)
SCALE = float(os.environ.get("LAYERFS_UNION_SCALE", "1"))
PROFILE_DIR = os.environ.get("LAYERFS_UNION_PROFILE")
PIN_CPU = os.environ.get("LAYERFS_UNION_CPU")
EXEC_SCRIPT = "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done"

ROWS: dict[str, str] = {
    "cold-stat": "cold  os.walk + lstat, every entry",
    "cold-read-small": "cold  open+read 20k files of 1 KiB",
    "cold-read-big": "cold  sequential read, 256 MiB",
    "create": "rw    create 10k files (100 B each)",
    "copy-up": "rw    copy-up 2k x 16 KiB (append 1 B)",
    "rm-rf": "rw    rm -rf 20k-entry lower tree",
    "untar": "rw    tar -x 4k files, dirs, symlinks (owners, modes, times)",
    "exec": "cold  chroot busybox sh: 200 x /bin/true",
    "rw-cold-stat": "rw    cold os.walk + lstat (writable mount)",
    "rw-cold-read-small": "rw    cold open+read 20k x 1 KiB (writable)",
    "rw-read-big": "rw    cold read 256 MiB, from the store",
    "rw-cached-read-big": "rw    cold read 256 MiB, file cache filled",
    "write-big": "rw    write a new 256 MiB file",
    "rewrite-big": "rw    rewrite 256 MiB of a copied-up file",
    "warm-stat": "warm  os.walk + lstat, every entry",
    "warm-read-small": "warm  open+read 20k files of 1 KiB",
    "ready-main": "ready mount to ready, 3 layers",
    "ready-many": "ready mount to ready, 50 layers",
    "ready-many-first": "ready first mount (index build), 50 layers",
    "walk-wide": "cold  os.walk + lstat, 101k entries",
    "deb-cold-stat": "deb   cold os.walk + lstat (Debian + python3)",
    "deb-cold-read-all": "deb   cold read every file",
    "deb-rw-cold-stat": "deb   cold os.walk + lstat (writable)",
    "deb-rw-read-all": "deb   cold read every file (writable)",
}


# -- results and the summary ----------------------------------------------------------------------
@dataclass
class Result:
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # daemon CPU seconds per round
    extra: dict[str, Any] | None = None  # the benchmark's extra_info (updated with ratios)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> float | None:
        return min(self.times) if self.times else None


RESULTS: dict[str, dict[str, Result]] = {}
NOTES: list[str] = []
CODE_STATE: list[str] = []  # at the start of the run


def _ratios(row: str) -> dict[str, float]:
    res = RESULTS.get(row, {})
    lay = res.get("layerfs")
    out: dict[str, float] = {}
    if lay is None or lay.best is None:
        return out
    for peer, key in (("fuse-overlayfs", "layerfs/fuse-overlayfs"), ("kernel", "layerfs/kernel")):
        other = res.get(peer)
        if other is not None and other.best:
            out[key] = lay.best / other.best
    drop_in, fovl = res.get("layerfs-overlay"), res.get("fuse-overlayfs")
    if drop_in is not None and drop_in.best and fovl is not None and fovl.best:
        out["layerfs-overlay/fuse-overlayfs"] = drop_in.best / fovl.best
    twin = res.get("layerfs-py")
    if twin is not None and twin.best and fovl is not None and fovl.best:
        out["layerfs-py/fuse-overlayfs"] = twin.best / fovl.best
    return out


def _record(row: str, fs: str, result: Result, benchmark: Any) -> None:
    benchmark.extra_info.update(
        {"row": row, "fs": fs, "best_s": result.best, "rounds_s": result.times, **result.info}
    )
    if result.cpu:
        benchmark.extra_info["daemon_cpu_s"] = result.cpu
    result.extra = benchmark.extra_info
    RESULTS.setdefault(row, {})[fs] = result
    ratios = _ratios(row)
    for r in RESULTS[row].values():  # every fs of the row carries the row's ratios
        if r.extra is not None:
            r.extra.update(ratios)


def _fmt(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:8.3f}" if t >= 0.01 else f"{t * 1e3:6.2f}ms"


def _ratio(r: float | None) -> str:
    return f"{r:8.2f}" if r is not None else f"{'-':>8}"


class _Summary:
    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not RESULTS:
            return
        tr = terminalreporter
        tr.write_sep("=", "union filesystem: layerfs vs fuse-overlayfs vs kernel overlay (this run)")
        tr.write_line(
            "best-of-rounds wall seconds; ratio > 1: layerfs is slower; cpu: daemon CPU s / wall; "
            "layerfs and lfs-ovl: C FUSE core, lfs-py: the pure-Python twin"
        )
        head = (
            f"{'row':<44} {'kernel':>8} {'fuse-ovl':>8} {'layerfs':>8} {'lfs-ovl':>8}  {'lfs/fovl':>8}"
            f" {'lfs/kern':>8} {'lovl/fovl':>9}  {'cpu fovl':>8} {'cpu lfs':>8}  {'lfs-py':>8} {'py/fovl':>8}"
        )
        tr.write_line(head)
        tr.write_line("-" * len(head))
        for row, label in ROWS.items():
            res = RESULTS.get(row)
            if not res:
                continue
            ratios = _ratios(row)

            def cpu(fs: str, res: dict[str, Result] = res) -> str:
                r = res.get(fs)
                if r is None or len(r.cpu) != len(r.times) or not r.best:
                    return "-"
                return f"{r.cpu[r.times.index(r.best)] / r.best:8.2f}"

            tr.write_line(
                f"{label:<44} {_fmt(res['kernel'].best if 'kernel' in res else None):>8} "
                f"{_fmt(res['fuse-overlayfs'].best if 'fuse-overlayfs' in res else None):>8} "
                f"{_fmt(res['layerfs'].best if 'layerfs' in res else None):>8} "
                f"{_fmt(res['layerfs-overlay'].best if 'layerfs-overlay' in res else None):>8}  "
                f"{_ratio(ratios.get('layerfs/fuse-overlayfs'))} {_ratio(ratios.get('layerfs/kernel'))} "
                f"{_ratio(ratios.get('layerfs-overlay/fuse-overlayfs')):>9}  "
                f"{cpu('fuse-overlayfs'):>8} {cpu('layerfs'):>8}  "
                f"{_fmt(res['layerfs-py'].best if 'layerfs-py' in res else None):>8} "
                f"{_ratio(ratios.get('layerfs-py/fuse-overlayfs'))}"
            )
        rss = RESULTS.get("walk-wide", {})
        for fs in DAEMONS:
            info = rss[fs].info if fs in rss else {}
            if "rss_after_kib" in info:
                mib = {k: v / 1024 for k, v in info.items() if k.endswith("_kib")}
                tr.write_line(
                    f"{fs} daemon after walking {info['entries']:,d} entries: VmRSS {mib['rss_after_kib']:.1f} MiB"
                    f" (RssAnon {mib['anon_after_kib']:.1f}; after mount {mib['rss_mount_kib']:.1f}"
                    f" / {mib['anon_mount_kib']:.1f}; VmHWM {mib['hwm_kib']:.1f})"
                )
        for note in NOTES:
            tr.write_line(note)
        now = _code_state()
        if CODE_STATE and now != CODE_STATE[0]:
            tr.write_line(f"WARNING: the layerfs code changed during the run; now: {now}")
        if PROFILE_DIR:
            tr.write_line(
                f"py-spy profiles of the layerfs daemon in {PROFILE_DIR} (timings above are distorted)"
            )


# -- processes --------------------------------------------------------------------------------------
def _mounted(mnt: str) -> bool:
    return bool(procfs.mounts_on(mnt))


def _mounts_below(base: str) -> list[str]:
    return [m.mountpoint for m in procfs.mounts_below(base)]


def _force_unmount(mnt: str) -> None:
    for cmd in (
        ["fusermount3", "-u", mnt],
        ["umount", mnt],
        ["fusermount3", "-u", "-z", mnt],
        ["umount", "-l", mnt],
    ):
        if not _mounted(mnt):
            return
        subprocess.run(cmd, capture_output=True)


def _cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all threads), in seconds."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _pin(pid: int) -> None:
    """Every thread of ``pid`` onto LAYERFS_UNION_CPU (threads started later inherit it)."""
    if PIN_CPU is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {int(PIN_CPU)})


def _wait_mounted(mnt: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not _mounted(mnt):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{proc.args} exited {proc.returncode}: {err.strip()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args}: not mounted after {timeout} s")
        time.sleep(0.002)


@dataclass
class Mount:
    fs: str
    mnt: str
    pid: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    scratch: str | None = None  # upper/work of a write mount, removed after unmount
    profiler: subprocess.Popen[bytes] | None = None
    store: str | None = None


class Mounter:
    """Mounts of the three filesystems; every mount is undone by ``umount``/``umount_all``."""

    def __init__(self, base: str, store: str) -> None:
        self.base = base
        self.store = store
        self.active: list[Mount] = []
        self._n = 0
        for fs in FS:
            os.makedirs(self.mnt(fs), exist_ok=True)

    def mnt(self, fs: str) -> str:
        return os.path.join(self.base, f"mnt-{fs}")

    def _scratch(self, fs: str) -> str:
        self._n += 1
        path = os.path.join(self.base, f"rw-{fs}-{self._n}")
        os.makedirs(path)
        return path

    def layerfs_cmd(self, *args: str, store: str | None = None) -> list[str]:
        return [sys.executable, "-m", "layerfs", "--store", store or self.store, *args]

    def mount(
        self,
        fs: str,
        image: UnionImage,
        *,
        rw: bool = False,
        profile: str | None = None,
        store: str | None = None,
    ) -> Mount:
        mnt = self.mnt(fs)
        if _mounted(mnt):
            raise RuntimeError(f"{mnt} is still mounted")
        scratch = self._scratch(fs) if rw else None
        m = Mount(fs, mnt, scratch=scratch, store=store)
        self.active.append(m)
        try:
            if fs in LAYERFS_MOUNTS:
                cmd = self.layerfs_cmd("mount", image.ref, mnt, store=store)
                if scratch:
                    cmd += ["--upper", os.path.join(scratch, "upper")]
                res = subprocess.run(cmd, capture_output=True, text=True, env=_env(fs))
                if res.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd[2:])}: {res.stderr.strip()}")
                m.pid = self._layerfs_pid(mnt, store or self.store)
                if m.pid:
                    _pin(m.pid)
                if profile and PROFILE_DIR and m.pid:
                    os.makedirs(PROFILE_DIR, exist_ok=True)
                    out = os.path.join(PROFILE_DIR, f"{profile}.txt")
                    m.profiler = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "--pid",
                            str(m.pid),
                            "--rate",
                            "200",
                            "--format",
                            "raw",
                            "-o",
                            out,
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(0.5)  # attached
            elif fs in OVERLAY_CMD:
                opts = "lowerdir=" + ":".join(reversed(image.layers))
                if scratch:
                    opts += f",upperdir={scratch}/upper,workdir={scratch}/work"
                    os.makedirs(f"{scratch}/upper")
                    os.makedirs(f"{scratch}/work")
                m.proc = subprocess.Popen(
                    [*OVERLAY_CMD[fs], "-f", "-o", opts, mnt],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=_env(fs),
                )
                m.pid = m.proc.pid
                _wait_mounted(mnt, m.proc)
                _pin(m.pid)
            else:
                lowers = list(image.layers)
                if len(lowers) == 1 and not scratch:  # a read-only overlay needs two lower dirs
                    lowers.insert(0, os.path.join(self.base, "empty-lower"))
                    os.makedirs(lowers[0], exist_ok=True)
                opts = "lowerdir=" + ":".join(reversed(lowers))
                if scratch:
                    opts += f",upperdir={scratch}/upper,workdir={scratch}/work"
                    os.makedirs(f"{scratch}/upper")
                    os.makedirs(f"{scratch}/work")
                res = subprocess.run(
                    ["mount", "-t", "overlay", "overlay", "-o", opts, mnt], capture_output=True, text=True
                )
                if res.returncode != 0:
                    raise RuntimeError(f"mount -t overlay -o {opts}: {res.stderr.strip()}")
        except BaseException:
            self.umount(m)
            raise
        return m

    @staticmethod
    def _layerfs_pid(mnt: str, store: str) -> int | None:
        reg = os.path.join(store, "mounts")
        target = os.path.realpath(mnt)
        for name in os.listdir(reg):
            if name.endswith(".json"):
                with contextlib.suppress(OSError, ValueError), open(os.path.join(reg, name)) as f:
                    rec = json.load(f)
                    if rec.get("mountpoint") == target:
                        return int(rec["pid"])
        return None

    def umount(self, m: Mount) -> None:
        try:
            if m.fs in LAYERFS_MOUNTS:
                subprocess.run(self.layerfs_cmd("umount", m.mnt, store=m.store), capture_output=True)
            elif m.fs in OVERLAY_CMD:
                subprocess.run(["fusermount3", "-u", m.mnt], capture_output=True)
            else:
                subprocess.run(["umount", m.mnt], capture_output=True)
            _force_unmount(m.mnt)
            if m.proc is not None:
                try:
                    m.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait()
                if m.proc.stderr:
                    m.proc.stderr.close()
            if m.profiler is not None:
                try:
                    m.profiler.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    m.profiler.kill()
                    m.profiler.wait()
        finally:
            if m in self.active:
                self.active.remove(m)
            if m.scratch and not _mounted(m.mnt):
                shutil.rmtree(m.scratch, ignore_errors=True)

    def umount_all(self) -> None:
        for m in list(reversed(self.active)):
            with contextlib.suppress(Exception):
                self.umount(m)
        for mp in sorted(_mounts_below(self.base), key=len, reverse=True):
            _force_unmount(mp)


# -- workloads ---------------------------------------------------------------------------------------
# walk_stat, read_files and read_big: the same work as layerfs bench's (storagebench.workloads)


def create_files(root: str, n: int, dirs: list[str]) -> None:
    payload = b"x" * 100
    for i in range(n):
        fd = os.open(
            os.path.join(root, dirs[i % len(dirs)], f"new-{i:05d}"),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL,
            0o644,
        )
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)


def append_byte(root: str, rels: list[str]) -> None:
    for rel in rels:
        fd = os.open(os.path.join(root, rel), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"!")
        finally:
            os.close(fd)


def rm_rf(path: str) -> None:
    if not os.path.isdir(path):
        raise AssertionError(f"{path} is not there to remove")
    subprocess.run(["rm", "-rf", path], check=True)
    if os.path.lexists(path):
        raise AssertionError(f"{path} still exists after rm -rf")


UNTAR_DIRS, UNTAR_FILES = 40, 100


def untar_tarball(base: str) -> str:
    """A package's worth of tar (made once): UNTAR_DIRS directories of UNTAR_FILES 1 KiB files
    and ten symlinks each, of two owners and three modes, with fixed times: what an image build's
    `apt-get install` or `pip install` unpacks."""
    path = os.path.join(base, "untar.tar")
    if os.path.exists(path):
        return path
    import io
    import tarfile

    tmp = f"{path}.tmp-{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
        for d in range(UNTAR_DIRS):
            ti = tarfile.TarInfo(f"pkg/d{d:02}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
            tf.addfile(ti)
            for f in range(UNTAR_FILES):
                data = hashlib.sha256(b"%d/%d" % (d, f)).hexdigest().encode() * 16
                ti = tarfile.TarInfo(f"pkg/d{d:02}/f{f:03}")
                ti.size, ti.mode, ti.mtime = len(data), (0o644, 0o755, 0o600)[f % 3], 1_600_000_000 + f
                ti.uid = ti.gid = 1000 if f % 2 else 0
                tf.addfile(ti, io.BytesIO(data))
            for f in range(10):
                ti = tarfile.TarInfo(f"pkg/d{d:02}/l{f}")
                ti.type, ti.linkname, ti.mtime = tarfile.SYMTYPE, f"f{f:03}", 1_600_000_000
                tf.addfile(ti)
    os.rename(tmp, path)
    return path


def untar(root: str, tarball: str) -> None:
    dest = os.path.join(root, "untar")
    os.mkdir(dest)
    subprocess.run(["tar", "-C", dest, "-xpf", tarball, "--numeric-owner"], check=True)
    last = os.path.join(dest, "pkg", f"d{UNTAR_DIRS - 1:02}")
    if len(os.listdir(last)) != UNTAR_FILES + 10 or os.stat(os.path.join(last, "f001")).st_uid != 1000:
        raise AssertionError(f"{dest}: tar -x left an incomplete tree")


def run_exec(root: str) -> None:
    subprocess.run(["chroot", root, "/bin/busybox", "sh", "-c", EXEC_SCRIPT], check=True)


# -- fixtures -------------------------------------------------------------------------------------------
@dataclass
class Env:
    params: UnionParams
    main: UnionImage
    many: UnionImage
    wide: UnionImage
    base: str
    store: str
    mounter: Mounter
    entries: int = 0  # below the root of the main image (as the kernel overlay shows it)

    def walk(self, mnt: str) -> None:
        """walk_stat, refusing a tree that is not the whole image (a broken mount is fast)."""
        n = walk_stat(mnt)
        if n != self.entries:
            raise AssertionError(f"{mnt}: walked {n} entries, the image has {self.entries}")

    def read_small(self, mnt: str) -> None:
        files = self.main.info["small_files"]
        got = read_files(mnt, files)
        if got != len(files) * self.params.small_size:
            raise AssertionError(f"{mnt}: read {got} bytes from {len(files)} files")


def _unavailable(base: str) -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount -t overlay, mknod whiteouts, trusted xattrs, chroot)"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "FUSE is not available (/dev/fuse, fusermount3)"
    if shutil.which("fuse-overlayfs") is None:
        return "fuse-overlayfs is not installed"
    if not os.path.exists(UnionParams.busybox):
        return f"{UnionParams.busybox} (busybox-static) is missing"
    probe = os.path.join(base, "probe")
    dirs = [os.path.join(probe, d) for d in ("a", "b", "m")]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={dirs[0]}:{dirs[1]}", dirs[2]],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        return f"the kernel overlay filesystem cannot be mounted: {res.stderr.strip()}"
    _force_unmount(dirs[2])
    shutil.rmtree(probe, ignore_errors=True)
    return None


def _code_state() -> str:
    """Which layerfs code ran (the numbers move with it): commit, and whether it was edited."""
    import layerfs

    root = os.path.dirname(os.path.dirname(os.path.abspath(layerfs.__file__)))

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True)
        return res.stdout if res.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD").strip()
    marker = os.path.join(root, "COMMIT")  # an exported snapshot (git archive) says what it is
    if not head and os.path.exists(marker):
        with open(marker) as f:
            return f"layerfs code: snapshot of {f.read().strip()[:12]} in {root}"
    if not head:
        return f"layerfs from {root} (not a git checkout)"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "layerfs").splitlines() if line]
    return f"layerfs code: {head}" + (
        f" + uncommitted changes in {', '.join(dirty)}" if dirty else " (clean)"
    )


def _prime(paths: list[str]) -> None:
    """Read backing files once, so every filesystem finds them in the host page cache."""
    for top in paths:
        if os.path.isfile(top):
            read_big(top)
            continue
        for dirpath, _, filenames in os.walk(top):
            for name in filenames:
                p = os.path.join(dirpath, name)
                if stat.S_ISREG(os.lstat(p).st_mode):
                    with open(p, "rb") as f:
                        while f.read(1 << 20):
                            pass


@pytest.fixture(scope="session")
def union_env(workdir: str, request: pytest.FixtureRequest) -> Iterator[Env]:
    pm = request.config.pluginmanager
    if not pm.has_plugin("layerfs-union-summary"):
        pm.register(_Summary(), "layerfs-union-summary")
    base = os.path.join(workdir, "union")
    os.makedirs(base, exist_ok=True)
    reason = _unavailable(base)
    if reason:
        pytest.skip(reason)
    from layerfs.store import Store
    from layerfs.tools.image import import_path

    if PIN_CPU is not None:
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {int(PIN_CPU)})  # this process and every command it starts
        request.addfinalizer(lambda: os.sched_setaffinity(0, affinity))
        NOTES.append(
            f"LAYERFS_UNION_CPU={PIN_CPU}: the benchmark and every daemon ran on that one CPU "
            "(no cross-CPU wake-ups per FUSE request; not how a real mount runs)"
        )
    params = UnionParams().scaled(SCALE)
    t0 = time.perf_counter()
    images = {name: ensure(name, params) for name in ("main", "many", "wide")}
    t_gen = time.perf_counter() - t0
    store_path = os.path.join(base, "store")
    store = Store(store_path)
    t0 = time.perf_counter()
    try:
        for img in images.values():
            import_path(store, img.layout, tag=img.ref)
    finally:
        store.close()
    NOTES.append(
        f"images: {images['main'].root.rpartition('/')[0]} (ready in {t_gen:.1f} s); "
        f"imported into a fresh store in {time.perf_counter() - t0:.1f} s"
    )
    CODE_STATE.append(_code_state())
    NOTES.append(CODE_STATE[0])
    mounter = Mounter(base, store_path)
    env = Env(params, images["main"], images["many"], images["wide"], base, store_path, mounter)
    try:
        # the first layerfs mount of each image builds its merged index (timed once, for the record)
        for img in images.values():
            t0 = time.perf_counter()
            m = mounter.mount("layerfs", img)
            NOTES.append(
                f"first layerfs mount of {img.name} ({img.info['layers']} layers, builds the index): "
                f"{time.perf_counter() - t0:.2f} s"
            )
            mounter.umount(m)
        _prime([*images["main"].layers, os.path.join(store_path, "data.mdb")])
        m = mounter.mount("kernel", env.main)
        try:
            env.entries = walk_stat(m.mnt)
        finally:
            mounter.umount(m)
        yield env
    finally:
        mounter.umount_all()
        left = _mounts_below(base)
        assert not left, f"mounts left behind: {left}"


@pytest.fixture(params=FS)
def fs(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run_row(
    benchmark: Any,
    env: Env,
    row: str,
    fs: str,
    work: Callable[[str], Any],
    *,
    image: UnionImage | None = None,
    rounds: int = ROUNDS,
    rw: bool = False,
    warm: Callable[[str], Any] | None = None,
    before: Callable[[str], Any] | None = None,
) -> Result:
    """``work(mountpoint)`` timed on a fresh mount every round (``warm``: on one mount,
    after ``warm`` ran once; ``before``: run untimed on each fresh mount first)."""
    image = image or env.main
    benchmark.group = f"union {row}"
    result = Result()
    state: dict[str, Mount] = {}

    def release() -> None:
        m = state.pop("m", None)
        if m is not None:
            env.mounter.umount(m)

    def setup() -> tuple[tuple[str], dict[str, Any]]:
        release()
        m = env.mounter.mount(fs, image, rw=rw, profile=row)
        state["m"] = m
        if before is not None:
            before(m.mnt)
        return (m.mnt,), {}

    def target(mnt: str) -> None:
        pid = state["m"].pid
        c0 = _cpu_seconds(pid)
        t0 = time.perf_counter()
        work(mnt)
        result.times.append(time.perf_counter() - t0)
        c1 = _cpu_seconds(pid)
        if c0 is not None and c1 is not None:
            result.cpu.append(c1 - c0)

    try:
        if warm is None:
            benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
        else:
            mnt = setup()[0][0]
            warm(mnt)
            benchmark.pedantic(target, args=(mnt,), rounds=rounds, warmup_rounds=0, iterations=1)
    finally:
        release()
    _record(row, fs, result, benchmark)
    return result


# -- the tree is the same on all three -----------------------------------------------------------------
def _tree(root: str, sample: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            else:
                out[rel] = (stat.filemode(st.st_mode), st.st_size)
    for rel in sample:
        with open(os.path.join(root, rel), "rb") as f:
            out["#" + rel] = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return out


def test_same_tree(union_env: Env) -> None:
    """The three mounts show the same tree (else the timings compare different work)."""
    env = union_env
    sample = env.main.info["small_files"][::97] + env.main.info["copyup_files"][::50] + [env.main.info["big"]]
    trees = {}
    for fs in FS:
        m = env.mounter.mount(fs, env.main)
        try:
            trees[fs] = _tree(m.mnt, sample)
        finally:
            env.mounter.umount(m)
    assert trees["kernel"] == trees["fuse-overlayfs"]
    assert trees["kernel"] == trees["layerfs"]
    assert trees["kernel"] == trees["layerfs-overlay"]
    assert trees["kernel"] == trees["layerfs-py"]
    n_small = sum(1 for k in trees["kernel"] if k.startswith("data/") and trees["kernel"][k] != "dir")
    assert n_small == len(env.main.info["small_files"])
    NOTES.append(
        f"main image: {len(trees['kernel']) - len(sample):,d} entries, {n_small:,d} files below data/ "
        "(identical on the three mounts)"
    )


# -- an image nobody generated: Debian with python3 ----------------------------------------------------
@dataclass
class Debian:
    image: UnionImage
    entries: int

    def walk(self, mnt: str) -> None:
        n = walk_stat(mnt)
        if n != self.entries:
            raise AssertionError(f"{mnt}: walked {n} entries, the image has {self.entries}")

    def read_all(self, mnt: str) -> None:
        got = read_files(mnt, self.image.info["files"])
        if got != self.image.info["bytes"]:
            raise AssertionError(f"{mnt}: read {got} bytes, the image has {self.image.info['bytes']}")


@pytest.fixture(scope="session")
def debian(union_env: Env) -> Debian:
    """The Debian image, built once by debootstrap (skipped where it cannot be) and imported
    into the benchmark's store."""
    reason = debian_unavailable()
    if reason:
        pytest.skip(reason)
    from layerfs.store import Store
    from layerfs.tools.image import import_path

    try:
        image = ensure_debian()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    store = Store(union_env.store)
    t0 = time.perf_counter()
    try:
        import_path(store, image.layout, tag=image.ref)
    finally:
        store.close()
    m = union_env.mounter.mount("layerfs", image)  # builds the index, untimed
    union_env.mounter.umount(m)
    _prime([*image.layers, os.path.join(union_env.store, "data.mdb")])
    m = union_env.mounter.mount("kernel", image)
    try:
        entries = walk_stat(m.mnt)
    finally:
        union_env.mounter.umount(m)
    NOTES.append(
        f"debian image ({image.root}): {entries:,d} entries, {len(image.info['files']):,d} files, "
        f"{image.info['bytes'] / 2**20:.0f} MiB; imported in {time.perf_counter() - t0:.1f} s"
    )
    return Debian(image, entries)


def test_deb_cold_stat(benchmark: Any, union_env: Env, debian: Debian, fs: str) -> None:
    run_row(benchmark, union_env, "deb-cold-stat", fs, debian.walk, image=debian.image)


def test_deb_cold_read_all(benchmark: Any, union_env: Env, debian: Debian, fs: str) -> None:
    run_row(benchmark, union_env, "deb-cold-read-all", fs, debian.read_all, image=debian.image)


def test_deb_rw_cold_stat(benchmark: Any, union_env: Env, debian: Debian, fs: str) -> None:
    run_row(benchmark, union_env, "deb-rw-cold-stat", fs, debian.walk, image=debian.image, rw=True)


def test_deb_rw_read_all(benchmark: Any, union_env: Env, debian: Debian, fs: str) -> None:
    run_row(benchmark, union_env, "deb-rw-read-all", fs, debian.read_all, image=debian.image, rw=True)


# -- rows ------------------------------------------------------------------------------------------------
def test_cold_stat(benchmark: Any, union_env: Env, fs: str) -> None:
    run_row(benchmark, union_env, "cold-stat", fs, union_env.walk)


def test_cold_read_small(benchmark: Any, union_env: Env, fs: str) -> None:
    run_row(benchmark, union_env, "cold-read-small", fs, union_env.read_small)


def test_cold_read_big(benchmark: Any, union_env: Env, fs: str) -> None:
    info = union_env.main.info

    def work(mnt: str) -> None:
        assert read_big(os.path.join(mnt, info["big"])) == info["big_size"]

    run_row(benchmark, union_env, "cold-read-big", fs, work)


def test_create(benchmark: Any, union_env: Env, fs: str) -> None:
    dirs = sorted({f.rpartition("/")[0] for f in union_env.main.info["small_files"]})
    n = max(1, int(10_000 * SCALE))
    run_row(
        benchmark,
        union_env,
        "create",
        fs,
        lambda mnt: create_files(mnt, n, dirs),
        rw=True,
        rounds=SLOW_ROUNDS,
    )


def test_copy_up(benchmark: Any, union_env: Env, fs: str) -> None:
    files = union_env.main.info["copyup_files"]
    run_row(benchmark, union_env, "copy-up", fs, lambda mnt: append_byte(mnt, files), rw=True)


def test_rm_rf(benchmark: Any, union_env: Env, fs: str) -> None:
    tree = union_env.main.info["rm_tree"]
    run_row(
        benchmark,
        union_env,
        "rm-rf",
        fs,
        lambda mnt: rm_rf(os.path.join(mnt, tree)),
        rw=True,
        rounds=SLOW_ROUNDS,
    )


def test_untar(benchmark: Any, union_env: Env, fs: str) -> None:
    """tar -x as root into a new directory of a writable mount: per file a CREATE, a WRITE and
    three SETATTRs (owner, mode, times), per directory a MKDIR, per link a SYMLINK."""
    tarball = untar_tarball(union_env.base)
    run_row(benchmark, union_env, "untar", fs, lambda mnt: untar(mnt, tarball), rw=True)


def test_exec(benchmark: Any, union_env: Env, fs: str) -> None:
    run_row(benchmark, union_env, "exec", fs, run_exec)


def test_rw_cold_stat(benchmark: Any, union_env: Env, fs: str) -> None:
    """A container's root file system is a writable mount: the same walk through one."""
    run_row(benchmark, union_env, "rw-cold-stat", fs, union_env.walk, rw=True)


def test_rw_cold_read_small(benchmark: Any, union_env: Env, fs: str) -> None:
    run_row(benchmark, union_env, "rw-cold-read-small", fs, union_env.read_small, rw=True)


def _clear_file_cache(env: Env) -> None:
    shutil.rmtree(os.path.join(env.store, "filecache"), ignore_errors=True)


def test_rw_read_big(benchmark: Any, union_env: Env, fs: str) -> None:
    """The big lower file through a writable mount with an empty file cache: decompressed from
    the store by the daemon (layerfs fills the cache after the file is closed, untimed)."""
    info = union_env.main.info

    def work(mnt: str) -> None:
        assert read_big(os.path.join(mnt, info["big"])) == info["big_size"]

    run_row(
        benchmark,
        union_env,
        "rw-read-big",
        fs,
        work,
        rw=True,
        before=lambda mnt: _clear_file_cache(union_env),
    )


def test_rw_cached_read_big(benchmark: Any, union_env: Env, fs: str) -> None:
    """The same read once layerfs's file cache holds the file: the kernel reads the copy itself
    (passthrough).  Peers have no such cache and do the same read as in rw-read-big; the copy,
    like every backing file here, is in the host page cache."""
    info = union_env.main.info
    root = os.path.join(union_env.store, "filecache")

    def fill(mnt: str) -> None:
        if fs not in LAYERFS_MOUNTS or CORE[fs] != "c":
            return
        if not os.path.isdir(root) or not os.listdir(root):
            read_big(os.path.join(mnt, info["big"]))  # the copy is made once it is closed
            deadline = time.monotonic() + 60
            while not (os.path.isdir(root) and os.listdir(root)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert os.listdir(root), "the file cache was not filled"
        _prime([root])

    def work(mnt: str) -> None:
        assert read_big(os.path.join(mnt, info["big"])) == info["big_size"]

    run_row(benchmark, union_env, "rw-cached-read-big", fs, work, rw=True, before=fill)


def _write_file(path: str, size: int, flags: int) -> None:
    buf = os.urandom(1 << 20)
    fd = os.open(path, flags, 0o644)
    try:
        for _ in range(size >> 20):
            os.write(fd, buf)
    finally:
        os.close(fd)


def test_write_big(benchmark: Any, union_env: Env, fs: str) -> None:
    size = union_env.main.info["big_size"]

    def work(mnt: str) -> None:
        _write_file(os.path.join(mnt, "new-big"), size, os.O_WRONLY | os.O_CREAT | os.O_EXCL)

    run_row(benchmark, union_env, "write-big", fs, work, rw=True, rounds=SLOW_ROUNDS)


def test_rewrite_big(benchmark: Any, union_env: Env, fs: str) -> None:
    """Overwrite the big lower file in place once it is copied up (the copy-up itself is not timed)."""
    info = union_env.main.info

    def copy_up(mnt: str) -> None:
        with open(os.path.join(mnt, info["big"]), "r+b") as f:
            f.write(b"\0")

    def work(mnt: str) -> None:
        _write_file(os.path.join(mnt, info["big"]), info["big_size"], os.O_WRONLY)

    run_row(benchmark, union_env, "rewrite-big", fs, work, rw=True, rounds=SLOW_ROUNDS, before=copy_up)


def test_warm_stat(benchmark: Any, union_env: Env, fs: str) -> None:
    run_row(benchmark, union_env, "warm-stat", fs, union_env.walk, warm=union_env.walk)


def test_warm_read_small(benchmark: Any, union_env: Env, fs: str) -> None:
    env = union_env
    run_row(benchmark, env, "warm-read-small", fs, env.read_small, warm=env.read_small)


# -- mount readiness ---------------------------------------------------------------------------------------
def _ready_row(
    benchmark: Any, env: Env, row: str, fs: str, image: UnionImage, *, first: bool = False
) -> None:
    """From invoking the mount command to a listable root (the command's own way of mounting:
    ``fuse-overlayfs`` daemonizes once mounted, ``layerfs mount`` returns once the kernel
    has the mount)."""
    benchmark.group = f"union {row}"
    mnt = env.mounter.mnt(fs)
    result = Result()
    state: dict[str, Mount] = {}
    lowers = ":".join(reversed(image.layers))

    def release() -> None:
        m = state.pop("m", None)
        if m is not None:
            env.mounter.umount(m)
            if m.store and m.store != env.store:
                shutil.rmtree(m.store, ignore_errors=True)

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        release()
        store = None
        if first:  # a fresh store: the mount has to build the merged index
            from layerfs.store import Store
            from layerfs.tools.image import import_path

            store = os.path.join(env.base, f"store-first-{len(result.times)}")
            s = Store(store)
            try:
                import_path(s, image.layout, tag=image.ref)
            finally:
                s.close()
        m = Mount(fs, mnt, store=store)
        env.mounter.active.append(m)
        state["m"] = m
        return (), {}

    def target() -> None:
        m = state["m"]
        t0 = time.perf_counter()
        if fs in LAYERFS_MOUNTS:
            subprocess.run(
                env.mounter.layerfs_cmd("mount", image.ref, mnt, store=m.store), check=True, env=_env(fs)
            )
        elif fs in OVERLAY_CMD:
            subprocess.run(
                [*OVERLAY_CMD[fs], "-o", f"lowerdir={lowers}", mnt],
                check=True,
                stderr=subprocess.DEVNULL,
                env=_env(fs),
            )
        else:
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers}", mnt], check=True)
        os.listdir(mnt)
        result.times.append(time.perf_counter() - t0)
        if not _mounted(mnt):
            raise AssertionError(f"{mnt} is not mounted")

    try:
        benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    finally:
        release()
    if fs == "layerfs" and row == "ready-main":
        starts = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(env.mounter.layerfs_cmd("version"), check=True, capture_output=True)
            starts.append(time.perf_counter() - t0)
        result.info["cli_start_s"] = min(starts)
        NOTES.append(f"`layerfs version` (CLI start, no mount): {min(starts):.3f} s")
    _record(row, fs, result, benchmark)


def test_ready_main(benchmark: Any, union_env: Env, fs: str) -> None:
    _ready_row(benchmark, union_env, "ready-main", fs, union_env.main)


def test_ready_many(benchmark: Any, union_env: Env, fs: str) -> None:
    _ready_row(benchmark, union_env, "ready-many", fs, union_env.many)


def test_ready_many_first(benchmark: Any, union_env: Env) -> None:
    _ready_row(benchmark, union_env, "ready-many-first", "layerfs", union_env.many, first=True)


# -- memory ------------------------------------------------------------------------------------------------
def test_walk_wide_rss(benchmark: Any, union_env: Env, fs: str) -> None:
    """Walk a 101k-entry image once on a fresh mount; the daemon's VmRSS/RssAnon before and after."""
    env = union_env
    state: dict[str, Any] = {}

    def walk(mnt: str) -> None:
        m = next(m for m in env.mounter.active if m.mnt == mnt)
        if m.pid is not None:
            state.setdefault("mount", _status(m.pid))
        state["entries"] = walk_stat(mnt)
        expected = env.wide.info["entries"] - 1  # the root is not counted
        if state["entries"] != expected:
            raise AssertionError(f"{mnt}: walked {state['entries']} entries, the image has {expected}")
        if m.pid is not None:
            state["after"] = _status(m.pid)

    result = run_row(benchmark, env, "walk-wide", fs, walk, image=env.wide, rounds=1)
    result.info["entries"] = state["entries"]
    if "after" in state:
        result.info.update(
            rss_mount_kib=state["mount"]["VmRSS"],
            anon_mount_kib=state["mount"]["RssAnon"],
            rss_after_kib=state["after"]["VmRSS"],
            anon_after_kib=state["after"]["RssAnon"],
            hwm_kib=state["after"]["VmHWM"],
        )
    benchmark.extra_info.update(result.info)
