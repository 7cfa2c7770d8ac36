"""Image references as Docker users write them: ``name[:tag]``, ids and id prefixes.

Names are shown the way ``docker images`` shows them: ``docker.io/library/``
and ``docker.io/`` are dropped, a missing tag means ``latest``.
"""

from __future__ import annotations

import re

from layerfs.store import Store

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?/)"
_NAME = re.compile(rf"^(?:{_DOMAIN})?{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_HEX = re.compile(r"^[0-9a-f]{4,64}$")


class RefError(ValueError):
    pass


def split(ref: str) -> tuple[str, str]:
    """``name:tag`` -> (name, tag), with ``latest`` for a missing tag."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, "latest"


def normalize(ref: str) -> str:
    name, tag = split(ref.strip())
    for registry in ("docker.io/", "index.docker.io/"):
        if name.startswith(registry):
            name = name[len(registry) :]
    if name.startswith("library/") and name.count("/") == 1:
        name = name[len("library/") :]
    if not _NAME.match(name):
        raise RefError(
            f"invalid reference format: repository name {name!r} must be lowercase letters, "
            "digits and separators"
        )
    if not _TAG.match(tag):
        raise RefError(f"invalid reference format: tag {tag!r}")
    return f"{name}:{tag}"


def id_part(ref: str) -> str | None:
    """The hex of an image id or id prefix (``sha256:`` optional), or None for a name."""
    ref = ref.strip()
    hexpart = ref[7:] if ref.startswith("sha256:") else ref
    return hexpart if _HEX.match(hexpart) else None


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
        raise RefError(f"no such image: {ref}") from None
    tagged = store.get_tag(name)
    if tagged is None:
        raise RefError(f"no such image: {ref}")
    return tagged
