"""Mount life through the CLI: ready on return, listed, errors, unmount after a crash or a
signal, programs running inside, concurrent readers, read-only, and a 100k-entry image."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLE, make_layout, member, tar_bytes
from unionutil import (  # noqa: F401 - need_fuse and no_mount_left_behind are fixtures
    abort_mount,
    debug_ops,
    extract_layers,
    inode_numbers,
    layerfs_mount,
    mount_devices,
    mounted,
    need_fuse,
    no_mount_left_behind,
    overlay_unavailable,
    wait_until,
)

from layerfs import procfs

pytestmark = pytest.mark.usefixtures("need_fuse", "fuse_core")


def _fstype(mnt: str) -> str | None:
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return fields[fields.index("-") + 1]
    return None


def _alive(pid: int) -> bool:
    """Whether a thread of process ``pid`` still runs.  A killed daemon's first thread is a
    zombie while its other threads exit, and /dev/fuse is closed after the last of them: until
    then a request still waits, and ends with ECONNABORTED instead of ENOTCONN."""
    return procfs.alive(pid)


def _mount_record(cli: Callable[..., Any], mnt: str) -> dict[str, Any]:
    recs = [r for r in cli("mounts", "--json").json() if r["mountpoint"] == os.path.realpath(mnt)]
    assert len(recs) == 1, recs
    return recs[0]


def test_mount_is_ready_when_the_command_returns(cli, sample, tmp_path):
    for i in range(3):
        mnt = str(tmp_path / f"m{i}")
        with layerfs_mount(cli, sample, mnt):
            # no waiting: the command returned, so the kernel has the mount
            assert {"app", "bin", "etc", "usr"} <= set(os.listdir(mnt))
            assert _fstype(mnt) == "fuse.layerfs"
            with open(os.path.join(mnt, "etc/hostname")) as f:
                assert f.read() == "layerfs-sample\n"
        assert not mounted(mnt)


def test_mounts_json_lists_image_and_upper(cli, sample, tmp_path):
    image_id = cli("images", "--json").json()[0]["id"].removeprefix("sha256:")
    ro, rw, upper = str(tmp_path / "ro"), str(tmp_path / "rw"), str(tmp_path / "upper")
    with layerfs_mount(cli, sample, ro), layerfs_mount(cli, sample, rw, upper=upper):
        recs = {r["mountpoint"]: r for r in cli("mounts", "--json").json()}
        assert set(recs) == {os.path.realpath(ro), os.path.realpath(rw)}
        for r in recs.values():
            assert r["image"] == image_id
            assert r["name"] == sample
            assert _alive(r["pid"])
        assert recs[os.path.realpath(ro)]["upper"] is None
        assert recs[os.path.realpath(rw)]["upper"] == os.path.abspath(upper)
        table = cli("mounts").out
        assert os.path.realpath(rw) in table and "(read-only)" in table
    assert cli("mounts", "--json").json() == []


def test_relative_upper_directory(store_path, sample, tmp_path):
    # the daemon detaches to /, so a relative --upper must be resolved before it does
    env = dict(os.environ, LAYERFS_STORE=store_path)
    run = [sys.executable, "-m", "layerfs"]
    (tmp_path / "m").mkdir()
    subprocess.run([*run, "mount", sample, "m", "--upper", "up"], cwd=tmp_path, env=env, check=True)
    try:
        os.mkdir(tmp_path / "m/proc")
        (tmp_path / "m/new").write_text("x")
    finally:
        subprocess.run([*run, "umount", "m"], cwd=tmp_path, env=env, check=True)
    assert sorted(os.listdir(tmp_path / "up")) == ["new", "proc"]


def test_relative_store_path(store_path, sample, tmp_path):
    # the daemon reopens the store after detaching to /: a relative path must not reach it
    assert store_path == str(tmp_path / "store")
    env = dict(os.environ, LAYERFS_STORE="store")
    run = [sys.executable, "-m", "layerfs"]
    (tmp_path / "m").mkdir()
    subprocess.run([*run, "mount", sample, "m"], cwd=tmp_path, env=env, check=True, timeout=30)
    try:
        assert "bin" in os.listdir(tmp_path / "m")
    finally:
        subprocess.run([*run, "umount", "m"], cwd=tmp_path, env=env, check=True, timeout=30)


def test_unknown_image_is_a_one_line_error(cli, sample, tmp_path):
    mnt = tmp_path / "m"
    mnt.mkdir()
    res = cli("mount", "no-such-image:latest", str(mnt), check=False)
    assert res.code == 1
    assert len(res.err.strip().splitlines()) == 1 and "no-such-image" in res.err
    assert not mounted(str(mnt))


def test_busy_mountpoint(cli, sample, tmp_path):
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt):
        res = cli("mount", sample, mnt, check=False)
        assert res.code == 1
        assert len(res.err.strip().splitlines()) == 1 and "busy" in res.err
        assert "bin" in os.listdir(mnt)  # the first mount is untouched
        assert len(cli("mounts", "--json").json()) == 1


def test_missing_mountpoint(cli, sample, tmp_path):
    mnt = str(tmp_path / "does-not-exist")
    res = cli("mount", sample, mnt, check=False)
    assert res.code == 1
    assert res.err == f"layerfs: cannot mount {sample} on {mnt}: mountpoint {mnt} does not exist\n"
    assert not os.path.exists(mnt)
    assert cli("mounts", "--json").json() == []
    (tmp_path / "file").write_text("x")
    res = cli("mount", sample, str(tmp_path / "file"), check=False)
    assert res.code == 1 and res.err.endswith(f"mountpoint {tmp_path}/file is not a directory\n"), res.err
    os.mkdir(tmp_path / "m")
    res = cli("mount", sample, str(tmp_path / "m"), "--lower", mnt, check=False)
    assert res.code == 1 and res.err == f"layerfs: lower directory {mnt} does not exist\n", res.err
    assert cli("mounts", "--json").json() == []


def _gc_frees_everything(cli: Callable[..., Any]) -> None:
    cli("gc")
    usage = cli("df", "--json").json()
    assert (usage["images"], usage["layers"], usage["objects"]) == (0, 0, 0), usage


def test_umount_cleans_up_after_kill_9(cli, sample, store_path, tmp_path):
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt, rw=True):
        pid = _mount_record(cli, mnt)["pid"]
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not _alive(pid))
        with pytest.raises(OSError) as exc:
            os.listdir(mnt)
        assert exc.value.errno == errno.ENOTCONN
        assert mounted(mnt)
        res = cli("umount", mnt, check=False)
        assert res.code == 0, res.err
        assert not mounted(mnt)
        assert os.listdir(mnt) == []
        assert cli("mounts", "--json").json() == []
    # the killed daemon could not drop its pin; umount did (a zombie the init process has not
    # reaped yet looks alive to gc)
    cli("rmi", sample)
    _gc_frees_everything(cli)
    assert _registry(store_path) == []  # no record, no (empty) log


def _registry(store_path: str) -> list[str]:
    return sorted(os.listdir(os.path.join(store_path, "mounts")))


def test_mounts_hides_a_mount_whose_daemon_died(cli, sample, store_path, tmp_path):
    """``mounts`` lists live mounts only: a killed daemon's mount is left out, and what it held
    (its record, its temporary upper directory, the pin of its image) is let go; ``umount``
    still detaches the dead mount."""
    live, dead = str(tmp_path / "live"), str(tmp_path / "dead")
    with layerfs_mount(cli, sample, live), layerfs_mount(cli, sample, dead, rw=True):
        rec = _mount_record(cli, dead)
        upper_base = os.path.dirname(rec["upper"])
        assert os.path.isdir(upper_base) and upper_base.startswith(store_path)
        os.kill(rec["pid"], signal.SIGKILL)
        assert wait_until(lambda: not _alive(rec["pid"]))
        assert [r["mountpoint"] for r in cli("mounts", "--json").json()] == [os.path.realpath(live)]
        assert dead not in cli("mounts").out
        assert not os.path.exists(upper_base)
        assert not any(n.startswith(rec["id"]) for n in _registry(store_path))
        assert mounted(dead)  # the dead mount itself is umount's to detach
        res = cli("umount", dead, check=False)
        assert res.code == 0 and res.err == "", res.err
        assert not mounted(dead)
    cli("rmi", sample)
    _gc_frees_everything(cli)  # the dead daemon's pin is gone


def test_a_clean_unmount_leaves_no_empty_log(cli, sample, store_path, tmp_path):
    """Each daemon logs to STORE/mounts/<id>.log: removed at a clean unmount when empty, kept
    when it holds something (here: --debug requests)."""
    mnt = str(tmp_path / "m")
    for _ in range(2):
        with layerfs_mount(cli, sample, mnt):
            rec = _mount_record(cli, mnt)
            assert _registry(store_path) == [f"{rec['id']}.json", f"{rec['id']}.log"]
        assert _registry(store_path) == []
    cli("mount", "--debug", sample, mnt)
    try:
        assert "bin" in os.listdir(mnt)
    finally:
        cli("umount", mnt)
    (log,) = _registry(store_path)
    assert log.endswith(".log") and os.path.getsize(os.path.join(store_path, "mounts", log)) > 0


def test_small_stored_files_reach_the_page_cache_with_their_open(cli, fuse_core, store_path, tmp_path):
    """A writable mount stores a small lower file's contents into the kernel's page cache as it
    answers the file's first OPEN: reading it then takes no READ (up to 64 KiB; a larger file
    is read as before).  Pages the kernel drops are read again; a copy-up and a write are seen."""
    if fuse_core == "python":
        pytest.skip("the C core's")
    rnd = random.Random(3)
    words = [rnd.randbytes(rnd.randrange(2, 8)).hex().encode() for _ in range(500)]

    def text(n: int) -> bytes:
        return b" ".join(rnd.choice(words) for _ in range(n // 3))[:n]

    files = {"a": text(1000), "b": text(4096), "c": text(64 << 10), "d": text((64 << 10) + 1), "e": b""}
    layer = tar_bytes([member(name, data) for name, data in files.items()])
    cli("import", make_layout(tmp_path / "layout", [layer], ref="small:1"))
    mnt = str(tmp_path / "m")
    os.makedirs(mnt)
    cli("mount", "--rw", "--debug", "small:1", mnt)
    try:
        nodes = {name: str(os.lstat(os.path.join(mnt, name)).st_ino) for name in files}
        for name, data in files.items():
            with open(os.path.join(mnt, name), "rb") as f:
                assert f.read() == data, name
        reads = {name for name in files if ("15", nodes[name]) in debug_ops(store_path)}
        assert reads == {"d"}, "a READ reached the daemon for a file it stored, or none for d"
        a = os.path.join(mnt, "a")
        with open(a, "rb") as f, open(a, "rb") as g:  # a second open while one is open
            assert f.read(10) == files["a"][:10] and g.read() == files["a"] and f.read() == files["a"][10:]
        fd = os.open(a, os.O_RDONLY)
        try:  # the kernel drops the pages: stored once per node, so they are read again
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, 2000, 0) == files["a"]
        finally:
            os.close(fd)
        assert ("15", nodes["a"]) in debug_ops(store_path)
        with open(a, "r+b") as f:  # copied up, then written through the same inode
            f.write(b"changed")
        with open(a, "rb") as f:
            assert f.read() == b"changed" + files["a"][7:]
    finally:
        cli("umount", mnt)


def test_umount_returns_once_the_daemon_let_go(cli, sample, tmp_path):
    """umount waits for the daemon to exit (its lease dropped): a gc right after it frees the
    image that rmi could not while it was mounted; a file still open in the mount delays it."""
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt):
        pid = _mount_record(cli, mnt)["pid"]
        cli("rmi", sample)
        assert cli("df", "--json").json()["layers"] == 3  # pinned by the mount
        f = open(os.path.join(mnt, "bin/busybox"), "rb")  # noqa: SIM115 - closed by the timer
        threading.Timer(1.5, f.close).start()
        start = time.monotonic()
        res = cli("umount", mnt, check=False)
        assert res.code == 0 and res.err == "", res.err
        assert time.monotonic() - start > 1.2  # waited for the file to be closed
        assert not _alive(pid) and not mounted(mnt)
        _gc_frees_everything(cli)


@pytest.mark.parametrize("detached_before", [False, True])
def test_umount_of_a_busy_mount_says_what_holds_it(cli, sample, tmp_path, detached_before):
    """Files still open after the wait: the mount is detached (as umount -l), its daemon keeps
    serving them (never killed under a reader) and goes, with the image's pin, once they close.
    The same when the mount was detached lazily before (fusermount3 -u -z)."""
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt):
        pid = _mount_record(cli, mnt)["pid"]
        cli("rmi", sample)
        with open(os.path.join(mnt, "bin/busybox"), "rb") as f:
            if detached_before:
                subprocess.run(["fusermount3", "-u", "-z", mnt], check=True, timeout=30)
            res = cli("umount", "--timeout", "1", mnt, check=False)
            assert res.code == 1
            (line,) = res.err.strip().splitlines()
            assert line == (
                f"layerfs: {mnt} is unmounted, but files opened through it are still in use: "
                f"its daemon (pid {pid}) serves them until they are closed"
            )
            assert not mounted(mnt) and _alive(pid)
            assert cli("mounts", "--json").json() == []
            assert len(f.read()) > 100_000  # still served
            cli("gc")
            assert cli("df", "--json").json()["layers"] == 3  # still pinned
        assert wait_until(lambda: not _alive(pid))
        _gc_frees_everything(cli)


def test_umount_kills_a_daemon_that_outlives_its_mount(cli, sample, tmp_path):
    """A daemon still there after the wait though nothing holds the mount (stopped here) has
    nothing left to serve: killed, and said in a warning."""
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt):
        pid = _mount_record(cli, mnt)["pid"]
        os.kill(pid, signal.SIGSTOP)
        res = cli("umount", "--timeout", "1", mnt, check=False)
        assert res.code == 0, res.err
        (line,) = res.err.strip().splitlines()
        assert (
            line
            == f"layerfs: warning: the daemon of {mnt} (pid {pid}) had not exited 1 s after the unmount: killed"
        )
        assert not _alive(pid) and not mounted(mnt)
        assert cli("mounts", "--json").json() == []
        cli("rmi", sample)
        _gc_frees_everything(cli)


def test_kill_9_mid_write_leaves_an_upper_the_kernel_mounts(cli, sample, sample_layout, tmp_path):
    """The daemon killed while a writer creates, appends, deletes and renames: the upper
    directory is still in the kernel's format (the kernel overlay mounts it over the layers)
    and shows every change that completed before the kill."""
    if overlay_unavailable(str(tmp_path)):
        pytest.skip(overlay_unavailable(str(tmp_path)))
    mnt, upper = str(tmp_path / "m"), str(tmp_path / "rw" / "upper")
    writer = (
        "import os, sys\n"
        "m = sys.argv[1]\n"
        "os.unlink(m + '/etc/hostname')\n"
        "os.makedirs(m + '/app/new', exist_ok=True)\n"
        "i = 0\n"
        "while True:\n"
        "    with open(f'{m}/app/new/f{i}', 'wb') as f:\n"
        "        f.write(os.urandom(4096) * 16)\n"
        "    with open(m + '/etc/passwd', 'ab') as f:\n"
        "        f.write(b'x')\n"
        "    os.rename(f'{m}/app/new/f{i}', f'{m}/app/new/g{i}')\n"
        "    print(i, flush=True)\n"
        "    i += 1\n"
    )
    with layerfs_mount(cli, sample, mnt, upper):
        pid = _mount_record(cli, mnt)["pid"]
        proc = subprocess.Popen([sys.executable, "-c", writer, mnt], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        done = [proc.stdout.readline() for _ in range(20)]  # 20 rounds completed, more under way
        os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not _alive(pid))
    completed = int(done[-1])
    lowers = extract_layers(sample_layout, str(tmp_path / "layers"))
    kmnt = str(tmp_path / "k")
    os.makedirs(kmnt)
    opts = f"lowerdir={':'.join(reversed(lowers))},upperdir={upper},workdir={tmp_path / 'rw' / 'kwork'}"
    os.makedirs(tmp_path / "rw" / "kwork")
    res = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, kmnt], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    try:
        assert not os.path.lexists(os.path.join(kmnt, "etc/hostname"))  # the whiteout holds
        names = set(os.listdir(os.path.join(kmnt, "app/new")))
        assert {f"g{i}" for i in range(completed + 1)} <= names
        for i in range(completed + 1):
            assert os.path.getsize(os.path.join(kmnt, f"app/new/g{i}")) == 65536
        with open(os.path.join(kmnt, "etc/passwd"), "rb") as f:
            assert f.read().endswith(b"x" * (completed + 1))
        assert os.listdir(os.path.join(kmnt, "app")) and os.path.exists(os.path.join(kmnt, "app/run.sh"))
    finally:
        subprocess.run(["umount", kmnt], capture_output=True)


def test_sigterm_unmounts(cli, sample, tmp_path):
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt):
        pid = _mount_record(cli, mnt)["pid"]
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not mounted(mnt)), "SIGTERM left the mount in place"
        assert wait_until(lambda: not _alive(pid)), "the daemon did not exit"
        assert cli("mounts", "--json").json() == []


@pytest.fixture
def risky(cli: Callable[..., Any], tmp_path: Path) -> str:
    """An image with a setuid-root program (the host's cat: it prints /proc/self/status, which
    says its effective uid) and a character device (1, 3: /dev/null)."""
    with open(shutil.which("cat") or "/usr/bin/cat", "rb") as f:
        cat = f.read()
    null = member("null", kind=tarfile.CHRTYPE, mode=0o666)
    null[0].devmajor, null[0].devminor = 1, 3
    cli("import", make_layout(tmp_path / "risky", [tar_bytes([member("suidcat", cat, mode=0o4755), null])]))
    return "test:latest"


def _mount_flags(mnt: str) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        (line,) = [ln for ln in f if ln.split()[4] == os.path.realpath(mnt)]
    return set(line.split()[5].split(","))


def _euid_of_setuid_program(path: str) -> int:
    """The effective uid ``path`` (a setuid cat) runs with when user nobody runs it (reached
    through a descriptor: the test's directories are private to root)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        res = subprocess.run(
            [f"/proc/self/fd/{fd}", "/proc/self/status"],
            pass_fds=(fd,),
            user=65534,
            group=65534,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        os.close(fd)
    assert res.returncode == 0, res.stderr
    uids = next(ln for ln in res.stdout.splitlines() if ln.startswith("Uid:")).split()[1:]
    assert uids[0] == "65534"
    return int(uids[1])


@pytest.mark.parametrize(
    ("options", "suid", "dev"),
    [
        ([], False, False),
        (["-o", "nosuid,nodev"], False, False),
        (["-o", "suid"], True, False),
        (["-o", "dev", "-o", "suid"], True, True),
    ],
)
def test_mounts_are_nosuid_nodev_unless_asked(cli, risky, tmp_path, options, suid, dev):
    """``layerfs mount`` is nosuid,nodev as mount(8) makes user mounts: with allow_other, a
    setuid-root file of the image would give any local user euid 0, a device node its device.
    ``-o suid`` and ``-o dev`` ask for them."""
    mnt = str(tmp_path / "m")
    os.makedirs(mnt)
    cli("mount", risky, mnt, "-o", "allow_other", *options)
    try:
        flags = _mount_flags(mnt)
        assert ("nosuid" in flags, "nodev" in flags) == (not suid, not dev), flags
        assert os.stat(os.path.join(mnt, "suidcat")).st_mode & 0o4000  # shown as stored
        assert _euid_of_setuid_program(os.path.join(mnt, "suidcat")) == (0 if suid else 65534)
        if dev:
            with open(os.path.join(mnt, "null"), "rb") as f:
                assert f.read() == b""
        else:
            with pytest.raises(PermissionError):
                open(os.path.join(mnt, "null"), "rb")
    finally:
        cli("umount", mnt)


def test_container_mounts_keep_suid_and_dev(cli, risky, tmp_path):
    """As docker's: a container's root filesystem (here a runtime bundle's) honours setuid bits
    and device nodes; the nosuid,nodev default is the mount command's."""
    bundle = str(tmp_path / "bundle")
    cli("bundle", risky, bundle, "/suidcat")
    rootfs = os.path.join(bundle, "rootfs")
    try:
        assert not {"nosuid", "nodev"} & _mount_flags(rootfs)
    finally:
        cli("umount", rootfs)


OVERLAPS = {
    # case: (mount point, extra arguments, the error after "cannot mount IMAGE on MNT: ")
    "upper-inside": ("m", ["--upper", "{m}/up"], "upper directory {m}/up lies inside the mount point {m}"),
    "upper-is-mountpoint": ("m", ["--upper", "{m}"], "upper directory {m} is the mount point"),
    "work-inside": (
        "m",
        ["--upper", "{t}/up", "--work", "{m}/work"],
        "work directory {m}/work lies inside the mount point {m}",
    ),
    "lower-inside": ("m", ["--lower", "{m}/sub"], "lower directory {m}/sub lies inside the mount point {m}"),
    "mountpoint-inside-upper": (
        "up/m",
        ["--upper", "{t}/up"],
        "the mount point {m} lies inside upper directory {t}/up",
    ),
    "mountpoint-inside-lower": (
        "low/m",
        ["--lower", "{t}/low"],
        "the mount point {m} lies inside lower directory {t}/low",
    ),
    "store-inside": ("m", [], "the store {m}/store lies inside the mount point {m}"),
}


@pytest.mark.parametrize("case", sorted(OVERLAPS))
def test_directories_overlapping_the_mount_point_are_refused(store_path, sample_layout, tmp_path, case):
    """An upper, work or lower directory (or the store) inside the mount point is reached by the
    daemon through its own mount, and the other way round: every access, and umount, hung.
    Refused up front, nothing mounted, nothing made."""
    where, extra, error = OVERLAPS[case]
    t = str(tmp_path)
    mnt = os.path.join(t, where)
    os.makedirs(os.path.join(mnt, "sub"))
    os.makedirs(os.path.join(t, "low"), exist_ok=True)
    store = os.path.join(mnt, "store") if case == "store-inside" else store_path
    env = dict(os.environ, LAYERFS_STORE=store)
    run = [sys.executable, "-m", "layerfs"]
    subprocess.run(
        [*run, "import", "-q", sample_layout], env=env, check=True, capture_output=True, timeout=120
    )
    before = sorted(os.listdir(mnt))
    args = [a.format(m=mnt, t=t) for a in extra]
    try:
        res = subprocess.run(
            [*run, "mount", *args, SAMPLE, mnt], env=env, capture_output=True, text=True, timeout=60
        )
        assert not mount_devices(mnt), "mounted (and hung)"
    finally:
        abort_mount(mnt)
    assert res.returncode == 1, res.stderr
    assert res.stderr == f"layerfs: cannot mount {SAMPLE} on {mnt}: {error.format(m=mnt, t=t)}\n"
    assert sorted(os.listdir(mnt)) == before  # no upper or work directory made in it


def test_program_runs_inside(cli, sample, tmp_path):
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt):
        res = subprocess.run(["chroot", mnt, "/app/run.sh"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout == f"hello from the layerfs sample image on {os.uname().machine}\nlayerfs-sample\n"


def test_concurrent_readers(cli, sample, tmp_path):
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt):
        cmds = [
            ["find", mnt],
            ["tar", "-cf", "/dev/null", "-C", mnt, "."],
            # the image has no /dev (so no ">/dev/null" inside): the output comes back on a pipe
            ["chroot", mnt, "/bin/sh", "-c", "for i in 1 2 3; do cat /etc/passwd; done"],
            # tar skips reading files when it writes to /dev/null: this one reads every byte
            ["find", mnt, "-type", "f", "-exec", "cat", "{}", "+"],
        ]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in cmds]
        results = [(c, *p.communicate(timeout=120), p.returncode) for c, p in zip(cmds, procs)]
        for cmd, _out, err, code in results:
            assert code == 0, f"{cmd} exited {code}: {err.decode(errors='replace')}"
        assert results[2][1].count(b"root:x:0:0:") == 3
        found = results[0][1].decode().splitlines()
        assert os.path.join(mnt, "app/run.sh") in found and len(found) > 50
        with open(os.path.join(mnt, "bin/busybox"), "rb") as f:
            busybox_size = len(f.read())
        assert len(results[3][1]) > busybox_size  # every file's content came through


