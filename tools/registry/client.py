"""A client of one registry: the distribution API (OCI distribution spec, Docker registry API v2)
over httpx.

What it does for its callers:

* the scheme: HTTPS with the system's CAs plus those of ``certs.d/HOST[:PORT]``
  (``/etc/containers/certs.d``, ``/etc/docker/certs.d``, ``~/.config/containers/certs.d``, or
  ``--cert-dir`` instead: ``*.crt`` are CAs, ``*.cert`` + ``*.key`` a client certificate);
  with ``insecure`` (``--tls-verify=false``, ``LAYERFS_INSECURE_REGISTRIES``) HTTPS without
  verification, falling back to plain HTTP, as docker does for an insecure registry;
* authentication (``auth``): anonymous, basic, bearer tokens per repository scope, fetched again
  when one expires or is refused;
* retries with backoff where they make sense: 429 (``Retry-After`` honoured) and 5xx answers and
  dropped connections of requests that can be repeated; anything else is one ``RegistryError``;
* redirects (blob storage elsewhere) followed, without the registry's credentials;
* ``BlobStream``: a blob as a file object that checks its size as it streams and resumes a
  dropped download with a range request from where it stopped.

Thread-safe: one ``Registry`` serves parallel downloads (httpx's client is thread-safe; the token
cache has a lock).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx

from layerfs.tools.registry import auth
from layerfs.tools.registry.reference import DOCKER_HUB, DOCKER_HUB_API
from layerfs.tools.sources import INDEX_TYPES, MANIFEST_TYPES

MANIFEST_ACCEPT = ", ".join([*MANIFEST_TYPES, *INDEX_TYPES])
# larger manifests are refused unread (distribution itself refuses to store more than 4 MiB)
MAX_MANIFEST = 4 << 20
READ_SIZE = 1 << 20
RETRIES = int(os.environ.get("LAYERFS_REGISTRY_RETRIES", "4"))  # after the first try
BACKOFF = float(os.environ.get("LAYERFS_REGISTRY_BACKOFF", "0.5"))  # seconds, doubled each time
MAX_RETRY_AFTER = 30.0
RESUMES = 5  # range requests in a row that bring nothing before a download is given up
CERTS_D = ("/etc/containers/certs.d", "/etc/docker/certs.d", "~/.config/containers/certs.d")
RETRY_STATUS = (429, 500, 502, 503, 504)
USER_AGENT = "layerfs/0.1.0"


class RegistryError(Exception):
    """The registry could not do what was asked; the message is one line for the user."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    """Another download of the same pull failed or the user interrupted it."""


def insecure_registries() -> set[str]:
    return {h.strip() for h in os.environ.get("LAYERFS_INSECURE_REGISTRIES", "").split(",") if h.strip()}


def ssl_context(host: str, *, verify: bool, cert_dir: str | None) -> ssl.SSLContext:
    """System CAs plus the registry's certs.d directory (or ``cert_dir``)."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    dirs = [cert_dir] if cert_dir else [os.path.join(os.path.expanduser(d), host) for d in CERTS_D]
    for d in dirs:
        if not os.path.isdir(d):
            continue
        try:
            for ca in sorted(glob.glob(os.path.join(d, "*.crt"))):
                if verify:
                    ctx.load_verify_locations(cafile=ca)
            for key in sorted(glob.glob(os.path.join(d, "*.key"))):
                if not os.path.exists(key[: -len(".key")] + ".cert"):
                    raise RegistryError(
                        f"missing client certificate {os.path.basename(key)[:-4]}.cert for key {key}"
                    )
            for cert in sorted(glob.glob(os.path.join(d, "*.cert"))):
                key = cert[: -len(".cert")] + ".key"
                if not os.path.exists(key):
                    raise RegistryError(f"client certificate {cert} has no key {key} beside it")
                ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise RegistryError(f"cannot use the certificates in {d}: {exc}") from None
    return ctx


