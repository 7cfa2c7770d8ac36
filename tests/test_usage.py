"""``layerfs df``: logical and unique bytes count the same thing, so their ratio is the dedup."""

from __future__ import annotations

import os

from conftest import make_layout, member, tar_bytes

FILES = {"a": os.urandom(5000), "b": b"hello\n" * 3000, "dir/c": os.urandom(70000)}
TOTAL = sum(map(len, FILES.values()))


def test_one_image_without_duplicates_is_1x(cli, tmp_path):
    layer = tar_bytes([member("dir", kind=b"5", mode=0o755)] + [member(p, d) for p, d in FILES.items()])
    cli("import", "-q", make_layout(tmp_path / "one", [layer], ref="one:1"))
    u = cli("df", "--json").json()
    assert u["logical_bytes"] == u["unique_bytes"] == TOTAL, u  # type: ignore[index]
    assert u["dedup_ratio"] == 1.0  # type: ignore[index]
    # tar headers, the entry table, manifest and config are stored too, but are no file data
    assert u["object_bytes"] > u["unique_bytes"]  # type: ignore[index]
    assert u["compression_ratio"] == u["object_bytes"] / u["payload_bytes"]  # type: ignore[index]
    assert "Dedup ratio:        1.00x" in cli("df").out


def test_sample_image_is_at_least_1x(cli, sample_layout):
    cli("import", "-q", sample_layout)
    u = cli("df", "--json").json()
    assert u["dedup_ratio"] >= 1.0 and u["logical_bytes"] >= u["unique_bytes"] > 0, u  # type: ignore[index]


def test_shared_layers_and_copies_count_in_logical_bytes_once_in_unique(cli, tmp_path):
    base = tar_bytes([member(p.replace("dir/", ""), d) for p, d in FILES.items()])
    copies = tar_bytes([member("copy-of-a", FILES["a"]), member("again-b", FILES["b"])])
    cli("import", "-q", make_layout(tmp_path / "x", [base], ref="x:1"))
    cli("import", "-q", make_layout(tmp_path / "y", [base, copies], ref="y:1"))
    u = cli("df", "--json").json()
    # layers are stored once: the shared one counts once in logical bytes too
    assert u["layers"] == 2  # type: ignore[index]
    assert u["logical_bytes"] == TOTAL + len(FILES["a"]) + len(FILES["b"])  # type: ignore[index]
    assert u["unique_bytes"] == TOTAL and u["unique_files"] == 3  # type: ignore[index]
    assert u["dedup_ratio"] == u["logical_bytes"] / TOTAL  # type: ignore[index]