def test_readonly_mount_refuses_writes(cli, sample, tmp_path):
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt):
        p = os.path.join(mnt, "etc/passwd")
        attempts: list[tuple[str, Callable[[], Any]]] = [
            ("open for writing", lambda: open(p, "r+b")),
            ("create", lambda: open(os.path.join(mnt, "etc/new"), "xb")),
            ("truncate", lambda: os.truncate(p, 0)),
            ("mkdir", lambda: os.mkdir(os.path.join(mnt, "newdir"))),
            ("unlink", lambda: os.unlink(p)),
            ("rmdir", lambda: os.rmdir(os.path.join(mnt, "home"))),
            ("rename", lambda: os.rename(p, p + ".old")),
            ("chmod", lambda: os.chmod(p, 0o600)),
            ("chown", lambda: os.chown(p, 1, 1)),
            ("utime", lambda: os.utime(p, ns=(1, 1))),
            ("setxattr", lambda: os.setxattr(p, "user.x", b"y")),
            ("removexattr", lambda: os.removexattr(os.path.join(mnt, "etc/tagged"), "user.layerfs")),
            ("symlink", lambda: os.symlink("x", os.path.join(mnt, "link"))),
            ("link", lambda: os.link(p, os.path.join(mnt, "hardlink"))),
            ("mkfifo", lambda: os.mkfifo(os.path.join(mnt, "fifo"))),
        ]
        for what, fn in attempts:
            with pytest.raises(OSError) as exc:
                fn()
            assert exc.value.errno == errno.EROFS, f"{what}: {exc.value}"
        with open(p, "rb") as f:
            assert f.read().startswith(b"root:")