def _error_text(resp: httpx.Response) -> str:
    """The registry's own words: its ``errors`` list, else a short body."""
    try:
        body = resp.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors:
            parts = []
            for e in errors[:3]:
                code = str(e.get("code", "")).lower().replace("_", " ")
                msg = str(e.get("message", ""))
                parts.append(
                    msg if code and msg.lower().startswith(code) else ": ".join(p for p in (code, msg) if p)
                )
            return "; ".join(parts)[:300]
        if isinstance(body, dict) and body.get("details"):
            return str(body["details"])[:300]
    except (ValueError, AttributeError, httpx.ResponseNotRead):
        pass
    try:
        text = resp.text.strip()
    except (httpx.ResponseNotRead, UnicodeDecodeError):
        text = ""
    return " ".join(text.split())[:200] or resp.reason_phrase or f"HTTP {resp.status_code}"


def _retry_after(resp: httpx.Response, attempt: int) -> float:
    value = resp.headers.get("retry-after", "")
    if value.strip().isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    return _backoff(attempt)


def _backoff(attempt: int) -> float:
    return BACKOFF * (2**attempt) * (0.75 + random.random() / 2)


class Registry:
    """One registry host; ``repository`` scopes are given per call."""

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        cert_dir: str | None = None,
        credentials: auth.Credentials | None = None,
        plain_http: bool = False,
    ) -> None:
        self.host = host  # as references name it (docker.io)
        self.api_host = DOCKER_HUB_API if host == DOCKER_HUB else host
        self.insecure = insecure or plain_http or host in insecure_registries()
        self.credentials = credentials if credentials is not None else auth.find(host)
        self.tokens = auth.TokenCache()
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._lock = threading.Lock()
        self._base: str | None = "http://" + self.api_host if plain_http else None
        self.requests: list[tuple[str, str]] = []  # (method, path) sent, for --json and tests
        ctx = ssl_context(self.api_host, verify=not self.insecure, cert_dir=cert_dir)
        self._http = httpx.Client(
            verify=ctx,
            follow_redirects=True,
            timeout=httpx.Timeout(60.0, connect=15.0),
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the scheme -----------------------------------------------------------------------------
    def base(self) -> str:
        """``https://HOST`` or, for an insecure registry that does not speak TLS, ``http://HOST``,
        found once with a ping of ``/v2/``."""
        with self._lock:
            if self._base is not None:
                return self._base
            schemes = ["https", "http"] if self.insecure else ["https"]
            last: Exception | None = None
            for scheme in schemes:
                try:
                    resp = self._http.get(f"{scheme}://{self.api_host}/v2/")
                except httpx.TransportError as exc:
                    last = exc
                    continue
                if resp.status_code == 401:
                    self._note_challenge(resp)
                elif resp.status_code == 404:
                    raise RegistryError(f"{self.host} is not a registry (no /v2/ API)", 404)
                self._base = f"{scheme}://{self.api_host}"
                return self._base
            assert last is not None
            raise self._transport_error(last) from None

    def _transport_error(self, exc: Exception) -> RegistryError:
        text = str(exc) or type(exc).__name__
        if "CERTIFICATE_VERIFY_FAILED" in text or isinstance(exc, ssl.SSLCertVerificationError):
            return RegistryError(
                f"{self.host}: its TLS certificate is not trusted ({text.split('(_ssl')[0].strip()}); put its CA "
                f"in /etc/containers/certs.d/{self.api_host}/ca.crt (or use --cert-dir), or --tls-verify=false "
                "for a registry you trust"
            )
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text or "UNEXPECTED_EOF" in text:
            return RegistryError(
                f"{self.host} does not answer HTTPS (a plain-HTTP registry?): use --tls-verify=false "
                "or LAYERFS_INSECURE_REGISTRIES to allow plain HTTP"
            )
        return RegistryError(f"cannot reach registry {self.host}: {text}")

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base() + path

    # -- authentication -------------------------------------------------------------------------
    def _note_challenge(self, resp: httpx.Response) -> tuple[str, dict[str, str]] | None:
        header = resp.headers.get("www-authenticate")
        if not header:
            return None
        challenge = auth.parse_challenge(header)
        self._challenge = challenge
        return challenge

    def _authorization(self, scope: str, *, fresh: bool = False) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        scheme, params = challenge
        if scheme == "basic":
            return self.credentials.basic() if self.credentials else None
        if scheme != "bearer":
            return None
        if not fresh:
            token = self.tokens.get(scope)
            if token is not None:
                return "Bearer " + token
        return "Bearer " + self._fetch_token(params, scope)

    def _fetch_token(self, params: dict[str, str], scope: str) -> str:
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"{self.host} asks for a bearer token but names no realm to get it from")
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query += [("scope", s) for s in scope.split(" ") if s]
        headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        try:
            resp = self._send_retrying("GET", realm, params=query, headers=headers)
        except httpx.TransportError as exc:
            raise RegistryError(f"cannot get a token for {self.host} from {realm}: {exc}") from None
        if resp.status_code in (401, 403):
            who = f"user {self.credentials.username}" if self.credentials else "anonymous access"
            raise RegistryError(
                f"{self.host}: the token service refused {who} ({_error_text(resp)})"
                + ("" if self.credentials else f"; run 'layerfs login {self.host}'"),
                resp.status_code,
            )
        if resp.status_code != 200:
            raise RegistryError(
                f"{self.host}: the token service answered {resp.status_code}: {_error_text(resp)}"
            )
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.host}: the token service's answer holds no token")
        self.tokens.put(scope, token, auth.token_lifetime(body))
        return token

    # -- requests -------------------------------------------------------------------------------
    def _send_retrying(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """One request, repeated on 429/5xx and dropped connections (idempotent requests only)."""
        for attempt in range(RETRIES + 1):
            try:
                resp = self._http.request(method, url, **kw)
            except httpx.TransportError as exc:
                if attempt == RETRIES or isinstance(exc, httpx.UnsupportedProtocol):
                    raise
                time.sleep(_backoff(attempt))
                continue
            if resp.status_code in RETRY_STATUS and attempt < RETRIES:
                time.sleep(_retry_after(resp, attempt))
                continue
            return resp
        raise AssertionError("unreachable")

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
        retry: bool = True,
        expect: tuple[int, ...] = (200,),
        what: str = "",
    ) -> httpx.Response:
        """Send a request with authentication and retries; a response of status ``expect``
        (streamed and still open with ``stream``), else RegistryError.  ``retry=False`` for a
        request whose body cannot be sent twice."""
        url = self.url(path)
        what = what or f"{method} {path}"
        refreshed = False
        attempt = 0
        while True:
            hdrs = dict(headers or {})
            authorization = self._authorization(scope, fresh=refreshed)
            if authorization:
                hdrs["Authorization"] = authorization
            self.requests.append((method, path))
            try:
                req = self._http.build_request(method, url, headers=hdrs, content=content, params=params)
                resp = self._http.send(req, stream=stream)
            except httpx.TransportError as exc:
                if not retry or attempt >= RETRIES or isinstance(exc, httpx.UnsupportedProtocol):
                    raise self._transport_error(exc) from None
                time.sleep(_backoff(attempt))
                attempt += 1
                continue
            status = resp.status_code
            if status in expect:
                return resp
            if stream:
                resp.read()  # the error body, then the connection goes back to the pool
                resp.close()
            if status == 401 and not refreshed and self._note_challenge(resp) is not None:
                # no token yet, an expired one, or one the registry dropped: ask for a new one once
                if self._challenge and self._challenge[0] == "bearer":
                    self.tokens.drop(scope)
                refreshed = True
                if content is not None and not isinstance(content, bytes):
                    raise RegistryError(
                        f"{self.host}: {what}: the registry asked for authentication mid-upload"
                    )
                continue
            if status in RETRY_STATUS and retry and attempt < RETRIES:
                time.sleep(_retry_after(resp, attempt))
                attempt += 1
                continue
            raise self._status_error(resp, what)

    def _status_error(self, resp: httpx.Response, what: str) -> RegistryError:
        status, text = resp.status_code, _error_text(resp)
        if status == 401:
            if self.credentials:
                return RegistryError(
                    f"{self.host}: {what}: the registry refused the credentials of {self.credentials.username} ({text})",
                    status,
                )
            return RegistryError(
                f"{self.host}: {what}: authentication required ({text}); run 'layerfs login {self.host}'",
                status,
            )
        if status == 403:
            return RegistryError(f"{self.host}: {what}: access denied ({text})", status)
        if status == 404:
            return RegistryError(f"{self.host}: {what}: not found ({text})", status)
        if status == 429:
            return RegistryError(
                f"{self.host}: {what}: too many requests (429), gave up after {RETRIES + 1} tries", status
            )
        if status >= 500:
            return RegistryError(
                f"{self.host}: {what}: server error {status} ({text}), gave up after {RETRIES + 1} tries",
                status,
            )
        return RegistryError(f"{self.host}: {what}: the registry answered {status} ({text})", status)

    # -- the API ---------------------------------------------------------------------------------
    @staticmethod
    def pull_scope(repo: str) -> str:
        return f"repository:{repo}:pull"

    @staticmethod
    def push_scope(repo: str, mount_from: str | None = None) -> str:
        scope = f"repository:{repo}:pull,push"
        return scope + (f" repository:{mount_from}:pull" if mount_from else "")

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index; the bytes checked against the
        digest asked for, or the one the registry says (``Docker-Content-Digest``)."""
        resp = self.request(
            "GET",
            f"/v2/{repo}/manifests/{ref}",
            scope=self.pull_scope(repo),
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
            what=f"manifest {repo}:{ref}" if not ref.startswith("sha256:") else f"manifest {repo}@{ref}",
        )
        try:
            length = resp.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_MANIFEST:
                raise RegistryError(
                    f"{self.host}: the manifest of {repo}:{ref} is {int(length)} bytes, more than a manifest may be "
                    f"({MAX_MANIFEST} bytes)"
                )
            data = bytearray()
            try:
                for piece in resp.iter_raw(65536):
                    data += piece
                    if len(data) > MAX_MANIFEST:
                        raise RegistryError(
                            f"{self.host}: the manifest of {repo}:{ref} is more than a manifest may be ({MAX_MANIFEST} bytes)"
                        )
            except httpx.TransportError as exc:
                raise RegistryError(
                    f"{self.host}: the manifest of {repo}:{ref} was cut short: {exc}"
                ) from None
        finally:
            resp.close()
        body = bytes(data)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.startswith("sha256:") and digest != ref:
            raise RegistryError(f"{self.host}: manifest {repo}@{ref}: content hashes to {digest}")
        said = resp.headers.get("docker-content-digest", "")
        if said.startswith("sha256:") and not ref.startswith("sha256:") and said != digest:
            raise RegistryError(
                f"{self.host}: manifest {repo}:{ref}: content hashes to {digest}, the registry says {said}"
            )
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        return body, media_type, digest

    def get_blob_bytes(self, repo: str, digest: str, size: int, limit: int) -> bytes:
        """A small blob (a config) whole, checked against its digest and size."""
        if size > limit:
            raise RegistryError(f"{self.host}: blob {digest} is {size} bytes, too large for an image config")
        with BlobStream(self, repo, digest, size) as f:
            data = f.read_all()
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest:
            raise RegistryError(f"{self.host}: blob {digest} of {repo}: content hashes to {got}")
        return data

    def blob_exists(self, repo: str, digest: str, scope: str | None = None) -> bool:
        resp = self.request(
            "HEAD",
            f"/v2/{repo}/blobs/{digest}",
            scope=scope or self.push_scope(repo),
            expect=(200, 404),
            what=f"blob {digest} in {repo}",
        )
        return resp.status_code == 200

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; False if the registry would rather have the bytes."""
        resp = self.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            params={"mount": digest, "from": from_repo},
            scope=self.push_scope(repo, from_repo),
            expect=(201, 202),
            what=f"mount of {digest} from {from_repo} into {repo}",
        )
        if resp.status_code == 202 and resp.headers.get("location"):
            # an upload session was opened instead: cancel it (the registry expires it anyway)
            with contextlib.suppress(RegistryError):
                self.request(
                    "DELETE",
                    self._location(resp),
                    scope=self.push_scope(repo),
                    expect=(204, 200, 202, 404),
                    retry=False,
                )
        return resp.status_code == 201

    def _location(self, resp: httpx.Response) -> str:
        location = resp.headers.get("location")
        if not location:
            raise RegistryError(f"{self.host}: an upload answer without a Location")
        return str(resp.url.join(location))

    def upload_blob(
        self, repo: str, chunks: Callable[[], Iterable[bytes]], progress: Callable[[int], None] | None = None
    ) -> tuple[str, int]:
        """Upload a blob streamed from ``chunks()`` (called again if the upload has to start
        over): POST, one streamed PATCH, PUT with the digest computed on the way."""
        scope = self.push_scope(repo)
        for attempt in range(RETRIES + 1):
            start = self.request(
                "POST", f"/v2/{repo}/blobs/uploads/", scope=scope, expect=(202,), what=f"upload to {repo}"
            )
            location = self._location(start)
            sha = hashlib.sha256()
            size = 0

            def body(sha: Any = sha) -> Iterator[bytes]:
                nonlocal size
                for piece in chunks():
                    sha.update(piece)
                    size += len(piece)
                    if progress is not None:
                        progress(len(piece))
                    yield piece

            try:
                patched = self.request(
                    "PATCH",
                    location,
                    scope=scope,
                    content=body(),
                    headers={"Content-Type": "application/octet-stream"},
                    expect=(202, 204),
                    retry=False,
                    what=f"upload to {repo}",
                )
            except RegistryError as exc:
                if attempt < RETRIES and (exc.status is None or exc.status in RETRY_STATUS):
                    time.sleep(_backoff(attempt))
                    continue
                raise
            digest = "sha256:" + sha.hexdigest()
            done = httpx.URL(self._location(patched)).copy_merge_params({"digest": digest})
            self.request(
                "PUT", str(done), scope=scope, expect=(201, 204), what=f"upload of {digest} to {repo}"
            )
            return digest, size
        raise AssertionError("unreachable")

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        resp = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{ref}",
            scope=self.push_scope(repo),
            content=body,
            headers={"Content-Type": media_type},
            expect=(201, 200, 202),
            what=f"manifest {repo}:{ref}",
        )
        return resp.headers.get("docker-content-digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    def check_login(self) -> None:
        """Raise RegistryError unless the registry accepts our credentials (``login``)."""
        resp = self.request("GET", "/v2/", scope="", expect=(200,), what="login")
        resp.close()


class BlobStream:
    """A blob being downloaded, as a file object (``read(n)``).

    It never returns more than ``size`` bytes (a registry sending more is refused), and a
    download that breaks off is resumed with ``Range: bytes=OFFSET-`` (a registry that ignores
    the range is read past what we have).  Digest checking is the reader's: the importer hashes
    what it reads.  ``cancel`` (an Event) makes the next read raise ``Cancelled``."""

    def __init__(
        self,
        registry: Registry,
        repo: str,
        digest: str,
        size: int,
        *,
        cancel: threading.Event | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._reg = registry
        self._repo = repo
        self.digest = digest
        self.size = size
        self.offset = 0
        self.resumes = 0
        self._cancel = cancel
        self._progress = progress
        self._failures = 0
        self._skip = 0
        self._resp: httpx.Response | None = None
        self._it: Iterator[bytes] | None = None
        self._pending = memoryview(b"")
        self._open()

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._resp is not None:
            with contextlib.suppress(Exception):
                self._resp.close()
            self._resp = None

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        resp = self._reg.request(
            "GET",
            f"/v2/{self._repo}/blobs/{self.digest}",
            scope=Registry.pull_scope(self._repo),
            headers=headers,
            stream=True,
            expect=(200, 206, 416),
            what=f"blob {self.digest} of {self._repo}",
        )
        if resp.status_code == 416:
            resp.close()
            raise RegistryError(
                f"{self._reg.host}: blob {self.digest} is truncated: the registry has {self.offset} of its "
                f"{self.size} bytes"
            )
        self._skip = 0
        if self.offset and resp.status_code == 200:
            self._skip = self.offset  # the range was ignored: read past what we have
        elif self.offset:
            start = resp.headers.get("content-range", "").removeprefix("bytes ").split("-")[0]
            if start != str(self.offset):
                resp.close()
                raise RegistryError(
                    f"{self._reg.host}: blob {self.digest}: asked for bytes from {self.offset}, got "
                    f"{resp.headers.get('content-range', 'no Content-Range')}"
                )
        length = resp.headers.get("content-length", "")
        if not self.offset and length.isdigit() and int(length) > self.size:
            resp.close()
            raise RegistryError(
                f"{self._reg.host}: blob {self.digest} is larger than its descriptor's {self.size} bytes "
                f"(the registry sends {int(length)})"
            )
        self._resp = resp
        self._it = resp.iter_raw()  # as it arrives: what came before a drop is kept

    def _resume(self, why: str) -> None:
        self.close()
        self._failures += 1
        if self._failures > RESUMES:
            raise RegistryError(
                f"{self._reg.host}: blob {self.digest}: {why} at byte {self.offset} of {self.size}, "
                f"and {RESUMES} range requests to resume it failed"
            )
        time.sleep(_backoff(self._failures - 1))
        self.resumes += 1
        self._open()

    def read(self, n: int = -1) -> bytes:
        while True:
            if self._cancel is not None and self._cancel.is_set():
                raise Cancelled()
            if self._pending:
                take = len(self._pending) if n < 0 else min(n, len(self._pending))
                out = bytes(self._pending[:take])
                self._pending = self._pending[take:]
                self.offset += take
                if self._progress is not None:
                    self._progress(take)
                return out
            if self.offset >= self.size:
                self._check_end()
                return b""
            assert self._it is not None
            why = ""
            try:
                data = next(self._it)
            except StopIteration:
                data, why = b"", "the registry ended the blob early"
            except httpx.TransportError as exc:
                data, why = b"", f"the connection dropped ({exc})"
            if not data:
                self._resume(why or "the registry ended the blob early")
                continue
            if self._skip:
                drop = min(self._skip, len(data))
                self._skip -= drop
                data = data[drop:]
                if not data:
                    continue
            if self.offset + len(data) > self.size:
                self.close()
                raise RegistryError(
                    f"{self._reg.host}: blob {self.digest} is larger than its descriptor's {self.size} bytes"
                )
            self._failures = 0
            self._pending = memoryview(data)

    def _check_end(self) -> None:
        """Past ``size``: more bytes would mean the descriptor lied."""
        if self._it is None:
            return
        try:
            extra = next(self._it)
        except (StopIteration, httpx.TransportError):
            extra = b""
        it, self._it = self._it, None
        del it
        self.close()
        if extra:
            raise RegistryError(
                f"{self._reg.host}: blob {self.digest} is larger than its descriptor's {self.size} bytes"
            )

    def read_all(self) -> bytes:
        out = bytearray()
        while piece := self.read(READ_SIZE):
            out += piece
        return bytes(out)
