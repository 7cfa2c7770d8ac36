"""Authentication and TLS against the real registry server: TLS from a CA the test makes (trusted
through --cert-dir and through certs.d), htpasswd (basic) auth with login/logout and the files docker
and podman keep credentials in, and token (bearer) auth with a token service of the test's:
scopes per repository, anonymous pulls, and a token the registry no longer accepts."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from registryutil import (
    CA,
    RegistryServer,
    TokenService,
    htpasswd,
    make_ca,
    needs_htpasswd,
    needs_openssl,
    needs_registry,
    needs_skopeo,
    registry,
    run,
    skopeo_copy,
)

pytestmark = [needs_registry, needs_openssl]
USER, PASSWORD = "alice", "s3cret-pass"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def cert_dir(ca: CA) -> str:
    """A certs.d-style directory with the CA alone (the CA's key beside it would be a client key)."""
    d = ca.dir / "certs"
    d.mkdir(exist_ok=True)
    shutil.copy(ca.cert, d / "ca.crt")
    return str(d)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, ca: CA) -> Iterator[RegistryServer]:
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd (apache2-utils) is not installed")
    base = tmp_path_factory.mktemp("tls-registry")
    cert = ca.issue("registry", ["127.0.0.1", "localhost"])
    with registry(base, tls=cert, htpasswd=htpasswd(base / "htpasswd", USER, PASSWORD)) as server:
        yield server


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Credentials files of this test only."""
    return {
        "DOCKER_CONFIG": str(tmp_path / "docker"),
        "REGISTRY_AUTH_FILE": str(tmp_path / "containers-auth.json"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }


def login(
    host: str, env: dict[str, str], *extra: str, password: str = PASSWORD
) -> subprocess.CompletedProcess[str]:
    """``layerfs login`` with the password on stdin, as scripts do."""
    return subprocess.run(
        [sys.executable, "-m", "layerfs", "login", "-u", USER, "--password-stdin", *extra, host],
        input=password,
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
    )


@needs_htpasswd
def test_tls_and_basic_auth_login_push_pull_logout(
    secure: RegistryServer, cert_dir: str, cli: Any, env: dict[str, str], sample_layout: str, tmp_path: Path
) -> None:
    host = secure.host
    cli("import", "-q", sample_layout)
    # no CA: refused with what to do
    bad = cli("push", "layerfs-sample", f"{host}/secure/app:1", env=env, check=False)
    assert bad.code == 1 and "TLS certificate is not trusted" in bad.err and "certs.d" in bad.err
    # the CA, no credentials: one line saying to log in
    bad = cli("push", "--cert-dir", cert_dir, "layerfs-sample", f"{host}/secure/app:1", env=env, check=False)
    assert bad.code == 1 and "authentication required" in bad.err and f"layerfs login {host}" in bad.err
    # a wrong password is refused and not kept
    p = login(host, env, "--cert-dir", cert_dir, password="wrong")
    assert (
        p.returncode == 1
        and p.stderr.startswith(f"layerfs: login to {host} failed")
        and p.stderr.count("\n") == 1
    )
    assert not os.path.exists(os.path.join(env["DOCKER_CONFIG"], "config.json"))
    # the right one is kept in docker's file, which podman and skopeo read too
    p = login(host, env, "--cert-dir", cert_dir)
    assert p.returncode == 0 and p.stdout == "Login Succeeded\n", p.stderr
    config = json.loads(Path(env["DOCKER_CONFIG"], "config.json").read_text())
    assert base64.b64decode(config["auths"][host]["auth"]).decode() == f"{USER}:{PASSWORD}"
    assert os.stat(Path(env["DOCKER_CONFIG"], "config.json")).st_mode & 0o077 == 0
    res = cli(
        "push", "--cert-dir", cert_dir, "--json", "layerfs-sample", f"{host}/secure/app:1", env=env
    ).json()
    assert res["layers_uploaded"] == 3
    other = {**env, "LAYERFS_STORE": str(tmp_path / "other")}
    pulled = cli("pull", "--cert-dir", cert_dir, "--json", f"{host}/secure/app:1", env=other).json()
    assert pulled["image_id"] == res["image_id"]
    if shutil.which("skopeo"):
        out = run(
            "skopeo", "inspect", "--cert-dir", cert_dir, "--authfile", str(Path(env["DOCKER_CONFIG"], "config.json")),
            f"docker://{host}/secure/app:1",
        )  # fmt: skip
        assert json.loads(out)["Digest"] == res["digest"]
    assert cli("logout", host, env=env).out == f"Removing login credentials for {host}\n"
    assert cli("logout", host, env=env).out == f"Not logged in to {host}\n"
    bad = cli("pull", "--cert-dir", cert_dir, f"{host}/secure/app:1", env=other, check=False)
    assert bad.code == 1 and "authentication required" in bad.err
    assert cli("verify").code == 0


@needs_htpasswd
@needs_skopeo
def test_credentials_of_podman_and_the_certs_d_directory(
    secure: RegistryServer, ca: CA, cert_dir: str, cli: Any, env: dict[str, str], sample_layout: str
) -> None:
    host = secure.host
    # skopeo (containers/image) logs in to the containers auth file; layerfs reads it
    run(
        "skopeo", "login", "--authfile", env["REGISTRY_AUTH_FILE"], "--cert-dir", cert_dir,
        "-u", USER, "-p", PASSWORD, host,
    )  # fmt: skip
    skopeo_copy(
        f"oci:{sample_layout}:latest", f"docker://{host}/podman/app:1",
        "--dest-cert-dir", cert_dir, "--dest-authfile", env["REGISTRY_AUTH_FILE"],
    )  # fmt: skip
    certs_d = Path("/etc/containers/certs.d") / host  # the test's own port: no one else's directory
    if os.geteuid() != 0:
        pytest.skip("certs.d lives under /etc: root only")
    certs_d.mkdir(parents=True)
    try:
        shutil.copy(ca.cert, certs_d / "ca.crt")
        res = cli("pull", "--json", f"{host}/podman/app:1", env=env).json()
        assert res["layers_new"] == 3
    finally:
        shutil.rmtree(certs_d)
    # login also updates the containers file when it exists, so an old entry there cannot shadow it
    p = login(host, env, "--cert-dir", cert_dir)
    assert p.returncode == 0
    assert host in json.loads(Path(env["REGISTRY_AUTH_FILE"]).read_text())["auths"]
    cli("logout", host, env=env)
    for f in (env["REGISTRY_AUTH_FILE"], os.path.join(env["DOCKER_CONFIG"], "config.json")):
        assert host not in json.loads(Path(f).read_text()).get("auths", {})


# -- bearer tokens ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, ca: CA
) -> Iterator[tuple[RegistryServer, TokenService]]:
    base = tmp_path_factory.mktemp("token-registry")
    service = TokenService(base, ca, {USER: PASSWORD}, lifetime=300)
    try:
        with registry(base, token=service.registry_config()) as server:
            yield server, service
    finally:
        service.stop()


def test_bearer_tokens_per_repository_scope(
    token_registry: tuple[RegistryServer, TokenService],
    cli: Any,
    env: dict[str, str],
    sample_layout: str,
    tmp_path: Path,
) -> None:
    server, service = token_registry
    host = server.host
    cli("import", "-q", sample_layout)
    bad = cli("push", "--tls-verify=false", "layerfs-sample", f"{host}/tok/app:1", env=env, check=False)
    assert bad.code == 1 and ("denied" in bad.err or "authentication required" in bad.err), bad.err
    assert login(host, env, "--tls-verify=false").returncode == 0
    service.issued.clear()
    cli("push", "--tls-verify=false", "-q", "layerfs-sample", f"{host}/tok/app:1", env=env)
    assert (USER, ["repository:tok/app:pull,push"]) in service.issued
    # anonymous pull: a token for pulling that one repository
    service.issued.clear()
    anon = {**env, "DOCKER_CONFIG": str(tmp_path / "nobody"), "LAYERFS_STORE": str(tmp_path / "anon")}
    res = cli("pull", "--tls-verify=false", "--json", f"{host}/tok/app:1", env=anon).json()
    assert res["layers_new"] == 3
    assert service.issued and all(i == ("", ["repository:tok/app:pull"]) for i in service.issued), (
        service.issued
    )
    # wrong credentials: the token service says no, in one line
    bad_env = {**env, "DOCKER_CONFIG": str(tmp_path / "bad")}
    Path(bad_env["DOCKER_CONFIG"]).mkdir()
    creds = base64.b64encode(f"{USER}:nope".encode()).decode()
    Path(bad_env["DOCKER_CONFIG"], "config.json").write_text(json.dumps({"auths": {host: {"auth": creds}}}))
    bad = cli(
        "pull",
        "--tls-verify=false",
        f"{host}/tok/app:1",
        env={**bad_env, "LAYERFS_STORE": str(tmp_path / "b")},
        check=False,
    )
    assert bad.code == 1 and "refused user alice" in bad.err and bad.err.count("\n") == 1


def test_a_token_the_registry_stops_accepting_is_fetched_again(
    token_registry: tuple[RegistryServer, TokenService], sample_layout: str
) -> None:
    """The token service says a token lasts 300 s; the registry finds it expired a few seconds
    later (its ``exp``, which distribution accepts up to 60 s late): the client's next request meets
    a 401 and asks for a new token."""
    from layerfs.tools.registry.client import Registry

    server, service = token_registry
    service.lifetime, service.promised = -57, 300  # exp + 60 s leeway: 3 s from now
    reg = Registry(server.host, insecure=True)
    scope = Registry.pull_scope("tok/app")
    try:
        mark = server.mark()
        reg.request("GET", "/v2/tok/app/tags/list", scope=scope, expect=(200, 404)).close()
        assert reg.tokens.fetched == 1
        time.sleep(4)
        reg.request("GET", "/v2/tok/app/tags/list", scope=scope, expect=(200, 404)).close()
        assert reg.tokens.fetched == 2  # the refused one was replaced
        statuses = [s for m, p, s in server.requests(mark) if p.startswith("/v2/tok/app/tags/list")]
        assert statuses[-2:] == [401, 200] or statuses[-2:] == [401, 404], statuses
    finally:
        reg.close()
        service.lifetime, service.promised = 300, None