# -- a large image --------------------------------------------------------------------------------
N_DIRS, PER_DIR = 1000, 100  # 100,000 files (+1,000 directories)


def _big_layer() -> bytes:
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    for d in range(N_DIRS):
        info = tarfile.TarInfo(f"d{d:04d}")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        members.append((info, b""))
        for f in range(PER_DIR):
            info = tarfile.TarInfo(f"d{d:04d}/f{f:03d}")
            info.mode, info.mtime = 0o644, 1_700_000_000
            members.append((info, b"%d/%d\n" % (d, f) if f % 10 == 0 else b""))
    return tar_bytes(members, fmt=tarfile.USTAR_FORMAT)


def test_100k_entries_walk_and_daemon_rss(cli, tmp_path: Path):
    t0 = time.monotonic()
    layout = make_layout(tmp_path / "big", [_big_layer()], ref="big:latest", compress=False)
    t_gen = time.monotonic() - t0
    cli("import", layout)
    t_import = time.monotonic() - t0 - t_gen
    mnt = str(tmp_path / "m")
    t1 = time.monotonic()
    with layerfs_mount(cli, "big:latest", mnt):
        t_mount = time.monotonic() - t1
        pid = _mount_record(cli, mnt)["pid"]
        t2 = time.monotonic()
        files = dirs = 0
        for dirpath, dirnames, filenames in os.walk(mnt):
            for name in dirnames + filenames:
                os.lstat(os.path.join(dirpath, name))
            dirs += len(dirnames)
            files += len(filenames)
        t_walk = time.monotonic() - t2
        with open(os.path.join(mnt, "d0999/f090")) as f:
            assert f.read() == "999/90\n"
        with open(f"/proc/{pid}/status") as f:
            mem = {
                k: int(v.split()[0])
                for k, v in (line.split(":", 1) for line in f)
                if k.startswith("Rss") or k == "VmRSS"
            }
    rss = f"VmRSS {mem['VmRSS'] / 1024:.1f} MiB (anon {mem['RssAnon'] / 1024:.1f}, file {mem['RssFile'] / 1024:.1f})"
    print(
        f"\n100k image: generate {t_gen:.1f}s, import {t_import:.1f}s, mount {t_mount:.1f}s, "
        f"walk+lstat {t_walk:.1f}s ({files} files, {dirs} dirs); daemon {rss}"
    )
    assert (files, dirs) == (N_DIRS * PER_DIR, N_DIRS)
    assert mem["VmRSS"] < 50 * 1024, f"daemon {rss} after walking 100k entries"


