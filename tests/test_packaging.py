"""The package as a user installs it: sdist -> wheel -> a fresh virtualenv, then the README's
main job from that virtualenv, a mount included.  The editable install the other tests use
hides a module missing from the wheel; this test does not (a wheel once shipped without
``layerfs.union``, and every mount failed)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from unionutil import need_fuse  # noqa: F401 - a fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*cmd: str, env: dict[str, str] | None = None, cwd: str | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert p.returncode == 0, (
        f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    )
    return p.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A virtualenv with layerfs installed from a wheel built from the sdist."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    tmp = tmp_path_factory.mktemp("pkg")
    # a clean copy: the checkout's build/ and *.egg-info (left by the editable install) would
    # smuggle unlisted modules into the sdist and from there into a wheel
    src = str(tmp / "src")
    _clean_copy(ROOT, src)
    direct, via_sdist = str(tmp / "direct"), str(tmp / "via-sdist")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run(*build, "-w", direct, src)  # what `pip install .` does
    # a wheel built from the sdist proves the sdist carries every source
    _run(sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", via_sdist, src)
    (sdist,) = glob.glob(os.path.join(via_sdist, "layerfs-*.tar.gz"))
    _run(*build, "-w", via_sdist, sdist)
    wheels = [w for d in (direct, via_sdist) for w in glob.glob(os.path.join(d, "layerfs-*.whl"))]
    assert len(wheels) == 2
    for wheel in wheels:
        names = zipfile.ZipFile(wheel).namelist()
        for module in _modules(src):
            assert module in names, f"{module} is missing from {wheel}"
        assert not any(n.startswith(("tools/", "tests/", "bench/")) for n in names), (
            "stray top-level packages"
        )
    venv = str(tmp / "venv")
    _run(sys.executable, "-m", "venv", venv)
    _run(os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", wheels[0])
    return venv


def _clean_copy(root: str, dst: str) -> None:
    """The files a fresh clone has (tracked and new, not ignored), or the tree less build output."""
    p = subprocess.run(
        ["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
    )
    if p.returncode == 0:
        for rel in filter(None, p.stdout.decode().split("\0")):
            if os.path.isfile(os.path.join(root, rel)):
                os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
                shutil.copy2(os.path.join(root, rel), os.path.join(dst, rel))
        return
    junk = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", ".*cache")
    shutil.copytree(root, dst, ignore=junk)


def _modules(src: str) -> list[str]:
    """Every Python module of the source tree, named as the wheel installs it."""
    out = []
    for top, installed in (("layerfs", "layerfs"), ("tools", "layerfs/tools")):
        for d, _, files in os.walk(os.path.join(src, top)):
            rel = os.path.relpath(d, os.path.join(src, top))
            out += [os.path.normpath(os.path.join(installed, rel, f)) for f in files if f.endswith(".py")]
    return out


def test_wheel_runs_the_main_job(installed, tmp_path, need_fuse):  # noqa: F811 - the fixture
    bin_ = os.path.join(installed, "bin")
    # run from elsewhere, so nothing of the checkout can be imported by accident
    env = dict(os.environ, LAYERFS_STORE=str(tmp_path / "store"), PYTHONPATH="", HOME=str(tmp_path))
    env["PATH"] = bin_ + os.pathsep + env.get("PATH", "")
    layerfs = os.path.join(bin_, "layerfs")
    where = _run(
        os.path.join(bin_, "python"), "-c", "import layerfs; print(layerfs.__file__)", cwd=str(tmp_path)
    )
    assert where.startswith(installed), where
    sample, mnt = str(tmp_path / "sample"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    _run(os.path.join(bin_, "python"), "-m", "layerfs.tools.sample", sample, env=env, cwd=str(tmp_path))
    assert "Loaded image: layerfs-sample:latest" in _run(
        layerfs, "import", sample, env=env, cwd=str(tmp_path)
    )
    assert "layerfs-sample" in _run(layerfs, "images", env=env)
    _run(layerfs, "df", env=env)
    _run(layerfs, "verify", env=env)
    version = _run(layerfs, "version", env=env)
    assert "tar parser: c" in version and "fuse core: c" in version, version
    _run(layerfs, "mount", "layerfs-sample", mnt, env=env)
    try:
        out = _run("chroot", mnt, "/app/run.sh", env=env)
        assert out.strip(), "the sample program printed nothing"
    finally:
        _run(layerfs, "umount", mnt, env=env)
    if shutil.which("runc"):
        assert _run(layerfs, "run", "--rm", "layerfs-sample", env=env) == out
