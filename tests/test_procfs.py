"""procfs: a process named by pid, start time and boot id is found again, and only that one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    # qemu-user: an emulated process reads its own start time as qemu's start-up saw the clock,
    # later than the kernel's (recorded on armhf under qemu 7.2: own view, another's view)
    (3308654, 3308653, True),
    (3308552, 3308548, True),  # the machine was busy
    # the pid now belongs to a process that started after the recorded one: pid reuse
    (4711, 4712, False),
    (4711, 4811, False),
    # a record claiming a start far later than the process's: not that process
    (4711 + procfs.START_SLACK + 1, 4711, False),
]


@pytest.mark.parametrize("start, now, alive", CASES)
def test_a_recorded_start_may_be_later_never_earlier(recorded, start, now, alive):
    recorded[1234] = now
    assert procfs.is_alive({"pid": 1234, "start": start, "boot": BOOT}) is alive
    assert procfs.alive(1234, start) is alive


def test_another_boot_or_no_process_is_dead(recorded):
    recorded[1234] = 4711
    assert not procfs.is_alive({"pid": 1234, "start": 4711, "boot": "another boot"})
    assert not procfs.is_alive({"pid": 99, "start": 4711, "boot": BOOT})  # gone
    assert not procfs.is_alive({"pid": 1234, "start": None, "boot": BOOT})  # never known
    assert procfs.alive(1234)  # no start time asked: the pid runs


def test_a_record_of_this_process_is_alive_in_another():
    """What gc does: another process judges this one's lease.  Under qemu-user (the emulated CI
    job) this process's own /proc/self/stat differs by a tick from what the other one reads."""
    me = procfs.identity(os.getpid())
    code = "import json, sys; from layerfs import procfs; print(procfs.is_alive(json.loads(sys.argv[1])))"
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(me)], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "True", me
