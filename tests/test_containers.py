"""Containers run by the real runc: run (foreground, -i, -d, --rm), the process options,
create/start/stop/rm, ps and logs, diff and commit, bind mounts, setup errors (exit 125),
rmi of an image a container uses, and ``bundle`` run by runc directly.

Every test leaves nothing behind: the autouse ``no_container_left_behind`` removes the
store's containers with ``rm -f`` and then checks that no mount, runc state or monitor
process of the test remains."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CLIResult, make_layout, member, tar_bytes
from unionutil import (  # noqa: F401 - need_fuse and no_mount_left_behind are fixtures
    force_unmount,
    mounted,
    need_fuse,
    no_mount_left_behind,
    wait_until,
)

from layerfs.userland import userland_arch

pytestmark = [
    pytest.mark.usefixtures("need_fuse"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (apt install runc)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="running containers with runc needs root"),
]
RUNC_ROOT = "/run/layerfs/runc"  # where layerfs keeps runc's state
HELLO = f"hello from the layerfs sample image on {os.uname().machine}\nlayerfs-sample\n"
SETUP_FAILED = 125


# -- helpers -----------------------------------------------------------------------------------
def _mount_lines_below(base: str) -> list[str]:
    base = os.path.realpath(base)
    with open("/proc/mounts") as f:
        return [line.strip() for line in f if base in line]


def _runc_state() -> set[str]:
    try:
        return set(os.listdir(RUNC_ROOT))
    except FileNotFoundError:
        return set()


def _runc_state_of(names: set[str], base: str) -> list[str]:
    """Those of ``names`` (runc state directories) that belong to containers below ``base``
    (a state that still has no readable state.json after a while counts: it appeared during
    the test; one being created right now, by a test of another checkout, is left alone)."""
    out = []
    for name in names:
        state = os.path.join(RUNC_ROOT, name, "state.json")
        wait_until(lambda state=state: os.path.exists(state), timeout=3)
        try:
            with open(state) as f:
                if base not in f.read():
                    continue
        except OSError:
            if not os.path.isdir(os.path.join(RUNC_ROOT, name)):
                continue
        out.append(name)
    return out


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (container monitors name the
    store, bundle mount daemons their directory)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if text in cmd:
            out.append(f"{pid}: {cmd}")
    return out


def one_line_error(res: CLIResult) -> str:
    """The single ``layerfs: ...`` line a failed verb writes to stderr."""
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), f"stderr is not one line: {res.err!r}"
    return lines[0]


def ps(cli: Callable[..., CLIResult], *flags: str) -> list[dict[str, Any]]:
    out = cli("ps", "--json", *flags).json()
    assert isinstance(out, list)
    return out


def container_dir(store_path: str, cid: str) -> str:
    return os.path.join(store_path, "containers", cid)


def run_in_pty(
    store_path: str,
    *args: str,
    typed: bytes = b"",
    then: tuple[bytes, bytes] = (b"", b""),
    timeout: float = 60,
) -> tuple[int, bytes]:
    """``layerfs ARGS`` on a new terminal (its stdin, stdout and stderr); ``typed`` is written
    to the terminal at once, as a user or ``script`` (``^D`` when its own input ends) would;
    ``then[1]`` once the terminal has shown ``then[0]``.  The exit code and everything the
    terminal showed."""
    env = dict(os.environ, LAYERFS_STORE=store_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the new one
        try:
            os.execve(sys.executable, [sys.executable, "-m", "layerfs", *args], env)
        finally:
            os._exit(127)
    out = b""
    try:
        if typed:
            os.write(fd, typed)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every process of the terminal closed it
                break
            if not chunk:
                break
            out += chunk
            if then[0] and then[0] in out:
                os.write(fd, then[1])
                then = (b"", b"")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def cli_input(store_path: str) -> Callable[..., CLIResult]:
    """``cli`` with stdin: ``cli_input(*args, input=TEXT)`` (``input=None``: the caller's stdin
    is /dev/null)."""

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> CLIResult:
        e = dict(os.environ, LAYERFS_STORE=store_path)
        e.update(env or {})
        p = subprocess.run(
            [sys.executable, "-m", "layerfs", *args],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            env=e,
            timeout=60,
        )
        return CLIResult(p.returncode, p.stdout, p.stderr)

    return run


@pytest.fixture(autouse=True)
def no_container_left_behind(
    cli: Callable[..., CLIResult], store_path: str, tmp_path: Path
) -> Iterator[None]:
    """After each test: ``rm -f`` every container of the store, then nothing of the test may
    stay: no container, no mount below its tmp dir, no runc state, no monitor process."""
    runc_before = _runc_state()
    yield
    base = os.path.realpath(tmp_path)
    problems = []
    if os.path.isdir(store_path):
        ids = cli("ps", "-aq", check=False).out.split()
        if ids:
            res = cli("rm", "-f", *ids, check=False)
            if res.code != 0:
                problems.append(f"rm -f {' '.join(ids)} exited {res.code}: {res.err.strip()}")
        left = cli("ps", "-aq", check=False).out.split()
        if left:
            problems.append(f"containers left after rm -f: {left}")
    # a monitor finishes its unmount just after it records the exit: give it a moment
    wait_until(lambda: not _mount_lines_below(base) and not _processes_mentioning(base), timeout=10)
    mounts = _mount_lines_below(base)
    if mounts:
        problems.append(f"mounts left behind: {mounts}")
        for line in sorted(mounts, key=len, reverse=True):
            force_unmount(line.split()[1])
    procs = _processes_mentioning(base)
    if procs:
        problems.append(f"processes left behind: {procs}")
    runc_left = _runc_state_of(_runc_state() - runc_before, base)
    if runc_left:
        problems.append(f"runc state left behind in {RUNC_ROOT}: {runc_left}")
        runc = shutil.which("runc") or "runc"
        for name in runc_left:
            subprocess.run([runc, "--root", RUNC_ROOT, "delete", "--force", name], capture_output=True)
    assert not problems, "\n".join(problems)


# -- 1. run: output and exit code ------------------------------------------------------------
def test_run_passes_output_and_exit_code_through(cli, sample):
    res = cli("run", sample)
    assert (res.code, res.out, res.err) == (0, HELLO, "")

    res = cli("run", sample, "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (res.code, res.out, res.err) == (7, "out\n", "err\n")

    # both are recorded as exited, with their codes
    codes = sorted((c["state"], c["exit_code"]) for c in ps(cli, "-a"))
    assert codes == [("exited", 0), ("exited", 7)]
    assert ps(cli) == []  # none is running


# -- 2. process options ------------------------------------------------------------------------
def test_env_workdir_hostname_user(cli, sample):
    script = 'env; echo "pwd=$(pwd)"; echo "uname=$(uname -n)"; id'
    res = cli(
        "run",
        "-e",
        "FOO=bar",
        "-e",
        "SPACED=a b=c",
        "-w",
        "/tmp/wd",
        "--hostname",
        "myhost",
        "-u",
        "nobody",
        sample,
        "sh",
        "-c",
        script,
    )
    env = dict(line.split("=", 1) for line in res.out.splitlines() if "=" in line and "(" not in line)
    assert env["FOO"] == "bar"
    assert env["SPACED"] == "a b=c"
    assert env["PATH"] == "/bin"  # the image's Env
    assert env["HOSTNAME"] == "myhost"
    assert "pwd=/tmp/wd" in res.out.splitlines()  # made although the image lacks it
    assert "uname=myhost" in res.out.splitlines()  # the kernel's host name, not just $HOSTNAME
    # a name from the image's /etc/passwd, its group from /etc/group
    assert res.out.splitlines()[-1] == "uid=65534(nobody) gid=65534(nogroup)"

    res = cli("run", "-u", "1234:5678", sample, "sh", "-c", "id -u; id -g")
    assert res.out == "1234\n5678\n"
    res = cli("run", "-u", "nobody:root", sample, "sh", "-c", "id -u; id -g")
    assert res.out == "65534\n0\n"

    # the defaults: root, the image's WorkingDir, the short id as the host name
    cid = cli("create", sample, "sh", "-c", 'id; echo "$(pwd) $(uname -n) $HOSTNAME"').out.strip()
    assert len(cid) == 64
    res = cli("start", "-a", cid)
    assert res.out == f"uid=0(root) gid=0(root)\n/app {cid[:12]} {cid[:12]}\n"


def test_entrypoint_and_command(cli, sample):
    # the image's Cmd is replaced by the command given
    assert cli("run", sample, "echo", "a", "b").out == "a b\n"
    # --entrypoint replaces the entrypoint and drops the image's Cmd, as docker does
    assert cli("run", "--entrypoint", "/bin/echo", sample).out == "\n"
    assert cli("run", "--entrypoint", "/bin/echo", sample, "x", "y").out == "x y\n"


def test_unknown_user_is_a_setup_error(cli, sample):
    res = cli("run", "-u", "nosuchuser", sample, "id", check=False)
    assert res.code == SETUP_FAILED
    assert "nosuchuser" in one_line_error(res)
    res = cli("run", "-u", "nobody:nosuchgroup", sample, "id", check=False)
    assert res.code == SETUP_FAILED
    assert "nosuchgroup" in one_line_error(res)


def test_user_from_a_custom_image(cli, tmp_path):
    """A user the image defines (User in its config) with supplementary groups."""
    busybox = next(p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p))
    with open(busybox, "rb") as f:
        bb = f.read()
    layer = tar_bytes(
        [
            member("bin", kind=tarfile.DIRTYPE, mode=0o755),
            member("bin/busybox", bb, mode=0o755),
            member("bin/sh", kind=tarfile.SYMTYPE, link="busybox", mode=0o777),
            member("bin/id", kind=tarfile.SYMTYPE, link="busybox", mode=0o777),
            member("etc", kind=tarfile.DIRTYPE, mode=0o755),
            member(
                "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nalice:x:1500:1600:Alice:/home/alice:/bin/sh\n"
            ),
            member("etc/group", b"root:x:0:\nstaff:x:1600:\nwheel:x:1700:alice\naudio:x:1800:bob,alice\n"),
        ]
    )
    layout = make_layout(
        tmp_path / "user-layout",
        [layer],
        ref="withuser:latest",
        config_extra={"config": {"Cmd": ["id"], "User": "alice", "Env": ["PATH=/bin"]}},
    )
    cli("import", layout)
    out = cli("run", "withuser:latest").out
    ids, _, groups = out.strip().partition(" groups=")
    assert ids == "uid=1500(alice) gid=1600(staff)", out
    # the groups that list alice (not audio's bob alone); the primary group may or may not be repeated
    assert set(groups.split(",")) - {"1600(staff)"} == {"1700(wheel)", "1800(audio)"}, out
    assert cli("run", "-u", "0", "withuser:latest").out.startswith("uid=0(root) gid=0(root)")


# -- 3. stdin ----------------------------------------------------------------------------------
def test_stdin_only_with_interactive(cli_input, sample):
    data = "line one\nline two\n" + "x" * 100_000 + "\n"
    res = cli_input("run", "-i", sample, "cat", input=data)
    assert (res.code, res.err) == (0, "")
    assert res.out == data

    # without -i the container reads nothing, even when we have input
    res = cli_input("run", sample, "sh", "-c", 'cat; echo "end"', input="must not arrive\n")
    assert (res.code, res.out) == (0, "end\n")


# -- 4. changes persist across stop/start; rm removes them --------------------------------------
def test_changes_survive_stop_and_start_until_rm(cli, sample, store_path):
    # first start: one line in /f, wait; the next start finds two lines and exits
    script = (
        "echo x >> /f; cat /f; "
        'test "$(wc -l < /f)" -ge 2 && exit 0; '
        'trap "exit 3" TERM; echo ready; sleep 1000 & wait'
    )
    cid = cli("run", "-d", "--name", "keeper", sample, "sh", "-c", script).out.strip()
    assert len(cid) == 64
    assert wait_until(lambda: "ready" in cli("logs", "keeper").out, timeout=15), cli("logs", "keeper")
    assert [c["state"] for c in ps(cli)] == ["running"]

    assert cli("stop", "-t", "5", "keeper").out == "keeper\n"
    [rec] = ps(cli, "-a")
    assert (rec["state"], rec["exit_code"]) == ("exited", 3)  # SIGTERM reached the process
    assert cli("diff", "keeper").out == "A /f\n"
    with open(os.path.join(container_dir(store_path, cid), "upper", "f")) as f:
        assert f.read() == "x\n"

    res = cli("start", "-a", "keeper")
    assert (res.code, res.out) == (0, "x\nx\n")
    assert cli("diff", "keeper").out == "A /f\n"
    assert cli("diff", "--json", "keeper").json() == [{"kind": "A", "path": "/f"}]

    assert cli("rm", "keeper").out == "keeper\n"
    assert not os.path.exists(container_dir(store_path, cid))
    assert ps(cli, "-a") == []
    # a new container of the same image starts from the image
    assert cli("run", sample, "sh", "-c", "test -e /f && echo present || echo absent").out == "absent\n"


def test_start_detached_reruns_command(cli, sample):
    cid = cli("create", "--name", "later", sample, "sh", "-c", "echo run >> /log; cat /log").out.strip()
    [rec] = ps(cli, "-a")
    assert (rec["id"], rec["state"], rec["status"]) == (cid, "created", "Created")
    assert ps(cli) == []
    for _ in (1, 2):
        assert cli("start", "later").out == "later\n"
        assert wait_until(lambda: ps(cli, "-a")[0]["state"] == "exited", timeout=15)
        assert ps(cli, "-a")[0]["exit_code"] == 0
    # the log has both runs' output: the second one saw the first one's change
    assert cli("logs", "later").out == "run\nrun\nrun\n"


# -- 5. commit ---------------------------------------------------------------------------------
def test_commit_delete_replace_add(cli, sample):
    parent = cli("inspect", sample).json()[0]
    cli(
        "run",
        "--name",
        "changer",
        sample,
        "sh",
        "-c",
        "rm /etc/hostname && echo replaced > /etc/os-release && echo added > /added",
    )
    changes = {(c["kind"], c["path"]) for c in cli("diff", "--json", "changer").json()}
    assert changes == {("C", "/etc"), ("D", "/etc/hostname"), ("C", "/etc/os-release"), ("A", "/added")}

    res = cli(
        "commit",
        "--json",
        "-m",
        "delete, replace, add",
        "-a",
        "Tess Ter <tess@example.com>",
        "-c",
        'CMD ["cat", "/added"]',
        "changer",
        "committed:v1",
    ).json()
    assert res["image_id"].startswith("sha256:") and res["layer"].startswith("sha256:")
    assert res["layer_new"] is True
    assert res["bytes_stored"] > 0

    new = cli("inspect", "committed:v1").json()[0]
    assert new["Id"] == res["image_id"]
    assert new["RootFS"]["Layers"] == parent["RootFS"]["Layers"] + [res["layer"]]
    assert new["Author"] == "Tess Ter <tess@example.com>"
    assert new["Config"]["Cmd"] == ["cat", "/added"]
    assert new["Config"]["WorkingDir"] == "/app"  # the rest of the config is the parent's

    check = "test -e /etc/hostname && echo hostname-present || echo hostname-gone; cat /etc/os-release /added"
    out = cli("run", "--rm", "committed:v1", "sh", "-c", check).out
    assert out == "hostname-gone\nreplaced\nadded\n"
    assert cli("run", "--rm", "committed:v1").out == "added\n"  # the -c CMD
    # the parent is untouched
    out = cli("run", "--rm", sample, "sh", "-c", check.replace("/added", "/etc/passwd")).out
    assert out.startswith("hostname-present\nNAME=")

    history = cli("history", "--json", "committed:v1").json()
    assert history[0]["comment"] == "delete, replace, add"
    assert history[0]["empty_layer"] is False
    assert "delete, replace, add" in cli("history", "committed:v1").out


def test_commit_of_an_unchanged_container_adds_no_layer(cli, sample):
    parent = cli("inspect", sample).json()[0]
    cli("run", "--name", "idle", sample, "true")
    assert cli("diff", "idle").out == ""  # /dev, /proc, /sys made for runc are no changes
    res = cli("commit", "--json", "idle", "idle:v1").json()
    assert res["layer"] is None
    assert res["layer_new"] is False
    assert res["bytes_stored"] < 4096  # a config and a manifest
    new = cli("inspect", "idle:v1").json()[0]
    assert new["Id"] == res["image_id"] != parent["Id"]
    assert new["RootFS"]["Layers"] == parent["RootFS"]["Layers"]
    assert cli("history", "--json", "idle:v1").json()[0]["empty_layer"] is True
    # and the committed image runs
    assert cli("run", "--rm", "idle:v1").out == HELLO


def test_commit_of_the_same_tree_gives_the_same_layer(cli, sample):
    script = "mkdir -p /srv/d && echo same > /srv/d/f && touch -d @1700000000 /srv/d/f /srv/d /srv"
    results = []
    for name in ("twin1", "twin2"):
        cli("run", "--name", name, sample, "sh", "-c", script)
        results.append(cli("commit", "--json", name, f"{name}:latest").json())
    first, second = results
    assert first["layer"] is not None
    assert first["layer"] == second["layer"]
    assert (first["layer_new"], second["layer_new"]) == (True, False)
    assert second["bytes_stored"] < 4096  # only the new config and manifest
    for name in ("twin1", "twin2"):
        assert cli("run", "--rm", f"{name}:latest", "cat", "/srv/d/f").out == "same\n"


# -- 6. bind mounts ------------------------------------------------------------------------------
def test_volume_read_write_and_read_only(cli, sample, tmp_path):
    host = tmp_path / "vol"
    host.mkdir()
    (host / "in.txt").write_text("from the host\n")

    res = cli(
        "run",
        "--rm",
        "-v",
        f"{host}:/data",
        sample,
        "sh",
        "-c",
        "cat /data/in.txt; echo back > /data/out.txt",
    )
    assert res.out == "from the host\n"
    assert (host / "out.txt").read_text() == "back\n"

    res = cli(
        "run",
        "--rm",
        "-v",
        f"{host}:/data:ro",
        sample,
        "sh",
        "-c",
        "cat /data/in.txt; echo nope > /data/ro.txt",
        check=False,
    )
    assert res.code != 0
    assert res.out == "from the host\n"
    assert "Read-only file system" in res.err
    assert not (host / "ro.txt").exists()

    # a missing host directory is made, as docker does
    fresh = tmp_path / "fresh"
    cli("run", "--rm", "-v", f"{fresh}:/mnt/fresh", sample, "sh", "-c", "echo made > /mnt/fresh/x")
    assert (fresh / "x").read_text() == "made\n"


def test_file_bind_mounts(cli, sample, tmp_path):
    """``-v /host/file:/ctr/file``: a file on a new mount point (a file, made in the root
    filesystem as runc makes directories: a change, as ``docker diff`` shows it) and a
    read-only file over one of the image's."""
    conf = tmp_path / "app.conf"
    conf.write_text("setting=1\n")
    name = tmp_path / "hostname"
    name.write_text("from-the-host\n")
    script = "cat /opt/conf/app.conf /etc/hostname; test -f /opt/conf/app.conf && echo file; " + (
        "echo setting=2 >> /opt/conf/app.conf; echo no > /etc/hostname"
    )
    res = cli(
        "run",
        "--name",
        "files",
        "-v",
        f"{conf}:/opt/conf/app.conf",
        "-v",
        f"{name}:/etc/hostname:ro",
        sample,
        "sh",
        "-c",
        script,
        check=False,
    )
    assert res.out == "setting=1\nfrom-the-host\nfile\n", res
    assert res.code == 1 and "Read-only file system" in res.err
    assert conf.read_text() == "setting=1\nsetting=2\n"
    assert name.read_text() == "from-the-host\n"
    assert cli("diff", "files").out == "A /opt\nA /opt/conf\nA /opt/conf/app.conf\n"
    # the image's own file is untouched
    assert cli("run", "--rm", sample, "cat", "/etc/hostname").out != "from-the-host\n"