def test_inode_numbers_are_stable_across_remounts_and_copy_up(cli, sample, tmp_path):
    mnt, upper = str(tmp_path / "m"), str(tmp_path / "upper")
    with layerfs_mount(cli, sample, mnt):
        first = inode_numbers(mnt)
    with layerfs_mount(cli, sample, mnt, upper=upper):
        assert inode_numbers(mnt) == first  # a writable mount of an untouched image: the same numbers
        with open(os.path.join(mnt, "etc/passwd"), "a") as f:
            f.write("copied up\n")
        os.chmod(os.path.join(mnt, "usr/share/doc"), 0o700)
        after_copy_up = inode_numbers(mnt)
    assert after_copy_up == first  # copy-up keeps the lower inode number (files and dirs)
    with layerfs_mount(cli, sample, mnt, upper=upper):
        assert inode_numbers(mnt) == first
    assert len(set(first.values())) == len(first) - 2  # only the two hardlinked pairs share


def test_statfs_describes_the_image(cli, sample, tmp_path):
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt):
        st = os.statvfs(mnt)
        assert st.f_bsize == 4096 and st.f_namemax == 255
        assert st.f_blocks * st.f_bsize >= 3_000_000  # the sample holds ~3 MB of file data
        assert st.f_files == len(set(inode_numbers(mnt).values())) + 1  # every inode, with the root


