"""Registry references as docker reads them: ``[REGISTRY/]PATH[:TAG][@sha256:HEX]``.

``busybox`` is ``docker.io/library/busybox:latest``; a first component with a dot, a colon or
an upper-case letter, or ``localhost``, is a registry host.  The name an image is stored and
shown under is ``tools.refs.normalize``'s (``docker.io/library/`` dropped); a reference with a
digest and no tag names no tag (docker shows such an image as ``<none>``).

Docker Hub is ``docker.io`` in references and credentials files, ``registry-1.docker.io`` on the
wire, and ``https://index.docker.io/v1/`` in docker's ``config.json``.
``LAYERFS_REGISTRY_MIRROR`` (``[http://]HOST[:PORT]``) sends Docker Hub pulls to a mirror first,
as docker's ``registry-mirrors`` does; the image keeps its Docker Hub name.

Pure functions; thread-safe.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from layerfs.tools import refs
from layerfs.tools.refs import RefError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port]; docker.io for Docker Hub
    repository: str  # library/busybox
    tag: str | None  # None when only a digest was given
    digest: str | None  # sha256:... of the manifest (or index)

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str | None:
        """The stored name (``busybox:latest``, ``127.0.0.1:5000/x:1``), None without a tag."""
        if self.tag is None:
            return None
        return refs.normalize(f"{self.registry}/{self.repository}:{self.tag}")

    @property
    def manifest_ref(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def parse(ref: str, *, default_tag: str | None = "latest") -> Reference:
    """A reference as docker pull/push reads it; RefError with docker's wording otherwise."""
    text = ref.strip()
    digest = None
    if "@" in text:
        text, _, digest = text.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise RefError(
                f"invalid reference format: digest '{refs.shown(digest)}' is not sha256: and 64 hex digits"
            )
    tagged = refs.split(text)[1] != "latest" or text.endswith(":latest")
    name = refs.normalize(text)  # the checks; adds :latest, drops docker.io/library/
    path, tag = refs.split(name)
    first, slash, rest = path.partition("/")
    if slash and (first == "localhost" or any(c in first for c in ".:") or first.lower() != first):
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, path if "/" in path else f"library/{path}"
    if not tagged:
        tag = None if digest else default_tag  # type: ignore[assignment]
    return Reference(registry, repository, tag, digest)


def registry_host(name: str) -> str:
    """A registry as ``login``/``logout`` take it: ``docker.io`` for none, Docker Hub's aliases
    folded, any ``http(s)://`` and path dropped (``https://index.docker.io/v1/``)."""
    host = name.strip()
    for scheme in ("https://", "http://"):
        if host.startswith(scheme):
            host = host[len(scheme) :]
    host = host.split("/", 1)[0]
    if host in ("", "docker.io", "index.docker.io", "registry-1.docker.io"):
        return DOCKER_HUB
    return host


def mirror() -> tuple[str, bool] | None:
    """Docker Hub's mirror from ``LAYERFS_REGISTRY_MIRROR``: (host[:port], plain HTTP)."""
    value = os.environ.get("LAYERFS_REGISTRY_MIRROR", "").strip().rstrip("/")
    if not value:
        return None
    plain = value.startswith("http://")
    return registry_host(value), plain