@pytest.mark.parametrize(
    "spec", ["relative:/data", "/abs:relative", "/a:/b:rw:x", "/a:/b:rx", "/a", "x:/", "/tmp:/", "/tmp:/.."]
)
def test_bad_volume_spec(cli, sample, spec):
    res = cli("run", "-v", spec, sample, "true", check=False)
    assert res.code == SETUP_FAILED
    assert "volume" in one_line_error(res)
    assert ps(cli, "-a") == []


# -- 7. ps, stop, logs, rm ----------------------------------------------------------------------
def test_ps_stop_logs_and_rm(cli, sample, store_path):
    cid = cli(
        "run",
        "-d",
        "--name",
        "bg",
        sample,
        "sh",
        "-c",
        'echo "to stdout"; echo "to stderr" >&2; exec sleep 1000',
    ).out.strip()
    [rec] = ps(cli)
    assert (rec["id"], rec["name"], rec["state"], rec["image"]) == (cid, "bg", "running", sample)
    assert rec["status"].startswith("Up ")
    assert cli("ps", "-q").out == cid[:12] + "\n"
    table = cli("ps").out.splitlines()
    assert table[0].split()[:2] == ["CONTAINER", "ID"] and table[1].startswith(cid[:12])
    assert table[1].split()[-1] == "bg"
    assert wait_until(lambda: cli("logs", "bg").out.count("to std") == 2, timeout=15)
    assert sorted(cli("logs", cid[:8]).out.splitlines()) == ["to stderr", "to stdout"]  # by id prefix

    # rm of a running container: refused, and it keeps running
    res = cli("rm", "bg", check=False)
    assert res.code == 1
    assert "running" in one_line_error(res)
    assert [c["state"] for c in ps(cli)] == ["running"]

    cli("stop", "-t", "1", "bg")  # sleep as pid 1 ignores SIGTERM: killed after 1 s
    assert ps(cli) == []
    assert cli("ps", "-q").out == ""
    [rec] = ps(cli, "-a")
    assert (rec["state"], rec["exit_code"]) == ("exited", 137)
    assert rec["status"].startswith("Exited (137)")
    assert not mounted(os.path.join(container_dir(store_path, cid), "rootfs"))
    assert sorted(cli("logs", "bg").out.splitlines()) == ["to stderr", "to stdout"]
    cli("stop", "bg")  # stopping a stopped container is fine
    cli("rm", "bg")
    assert ps(cli, "-a") == []
    res = cli("logs", "bg", check=False)
    assert res.code == 1 and "no such container" in one_line_error(res)