def test_reads_stay_right_while_other_images_come_and_go(cli, sample, tmp_path):
    """The C core reads the store without an LMDB reader slot of its own (docs/FORMAT.md): while
    imports, rmi and gc in other processes free and reuse pages, every read through a mount must
    still return the image's bytes.  Each file's page cache is dropped before it is read again,
    so every round's READs reach the daemon."""
    mnt = str(tmp_path / "m")
    stop = threading.Event()
    errors: list[str] = []

    def churn() -> None:
        n = 0
        while not stop.is_set() and n < 40:
            layer = tar_bytes([member(f"f{i}", os.urandom(70_000)) for i in range(40)])
            layout = make_layout(tmp_path / f"churn{n}", [layer], ref=f"churn:{n}", compress=False)
            for args in (("import", layout), ("rmi", f"churn:{n}"), ("gc",)):
                res = cli(*args, check=False)
                if res.code != 0:
                    errors.append(f"{args}: {res.err}")
            n += 1

    with layerfs_mount(cli, sample, mnt):
        files = []
        for d, _, names in os.walk(mnt):
            files += [os.path.join(d, n) for n in names if stat.S_ISREG(os.lstat(os.path.join(d, n)).st_mode)]
        expected = {}
        for p in files:
            with open(p, "rb") as f:
                expected[p] = hashlib.sha256(f.read()).hexdigest()
        worker = threading.Thread(target=churn)
        worker.start()
        rounds = 0
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and worker.is_alive():
                for p in files:
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        data = b""
                        while chunk := os.read(fd, 1 << 20):
                            data += chunk
                    finally:
                        os.close(fd)
                    assert hashlib.sha256(data).hexdigest() == expected[p], p
                rounds += 1
        finally:
            stop.set()
            worker.join()
    assert not errors, errors
    assert rounds >= 2


