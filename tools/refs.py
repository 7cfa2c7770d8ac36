"""Image references as Docker users write them: ``name[:tag]``, ids and id prefixes.

Names are shown the way ``docker images`` shows them: ``docker.io/library/``
and ``docker.io/`` are dropped, a missing tag means ``latest``.
"""

from __future__ import annotations

import re

from layerfs.store import Store

# docker's reference grammar (github.com/distribution/reference), ASCII only as in Go
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*", re.ASCII)
_HOST_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_HOST_PART}(?:\.{_HOST_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?", re.ASCII)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
_HEX = re.compile(r"[0-9a-f]{4,64}", re.ASCII)
_ID = re.compile(r"[0-9a-f]{64}", re.ASCII)
PATH_MAX = 255  # docker: a repository path (library/busybox for busybox) has at most 255 characters
KEY_MAX = 511  # LMDB's largest key: a tag record is keyed by the whole name:tag


class RefError(ValueError):
    pass


def shown(ref: str) -> str:
    """A reference as a one-line message quotes it: control characters escaped, at most about
    80 characters (a 5,000-character name is not echoed whole)."""
    s = ref if ref.isprintable() else repr(ref)[1:-1]
    return s if len(s) <= 80 else f"{s[:60]}... ({len(ref)} characters)"


def split(ref: str) -> tuple[str, str]:
    """``name:tag`` -> (name, tag), with ``latest`` for a missing tag."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, "latest"


def normalize(ref: str) -> str:
    """``name[:tag]`` as stored and shown (``docker.io/library/`` dropped, ``latest`` added),
    checked as docker checks a reference; RefError says what is wrong.

    The one check of every name given to an image: ``import -t``, ``tag``, ``commit``, the names
    an archive carries, and names looked up.  A first component with a dot, a colon or an upper
    case letter, or ``localhost``, is a registry host (so ``Registry/x`` is valid, as in docker);
    the repository path must be lower case and at most 255 characters counted as docker counts
    them (``library/x`` for ``x``); a tag is at most 128 letters, digits, ``_``, ``.`` and ``-``,
    not starting with ``.`` or ``-``."""
    ref = ref.strip()
    if not ref:
        raise RefError("invalid reference format: the name is empty")
    if _ID.fullmatch(ref):
        raise RefError(f"invalid repository name ({shown(ref)}), cannot specify 64-byte hexadecimal strings")
    name, tag = split(ref)
    first, slash, rest = name.partition("/")
    if slash and (first == "localhost" or any(c in first for c in ".:") or first.lower() != first):
        domain, path = first, rest
    else:
        domain, path = "", name
    if domain in ("docker.io", "index.docker.io"):
        domain = ""
    if not domain and path.startswith("library/") and path.count("/") == 1:
        path = path[len("library/") :]
    if path.lower() != path:
        raise RefError(f"invalid reference format: repository name ({shown(path)}) must be lowercase")
    if domain and not _DOMAIN.fullmatch(domain):
        raise RefError(f"invalid reference format: {shown(domain)} is not a registry host name")
    if not _PATH.fullmatch(path):
        raise RefError(
            f"invalid reference format: repository name '{shown(path)}' must be lowercase letters, digits "
            "and separators ('.', '_', '__', '-') between them, in components separated by '/'"
        )
    if len(path if domain or "/" in path else "library/" + path) > PATH_MAX:
        raise RefError(
            f"invalid reference format: repository name must not be more than {PATH_MAX} characters"
        )
    if not _TAG.fullmatch(tag):
        raise RefError(
            f"invalid reference format: tag '{shown(tag)}' must be 1 to 128 letters, digits, '_', '.' "
            "and '-', not starting with '.' or '-'"
        )
    full = f"{domain}/{path}:{tag}" if domain else f"{path}:{tag}"
    if len(full.encode()) > KEY_MAX:
        raise RefError(
            f"invalid reference format: {shown(full)} is longer than {KEY_MAX} bytes, the longest name a store holds"
        )
    return full


def id_part(ref: str) -> str | None:
    """The hex of an image id or id prefix (``sha256:`` optional), or None for a name."""
    ref = ref.strip()
    hexpart = ref[7:] if ref.startswith("sha256:") else ref
    return hexpart if _HEX.fullmatch(hexpart) else None


def resolve(store: Store, ref: str) -> bytes:
    """An image id (raw sha256) from a name[:tag], a full id or a unique id prefix."""
    ref = ref.strip()
    hexpart = id_part(ref)
    if hexpart is not None:
        if len(hexpart) == 64:
            image_id = bytes.fromhex(hexpart)
            if store.get_image(image_id) is not None:
                return image_id
        else:
            matches = [k for k, _ in store.images() if k.hex().startswith(hexpart)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise RefError(f"image id prefix {hexpart} is ambiguous")
    try:
        name = normalize(ref)
    except RefError:
        raise RefError(f"no such image: {shown(ref)}") from None
    tagged = store.get_tag(name)
    if tagged is None:
        raise RefError(f"no such image: {shown(ref)}")
    return tagged
