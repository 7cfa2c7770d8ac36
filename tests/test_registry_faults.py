"""Bad input and faults: a registry of the test's own (a small HTTP server that misbehaves on
request) serves blobs that do not match their digests, truncated or oversized blobs, manifests too
large or of an unknown type, 401/403/404/429/5xx answers, redirects to blob storage elsewhere and
connections dropped mid-blob; a pull is killed (kill -9, Ctrl-C) mid-layer.  After each case the
error is one line, nothing of the image is visible, ``layerfs verify`` is clean, and where the fault
passes, the next pull finishes the job."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import member, tar_bytes

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
FAST = {"LAYERFS_REGISTRY_BACKOFF": "0.01"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up (the TLS probe of --tls-verify=false, dropped blobs) are expected


@dataclass
class Image:
    manifest: bytes
    config: bytes
    layers: list[bytes]  # compressed blobs
    diff_ids: list[str]

    @property
    def image_id(self) -> str:
        return sha(self.config)


def make_image(n: int = 3, size: int = 300_000, seed: str = "f") -> Image:
    raws = []
    for i in range(n):
        data = b"".join(hashlib.sha256(f"{seed}{i}-{k}".encode()).digest() for k in range(size // 32))
        raws.append(tar_bytes([member(f"l{i}/", kind=b"5", mode=0o755), member(f"l{i}/data", data)]))
    blobs = [gzip.compress(r, mtime=0) for r in raws]
    diff_ids = [sha(r) for r in raws]
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(b), "size": len(b)}
                for b in blobs
            ],
        }
    ).encode()
    return Image(manifest, config, blobs, diff_ids)


@dataclass
class Faults:
    """What the server does wrong.  ``blob``: digest -> mode; ``status``: path suffix -> statuses to
    answer first (the last one forever if ``sticky``)."""

    blob: dict[str, str] = field(default_factory=dict)
    status: dict[str, list[int]] = field(default_factory=dict)
    sticky: bool = False
    manifest_type: str | None = None
    manifest_body: bytes | None = None
    basic: str | None = None  # required Authorization value
    redirect_to: str | None = None  # base URL blobs are redirected to
    slow: float = 0.0  # seconds per 64 KiB of blob
    dropped: set[str] = field(default_factory=set)


class MisbehavingRegistry:
    def __init__(self, image: Image, repo: str = "bad/app") -> None:
        self.image = image
        self.repo = repo
        self.faults = Faults()
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.blob_bytes_sent = 0
        self.active = self.max_active = 0  # layer downloads in flight at once
        self._lock = threading.Lock()
        self.blobs = {sha(b): b for b in [image.config, *image.layers]}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                outer.handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                outer.handle(self, head=False)

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reply(
        self,
        h: Any,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def handle(self, h: Any, head: bool) -> None:
        f = self.faults
        path = h.path.split("?")[0]
        self.log.append((h.command, path, dict(h.headers)))
        if f.basic is not None and h.headers.get("Authorization") != f.basic:
            self.reply(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                       {"WWW-Authenticate": 'Basic realm="test"'}, head)  # fmt: skip
            return
        for suffix, statuses in f.status.items():
            if path.endswith(suffix) and statuses:
                status = statuses[0] if f.sticky and len(statuses) == 1 else statuses.pop(0)
                body = json.dumps({"errors": [{"code": "TEST", "message": f"test says {status}"}]}).encode()
                self.reply(h, status, body, {"Retry-After": "0"} if status == 429 else None, head)
                return
        if path == "/v2/":
            self.reply(h, 200, b"{}", None, head)
        elif path.startswith(f"/v2/{self.repo}/manifests/"):
            body = f.manifest_body if f.manifest_body is not None else self.image.manifest
            mtype = f.manifest_type or MT_MANIFEST
            self.reply(h, 200, body, {"Content-Type": mtype, "Docker-Content-Digest": sha(body)}, head)
        elif path.startswith(f"/v2/{self.repo}/blobs/"):
            self.blob(h, path.rsplit("/", 1)[1], head)
        else:
            self.reply(
                h,
                404,
                b'{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known"}]}',
                None,
                head,
            )

    def blob(self, h: Any, digest: str, head: bool) -> None:
        f = self.faults
        data = self.blobs.get(digest)
        if data is None:
            self.reply(h, 404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}', None, head)
            return
        mode = f.blob.get(digest, "ok")
        if f.redirect_to and "storage" not in h.headers.get("X-Test", ""):
            self.reply(h, 307, b"", {"Location": f"{f.redirect_to}/storage/{digest}"}, head)
            return
        if mode == "corrupt":  # byte 4: a gzip header's mtime, so still a valid gzip stream
            data = data[:4] + bytes([data[4] ^ 1]) + data[5:]
        elif mode == "garble":
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        elif mode == "truncate":
            data = data[: len(data) // 2]
        elif mode == "bigger":
            data = data + b"\0" * 4096
        start = 0
        rng = h.headers.get("Range")
        if rng and mode != "drop-then-ignore-range":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.reply(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                return
        body = data[start:]
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            return
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self._send(h, body, digest, mode)
        finally:
            with self._lock:
                self.active -= 1

    def _send(self, h: Any, body: bytes, digest: str, mode: str) -> None:
        f = self.faults
        cut = len(body)
        once = mode in ("drop-once", "drop-then-ignore-range")
        if mode == "drop-always" or (once and digest not in f.dropped):
            f.dropped.add(digest)
            cut = len(body) // 2
        sent = 0
        while sent < cut:
            piece = body[sent : min(cut, sent + 65536)]
            try:
                h.wfile.write(piece)
                h.wfile.flush()
            except OSError:
                return
            sent += len(piece)
            self.blob_bytes_sent += len(piece)
            if f.slow:
                time.sleep(f.slow)
        if cut < len(body):
            h.close_connection = True
            h.connection.shutdown(2)  # the registry drops the connection mid-blob


class StorageServer:
    """Where blobs are redirected to: another address, which must not see the registry's credentials."""

    def __init__(self, registry: MisbehavingRegistry) -> None:
        self.seen_auth: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.seen_auth.append(self.headers.get("Authorization"))
                data = registry.blobs[self.path.rsplit("/", 1)[1]]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = QuietServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def image() -> Image:
    return make_image()


