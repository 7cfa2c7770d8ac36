"""procfs: a process named by pid, start time and boot id is found again, and only that one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from layerfs import procfs

BOOT = "5d2c3a4e-0000-4000-8000-000000000001"


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """/proc as a table: pid -> start time; this boot is BOOT."""
    table: dict[int, int] = {}
    monkeypatch.setattr(procfs, "start_time", table.get)
    monkeypatch.setattr(procfs, "boot_id", lambda: BOOT)
    return table


# (start time the process recorded, start time /proc shows now, alive?)
CASES = [
    (4711, 4711, True),
    (4711, 4712, False),  # the pid now belongs to a process that started later: pid reuse
    (4712, 4711, False),
]


@pytest.mark.parametrize("start, now, alive", CASES)
def test_the_start_time_must_match(recorded, start, now, alive):
    recorded[1234] = now
    assert procfs.is_alive({"pid": 1234, "start": start, "boot": BOOT}) is alive
    assert procfs.alive(1234, start) is alive


def test_another_boot_or_no_process_is_dead(recorded):
    recorded[1234] = 4711
    assert not procfs.is_alive({"pid": 1234, "start": 4711, "boot": "another boot"})
    assert not procfs.is_alive({"pid": 99, "start": 4711, "boot": BOOT})  # gone
    assert not procfs.is_alive({"pid": 1234, "start": None, "boot": BOOT})  # never known
    assert procfs.alive(1234)  # no start time asked: the pid runs


def _judged_by_another_process(record: dict[str, object]) -> bool:
    code = "import json, sys; from layerfs import procfs; print(procfs.is_alive(json.loads(sys.argv[1])))"
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(record)], capture_output=True, text=True, check=True
    ).stdout
    return out.strip() == "True"


def test_a_record_of_this_process_is_alive_in_another():
    """What gc does: another process judges this one's lease.  Under qemu-user (the emulated CI
    job) this process's own /proc/self/stat says a start a few ticks after the kernel's."""
    me = procfs.identity(os.getpid())
    assert _judged_by_another_process(me), me


def test_a_forked_childs_record_is_alive_in_another():
    """A daemon forks without exec and records itself; under qemu-user the child's own
    /proc/self/stat gives its parent's start time.  Once it is gone, the record is dead."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    time.sleep(0.05)  # the child starts some ticks after this process
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(hold_w)
            os.write(ready_w, json.dumps(procfs.identity(os.getpid())).encode())
            os.read(hold_r, 1)  # until the parent closes its end
        finally:
            os._exit(0)
    os.close(hold_r)
    try:
        child = json.loads(os.read(ready_r, 4096))
        assert child["pid"] == pid
        assert _judged_by_another_process(child), child
    finally:
        os.close(hold_w)
        os.waitpid(pid, 0)
    assert not _judged_by_another_process(child)


def test_a_process_whose_first_thread_ended_is_alive_until_its_last_ends():
    """/proc/PID/stat shows the first thread: a zombie once it has ended, while the process's
    other threads still run (a killed daemon's do for a moment, and its /dev/fuse stays open
    until the last is gone).  Only then is the process dead."""
    code = (
        "import ctypes, sys, threading\n"
        "threading.Thread(target=sys.stdin.read).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        else:
            pytest.fail("the first thread did not end")
        assert procfs.alive(proc.pid)
        proc.stdin.close()  # the other thread's read ends, and with it the process
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert not procfs.alive(proc.pid)
