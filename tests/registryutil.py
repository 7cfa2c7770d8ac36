"""Registries for the registry tests: the real distribution server (Debian's ``docker-registry``)
on 127.0.0.1, plain or with TLS from a CA made here, htpasswd or token auth; and what they need
(certificates, a token service that signs JWTs with openssl, counts of the requests served)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REGISTRY_BIN = shutil.which("docker-registry") or shutil.which("registry")
needs_registry = pytest.mark.skipif(
    REGISTRY_BIN is None,
    reason="docker-registry (CNCF distribution) is not installed (.ci/install installs it)",
)
needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
needs_podman = pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
needs_htpasswd = pytest.mark.skipif(
    shutil.which("htpasswd") is None, reason="htpasswd (apache2-utils) is not installed"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*cmd: str, **kw: object) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}")
    return str(p.stdout)


# -- certificates ---------------------------------------------------------------------------------
@dataclass
class CA:
    dir: Path
    cert: Path
    key: Path

    def issue(self, name: str, hosts: list[str]) -> tuple[Path, Path]:
        """A server certificate for ``hosts`` (IP addresses or names), signed by this CA."""
        key, csr, crt, ext = (self.dir / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
        san = ",".join(f"IP:{h}" if re.fullmatch(r"[0-9.]+", h) else f"DNS:{h}" for h in hosts)
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
        run(
            "openssl",
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={hosts[0]}",
        )
        run(
            "openssl", "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-out", str(crt), "-days", "2", "-sha256", "-extfile", str(ext),
        )  # fmt: skip
        return crt, key


def make_ca(directory: Path, name: str = "layerfs test CA") -> CA:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.crt", directory / "ca.key"
    run(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
        "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return CA(directory, cert, key)


# -- the registry ---------------------------------------------------------------------------------
_ACCESS = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[0-9.]+" (\d+)')


class RegistryServer:
    """``docker-registry serve`` on 127.0.0.1:PORT with its storage under ``base``."""

    def __init__(
        self,
        base: Path,
        *,
        tls: tuple[Path, Path] | None = None,
        htpasswd: Path | None = None,
        token: dict[str, str] | None = None,
    ) -> None:
        assert REGISTRY_BIN is not None
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = base / "registry.log"
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {base / 'data'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
            f"  secret: {hashlib.sha256(str(base).encode()).hexdigest()}",
        ]
        if tls:
            lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
        if htpasswd:
            lines += ["auth:", "  htpasswd:", "    realm: layerfs-test", f"    path: {htpasswd}"]
        elif token:
            lines += ["auth:", "  token:"] + [f"    {k}: {v}" for k, v in token.items()]
        (base / "config.yml").write_text("\n".join(lines) + "\n")
        self.tls = tls is not None
        self._out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(base / "config.yml")],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def mark(self) -> int:
        """A position in the access log: ``requests(since=...)`` counts what came after it."""
        return self.log.stat().st_size

    def requests(self, since: int = 0) -> list[tuple[str, str, int]]:
        """(method, path, status) of the requests served, from the access log."""
        time.sleep(0.2)  # the log line is written after the answer
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [(m.group(1), m.group(2), int(m.group(3))) for m in _ACCESS.finditer(text)]

    def uploads(self, since: int = 0) -> list[tuple[str, str, int]]:
        return [
            r for r in self.requests(since) if "/blobs/uploads/" in r[1] and r[0] in ("POST", "PATCH", "PUT")
        ]


@contextlib.contextmanager
def registry(base: Path, **kw: object) -> Iterator[RegistryServer]:
    server = RegistryServer(base, **kw)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def htpasswd(path: Path, user: str, password: str) -> Path:
    run("htpasswd", "-Bbc", str(path), user, password)
    return path


# -- a token service (bearer auth) ----------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """The registry's ``auth.token`` realm: checks basic credentials (``users``) and signs JWTs
    (RS256 with openssl, the certificate in ``x5c``) granting what was asked (anonymous users:
    pull only); ``lifetime`` seconds.  ``issued`` lists the scopes asked for."""

    def __init__(self, base: Path, ca: CA, users: dict[str, str], lifetime: int = 300) -> None:
        self.crt, self.key = ca.issue("token-signer", ["token-signer"])
        der = run("openssl", "x509", "-in", str(self.crt), "-outform", "PEM")
        self.x5c = [base64.b64encode(base64.b64decode("".join(der.strip().splitlines()[1:-1]))).decode()]
        self.root = ca.cert
        self.users = users
        self.lifetime = lifetime
        self.promised: int | None = None  # expires_in to tell, when it should differ from the truth
        self.issued: list[tuple[str, list[str]]] = []
        self.service = "layerfs-test-registry"
        self.port = free_port()
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlparse(self.path)
                q = urllib.parse.parse_qs(url.query)
                user = ""
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if service.users.get(user) != password:
                        self.send_response(401)
                        self.end_headers()
                        return
                scopes = q.get("scope", [])
                service.issued.append((user, scopes))
                body = json.dumps(
                    {"token": service.sign(user, scopes), "expires_in": service.promised or service.lifetime}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.realm = f"http://127.0.0.1:{self.port}/token"

    def registry_config(self) -> dict[str, str]:
        return {
            "realm": self.realm,
            "service": self.service,
            "issuer": "layerfs-test",
            "rootcertbundle": str(self.root),
        }

    def sign(self, user: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            for one in scope.split(" "):
                parts = one.split(":")
                if len(parts) == 3 and parts[0] == "repository" and user:
                    access.append({"type": "repository", "name": parts[1], "actions": parts[2].split(",")})
                elif len(parts) == 3 and parts[0] == "repository":
                    actions = [a for a in parts[2].split(",") if a == "pull"]
                    access.append({"type": "repository", "name": parts[1], "actions": actions})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": self.x5c}
        claims = {
            "iss": "layerfs-test",
            "sub": user,
            "aud": self.service,
            "exp": now + self.lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing_input}.{_b64(sig)}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- pushing test images with skopeo ----------------------------------------------------------------
def skopeo_copy(src: str, dest: str, *extra: str) -> None:
    run("skopeo", "--insecure-policy", "copy", "--quiet", *extra, src, dest)