def test_rmi_and_gc_while_mounted_keep_the_mount_readable(cli, sample, tmp_path):
    """A mount pins its image's layers: rmi + gc while mounted leave it readable; after the
    umount, gc reclaims everything."""
    mnt = str(tmp_path / "m")
    with layerfs_mount(cli, sample, mnt):
        assert "Deleted: sha256:" in cli("rmi", sample).out
        cli("gc")
        with open(os.path.join(mnt, "bin/busybox"), "rb") as f:
            assert len(f.read()) > 100_000
        assert cli("df", "--json").json()["layers"] == 3
    cli("gc")
    usage = cli("df", "--json").json()
    assert usage["layers"] == 0 and usage["objects"] == 0


def test_an_image_removed_while_it_is_being_mounted(cli, sample, sample_layout, store_path, tmp_path):
    """`mount` resolves the name, then (the first time) builds the merged index, then forks the
    daemon, which pinned the image only then: an rmi + gc in between gave a mount that listed
    every file and failed every read.  The image is pinned from the start, or the mount fails."""
    from layerfs.mount import MountError, MountSpec, mount
    from layerfs.store import Store
    from layerfs.tools.refs import resolve

    mnt = str(tmp_path / "m")
    os.makedirs(mnt)
    with Store(store_path) as store:
        image_id = resolve(store, sample)
        image = store.get_image(image_id)
        assert image is not None
        layers = list(image.layers)
    spec = MountSpec(image_id, layers, mnt, name=sample)
    cli("rmi", sample)  # between the resolution and the mount
    cli("gc")
    with Store(store_path) as store, pytest.raises(MountError, match="was removed"):
        mount(store, spec)
    assert not mounted(mnt)

    cli("import", "-q", sample_layout)
    with Store(store_path) as store:
        pid = mount(store, spec)
    try:
        with Store(store_path) as store:
            # once mounted, only the daemon's lease holds the image
            assert [lease["pid"] for _, lease in store.leases()] == [pid]
        cli("rmi", "-f", sample, check=False)
        cli("gc")
        with open(os.path.join(mnt, "etc/hostname")) as f:
            assert f.read() == "layerfs-sample\n"
    finally:
        cli("umount", mnt, check=False)


