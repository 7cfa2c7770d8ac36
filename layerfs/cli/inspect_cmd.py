"""``layerfs inspect IMAGE...``: the image as JSON, shaped like ``docker image inspect``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from layerfs.cli.common import CLIError, open_store, print_json
from layerfs.store import Store
from layerfs.tools.refs import RefError, resolve


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("inspect", help="show image details as JSON")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=run)


def describe(store: Store, image_id: bytes) -> dict[str, Any]:
    rec = store.get_image(image_id)
    assert rec is not None
    config = json.loads(store.read_object(rec.config))
    tags = sorted(name for name, i in store.tags().items() if i == image_id)
    os_, _, arch = rec.platform.partition("/")
    arch, _, variant = arch.partition("/")
    out = {
        "Id": "sha256:" + image_id.hex(),
        "RepoTags": tags,
        "RepoDigests": [],
        "Created": config.get("created", ""),
        "Author": config.get("author", ""),
        "Config": config.get("config", {}),
        "Architecture": config.get("architecture", arch),
        "Os": config.get("os", os_),
        "Size": rec.size,
        "RootFS": {"Type": "layers", "Layers": ["sha256:" + h.hex() for h in rec.layers]},
        "Manifest": {"Digest": "sha256:" + rec.manifest.hex(), "MediaType": rec.manifest_media_type},
        "Platform": rec.platform,
    }
    if config.get("variant"):
        out["Variant"] = config["variant"]
    return out


def run(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        out = []
        for ref in args.images:
            try:
                out.append(describe(store, resolve(store, ref)))
            except RefError as exc:
                raise CLIError(str(exc)) from None
    print_json(out)
    return 0
