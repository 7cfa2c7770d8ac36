"""--platform as docker and containerd read it: short and alias spellings normalised, then matched."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import tomllib
from conftest import make_layout, member, tar_bytes

from layerfs.tools import sources
from layerfs.userland import userland_arch

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


# -- the host's platform is its userland's, not its kernel's ------------------------------------
# (kernel machine, Python's multiarch triplet, pointer size) -> (architecture, variant)
USERLANDS = [
    (("x86_64", "x86_64-linux-gnu", 8), ("amd64", "")),
    (("aarch64", "aarch64-linux-gnu", 8), ("arm64", "v8")),
    (("armv7l", "arm-linux-gnueabihf", 4), ("arm", "v7")),
    # 32-bit Raspberry Pi OS on a 64-bit kernel: uname -m says aarch64
    (("aarch64", "arm-linux-gnueabihf", 4), ("arm", "v7")),
    (("armv8l", "arm-linux-gnueabihf", 4), ("arm", "v7")),
    (("armv6l", "arm-linux-gnueabihf", 4), ("arm", "v6")),  # Raspberry Pi Zero / 1
    (("x86_64", "i386-linux-gnu", 4), ("386", "")),
    # a Python without a multiarch triplet: the kernel's name, corrected by the pointer size
    (("aarch64", "", 4), ("arm", "v7")),
    (("x86_64", "", 4), ("386", "")),
    (("aarch64", "", 8), ("arm64", "v8")),
    (("riscv64", "riscv64-linux-gnu", 8), ("riscv64", "")),
]


@pytest.mark.parametrize("given, want", USERLANDS, ids=["-".join(map(str, g)) for g, _ in USERLANDS])
def test_userland_not_kernel_names_the_host(given, want):
    assert userland_arch(*given) == want


def test_host_platform_is_this_pythons():
    arch, variant = userland_arch()
    assert sources.normalize_platform(sources.host_platform()) == sources.normalize_platform(
        f"linux/{arch}/{variant}" if variant else f"linux/{arch}"
    )
    if struct.calcsize("P") == 4:
        assert arch not in ("amd64", "arm64")  # whatever uname -m says


def test_an_arm_entry_without_variant_serves_an_armv7_host(monkeypatch):
    """An index names 32-bit arm images ``linux/arm`` as often as ``linux/arm/v7``."""
    monkeypatch.setattr(sources, "host_platform", lambda: "linux/arm/v7")
    arm = sources.Descriptor("m", "sha256:" + "a" * 64, 1, {}, {"os": "linux", "architecture": "arm"})
    arm64 = sources.Descriptor("m", "sha256:" + "b" * 64, 1, {}, {"os": "linux", "architecture": "arm64"})
    assert sources.choose_platform([arm64, arm], None) is arm
    assert sources.platform_rank("linux/arm/v7", "linux/arm") == 0


def test_import_without_platform_takes_the_hosts(cli, tmp_path):
    """Whatever the host is (amd64, arm64, arm/v7...), a multi-platform index gives its image."""
    ids = multi_arch(tmp_path / "multi")
    host = sources.normalize_platform(sources.host_platform())
    if host not in ids:
        pytest.skip(f"the test index has no image for this host ({host})")
    (res,) = cli("import", "--json", str(tmp_path / "multi")).json()  # type: ignore[misc]
    assert res["image_id"] == ids[host] and res["platform"] == host


def test_no_dependency_is_chosen_by_the_kernels_machine_name():
    """pip reads ``platform_machine`` from the kernel: aarch64 under a 32-bit userland, which
    would then fetch 64-bit-only packages (isal) and build them from source, or fail."""
    with open(Path(__file__).parent.parent / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    assert [d for d in deps if "platform_machine" in d] == []