def _flip_stored_byte(store_path: str, sha: bytes, at: int = 100) -> None:
    """Damage the first chunk of object ``sha`` in its pack (as a bad disk sector would)."""
    from layerfs.store import Store
    from layerfs.store.store import decode_object

    with Store(store_path) as store:
        with store.read() as txn:
            _, chunks = decode_object(bytes(txn.get(sha, db=store.db("objects"))))
        c = chunks[0]
        key = c.pack.to_bytes(8, "big")
        if store.payload_kind == "files":  # (LAYERFS_STORE_PAYLOAD=files)
            with open(os.path.join(store_path, "packs", f"{c.pack:016x}"), "r+b") as f:
                f.seek(c.offset + min(at, c.stored - 1))
                byte = f.read(1)[0]
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte ^ 0xFF]))
            return

        def fn(txn: Any) -> None:
            value = bytearray(txn.get(key, db=store.db("packs")))
            value[c.offset + min(at, c.stored - 1)] ^= 0xFF
            txn.put(key, bytes(value), db=store.db("packs"))

        store.write(fn)


def test_a_corrupt_chunk_gives_eio_and_says_which_file(cli, store_path, tmp_path, fuse_core):
    """A chunk failing its check is EIO for the reader (it was EINVAL: SIGBUS in a container)
    and a line in the mount's log naming the object, the image and the path; verify names the
    images and paths of a damaged object too.  (Large enough that a writable mount's READ goes
    to its reader thread.)"""
    data = os.urandom(600_000)
    layer = tar_bytes([member("data/blob", data), member("ok", b"fine\n")])
    cli("import", "-q", make_layout(tmp_path / "layout", [layer], ref="damaged:1"))
    sha = hashlib.sha256(data).digest()
    _flip_stored_byte(store_path, sha)
    for rw in (False, True):
        mnt = str(tmp_path / f"m{int(rw)}")
        with layerfs_mount(cli, "damaged:1", mnt, rw=rw):
            with pytest.raises(OSError) as exc, open(os.path.join(mnt, "data/blob"), "rb") as f:
                f.read()
            assert exc.value.errno == errno.EIO
            with open(os.path.join(mnt, "ok"), "rb") as f:
                assert f.read() == b"fine\n"
            mount_id = hashlib.sha256(os.path.realpath(mnt).encode()).hexdigest()[:16]
            log_path = os.path.join(store_path, "mounts", f"{mount_id}.log")
            assert wait_until(lambda p=log_path: os.path.exists(p) and "/data/blob" in open(p).read(), 10)
            with open(log_path) as f:
                log = f.read()
            line = next(x for x in log.splitlines() if "/data/blob" in x)
            assert sha.hex() in line and "damaged:1" in line, log
    out = cli("verify", check=False)
    assert out.code == 3
    assert f"object {sha.hex()} is /data/blob in layer" in out.out and "(damaged:1)" in out.out, out.out


