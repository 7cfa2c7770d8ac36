"""Registry credentials and tokens.

Credentials are read where podman and docker keep them, first match wins:

1. the containers auth file: ``$REGISTRY_AUTH_FILE``, else ``$XDG_RUNTIME_DIR/containers/auth.json``
   (podman login's; ``/run/containers/UID/auth.json`` without that variable), then
   ``$XDG_CONFIG_HOME/containers/auth.json``;
2. docker's ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``.

Both hold ``{"auths": {"HOST": {"auth": base64("user:password")}}}`` (docker keys Docker Hub as
``https://index.docker.io/v1/``).  ``login`` writes docker's file, which podman also reads, and
the containers auth file too when that file exists (an entry there would shadow docker's);
``logout`` removes the registry from both.  Credential helpers (``credsStore``, ``credHelpers``)
are not run: a registry only they know is treated as anonymous.

Tokens: a 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` is answered by
asking the realm for a token for the repository's scope (with the credentials, if any, as basic
auth); tokens are cached per scope until they expire (``expires_in``, 60 s by default) or the
registry refuses them, then fetched again.  ``Basic`` challenges get the credentials.

``TokenCache`` is thread-safe (one lock); the file functions are not (the CLI calls them once).
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from layerfs.tools.registry.reference import DOCKER_HUB, DOCKER_HUB_CONFIG_KEY


class AuthError(Exception):
    """Credentials are missing or refused; the message is for the user."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def containers_auth_file() -> str:
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return os.environ["REGISTRY_AUTH_FILE"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "containers", "auth.json")
    return f"/run/containers/{os.getuid()}/auth.json"  # containers/image's choice without it


def _config_home_auth_file() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "containers", "auth.json")


def docker_config_file() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def _keys(registry: str) -> list[str]:
    """The keys a registry may be stored under in an ``auths`` map."""
    if registry == DOCKER_HUB:
        return [
            DOCKER_HUB_CONFIG_KEY,
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "https://registry-1.docker.io",
        ]
    return [
        registry,
        f"https://{registry}",
        f"http://{registry}",
        f"https://{registry}/v1/",
        f"https://{registry}/v2/",
    ]


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read the credentials file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise AuthError(f"the credentials file {path} is not a JSON object")
    return data


def _decode(entry: Any, path: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise AuthError(f"the credentials file {path} has a malformed 'auth' entry") from None
        if sep:
            return Credentials(user, password)
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]))
    return None


def auth_files() -> list[str]:
    return [containers_auth_file(), _config_home_auth_file(), docker_config_file()]


def find(registry: str) -> Credentials | None:
    """The stored credentials for ``registry`` (host[:port]), or None (anonymous)."""
    for path in auth_files():
        auths = _read(path).get("auths") or {}
        if not isinstance(auths, dict):
            continue
        for key in _keys(registry):
            found = _decode(auths.get(key), path)
            if found is not None:
                return found
    return None


def _write(path: str, data: dict[str, Any]) -> None:
    """Replace the file whole (a new file renamed over the old), private to its owner."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".auth-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent="\t")
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def store_credentials(registry: str, creds: Credentials) -> list[str]:
    """Save credentials for ``registry`` (login); the files written."""
    entry = {"auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()}
    written = []
    targets = [(docker_config_file(), DOCKER_HUB_CONFIG_KEY if registry == DOCKER_HUB else registry)]
    if os.path.exists(containers_auth_file()):
        targets.append((containers_auth_file(), registry))
    for path, key in targets:
        data = _read(path)
        auths = data.setdefault("auths", {})
        if not isinstance(auths, dict):
            raise AuthError(f"the credentials file {path} has a malformed 'auths' entry")
        for other in _keys(registry):  # one entry per registry, under the key this file uses
            auths.pop(other, None)
        auths[key] = entry
        _write(path, data)
        written.append(path)
    return written


def remove_credentials(registry: str) -> list[str]:
    """Forget ``registry`` (logout) in every file that names it; the files changed."""
    changed = []
    for path in auth_files():
        data = _read(path)
        auths = data.get("auths")
        if not isinstance(auths, dict):
            continue
        gone = [k for k in _keys(registry) if k in auths]
        if gone:
            for k in gone:
                del auths[k]
            _write(path, data)
            changed.append(path)
    return changed


# -- challenges and tokens ------------------------------------------------------------------------
_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _PARAM.finditer(rest)
    }
    return scheme.lower(), {k: v.replace('\\"', '"') for k, v in params.items()}


@dataclass
class _Token:
    value: str
    expires: float


class TokenCache:
    """Bearer tokens of one registry, by scope."""

    # a token is renewed this long before the registry would refuse it
    MARGIN = 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, _Token] = {}
        self.fetched = 0  # tokens asked for (tests count them)

    def get(self, scope: str) -> str | None:
        with self._lock:
            t = self._tokens.get(scope)
            if t is None or t.expires - self.MARGIN <= time.monotonic():
                return None
            return t.value

    def put(self, scope: str, value: str, expires_in: float) -> None:
        with self._lock:
            self.fetched += 1
            self._tokens[scope] = _Token(value, time.monotonic() + max(expires_in, 0.0))

    def drop(self, scope: str) -> None:
        with self._lock:
            self._tokens.pop(scope, None)


def token_lifetime(body: dict[str, Any]) -> float:
    """Seconds a token answer is good for: ``expires_in`` (the spec's default is 60)."""
    try:
        value = float(body.get("expires_in") or 60)
    except (TypeError, ValueError):
        value = 60.0
    return value
