"""Parallel downloads and the progress display: layers download at once (docker's three by
default), with one display (a bar per layer and a total) on a terminal and none otherwise."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from typing import Any

import pytest
from test_registry_faults import FAST, Image, MisbehavingRegistry, make_image, pull, sha


@pytest.fixture
def image() -> Image:
    return make_image(n=4, size=400_000, seed="par")


@pytest.fixture
def slow(image: Image) -> Iterator[MisbehavingRegistry]:
    server = MisbehavingRegistry(image)
    server.faults.slow = 0.02
    yield server
    server.stop()


def test_layers_download_in_parallel(slow: MisbehavingRegistry, image: Image, cli: Any) -> None:
    res = pull(cli, slow)
    assert res.code == 0, res.err
    assert res.json()["layers_new"] == 4
    assert slow.max_active == 3  # LAYERFS_PULL_JOBS, docker's max-concurrent-downloads
    assert cli("verify").code == 0


def test_one_at_a_time_when_asked(slow: MisbehavingRegistry, cli: Any) -> None:
    res = pull(cli, slow, env={"LAYERFS_PULL_JOBS": "1"})
    assert res.code == 0, res.err
    assert slow.max_active == 1


def test_progress_on_a_terminal_only(
    slow: MisbehavingRegistry, image: Image, store_path: str, cli: Any
) -> None:
    ref = f"{slow.host}/{slow.repo}:1"
    env = dict(os.environ, LAYERFS_STORE=store_path, COLUMNS="120", **FAST)
    master, tty = pty.openpty()
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerfs", "pull", "--tls-verify=false", ref],
        stdout=subprocess.PIPE,
        stderr=tty,
        env=env,
    )
    os.close(tty)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        shown += data
    out, _ = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 0
    text = shown.decode(errors="replace")
    assert "total" in text
    assert all(sha(b)[7:19] in text for b in image.layers), text[-2000:]
    assert b"Status: Downloaded newer image for" in out
    # not a terminal: no display, only the summary line
    cli("rmi", ref)
    res = cli("pull", "--tls-verify=false", ref, env=FAST)
    assert res.err.count("\n") == 1 and "new layers" in res.err