def test_copy_up_bookkeeping_is_hidden_from_the_kernel_overlay(cli, sample, sample_layout, tmp_path):
    """Copy-up records a file's inode number in an xattr of the upper file: under a name of the
    kernel overlay's own namespace, which it hides, so a kernel mount of the upper directory
    shows the file's xattrs as they are (trusted.layerfs.ino showed as a real one)."""
    if overlay_unavailable(str(tmp_path)):
        pytest.skip(overlay_unavailable(str(tmp_path)))
    mnt, upper = str(tmp_path / "m"), str(tmp_path / "rw" / "upper")
    with layerfs_mount(cli, sample, mnt, upper):
        ino = os.lstat(os.path.join(mnt, "etc/passwd")).st_ino
        with open(os.path.join(mnt, "etc/passwd"), "ab") as f:
            f.write(b"x")
        assert os.lstat(os.path.join(mnt, "etc/passwd")).st_ino == ino  # kept across copy-up
        assert os.listxattr(os.path.join(mnt, "etc/passwd")) == []
    assert os.listxattr(os.path.join(upper, "etc/passwd")) == ["trusted.overlay.layerfs.ino"]
    lowers = extract_layers(sample_layout, str(tmp_path / "layers"))
    kmnt = str(tmp_path / "k")
    os.makedirs(kmnt)
    os.makedirs(tmp_path / "rw" / "kwork")
    opts = f"lowerdir={':'.join(reversed(lowers))},upperdir={upper},workdir={tmp_path / 'rw' / 'kwork'}"
    res = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, kmnt], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    try:
        assert os.listxattr(os.path.join(kmnt, "etc/passwd")) == []
    finally:
        subprocess.run(["umount", kmnt], capture_output=True)
    with layerfs_mount(cli, sample, mnt, upper):  # a legacy name is still read
        up = os.path.join(upper, "etc/passwd")
        value = os.getxattr(up, "trusted.overlay.layerfs.ino")
        os.removexattr(up, "trusted.overlay.layerfs.ino")
        os.setxattr(up, "trusted.layerfs.ino", value)
    with layerfs_mount(cli, sample, mnt, upper):
        assert os.lstat(os.path.join(mnt, "etc/passwd")).st_ino == ino
