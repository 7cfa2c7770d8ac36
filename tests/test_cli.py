"""The CLI end to end on the sample image: what a Docker user would type."""

from __future__ import annotations


def test_import_list_verify_rmi(cli, sample_layout):
    out = cli("import", sample_layout).out
    assert "Loaded image: layerfs-sample:latest" in out
    images = cli("images", "--json").json()
    assert [i["repo_tags"] for i in images] == [["layerfs-sample:latest"]]
    assert len(images[0]["layers"]) == 3
    assert cli("verify").code == 0
    before = cli("df", "--json").json()
    assert before["layers"] == 3 and before["stored_bytes"] > 0

    again = cli("import", sample_layout, "--json").json()
    assert again[0]["layers_new"] == 0 and again[0]["layers_known"] == 3 and again[0]["bytes_stored"] == 0
    assert cli("df", "--json").json()["stored_bytes"] == before["stored_bytes"]

    cli("tag", "layerfs-sample", "other/name:v1")
    assert cli("rmi", "other/name:v1").out.strip() == "Untagged: other/name:v1"
    res = cli("rmi", "layerfs-sample:latest")
    assert "Deleted: sha256:" in res.out
    after = cli("df", "--json").json()
    assert after["layers"] == 0 and after["objects"] == 0 and after["payload_bytes"] == 0
    assert cli("images", "-q").out == ""


def test_errors_are_one_line_with_nonzero_exit(cli, tmp_path):
    res = cli("inspect", "nope:latest", check=False)
    assert res.code == 1 and res.err.strip() == "layerfs: no such image: nope:latest"
    res = cli("import", str(tmp_path / "missing.tar"), check=False)
    assert res.code == 1 and len(res.err.strip().splitlines()) == 1
    assert cli("rmi", "nope", check=False).code == 1


def test_version_reports_backend(cli):
    info = cli("version", "--json").json()
    assert info["tar_parser"] in ("c", "python")
    assert cli("version", env={"LAYERFS_IMPL": "python"}).out.count("tar parser: python") == 1
    assert info["fuse_core"] in ("c", "python")
    assert cli("version", "--json", env={"LAYERFS_IMPL": "python"}).json()["fuse_core"] == "python"
    assert cli("version", "--json", env={"LAYERFS_FUSE": "python"}).json()["fuse_core"] == "python"
    assert cli("version", "--json", env={"LAYERFS_FUSE": "c"}).json()["fuse_core"] == "c"