def test_rm_force_kills_a_running_container(cli, sample, store_path):
    cid = cli("run", "-d", sample, "sleep", "1000").out.strip()
    assert [c["state"] for c in ps(cli)] == ["running"]
    rootfs = os.path.join(container_dir(store_path, cid), "rootfs")
    assert mounted(rootfs)
    assert cli("rm", "-f", cid).out == cid + "\n"
    assert ps(cli, "-a") == []
    assert not os.path.exists(container_dir(store_path, cid))
    assert not mounted(rootfs)
    assert cid not in _runc_state()


def test_stop_then_immediate_start_keeps_the_new_mount(cli, sample, store_path):
    """A stopped container's monitor unmounts after it records the exit; a ``start`` right
    after ``stop`` must not lose its fresh mount to that unmount."""
    script = 'trap "exit 0" TERM; echo up; sleep 1000 & wait'
    cid = cli("run", "-d", "--name", "again", sample, "sh", "-c", script).out.strip()
    rootfs = os.path.join(container_dir(store_path, cid), "rootfs")
    for _ in range(3):
        assert wait_until(lambda: cli("logs", "again").out.count("up") >= 1, timeout=15)
        cli("stop", "-t", "5", "again")
        cli("start", "again")
        assert wait_until(lambda: ps(cli) != [], timeout=15)
        assert wait_until(lambda: mounted(rootfs), timeout=5)
    # the running container still sees its root filesystem
    assert [c["state"] for c in ps(cli)] == ["running"]
    assert mounted(rootfs)
    assert os.path.exists(os.path.join(rootfs, "app", "run.sh"))


