"""Pull from a local registry against podman pull and skopeo copy, in the same run.

The generated bench image A (and B, which shares all but one layer with A; layers that name a
path twice are rewritten once, since podman refuses them) is put into the real registry server (``docker-registry`` on 127.0.0.1, plain HTTP) by skopeo; then each round pulls A
from nothing:

* ``layerfs pull`` (the CLI, a fresh store each round): download, decompress, parse, index every
  file, store;
* ``podman pull`` (overlay driver, a fresh storage root each round): download, decompress, unpack
  the layers into overlay directories;
* ``skopeo copy docker://... oci:DIR`` (a fresh directory each round): download the blobs.

Targets (issue 13): layerfs <= 0.6 x podman, <= 0.8 x skopeo.  They are reported at the end of
the module (``test_registry_ratios``) and kept in ``extra_info``, never asserted.  What is asserted:
a pull of B into a store that has A downloads exactly B's one new layer blob (and its config).

Run: ``python -m pytest bench/test_registry_bench.py -q --benchmark-enable`` (LAYERFS_BENCH_SCALE
as for the other suites).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from benchlib import timing
from imagegen import GeneratedImage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from registryutil import REGISTRY_BIN, RegistryServer  # noqa: E402

ROUNDS = 3
TARGET_VS_PODMAN = 0.6
TARGET_VS_SKOPEO = 0.8
_counter = itertools.count()
_results: dict[str, Any] = {}

pytestmark = pytest.mark.skipif(
    REGISTRY_BIN is None or shutil.which("skopeo") is None,
    reason="docker-registry and skopeo are needed (.ci/install installs them)",
)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return p.stdout


def _without_duplicates(src: str, dst: Path, tag: str) -> str:
    """``src`` with every layer that names a path twice rewritten to name it once (the last
    member wins, as importers apply it): podman refuses such layers ("duplicates of file paths
    not supported"), and the generator makes some.  Other layers are kept byte for byte."""
    blobs = Path(src) / "blobs/sha256"
    index = json.loads((Path(src) / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_bytes())
    (dst / "blobs/sha256").mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (dst / "blobs/sha256" / digest).write_bytes(data)
        return "sha256:" + digest

    for i, desc in enumerate(manifest["layers"]):
        blob = (blobs / desc["digest"][7:]).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as t:
            members = t.getmembers()
            last = {m.name.lstrip("./"): m for m in members}
            if len(last) == len(members):
                put(blob)
                continue
            out = io.BytesIO()
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as w:
                for m in members:
                    if last[m.name.lstrip("./")] is m:
                        w.addfile(m, t.extractfile(m) if m.isfile() else None)
        raw = out.getvalue()
        config["rootfs"]["diff_ids"][i] = "sha256:" + hashlib.sha256(raw).hexdigest()
        data = gzip.compress(raw, compresslevel=6, mtime=0)
        desc.update(digest=put(data), size=len(data))
    cfg = json.dumps(config).encode()
    manifest["config"].update(digest=put(cfg), size=len(cfg))
    body = json.dumps(manifest).encode()
    top = {"mediaType": manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json"), "digest": put(body),
           "size": len(body), "annotations": {"org.opencontainers.image.ref.name": tag}}  # fmt: skip
    (dst / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    (dst / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return str(dst)


@pytest.fixture(scope="module")
def served(bench_image: GeneratedImage, workdir: str) -> Iterator[tuple[RegistryServer, str, str]]:
    server = RegistryServer(Path(workdir) / "registry")
    try:
        refs = []
        for name, layout in (("a", bench_image.layout_a), ("b", bench_image.layout_b)):
            clean = _without_duplicates(layout, Path(workdir) / f"layout-{name}", bench_image.tag)
            ref = f"{server.host}/bench/{name}:latest"
            _run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                  f"oci:{clean}:{bench_image.tag}", f"docker://{ref}"])  # fmt: skip
            refs.append(ref)
        yield server, refs[0], refs[1]
    finally:
        server.stop()


def _fresh(workdir: str, what: str) -> tuple[tuple[str], dict[str, Any]]:
    path = os.path.join(workdir, f"{what}-{next(_counter)}")
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    return (path,), {}


def _layerfs(store: str, *args: str) -> str:
    env = dict(os.environ, LAYERFS_STORE=store)
    return _run([sys.executable, "-m", "layerfs", *args], env=env)


def _record(key: str, benchmark: Any) -> None:
    _results[key] = timing(benchmark)


@pytest.mark.benchmark(group="registry pull image-a")
def test_pull_layerfs(benchmark: Any, served: tuple[RegistryServer, str, str], workdir: str) -> None:
    _, ref_a, _ = served

    def pull(store: str) -> None:
        _layerfs(store, "pull", "--tls-verify=false", "-q", ref_a)
        shutil.rmtree(store, ignore_errors=True)

    benchmark.pedantic(pull, setup=lambda: _fresh(workdir, "store"), rounds=ROUNDS, iterations=1)
    _record("layerfs", benchmark)


@pytest.mark.benchmark(group="registry pull image-a")
def test_pull_podman(benchmark: Any, served: tuple[RegistryServer, str, str], workdir: str) -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    _, ref_a, _ = served

    def podman(root: str, *args: str) -> list[str]:
        return ["podman", "--root", f"{root}/root", "--runroot", f"{root}/run", "--storage-driver", "overlay",
                "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args]  # fmt: skip

    def pull(root: str) -> None:
        _run(podman(root, "pull", "-q", "--tls-verify=false", ref_a))

    def setup() -> tuple[tuple[str], dict[str, Any]]:
        return _fresh(workdir, "podman")

    roots: list[str] = []

    def timed(root: str) -> None:
        roots.append(root)
        pull(root)

    try:
        benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        for root in roots:
            subprocess.run(podman(root, "rmi", "-af"), capture_output=True)
            shutil.rmtree(root, ignore_errors=True)
    _record("podman", benchmark)


@pytest.mark.benchmark(group="registry pull image-a")
def test_copy_skopeo(benchmark: Any, served: tuple[RegistryServer, str, str], workdir: str) -> None:
    _, ref_a, _ = served

    def copy(path: str) -> None:
        _run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
              f"docker://{ref_a}", f"oci:{path}:latest"])  # fmt: skip
        shutil.rmtree(path, ignore_errors=True)

    benchmark.pedantic(copy, setup=lambda: _fresh(workdir, "skopeo"), rounds=ROUNDS, iterations=1)
    _record("skopeo", benchmark)


def test_pull_of_a_near_image_moves_one_layer(
    served: tuple[RegistryServer, str, str], bench_image: GeneratedImage, workdir: str
) -> None:
    server, ref_a, ref_b = served
    store = _fresh(workdir, "incr")[0][0]
    _layerfs(store, "pull", "--tls-verify=false", "-q", ref_a)
    mark = server.mark()
    res = json.loads(_layerfs(store, "pull", "--tls-verify=false", "--json", ref_b))
    manifest = json.loads(_run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref_b}"]))
    a_manifest = json.loads(_run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref_a}"]))
    a_digests = {layer["digest"] for layer in a_manifest["layers"]}
    new = [d for d in manifest["layers"] if d["digest"] not in a_digests]
    assert len(new) == 1
    assert res["layers_new"] == 1 and res["bytes_downloaded"] == new[0]["size"]
    got = sorted(p for m, p, s in server.requests(mark) if m == "GET" and "/blobs/" in p)
    assert got == sorted(
        [f"/v2/bench/b/blobs/{manifest['config']['digest']}", f"/v2/bench/b/blobs/{new[0]['digest']}"]
    )
    _results["incremental"] = {
        "bytes": res["bytes_downloaded"],
        "image_bytes": sum(d["size"] for d in manifest["layers"]),
    }
    shutil.rmtree(store, ignore_errors=True)


def test_registry_ratios(bench_image: GeneratedImage, capsys: pytest.CaptureFixture[str]) -> None:
    """The figures of this module, printed (with -s or not) and kept for the run's JSON output."""
    lines = [f"registry pull of image-a ({bench_image.describe()})"]
    lf = _results.get("layerfs")
    for key, label in (
        ("layerfs", "layerfs pull"),
        ("podman", "podman pull (overlay)"),
        ("skopeo", "skopeo copy to oci:"),
    ):
        t = _results.get(key)
        lines.append(
            f"  {label:<24} " + (f"{t['min']:.3f} s best, {t['median']:.3f} s median" if t else "not timed")
        )
    for key, target in (("podman", TARGET_VS_PODMAN), ("skopeo", TARGET_VS_SKOPEO)):
        t = _results.get(key)
        if lf and t:
            r, rm = lf["min"] / t["min"], lf["median"] / t["median"]
            lines.append(
                f"  layerfs / {key} = {r:.2f} best, {rm:.2f} median (target <= {target}: {'MET' if r <= target else 'NOT MET'})"
            )
    inc = _results.get("incremental")
    if inc:
        lines.append(
            f"  pull of image-b after image-a moved {inc['bytes']:,d} of its {inc['image_bytes']:,d} layer bytes"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