@pytest.fixture
def bad(image: Image) -> Iterator[MisbehavingRegistry]:
    server = MisbehavingRegistry(image)
    yield server
    server.stop()


def pull(cli: Any, server: MisbehavingRegistry, *extra: str, env: dict[str, str] | None = None) -> Any:
    return cli(
        "pull",
        "--tls-verify=false",
        "--json",
        *extra,
        f"{server.host}/{server.repo}:1",
        check=False,
        env={**FAST, **(env or {})},
    )


def assert_nothing_visible(cli: Any) -> None:
    assert cli("images", "--json").json() == []
    assert cli("verify").code == 0
    cli("gc")
    df = cli("df", "--json").json()
    assert (df["images"], df["tags"], df["layers"], df["objects"]) == (0, 0, 0, 0), df
    assert cli("verify").code == 0


def refused(res: Any, *words: str) -> None:
    assert res.code == 1, res
    assert res.err.startswith("layerfs: pull of ") and res.err.count("\n") == 1, res.err
    for w in words:
        assert w in res.err, res.err


# -- blobs that lie -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("corrupt", ["content hashes to"]),
        ("garble", ["layer sha256:"]),  # the gzip check or the tar parser, whichever meets it first
        ("truncate", ["truncated", "of its"]),
        ("bigger", ["larger than its descriptor"]),
        ("drop-always", ["connection dropped", "range requests to resume it failed"]),
    ],
)
def test_a_bad_blob_is_refused_and_nothing_stays(
    mode: str, words: list[str], bad: MisbehavingRegistry, image: Image, cli: Any
) -> None:
    bad.faults.blob[sha(image.layers[1])] = mode
    refused(pull(cli, bad), *words)
    assert_nothing_visible(cli)


def test_a_bad_config_is_refused(bad: MisbehavingRegistry, image: Image, cli: Any) -> None:
    bad.faults.blob[sha(image.config)] = "corrupt"
    refused(pull(cli, bad), "content hashes to")
    assert_nothing_visible(cli)