@pytest.mark.parametrize("verb", [("stop", "-t", "0"), ("rm", "-f")], ids=["stop", "rm-f"])
def test_stop_of_a_foreground_run_rm_container(cli, sample, store_path, verb):
    """docker stop (and rm -f) of a container that ``run --rm`` runs in the foreground: the
    run ends with 137 and removes the container; the stop itself succeeds."""
    env = dict(os.environ, LAYERFS_STORE=store_path)
    for round_ in range(2):
        name = f"fg{round_}"
        fg = subprocess.Popen(
            [sys.executable, "-m", "layerfs", "run", "--rm", "--name", name, sample, "sleep", "1000"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert wait_until(lambda: [c["state"] for c in ps(cli)] == ["running"], timeout=15)
            res = cli(*verb, name, check=False)
            out, err = fg.communicate(timeout=30)
        finally:
            if fg.poll() is None:
                fg.kill()
                fg.wait()
        assert (fg.returncode, err) == (137, ""), (out, err)
        assert ps(cli, "-a") == []
        assert (res.code, res.out, res.err) == (0, name + "\n", ""), res


# -- 8. setup errors -----------------------------------------------------------------------------
def test_setup_errors_exit_125_with_one_line(cli, sample, tmp_path):
    # an image without Entrypoint and Cmd
    layout = make_layout(
        tmp_path / "nocmd",
        [tar_bytes([member("hello.txt", b"hi\n")])],
        ref="nocmd:latest",
        config_extra={"config": {"Env": ["PATH=/bin"]}},
    )
    cli("import", layout)
    for verb in ("run", "create"):
        res = cli(verb, "nocmd:latest", check=False)
        assert res.code == SETUP_FAILED, res
        assert "no command" in one_line_error(res)
    assert ps(cli, "-a") == []

    # the OCI runtime is missing
    for runtime in ("/nonexistent-runc", "no-such-runtime-here"):
        res = cli("run", sample, "true", check=False, env={"LAYERFS_RUNTIME": runtime})
        assert res.code == SETUP_FAILED, res
        assert runtime in one_line_error(res)
        res = cli("run", "-d", sample, "true", check=False, env={"LAYERFS_RUNTIME": runtime})
        assert res.code == SETUP_FAILED, res
        one_line_error(res)
        assert ps(cli, "-a") == []  # nothing was created

    # a working directory that is a file in the image
    res = cli("run", "--rm", "-w", "/etc/passwd", sample, "true", check=False)
    assert res.code == SETUP_FAILED
    assert "/etc/passwd is not a directory" in one_line_error(res)

    # an unknown image
    res = cli("run", "no-such-image:latest", "true", check=False)
    assert res.code == SETUP_FAILED
    assert "no-such-image" in one_line_error(res)

    # a name already in use
    cli("create", "--name", "dup", sample)
    res = cli("run", "--name", "dup", sample, "true", check=False)
    assert res.code == SETUP_FAILED
    assert "dup" in one_line_error(res)
    res = cli("create", "--name", "bad name!", sample, check=False)
    assert res.code == SETUP_FAILED
    one_line_error(res)
    assert [c["name"] for c in ps(cli, "-a")] == ["dup"]


def test_runtime_failures_map_to_docker_exit_codes(cli, sample, tmp_path):
    """What runc refuses is one line on stderr, never runc's own, with docker's status:
    126 for a command that cannot be invoked, 127 for one that is not there, 125 for any
    other failure to set the container up; the container is left created (as docker leaves
    it), and ``--rm`` removes it."""
    hostfile = tmp_path / "file"
    hostfile.write_text("x\n")
    cases = [  # (options, command, status, words of the message)
        ([], "/etc/passwd", 126, 'exec: "/etc/passwd": permission denied'),  # not executable
        ([], "/etc", 126, 'exec: "/etc": permission denied'),  # a directory
        (["-w", "/tmp"], "./nothing", 127, "no such file or directory"),  # relative: runc looks
        (["-v", f"{hostfile}:/etc"], "true", 125, "not a directory"),  # a file over a directory
        (["-u", "99999999999"], "true", 125, "0-2147483647"),  # a uid the kernel cannot have
        (["-u", "1:4294967296"], "true", 125, "0-2147483647"),
    ]
    for opts, cmd, code, words in cases:
        res = cli("run", "--name", "failing", *opts, sample, cmd, check=False)
        assert res.code == code, (opts, cmd, res)
        assert words in one_line_error(res), (opts, cmd, res)
        assert res.out == ""
        [rec] = ps(cli, "-a")
        assert rec["state"] == "created", (opts, cmd, rec)
        cli("rm", "failing")
        res = cli("run", "--rm", *opts, sample, cmd, check=False)
        assert (res.code, len(res.err.splitlines())) == (code, 1), (opts, cmd, res)
        assert ps(cli, "-a") == []

    # detached: the same line and status from run -d and start; the container stays created
    res = cli("run", "-d", "--name", "bad", sample, "/etc/passwd", check=False)
    assert res.code == 126 and "permission denied" in one_line_error(res), res
    assert res.out == ""
    [rec] = ps(cli, "-a")
    assert (rec["name"], rec["state"], rec["status"]) == ("bad", "created", "Created")
    res = cli("start", "bad", check=False)
    assert res.code == 126 and "permission denied" in one_line_error(res), res
    res = cli("start", "-a", "bad", check=False)
    assert res.code == 126 and "permission denied" in one_line_error(res), res
    assert "runc" not in cli("logs", "bad").out
    cli("rm", "bad")
    res = cli("run", "-d", "--rm", sample, "/etc", check=False)
    assert res.code == 126 and 'exec: "/etc": permission denied' in one_line_error(res), res
    assert ps(cli, "-a") == []


def test_start_of_a_container_whose_runtime_vanished(cli, sample):
    cli("create", "--name", "norunc", sample, "true")
    for args in (["start", "norunc"], ["start", "-a", "norunc"]):
        res = cli(*args, check=False, env={"LAYERFS_RUNTIME": "/nonexistent-runc"})
        assert res.code != 0, res
        one_line_error(res)
    [rec] = ps(cli, "-a")
    assert rec["state"] == "created"


def test_unknown_container(cli, sample):
    for verb in ("start", "stop", "rm", "logs", "diff", "commit"):
        res = cli(verb, "nonexistent", check=False)
        assert res.code == 1, (verb, res)
        assert "no such container" in one_line_error(res)


# -- 9. rmi of an image in use -----------------------------------------------------------------
def test_rmi_refuses_an_image_a_container_uses(cli, sample):
    image_id = cli("inspect", sample).json()[0]["Id"]
    cli("create", "--name", "user", sample)
    res = cli("rmi", sample, check=False)
    assert res.code == 1
    assert "user" in res.err
    assert [i["id"] for i in cli("images", "--json").json()] == [image_id]
    # the container still runs: its image is whole
    assert cli("start", "-a", "user").out == HELLO

    cli("rm", "user")
    cli("rmi", sample)
    assert cli("images", "--json").json() == []


# -- 10. bundle ---------------------------------------------------------------------------------
def _runc_run(tmp_path: Path, bundle: str, name: str) -> subprocess.CompletedProcess[str]:
    runc = shutil.which("runc")
    assert runc is not None
    root = str(tmp_path / "runc-root")
    try:
        return subprocess.run(
            [runc, "--root", root, "run", "--bundle", bundle, name],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run([runc, "--root", root, "delete", "--force", name], capture_output=True)


def test_bundle_runs_with_runc(cli, sample, tmp_path):
    bundle = str(tmp_path / "bundle")
    assert cli("bundle", sample, bundle).out == bundle + "\n"
    rootfs = os.path.join(bundle, "rootfs")
    try:
        assert mounted(rootfs)
        with open(os.path.join(bundle, "config.json")) as f:
            config = json.load(f)
        proc = config["process"]
        assert proc["args"] == ["/app/run.sh"]
        assert "PATH=/bin" in proc["env"]
        assert proc["cwd"] == "/app"
        assert proc["user"] == {"uid": 0, "gid": 0}
        assert config["root"]["path"] == "rootfs"
        res = _runc_run(tmp_path, bundle, "layerfs-bundle-test")
        assert (res.returncode, res.stdout) == (0, HELLO), res.stderr
        # the rootfs is writable, and the changes land in DIR/upper
        with open(os.path.join(rootfs, "written-by-host"), "w") as f:
            f.write("hi\n")
        assert os.path.exists(os.path.join(bundle, "upper", "written-by-host"))
    finally:
        cli("umount", rootfs, check=False)
    assert not mounted(rootfs)
    # the image is untouched
    assert (
        cli("run", "--rm", sample, "sh", "-c", "test -e /written-by-host && echo yes || echo no").out
        == "no\n"
    )


def test_bundle_with_command_and_options(cli, sample, tmp_path):
    bundle = str(tmp_path / "b2")
    cli("bundle", "-e", "GREETING=hi", "-w", "/srv", "-u", "nobody", "--hostname", "bhost", sample, bundle,
        "sh", "-c", 'echo "$GREETING $(pwd) $(uname -n) $(id -u)"')  # fmt: skip
    rootfs = os.path.join(bundle, "rootfs")
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            config = json.load(f)
        assert config["process"]["args"][:2] == ["sh", "-c"]
        assert config["process"]["cwd"] == "/srv"
        assert config["process"]["user"]["uid"] == 65534
        assert config["hostname"] == "bhost"
        res = _runc_run(tmp_path, bundle, "layerfs-bundle-test2")
        assert (res.returncode, res.stdout) == (0, "hi /srv bhost 65534\n"), res.stderr
        # a second bundle in the same place is refused, and the mount stays
        res2 = cli("bundle", sample, bundle, check=False)
        assert res2.code == 1
        one_line_error(res2)
        assert mounted(rootfs)
    finally:
        cli("umount", rootfs, check=False)
    assert not mounted(rootfs)


# -- 11. --rm -----------------------------------------------------------------------------------
def test_run_rm_removes_the_container(cli, sample, store_path):
    res = cli("run", "--rm", sample)
    assert (res.code, res.out) == (0, HELLO)
    assert ps(cli, "-a") == []

    res = cli("run", "--rm", sample, "sh", "-c", "echo bye; exit 3", check=False)
    assert (res.code, res.out) == (3, "bye\n")
    assert ps(cli, "-a") == []

    # a command the image does not have: docker's 127 and message; removed too
    for missing in ("/no/such/program", "no-such-program"):
        res = cli("run", "--rm", sample, missing, check=False)
        assert res.code == 127
        assert f'"{missing}": executable file not found' in one_line_error(res)
        assert ps(cli, "-a") == []
    assert os.listdir(os.path.join(store_path, "containers")) == []


# -- a hostile image, a host shared with other users ----------------------------------------------------
def hostile_image(cli, tmp_path: Path, name: str, extra: list, config: dict[str, Any]) -> str:
    with open("/bin/busybox", "rb") as f:
        busybox = f.read()
    members = [
        member("bin", kind=tarfile.DIRTYPE, mode=0o755),
        member("bin/busybox", busybox, mode=0o755),
        member("bin/sh", kind=tarfile.SYMTYPE, link="busybox"),
        member("bin/cat", kind=tarfile.SYMTYPE, link="busybox"),
        member("etc", kind=tarfile.DIRTYPE, mode=0o755),
        *extra,
    ]
    layout = make_layout(
        tmp_path / name,
        [tar_bytes(members)],
        ref=f"{name}:latest",
        config_extra={"config": {"Env": ["PATH=/bin"], **config}},
    )
    cli("import", layout)
    return f"{name}:latest"


def test_image_symlinks_never_reach_the_host(cli, tmp_path):
    host_dir = tmp_path / "hostdir"
    host_dir.mkdir()
    host_passwd = tmp_path / "hostpasswd"
    host_passwd.write_text("evil:x:4242:4343::/:/bin/sh\n")
    image = hostile_image(
        cli,
        tmp_path,
        "hostile",
        [
            member("esc", kind=tarfile.SYMTYPE, link=str(host_dir)),
            member("etc/passwd", kind=tarfile.SYMTYPE, link=str(host_passwd)),
            member("appreal", kind=tarfile.DIRTYPE, mode=0o755),
            member("appreal/run", b"#!/bin/sh\necho ran\n", mode=0o755),
            member("opt", kind=tarfile.DIRTYPE, mode=0o755),
            member("opt/app", kind=tarfile.SYMTYPE, link="/appreal"),
        ],
        {"Cmd": ["/opt/app/run"], "WorkingDir": "/esc/created-by-layerfs"},
    )
    # the working directory is made inside the image (the link resolved as in a chroot)
    res = cli("run", "--rm", image, check=False)
    assert (res.code, res.out) == (0, "ran\n"), res  # found through the image's own link
    assert os.listdir(host_dir) == []
    # /etc/passwd is read inside the image: the host's file it names is not
    res = cli("run", "--rm", "-u", "evil", image, "true", check=False)
    assert res.code == SETUP_FAILED and "unable to find user evil" in one_line_error(res)


def test_passwd_linked_to_a_device_is_not_read(cli, tmp_path):
    image = hostile_image(
        cli,
        tmp_path,
        "zero",
        [member("etc/passwd", kind=tarfile.SYMTYPE, link="/dev/zero")],
        {"Cmd": ["true"]},
    )
    res = cli("run", "--rm", "-u", "someone", image, "true", check=False)
    assert res.code == SETUP_FAILED and "unable to find user someone" in one_line_error(res)


def test_container_files_are_private_to_root(cli, sample, store_path):
    cid = cli("create", sample, "true").out.strip()
    for path in (os.path.join(store_path, "containers"), container_dir(store_path, cid)):
        assert os.stat(path).st_mode & 0o077 == 0, oct(os.stat(path).st_mode)


def test_network_host_without_raw_sockets_and_none(cli, sample):
    cap_eff = "sh -c 'grep CapEff /proc/self/status'"
    host = cli("run", "--rm", "--network", "host", sample, "sh", "-c", cap_eff.split("'")[1]).out.split()[1]
    none = cli("run", "--rm", "--network", "none", sample, "sh", "-c", cap_eff.split("'")[1]).out.split()[1]
    cap_net_raw = 1 << 13
    assert int(host, 16) & cap_net_raw == 0
    assert int(none, 16) & cap_net_raw
    assert cli("run", "--rm", "--network", "none", sample, "ls", "/sys/class/net").out.split() == ["lo"]


def test_commit_of_a_running_container_pauses_it(cli, sample, store_path):
    # (a rename: a pause between the truncate and the write of `echo $i > /count` would commit
    # an empty file, as docker commit would)
    script = "i=0; while true; do i=$((i+1)); echo $i > /count.new; mv /count.new /count; sleep 0.02; done"
    cid = cli("run", "-d", sample, "sh", "-c", script).out.strip()
    assert wait_until(lambda: "/count" in (line.split()[-1] for line in cli("diff", cid).out.splitlines()))
    image = cli("commit", cid, "snap:1").out.strip()
    assert image.startswith("sha256:")
    assert int(cli("run", "--rm", "snap:1", "cat", "/count").out) >= 1
    # resumed afterwards: still running, and still counting
    running = [c for c in ps(cli) if c["id"] == cid]
    assert running and running[0]["state"] == "running"
    count = Path(container_dir(store_path, cid)) / "upper" / "count"
    before = int(count.read_text() or 0)
    assert wait_until(lambda: int(count.read_text() or 0) > before + 2)


def test_concurrent_starts_run_one_container(cli, sample, store_path):
    cid = cli("create", sample, "sleep", "1000").out.strip()
    env = dict(os.environ, LAYERFS_STORE=store_path)
    procs = [
        subprocess.Popen([sys.executable, "-m", "layerfs", "start", cid], env=env, stdout=subprocess.PIPE)
        for _ in range(3)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    # one monitor won (its mount daemon, forked from it, shares its command line); the others
    # found the container locked and left
    rootfs = os.path.join(container_dir(store_path, cid), "rootfs")
    with open("/proc/mounts") as f:
        assert [line.split()[1] for line in f].count(rootfs) == 1
    listed = subprocess.run(
        ["runc", "--root", "/run/layerfs/runc", "list", "-q"], capture_output=True, text=True
    )
    assert listed.stdout.split().count(cid) == 1
    assert len(_processes_mentioning(f"monitor {store_path} {cid}")) == 2
    cli("stop", "-t", "0", cid)
    assert ps(cli, "-a")[0]["state"] == "exited"


# -- 12. terminals: -t, -it, -dit; -d --rm ----------------------------------------------------
def test_tty_without_a_terminal(cli_input, sample, store_path):
    """``-t`` gives the container a terminal even when ours is none (docker too): its output
    comes through it (``\\r\\n``), TERM is xterm unless set, the exit code passes through.
    ``-it`` needs a terminal on stdin: docker's message and 1."""

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        env = dict(os.environ, LAYERFS_STORE=store_path)
        cmd = [sys.executable, "-m", "layerfs", "run", "--rm", *args]
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=60)

    res = run("-t", sample, "sh", "-c", 'test -t 0 && test -t 1 && echo "tty $TERM"; exit 3')
    assert (res.returncode, res.stdout, res.stderr) == (3, b"tty xterm\r\n", b""), res
    res = run("-t", "-e", "TERM=vt100", sample, "sh", "-c", "echo $TERM")
    assert (res.returncode, res.stdout) == (0, b"vt100\r\n"), res
    res = run(sample, "sh", "-c", 'echo "${TERM-unset}"')
    assert res.stdout == b"unset\n"  # no TERM without -t
    res = cli_input("run", "--rm", "-it", sample, "true")
    assert res.code == 1
    assert one_line_error(res) == "layerfs: the input device is not a TTY"
    assert ps(cli_input, "-a") == []


def test_tty_output_on_a_terminal_has_no_stray_byte(store_path, sample):
    """On a terminal whose input already ended (``script`` types ^D then), ``-t`` without
    ``-i`` does not read our input: the session shows exactly the command's output."""
    code, out = run_in_pty(store_path, "run", "--rm", "-t", sample, "echo", "hi", typed=b"\x04")
    # the container's terminal writes "\r\n"; ours, not raw without -i (as docker leaves it),
    # adds its own "\r": a terminal shows the same
    assert (code, out) == (0, b"hi\r\r\n")
    code, out = run_in_pty(
        store_path, "run", "--rm", "-it", sample, "sh", "-c", "read x; echo got $x", typed=b"abc\r"
    )
    assert code == 0 and out.endswith(b"got abc\r\n"), out


def test_detached_tty_and_interactive_stay_up(cli, sample, store_path):
    """``-dit sh`` (and ``-dt``, ``-di``) wait for input that never comes, as with docker:
    the shell runs until stopped; its terminal's output (its prompt too) is in the log."""
    for flags in ("-dit", "-dt", "-di"):
        name = "shell" + flags
        cli("run", flags, "--name", name, sample, "sh", "-c", "echo started; exec sh")
        assert wait_until(lambda name=name: "started" in cli("logs", name).out, timeout=15)
        time.sleep(0.5)
        assert [c["state"] for c in ps(cli) if c["name"] == name] == ["running"], flags
        with open(os.path.join(container_dir(store_path, ps(cli)[0]["id"]), "container.log"), "rb") as f:
            log = f.read()
        if "t" in flags:  # an interactive shell on a terminal: its banner and prompt follow
            assert log.startswith(b"started\r\n") and b"/app # " in log, log
        else:
            assert log == b"started\n"
        cli("stop", "-t", "1", name)
        assert [c["state"] for c in ps(cli, "-a") if c["name"] == name] == ["exited"]


def test_detached_rm_removes_the_container_when_it_exits(cli, sample, store_path):
    cid = cli("run", "-d", "--rm", sample, "sh", "-c", "sleep 0.5").out.strip()
    assert len(cid) == 64
    assert wait_until(lambda: ps(cli, "-a") == [], timeout=15)
    assert not os.path.exists(container_dir(store_path, cid))
    # and when it is stopped
    cli("run", "-d", "--rm", "--name", "gone", sample, "sleep", "1000")
    assert [c["name"] for c in ps(cli)] == ["gone"]
    assert cli("stop", "-t", "0", "gone").out == "gone\n"
    assert wait_until(lambda: ps(cli, "-a") == [], timeout=15)
    assert os.listdir(os.path.join(store_path, "containers")) == []


# -- 13. whatever process dies, the container's state is the truth ------------------------------
def _state(store_path: str, cid: str) -> dict[str, Any]:
    with open(os.path.join(container_dir(store_path, cid), "container.json")) as f:
        state = json.load(f)["state"]
    assert isinstance(state, dict)
    return state


def _mount_daemon(cli: Callable[..., CLIResult], rootfs: str) -> int:
    """The pid of the daemon serving ``rootfs``."""
    mounts = cli("mounts", "--json").json()
    assert isinstance(mounts, list)
    for rec in mounts:
        if rec["mountpoint"] == os.path.realpath(rootfs):
            return int(rec["pid"])
    raise AssertionError(f"no mount daemon for {rootfs}")


def _kill9(pid: int) -> None:
    os.kill(pid, 9)
    assert wait_until(
        lambda: (
            not os.path.exists(f"/proc/{pid}")
            or open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
        )
    )


@pytest.mark.parametrize("victim", ["monitor", "foreground run", "mount daemon"])
def test_a_killed_process_leaves_the_truth(cli, sample, store_path, victim):
    """kill -9 of the process that waits for the container (a detached container's monitor, a
    foreground run) or of its mount daemon: ps shows what runc says (still running), stop
    stops it, rm -f removes it; nothing is left behind."""
    script = 'trap "exit 5" TERM; echo up; sleep 1000 & wait'
    env = dict(os.environ, LAYERFS_STORE=store_path)
    fg = None
    if victim == "foreground run":
        fg = subprocess.Popen(
            [sys.executable, "-m", "layerfs", "run", "--name", "c1", sample, "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert wait_until(lambda: ps(cli) and "init" in _state(store_path, ps(cli)[0]["id"]), timeout=15)
        cid = ps(cli)[0]["id"]
    else:
        cid = cli("run", "-d", "--name", "c1", sample, "sh", "-c", script).out.strip()
        assert wait_until(lambda: "up" in cli("logs", "c1").out, timeout=15)
    rootfs = os.path.join(container_dir(store_path, cid), "rootfs")
    pid = _mount_daemon(cli, rootfs) if victim == "mount daemon" else int(_state(store_path, cid)["pid"])
    _kill9(pid)
    if fg is not None:
        fg.wait(timeout=10)
        fg.stdout.close()  # type: ignore[union-attr]
        fg.stderr.close()  # type: ignore[union-attr]

    [rec] = ps(cli)  # runc still runs it: running, whoever died
    assert (rec["name"], rec["state"]) == ("c1", "running"), rec
    assert rec["status"].startswith("Up "), rec
    assert cli("stop", "-t", "5", "c1").out == "c1\n"
    [rec] = ps(cli, "-a")
    assert rec["state"] == "exited", rec
    assert rec["status"].startswith("Exited ("), rec
    assert "days" not in rec["status"], rec
    assert cid not in _runc_state()
    assert not mounted(rootfs)
    assert cli("rm", "c1").out == "c1\n"

    # rm -f of one whose monitor was killed; then one whose monitor was killed and that ended
    cid = cli("run", "-d", "--name", "c2", sample, "sleep", "1000").out.strip()
    _kill9(int(_state(store_path, cid)["pid"]))
    assert [c["state"] for c in ps(cli)] == ["running"]
    assert cli("rm", "-f", "c2").out == "c2\n"
    assert ps(cli, "-a") == []
    assert cid not in _runc_state()

    go = "while [ ! -e /tmp/go ]; do sleep 0.1; done; echo done"
    cid = cli("run", "-d", "--name", "c3", sample, "sh", "-c", go).out.strip()
    rootfs = os.path.join(container_dir(store_path, cid), "rootfs")
    _kill9(int(_state(store_path, cid)["pid"]))
    Path(rootfs, "tmp", "go").touch()
    assert wait_until(lambda: [c["state"] for c in ps(cli, "-a")] == ["exited"], timeout=15)
    assert "days" not in ps(cli, "-a")[0]["status"]
    assert not mounted(rootfs)
    assert cid not in _runc_state()
    assert cli("start", "-a", "c3").out == "done\n"  # it runs again


# -- 14. an image for another machine ----------------------------------------------------------
def test_image_of_another_architecture_warns_as_docker(cli, tmp_path):
    """An image whose config names another architecture: docker's warning, then the kernel's
    "exec format error" from the container and status 1, as with docker."""
    here, _ = userland_arch()  # the userland's, not the kernel's (32-bit Raspberry Pi OS: aarch64)
    arch, machine = ("arm64", 183) if here == "amd64" else ("amd64", 62)
    # an ELF header for that machine: the kernel refuses it with ENOEXEC.  Its EI_ABIVERSION is 1:
    # binfmt_misc's qemu-user handlers match 0 only, so where qemu-user-static is installed (the
    # emulated CI job installs it) none of them takes the header for an emulator to run
    elf = (
        b"\x7fELF\x02\x01\x01\x00\x01"
        + b"\0" * 7
        + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0x400000, 64, 0, 0, 64, 56, 0, 64, 0, 0)
    )
    layer = tar_bytes([member("bin", kind=tarfile.DIRTYPE, mode=0o755), member("bin/app", elf, mode=0o755)])
    layout = make_layout(
        tmp_path / "foreign",
        [layer],
        ref="foreign:latest",
        config_extra={"architecture": arch, "config": {"Cmd": ["/bin/app"]}},
    )
    cli("import", layout)
    res = cli("run", "--rm", "foreign:latest", check=False)
    warning, error = res.err.splitlines()
    assert warning.startswith(
        f"WARNING: The requested image's platform (linux/{arch}) does not match the detected host platform (linux/"
    ), warning
    assert warning.endswith(") and no specific platform was requested"), warning
    assert (res.code, error) == (1, "exec /bin/app: exec format error"), res
    res = cli("create", "foreign:latest")
    assert res.err.startswith("WARNING: The requested image's platform") and len(res.err.splitlines()) == 1
    if here == "amd64":  # what an amd64 machine runs: a lower level, 386
        for n, extra in enumerate(({"architecture": "amd64", "variant": "v2"}, {"architecture": "386"})):
            cfg = {**extra, "config": {"Cmd": ["/bin/app"]}}
            cli(
                "import", make_layout(tmp_path / f"here{n}", [layer], ref=f"here{n}:latest", config_extra=cfg)
            )
            assert cli("create", f"here{n}:latest").err == ""


# -- 15. signals to the client reach the container's process (docker's sig-proxy) ---------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 42), (signal.SIGTERM, 43), (signal.SIGHUP, 44)])
def test_signals_to_a_foreground_run_reach_the_container(sample, store_path, sig, code):
    """kill -INT (TERM, HUP) of ``layerfs run`` (foreground, no -t) is passed on to the
    container's process, as docker's sig-proxy does: its trap runs, its status is ours."""
    name = signal.Signals(sig).name[3:]
    script = f'trap "echo got {name}; exit {code}" {name}; echo ready; while true; do sleep 0.1; done'
    env = dict(os.environ, LAYERFS_STORE=store_path)
    fg = subprocess.Popen(
        [sys.executable, "-m", "layerfs", "run", "--rm", sample, "sh", "-c", script],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert fg.stdout is not None
        ready, _, _ = select.select([fg.stdout], [], [], 30)
        assert ready and fg.stdout.readline() == b"ready\n"
        fg.send_signal(sig)
        out, err = fg.communicate(timeout=30)
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()
    assert (fg.returncode, out, err) == (code, f"got {name}\n".encode(), b"")


def test_ctrl_c_on_the_terminal_reaches_the_container(store_path, sample):
    """^C on the terminal of a foreground run (no -t): the container's process is in a session
    of its own, so only layerfs gets the SIGINT, and passes it on."""
    script = 'trap "echo got INT; exit 42" INT; echo ready; while true; do sleep 0.1; done'
    code, out = run_in_pty(store_path, "run", "--rm", sample, "sh", "-c", script, then=(b"ready", b"\x03"))
    assert code == 42, out
    assert out.endswith(b"got INT\r\n"), out


# -- 16. docker's capabilities, seccomp profile, --privileged, --cap-add/--cap-drop -------------
DOCKER_CAPS = 0xA80425FB  # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
# NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP: docker's default set
CAP_NET_RAW = 1 << 13


def _status(cli: Callable[..., CLIResult], sample: str, *opts: str) -> dict[str, int]:
    out = cli(
        "run", "--rm", *opts, sample, "grep", "-E", "^(Cap|Seccomp|NoNewPrivs)", "/proc/self/status"
    ).out
    return {
        k: int(v.strip(), 16 if k.startswith("Cap") else 10)
        for k, v in (line.split(":") for line in out.splitlines())
    }


def test_docker_capabilities_and_seccomp_profile(cli, sample):
    st = _status(cli, sample, "--network", "none")
    assert (st["CapBnd"], st["CapPrm"], st["CapEff"], st["CapInh"], st["CapAmb"]) == (
        DOCKER_CAPS,
        DOCKER_CAPS,
        DOCKER_CAPS,
        0,
        0,
    )
    assert (st["Seccomp"], st["NoNewPrivs"]) == (2, 0)  # a filter; no_new_privs only when asked, as docker
    assert _status(cli, sample)["CapBnd"] == DOCKER_CAPS  # the default network: the container's own
    host = _status(cli, sample, "--network", "host")["CapBnd"]
    assert host == DOCKER_CAPS & ~CAP_NET_RAW  # the host network: no raw sockets
    st = _status(cli, sample, "-u", "nobody")  # not root: nothing effective (the kernel clears it at exec)
    assert (st["CapBnd"], st["CapEff"], st["CapPrm"]) == (DOCKER_CAPS, 0, 0)

    # refused by the profile: a user namespace (no capability needed without it), mounts, setns
    for cmd in ("busybox unshare -U true", "busybox unshare -m true", "busybox mount -t tmpfs none /tmp"):
        res = cli("run", "--rm", sample, "sh", "-c", cmd, check=False)
        assert res.code != 0 and ("Operation not permitted" in res.err or "permission denied" in res.err), (
            cmd,
            res,
        )
    res = cli("run", "--rm", sample, "sh", "-c", "busybox nsenter -t 1 -n true", check=False)
    assert res.code != 0
    # what programs do still works: a pipeline, subshells, the 32-bit persona, files, signals
    script = "busybox linux32 uname -m; (echo a; echo b) | wc -l; mkdir -p /tmp/x && echo y > /tmp/x/f && cat /tmp/x/f; sleep 5 & kill $!; wait $!; echo $?"
    assert cli("run", "--rm", sample, "sh", "-c", script).out.split() == ["i686", "2", "y", "143"]

    # seccomp=unconfined: the user namespace is made; --privileged: every capability we have
    assert (
        cli(
            "run", "--rm", "--security-opt", "seccomp=unconfined", sample, "busybox", "unshare", "-U", "true"
        ).code
        == 0
    )
    with open("/proc/self/status") as f:
        ours = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    st = _status(cli, sample, "--privileged")
    assert (st["CapBnd"], st["CapEff"], st["Seccomp"]) == (ours, ours, 0)
    res = cli(
        "run",
        "--rm",
        "--privileged",
        sample,
        "sh",
        "-c",
        "busybox mount -t tmpfs none /tmp && busybox unshare -U -m true",
    )
    assert res.code == 0
    # --cap-add SYS_ADMIN gives back the calls it governs (mount, unshare), as docker's profile
    res = cli(
        "run",
        "--rm",
        "--cap-add",
        "SYS_ADMIN",
        sample,
        "sh",
        "-c",
        "busybox mount -t tmpfs none /tmp && busybox unshare -m true && echo ok",
    )
    assert res.out == "ok\n", res
    assert _status(cli, sample, "--cap-drop", "ALL", "--cap-add", "chown")["CapBnd"] == 1
    dropped = _status(
        cli, sample, "--network", "none", "--cap-drop", "KILL", "--cap-drop", "cap_net_bind_service"
    )
    assert dropped["CapBnd"] == DOCKER_CAPS & ~(1 << 5) & ~(1 << 10)
    assert _status(cli, sample, "--network", "host", "--cap-add", "NET_RAW")["CapBnd"] == DOCKER_CAPS
    assert _status(cli, sample, "--security-opt", "no-new-privileges")["NoNewPrivs"] == 1

    for bad in (["--cap-add", "BOGUS"], ["--cap-drop", "nope"], ["--security-opt", "apparmor=x"]):
        res = cli("run", "--rm", *bad, sample, "true", check=False)
        assert res.code == SETUP_FAILED, (bad, res)
        one_line_error(res)
    assert ps(cli, "-a") == []


# -- 17. the default network: a namespace of its own, connected by pasta -------------------------
def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _netns_of_container(cid: str) -> str:
    return "/run/netns/layerfs-" + cid[:12]


@pytest.mark.skipif(shutil.which("pasta") is None, reason="pasta is not installed (apt install passt)")
def test_default_network_is_the_containers_own(cli, cli_input, sample, store_path):
    ours = os.readlink("/proc/self/ns/net")
    script = "busybox readlink /proc/self/ns/net; ls /sys/class/net"
    own, *links = cli_input("run", "--rm", sample, "sh", "-c", script).out.split()
    assert own != ours and "lo" in links and len(links) == 2, (own, links)  # loopback and pasta's link
    res = cli_input("run", "--rm", "--network", "host", sample, "busybox", "readlink", "/proc/self/ns/net")
    assert res.out.strip() == ours
    assert cli_input("run", "--rm", "--network", "none", sample, "ls", "/sys/class/net").out.split() == ["lo"]

    # out: the gateway leads to the host (a service on its loopback answers).  The client keeps
    # its side open until the answer is in: Debian 12's pasta loses the answer to a connection
    # the container half-closes at once (echo ping | nc)
    port = _free_port()
    server = socket.create_server(("127.0.0.1", port))

    def answer() -> None:
        conn = server.accept()[0]
        conn.recv(100)
        conn.sendall(b"pong\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    gateway = 'gw=$(busybox ip route | busybox awk "/default/ {print \\$3}")'
    res = cli_input(
        "run", "--rm", sample, "sh", "-c", f"{gateway}; (echo ping; sleep 3) | busybox nc -w 5 $gw {port}"
    )
    server.close()
    assert res.out == "pong\n", res

    # in: -p HOST:CONTAINER (and IP:HOST:CONTAINER/udp) published on the host
    tcp, udp = _free_port(), _free_port(socket.SOCK_DGRAM)
    serve = 'busybox nc -l -p 80 -e echo "hello from the container"; exec sleep 1000'
    cid = cli(
        "run", "-d", "-p", f"{tcp}:80", "-p", f"127.0.0.1:{udp}:81/udp", sample, "sh", "-c", serve
    ).out.strip()
    assert os.path.exists(_netns_of_container(cid))

    def fetch() -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", tcp), timeout=2) as c:
                return c.recv(100)
        except OSError:
            return b""

    got: list[bytes] = []
    assert wait_until(lambda: got.append(fetch()) or got[-1] == b"hello from the container\n", timeout=15), (
        got
    )
    # the UDP port reaches the container's namespace (busybox's nc has no UDP: a listener of ours there)
    listener = subprocess.Popen(
        ["ip", "netns", "exec", os.path.basename(_netns_of_container(cid)), sys.executable, "-c",
         "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 81)); "
         "print('ready', flush=True); print(s.recvfrom(100)[0].decode(), flush=True)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "ready\n"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(b"datagram", ("127.0.0.1", udp))
        assert listener.communicate(timeout=10)[0] == "datagram\n"
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    cli("stop", "-t", "0", cid)
    # taken down with the container: the namespace and pasta (its pid file is in the container's dir)
    assert not os.path.exists(_netns_of_container(cid))
    assert not os.path.exists(os.path.join(container_dir(store_path, cid), "pasta.pid"))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tcp), timeout=2).close()

    # -p with the host network: docker's warning; a bad specification: refused
    res = cli("run", "--rm", "--network", "host", "-p", "1:2", sample, "true")
    assert res.err == "WARNING: Published ports are discarded when using host network mode\n"
    for bad in ("80", "1:99999", "a:b", "1:2/sctp", "nohost:1:2"):
        res = cli("run", "--rm", "-p", bad, sample, "true", check=False)
        assert res.code == SETUP_FAILED and "invalid port specification" in one_line_error(res), (bad, res)


@pytest.mark.skipif(shutil.which("pasta") is None, reason="pasta is not installed (apt install passt)")
def test_default_network_resolv_conf(cli, tmp_path):
    """An image with /etc/resolv.conf sees the host's nameservers there (as docker writes it,
    without those on the host's loopback); it is no change of the container."""
    image = hostile_image(
        cli, tmp_path, "withresolv", [member("etc/resolv.conf", b"nameserver 192.0.2.99\n")], {}
    )
    cli("run", "--name", "dns", image, "cat", "/etc/resolv.conf")
    from layerfs.containers.network import resolv_conf

    assert cli("start", "-a", "dns").out == resolv_conf()
    assert "nameserver 127." not in resolv_conf()
    assert cli("diff", "dns").out == ""
    assert (
        cli("run", "--rm", "--network", "host", image, "cat", "/etc/resolv.conf").out
        == "nameserver 192.0.2.99\n"
    )
