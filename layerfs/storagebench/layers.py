"""Generated image layers, written twice from one list of operations: as an uncompressed tar
(OCI whiteout names), for an OCI image layout that ``layerfs import`` reads, and as a layer
directory in the kernel overlayfs format (a whiteout is a 0/0 character device, an opaque
directory carries ``trusted.overlay.opaque=y``), for ``fuse-overlayfs`` and ``mount -t
overlay``.  The developer benchmarks (``bench/uniongen.py``) and ``layerfs bench`` share it.

An operation is one of::

    ("dir", path, mode)  ("file", path, data | (size, producer), mode)  ("symlink", path, target)
    ("whiteout", path)   ("opaque", dir path)  -- the directory itself must come first

Pure functions over the paths they are given; no state, so thread-safe.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import tarfile
from collections.abc import Callable, Iterator
from typing import Any, Union

KiB, MiB = 1 << 10, 1 << 20
MTIME = 1_700_000_000
OPAQUE_XATTR = "trusted.overlay.opaque"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"

Data = Union[bytes, tuple[int, Callable[[], Iterator[bytes]]]]
Op = tuple[Any, ...]

_WORDS = (
    "the of and to in is for that this with be on as it by are not or from at file an which if can "
    "use data value default return set option see also must should when new name error path list "
    "type string number will may used function object module version lorem ipsum dolor sit amet"
).split()


class Content:
    """File contents from a seed: small text-like files, and large files of 64 KiB pieces
    alternating random bytes and text (so about half of them compresses)."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        words = rng.choices(_WORDS, k=400_000)
        self.text = " ".join(words).encode()[: 2 * MiB]

    def small(self, rng: random.Random, tag: str, size: int) -> bytes:
        head = f"{tag}\n".encode()
        off = rng.randrange(len(self.text) - size)
        return (head + rng.randbytes(16).hex().encode() + self.text[off : off + size])[:size]

    def big(self, seed: int, size: int) -> Iterator[bytes]:
        rng = random.Random(seed)
        piece = 64 * KiB
        for i, pos in enumerate(range(0, size, piece)):
            n = min(piece, size - pos)
            if i % 2:
                off = rng.randrange(len(self.text) - n)
                yield self.text[off : off + n]
            else:
                yield rng.randbytes(n)


def chunks(data: Data) -> tuple[int, Iterator[bytes]]:
    """A file's size and its bytes, piece by piece."""
    if isinstance(data, bytes):
        return len(data), iter((data,))
    size, produce = data
    return size, produce()


class _IterReader(io.RawIOBase):
    def __init__(self, it: Iterator[bytes]) -> None:
        self._it = it
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def write_tar(ops: list[Op], out: str) -> None:
    """The layer as an uncompressed tar (OCI whiteout names)."""

    def info(path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(path)
        ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, MTIME, 0, 0
        return ti

    with open(out, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as t:
        for op in ops:
            kind, path = op[0], op[1]
            if kind == "dir":
                t.addfile(info(path + "/", tarfile.DIRTYPE, op[2]))
            elif kind == "file":
                size, it = chunks(op[2])
                ti = info(path, tarfile.REGTYPE, op[3])
                ti.size = size
                t.addfile(ti, io.BufferedReader(_IterReader(it), 1 * MiB))
            elif kind == "symlink":
                ti = info(path, tarfile.SYMTYPE, 0o777)
                ti.linkname = op[2]
                t.addfile(ti)
            elif kind == "whiteout":
                head, _, name = path.rpartition("/")
                t.addfile(info(f"{head}/.wh.{name}" if head else f".wh.{name}", tarfile.REGTYPE, 0o644))
            elif kind == "opaque":
                t.addfile(info(f"{path}/.wh..wh..opq", tarfile.REGTYPE, 0o644))
            else:
                raise ValueError(kind)


def write_overlay_dir(ops: list[Op], dest: str) -> None:
    """The layer as a kernel overlayfs layer directory."""
    os.makedirs(dest)
    os.chmod(dest, 0o755)
    dirs = [""]
    for op in ops:
        kind, path = op[0], op[1]
        p = os.path.join(dest, path)
        if kind != "dir":
            os.makedirs(os.path.dirname(p), exist_ok=True)
        if kind == "dir":
            os.makedirs(p, exist_ok=True)
            os.chmod(p, op[2])
            dirs.append(path)
        elif kind == "file":
            _, it = chunks(op[2])
            with open(p, "wb") as f:
                for piece in it:
                    f.write(piece)
            os.chmod(p, op[3])
            os.utime(p, (MTIME, MTIME))
        elif kind == "symlink":
            os.symlink(op[2], p)
            os.utime(p, (MTIME, MTIME), follow_symlinks=False)
        elif kind == "whiteout":
            os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif kind == "opaque":
            os.setxattr(p, OPAQUE_XATTR, b"y")
    for d in sorted(dirs, key=lambda s: -s.count("/") - (s != "")):
        os.utime(os.path.join(dest, d), (MTIME, MTIME))


DEFAULT_CONFIG: dict[str, Any] = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]}}


def write_layout(layer_tars: list[str], out: str, ref: str, config: dict[str, Any] | None = None) -> str:
    """An OCI image layout of uncompressed tar layers (moved in), bottom first; ``config`` is
    the image config without its ``rootfs`` (which is filled in).  Returns the layout."""
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put_bytes(data: bytes) -> tuple[str, int]:
        h = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, h), "wb") as f:
            f.write(data)
        return "sha256:" + h, len(data)

    descs, diff_ids = [], []
    for tar in layer_tars:
        h = hashlib.sha256()
        with open(tar, "rb") as f:
            for block in iter(lambda: f.read(4 * MiB), b""):
                h.update(block)
        size = os.path.getsize(tar)
        os.rename(tar, os.path.join(blobs, h.hexdigest()))
        descs.append({"mediaType": MT_LAYER, "digest": "sha256:" + h.hexdigest(), "size": size})
        diff_ids.append("sha256:" + h.hexdigest())
    # without ``config``: the bytes (so the image ids) the developer benchmarks always wrote
    rootfs = {"type": "layers", "diff_ids": diff_ids}
    cfg = json.dumps(dict(config or DEFAULT_CONFIG, rootfs=rootfs), sort_keys=config is not None).encode()
    cfg_digest, cfg_size = put_bytes(cfg)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": cfg_size},
            "layers": descs,
        }
    ).encode()
    man_digest, man_size = put_bytes(manifest)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": man_digest,
                "size": man_size,
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    with open(os.path.join(out, "index.json"), "w") as out_f:
        json.dump(index, out_f)
    with open(os.path.join(out, "oci-layout"), "w") as out_f:
        json.dump({"imageLayoutVersion": "1.0.0"}, out_f)
    return out


def layout_layers(layout: str) -> tuple[list[str], dict[str, Any]]:
    """The layer blob files of the one image in an OCI layout written by ``write_layout`` (or
    ``layerfs save --format oci-dir``), bottom first, and its config."""
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)

    def blob(digest: str) -> str:
        algo, _, hexdigest = digest.partition(":")
        return os.path.join(layout, "blobs", algo, hexdigest)

    with open(blob(index["manifests"][0]["digest"])) as f:
        manifest = json.load(f)
    with open(blob(manifest["config"]["digest"])) as f:
        config = json.load(f)
    return [blob(d["digest"]) for d in manifest["layers"]], config
