"""--platform as docker and containerd read it: short and alias spellings normalised, then matched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_layout, member, tar_bytes

from layerfs.tools import sources

SPELLINGS = {
    "arm64": "linux/arm64/v8",
    "aarch64": "linux/arm64/v8",
    "linux/arm64": "linux/arm64/v8",
    "linux/aarch64": "linux/arm64/v8",
    "linux/arm64/8": "linux/arm64/v8",
    "linux/arm64/v8": "linux/arm64/v8",
    "x86_64": "linux/amd64",
    "x86-64": "linux/amd64",
    "amd64": "linux/amd64",
    "linux/x86_64": "linux/amd64",
    "LINUX/AMD64": "linux/amd64",
    "linux/amd64/v1": "linux/amd64",
    "armhf": "linux/arm/v7",
    "armel": "linux/arm/v6",
    "arm": "linux/arm/v7",
    "linux/arm": "linux/arm/v7",
    "linux/arm/7": "linux/arm/v7",
    "linux/arm/v6": "linux/arm/v6",
    "i386": "linux/386",
    "s390x": "linux/s390x",
    "linux/riscv64": "linux/riscv64",
}


def test_spellings_are_normalised():
    for spec, want in SPELLINGS.items():
        assert sources.normalize_platform(spec) == want, spec
    # a bare operating system: this machine's architecture
    assert sources.normalize_platform("linux") == sources.normalize_platform(sources.host_platform())


@pytest.mark.parametrize("spec", ["", "foo", "linux/", "/amd64", "linux/arm64/v8/x", "linux/*"])
def test_nonsense_is_refused(spec):
    with pytest.raises(sources.PlatformError, match="invalid platform"):
        sources.normalize_platform(spec)


def test_matching():
    platform_matches = sources.platform_matches
    assert platform_matches("linux/arm64", "linux/arm64/v8")
    assert platform_matches("linux/arm64", "linux/arm64")  # no variant: v8
    assert platform_matches("linux/arm64/v8", "linux/arm64")
    assert platform_matches("linux/arm", "linux/arm/v7")
    assert platform_matches("linux/arm/v7", "linux/arm/v6")  # containerd's fallback for 32-bit arm
    assert not platform_matches("linux/arm/v6", "linux/arm/v7")
    assert not platform_matches("linux/arm64", "linux/arm/v8")
    assert not platform_matches("linux/amd64", "linux/arm64")
    assert not platform_matches("linux/arm64", "")


PLATFORMS = [("amd64", None), ("arm64", "v8"), ("arm", "v7"), ("arm", "v6"), ("386", None)]


def multi_arch(path: Path) -> dict[str, str]:
    """An OCI layout with one image per platform under one name; config digest per platform."""
    descs, ids = [], {}
    for arch, variant in PLATFORMS:
        extra: dict[str, object] = {"architecture": arch} | ({"variant": variant} if variant else {})
        make_layout(
            path, [tar_bytes([member("arch", f"{arch}{variant or ''}".encode())])], config_extra=extra
        )
        (desc,) = json.loads((path / "index.json").read_text())["manifests"]
        desc["platform"] = {"os": "linux", **extra}
        manifest = json.loads((path / "blobs" / "sha256" / desc["digest"][7:]).read_text())
        ids["linux/" + arch + (f"/{variant}" if variant else "")] = manifest["config"]["digest"]
        descs.append(desc)
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": descs}))
    return ids


@pytest.mark.parametrize(
    "spec, picked",
    [
        ("arm64", "linux/arm64/v8"),
        ("aarch64", "linux/arm64/v8"),
        ("linux/arm64", "linux/arm64/v8"),
        ("x86_64", "linux/amd64"),
        ("x86-64", "linux/amd64"),
        ("armhf", "linux/arm/v7"),
        ("arm", "linux/arm/v7"),
        ("armel", "linux/arm/v6"),
        ("i386", "linux/386"),
    ],
)
def test_import_picks_the_platform(spec, picked, cli, tmp_path):
    ids = multi_arch(tmp_path / "multi")
    (res,) = cli("import", "--json", "--platform", spec, str(tmp_path / "multi")).json()  # type: ignore[misc]
    assert res["image_id"] == ids[picked] and res["platform"] == picked


def test_unknown_or_missing_platform(cli, tmp_path):
    multi_arch(tmp_path / "multi")
    res = cli("import", "--platform", "foo", str(tmp_path / "multi"), check=False)
    assert res.code == 2 and res.out == ""
    (line,) = res.err.splitlines()
    assert line.startswith("layerfs: invalid platform 'foo'")
    res = cli("load", "--platform", "linux/arm64/v8/x", "-i", str(tmp_path / "multi"), check=False)
    assert res.code == 2 and len(res.err.splitlines()) == 1
    res = cli("import", "--platform", "s390x", str(tmp_path / "multi"), check=False)
    assert res.code == 1
    (line,) = res.err.splitlines()
    assert "no image for platform linux/s390x" in line and "linux/arm64/v8" in line
    assert cli("images", "-q").out == ""


def test_config_platform_is_checked_the_same_way(cli, tmp_path):
    """A single image without a platform in its index is checked against its config."""
    layout = make_layout(
        tmp_path / "one", [tar_bytes([member("f", b"x")])], config_extra={"architecture": "arm64"}
    )
    assert cli("import", "-q", "--platform", "aarch64", layout).code == 0
    res = cli("import", "--platform", "armhf", layout, check=False)
    assert res.code == 1 and "image is for linux/arm64, not linux/arm/v7" in res.err