@pytest.mark.parametrize("mode", ["drop-once", "drop-then-ignore-range"])
def test_a_dropped_download_resumes(mode: str, bad: MisbehavingRegistry, image: Image, cli: Any) -> None:
    """Resumed with a range request; a server that ignores the range is read past what we have."""
    digest = sha(image.layers[1])
    bad.faults.blob[digest] = mode
    res = pull(cli, bad)
    assert res.code == 0, res.err
    out = res.json()
    assert out["resumes"] == 1 and out["image_id"] == image.image_id
    ranges = [hdr.get("Range") for m, p, hdr in bad.log if p.endswith(digest) and m == "GET"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert cli("verify").code == 0


# -- manifests ------------------------------------------------------------------------------------
def test_a_manifest_too_large_is_refused_unread(bad: MisbehavingRegistry, cli: Any) -> None:
    bad.faults.manifest_body = b"{" + b" " * (5 << 20) + b"}"
    refused(pull(cli, bad), "more than a manifest may be")
    assert_nothing_visible(cli)


@pytest.mark.parametrize(
    ("mtype", "words"),
    [
        ("application/vnd.example.unknown+json", ["unsupported media type"]),
        ("application/vnd.docker.distribution.manifest.v1+prettyjws", ["schema 1"]),
    ],
)
def test_an_unknown_manifest_type_is_refused(
    mtype: str, words: list[str], bad: MisbehavingRegistry, image: Image, cli: Any
) -> None:
    doc = json.loads(image.manifest)
    doc["mediaType"] = mtype
    bad.faults.manifest_body = json.dumps(doc).encode()
    bad.faults.manifest_type = mtype
    refused(pull(cli, bad), *words)
    assert_nothing_visible(cli)


# -- answers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "words"),
    [
        (401, ["authentication required", "layerfs login"]),
        (403, ["access denied", "test says 403"]),
        (404, ["not found"]),
        (429, ["too many requests", "gave up after"]),
        (500, ["server error 500", "gave up after"]),
        (503, ["server error 503"]),
    ],
)
def test_error_answers_are_one_line(
    status: int, words: list[str], bad: MisbehavingRegistry, image: Image, cli: Any
) -> None:
    bad.faults.status[f"/blobs/{sha(image.layers[2])}"] = [status]
    bad.faults.sticky = True
    refused(pull(cli, bad), *words)
    assert_nothing_visible(cli)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_passing_trouble_is_retried(status: int, bad: MisbehavingRegistry, image: Image, cli: Any) -> None:
    path = f"/blobs/{sha(image.layers[0])}"
    bad.faults.status[path] = [status, status]
    bad.faults.status["/manifests/1"] = [status]
    res = pull(cli, bad)
    assert res.code == 0, res.err
    assert res.json()["image_id"] == image.image_id
    assert cli("verify").code == 0


def test_redirect_to_blob_storage_elsewhere_gets_no_credentials(
    bad: MisbehavingRegistry, image: Image, cli: Any, tmp_path: Path
) -> None:
    storage = StorageServer(bad)
    try:
        creds = base64.b64encode(b"bob:pw").decode()
        bad.faults.basic = f"Basic {creds}"
        bad.faults.redirect_to = storage.url
        (tmp_path / "docker").mkdir()
        (tmp_path / "docker/config.json").write_text(json.dumps({"auths": {bad.host: {"auth": creds}}}))
        res = pull(
            cli,
            bad,
            env={"DOCKER_CONFIG": str(tmp_path / "docker"), "REGISTRY_AUTH_FILE": str(tmp_path / "none")},
        )
        assert res.code == 0, res.err
        assert res.json()["image_id"] == image.image_id
        assert len(storage.seen_auth) == 4 and storage.seen_auth == [None] * 4  # config + 3 layers
    finally:
        storage.stop()
    assert cli("verify").code == 0


# -- killed mid-pull ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_killed_mid_pull_then_the_next_pull_finishes(
    how: str, bad: MisbehavingRegistry, image: Image, cli: Any, store_path: str
) -> None:
    bad.faults.slow = 0.2  # 320 KB/s: the kill lands mid-layer
    env = dict(os.environ, LAYERFS_STORE=store_path, LAYERFS_PULL_JOBS="1", **FAST)
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerfs", "pull", "--tls-verify=false", "-q", f"{bad.host}/{bad.repo}:1"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    first, second = len(image.layers[0]), len(image.layers[1])
    deadline = time.monotonic() + 60
    # one download at a time: the second layer's bytes flow once the first is committed
    while bad.blob_bytes_sent < len(image.config) + first + 65536 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bad.blob_bytes_sent < len(image.config) + first + second
    proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if how == "ctrl-c":
        assert proc.returncode == 130 and err.strip().endswith("layerfs: interrupted"), err
    assert cli("images", "--json").json() == []
    assert cli("verify").code == 0
    bad.faults.slow = 0
    res = pull(cli, bad)
    assert res.code == 0, res.err
    out = res.json()
    assert out["image_id"] == image.image_id
    # the first layer was finished before the kill: not downloaded again
    assert out["layers_new"] == 2 and out["bytes_downloaded"] == len(image.layers[1]) + len(image.layers[2])
    assert cli("verify").code == 0
