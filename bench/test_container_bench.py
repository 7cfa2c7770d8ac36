"""Containers: start latency against runc on a plain directory, commit throughput against umoci.

Start latency (``true`` in the sample image), each in the same run:

* ``runc``: ``runc run`` of a bundle whose rootfs is the image extracted to a plain
  directory (the floor: no union filesystem, no layerfs process);
* ``layerfs start -a``: an existing container: mount its image with its upper
  directory, write the bundle, ``runc run``, unmount (what a container restart costs);
* ``layerfs run --rm``: all of it, plus creating and removing the container (a
  ``docker run --rm``), including the CLI's interpreter start.

Commit of a container that wrote 100 MB (100 files of 1 MiB, half incompressible, half
text-like), each round in a fresh store so nothing is deduplicated away:

* ``layerfs commit``: scan the upper directory, write the layer tar, import it (hash,
  zstd, LMDB), record the image;
* ``umoci repack``: the same 100 MB added to an ``umoci unpack``'ed bundle; it walks the
  rootfs against its mtree and writes a gzip'd layer (the peer doing the same job);
* ``tar | sha256``: ``tar -c`` of the upper directory into SHA-256 (the floor: read and
  hash the bytes once, store nothing).

Run: ``python -m pytest bench/test_container_bench.py --benchmark-enable``; the summary at
the end has the times and the ratios.  Nothing asserts a time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("runc") is None or shutil.which("umoci") is None or not os.path.exists("/dev/fuse"),
    reason="runc, umoci and FUSE are needed",
)

ROUNDS = int(os.environ.get("LAYERFS_CONTAINER_ROUNDS", "10"))
COMMIT_ROUNDS = 3
COMMIT_FILES, FILE_SIZE = 100, 1 << 20
RESULTS: dict[str, dict[str, list[float]]] = {}
LABELS = {"start": "start + run true + exit", "commit": "commit 100 MB written by a container"}


def _best(times: list[float]) -> float:
    return min(times)


class _Summary:
    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not RESULTS:
            return
        tr = terminalreporter
        tr.write_sep("=", "containers: layerfs vs runc / umoci (this run, best of rounds, wall seconds)")
        for row, res in RESULTS.items():
            tr.write_line(LABELS[row])
            base_name, base = next(iter(res.items()))  # the first peer of a row is the reference
            for peer, times in res.items():
                ratio = f"  {_best(times) / _best(base):6.2f} x {base_name}"
                med = sorted(times)[len(times) // 2]
                tr.write_line(f"  {peer:<22} {_best(times):8.3f} s [median {med:.3f}]{ratio}")


@pytest.fixture(scope="module")
def env(workdir: str, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    pm = request.config.pluginmanager
    if not pm.has_plugin("layerfs-container-summary"):
        pm.register(_Summary(), "layerfs-container-summary")
    busybox = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)
    if busybox is None:
        pytest.skip("busybox-static is needed for the sample image")
    from layerfs.tools.sample import write_layout

    base = os.path.join(workdir, "containers")
    os.makedirs(base, exist_ok=True)
    layout = os.path.join(base, "sample")
    write_layout(layout, busybox)
    e = {"base": base, "layout": layout, "store": os.path.join(base, "store")}
    _layerfs(e["store"], "import", "-q", layout)
    yield e
    left = _layerfs(e["store"], "ps", "-aq").split()
    if left:
        _layerfs(e["store"], "rm", "-f", *left)


def _layerfs(store: str, *args: str) -> str:
    # with the bytecode cache, as installed copies run: some sandboxes set PYTHONDONTWRITEBYTECODE,
    # and compiling every module again costs about 45 ms of each start
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    res = subprocess.run(
        [sys.executable, "-m", "layerfs", *args],
        capture_output=True,
        text=True,
        env=dict(env, LAYERFS_STORE=store),
    )
    assert res.returncode == 0, f"layerfs {' '.join(args)}: {res.stderr}"
    return res.stdout


def _rounds(fn: Callable[[], None], n: int, setup: Callable[[], None] | None = None) -> list[float]:
    times = []
    for _ in range(n):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _measure(
    benchmark: Any,
    row: str,
    peer: str,
    fn: Callable[[], None],
    rounds: int,
    setup: Callable[[], None] | None = None,
) -> None:
    """The layerfs row through pytest-benchmark (its JSON, its table); the peers' rows are timed
    the same way by ``_rounds`` and carried in ``extra_info``."""
    times: list[float] = []

    def timed() -> None:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, setup=setup, rounds=rounds if not getattr(benchmark, "disabled", False) else 1)
    RESULTS.setdefault(row, {})[peer] = times
    benchmark.extra_info.update(
        {"row": row, "rounds_s": {p: t for p, t in RESULTS[row].items()}}
        | {f"{peer}/{p}": min(times) / min(t) for p, t in RESULTS[row].items() if p != peer}
    )


def test_start_latency(benchmark: Any, env: dict[str, str]) -> None:
    store, base = env["store"], env["base"]
    # the floor: the same rootfs as a plain directory, the same config.json
    bundle = os.path.join(base, "bundle")
    _layerfs(store, "bundle", "layerfs-sample", bundle, "true")
    plain = os.path.join(base, "plain")
    shutil.rmtree(plain, ignore_errors=True)
    os.makedirs(plain)
    subprocess.run(["cp", "-a", os.path.join(bundle, "rootfs"), os.path.join(plain, "rootfs")], check=True)
    _layerfs(store, "umount", os.path.join(bundle, "rootfs"))
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(plain, "config.json"), "w") as f:
        json.dump(config, f)
    root = os.path.join(base, "runc-root")

    def runc() -> None:
        subprocess.run(["runc", "--root", root, "run", "--bundle", plain, "bench-plain"], check=True)

    cid = _layerfs(store, "create", "--name", "bench-start", "layerfs-sample", "true").strip()

    def start() -> None:
        _layerfs(store, "start", "-a", cid)

    def run_rm() -> None:
        _layerfs(store, "run", "--rm", "layerfs-sample", "true")

    for peer, fn in (("runc", runc), ("layerfs start -a", start)):
        fn()  # warm: page cache, index, interpreter files
        RESULTS.setdefault("start", {})[peer] = _rounds(fn, ROUNDS)
    run_rm()
    _measure(benchmark, "start", "layerfs run --rm", run_rm, ROUNDS)


def _write_payload(root: str) -> None:
    """100 MiB in 100 files: odd files random, even files repetitive text (compressible)."""
    d = os.path.join(root, "data")
    os.makedirs(d, exist_ok=True)
    text = b"".join(b"line %d of a log a container wrote, with some words in it\n" % i for i in range(20000))
    for i in range(COMMIT_FILES):
        data = os.urandom(FILE_SIZE) if i % 2 else (text * (FILE_SIZE // len(text) + 1))[:FILE_SIZE]
        with open(os.path.join(d, f"f{i:03d}"), "wb") as f:
            f.write(data)


def test_commit_throughput(benchmark: Any, env: dict[str, str]) -> None:
    base = env["base"]
    state: dict[str, str] = {}
    counter = iter(range(1000))

    def fresh_container() -> None:
        n = next(counter)
        store = os.path.join(base, f"commit-store-{n}")
        _layerfs(store, "import", "-q", env["layout"])
        cid = _layerfs(store, "create", "layerfs-sample", "true").strip()
        upper = os.path.join(store, "containers", cid, "upper")
        _write_payload(upper)
        os.sync()
        state.update(store=store, upper=upper, cid=cid)

    def commit() -> None:
        _layerfs(state["store"], "commit", state["cid"], "bench:commit")

    def fresh_umoci() -> None:
        n = next(counter)
        bundle = os.path.join(base, f"umoci-{n}")
        layout = os.path.join(base, f"umoci-layout-{n}")
        shutil.copytree(env["layout"], layout)
        subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:latest", bundle],
            check=True,
            capture_output=True,
        )
        _write_payload(os.path.join(bundle, "rootfs"))
        os.sync()
        state.update(bundle=bundle, layout=layout)

    def repack() -> None:
        subprocess.run(
            ["umoci", "repack", "--image", f"{state['layout']}:latest", state["bundle"]],
            check=True,
            capture_output=True,
        )

    def floor() -> None:
        subprocess.run(f"tar -C {state['upper']} -cf - . | sha256sum >/dev/null", shell=True, check=True)

    RESULTS["commit"] = {"umoci repack": _rounds(repack, COMMIT_ROUNDS, fresh_umoci)}
    fresh_container()
    RESULTS["commit"]["tar | sha256 (floor)"] = _rounds(floor, COMMIT_ROUNDS)
    _measure(benchmark, "commit", "layerfs commit", commit, COMMIT_ROUNDS, fresh_container)
