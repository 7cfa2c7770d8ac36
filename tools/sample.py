"""Build the project's sample image from files the host has: an OCI image layout.

``python -m layerfs.tools.sample OUT [--busybox PATH]`` writes a three-layer
image around the host's static busybox (Debian: ``busybox-static``) that
exercises what an importer and a union filesystem must get right:

1. base: ``/bin/busybox`` with applet symlinks, ``/etc`` files, a hardlinked
   pair, a FIFO, a setuid file, an xattr (``user.layerfs``), nested dirs;
2. change: deletes a file (``.wh.``), replaces a directory wholesale (opaque
   ``.wh..wh..opq``), adds a hardlinked pair, a long path name;
3. app: a shell script as the image's command and a 1 MiB+ file (several chunks).

The bytes are reproducible: fixed mtimes, sorted members, gzip without a
timestamp, so the image id is the same on every machine with the same busybox.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile

from layerfs.tools.export import ImageExport, bytes_blob, write_oci_dir
from layerfs.tools.sources import MT_OCI_CONFIG, MT_OCI_LAYER, MT_OCI_MANIFEST
from layerfs.userland import userland_arch

MTIME = 1_700_000_000
APPLETS = [
    "sh",
    "ls",
    "cat",
    "echo",
    "true",
    "false",
    "find",
    "stat",
    "id",
    "env",
    "sleep",
    "mkdir",
    "rm",
    "touch",
    "grep",
    "sed",
    "wc",
    "head",
    "tail",
    "uname",
    "printf",
    "test",
    "cp",
    "mv",
    "ln",
]
REF_NAME = "layerfs-sample:latest"


class _Layer:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def add(
        self,
        name: str,
        kind: bytes = tarfile.REGTYPE,
        data: bytes = b"",
        mode: int = 0o644,
        link: str = "",
        xattrs: dict[str, str] | None = None,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = MTIME
        info.uid, info.gid = uid, gid
        info.uname = info.gname = "root" if uid == 0 else ""
        info.linkname = link
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        if kind == tarfile.REGTYPE:
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        else:
            self.tar.addfile(info)

    def blob(self) -> tuple[bytes, bytes]:
        """(gzip blob, uncompressed tar)."""
        self.tar.close()
        raw = self.buf.getvalue()
        return gzip.compress(raw, compresslevel=6, mtime=0), raw


def find_busybox() -> str:
    for p in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        if p and os.path.exists(p):
            return p
    raise SystemExit(
        "layerfs sample: no busybox found; install busybox-static (apt-get install busybox-static)"
    )


def build_layers(busybox: bytes) -> list[_Layer]:
    base = _Layer()
    for d in (
        "bin",
        "etc",
        "tmp",
        "var",
        "var/lib",
        "var/lib/app",
        "usr",
        "usr/share",
        "usr/share/doc",
        "home",
    ):
        base.add(d, tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
    base.add("bin/busybox", data=busybox, mode=0o755)
    for applet in APPLETS:
        base.add(f"bin/{applet}", tarfile.SYMTYPE, link="busybox", mode=0o777)
    base.add("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    base.add("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
    base.add("etc/hostname", data=b"layerfs-sample\n")
    base.add("etc/motd", data=b"Welcome to the layerfs sample image.\n")
    base.add("etc/os-release", data=b'NAME="layerfs sample"\nID=layerfs-sample\n')
    base.add("var/lib/app/state.db", data=b"old state\n" * 100, uid=1000, gid=1000)
    base.add("var/lib/app/cache.bin", data=bytes(range(256)) * 16)
    base.add("usr/share/doc/README", data=b"a file and its hardlink share one inode\n")
    base.add("usr/share/doc/README.link", tarfile.LNKTYPE, link="usr/share/doc/README")
    base.add("bin/su-demo", data=b"#!/bin/sh\nid\n", mode=0o4755)
    base.add("tmp/fifo", tarfile.FIFOTYPE, mode=0o600)
    base.add("etc/tagged", data=b"has an xattr\n", xattrs={"user.layerfs": "sample"})

    change = _Layer()
    change.add("etc", tarfile.DIRTYPE, mode=0o755)
    change.add("etc/.wh.motd")  # deleted
    change.add("var", tarfile.DIRTYPE, mode=0o755)
    change.add("var/lib", tarfile.DIRTYPE, mode=0o755)
    change.add("var/lib/app", tarfile.DIRTYPE, mode=0o755)
    change.add("var/lib/app/.wh..wh..opq")  # everything of layer 1 below here is gone
    change.add("var/lib/app/state.db", data=b"new state\n")
    change.add("usr", tarfile.DIRTYPE, mode=0o755)
    change.add("usr/share", tarfile.DIRTYPE, mode=0o755)
    change.add("usr/share/doc", tarfile.DIRTYPE, mode=0o755)
    # a copy of a layer-1 file and a hardlink to it inside this layer (a hardlink to a file of
    # a lower layer imports here, but containers/storage refuses such layers: podman load fails)
    change.add("usr/share/doc/README.again", data=b"a file and its hardlink share one inode\n")
    change.add("usr/share/doc/README.again2", tarfile.LNKTYPE, link="usr/share/doc/README.again")
    deep = "usr/share/doc/" + "/".join([f"a-rather-long-directory-name-{i:02d}" for i in range(6)])
    parts = deep.split("/")
    for i in range(4, len(parts) + 1):  # usr/share/doc is already in
        change.add("/".join(parts[:i]), tarfile.DIRTYPE, mode=0o755)
    change.add(deep + "/" + "x" * 120 + ".txt", data=b"long paths need PAX headers\n")

    app = _Layer()
    app.add("app", tarfile.DIRTYPE, mode=0o755)
    app.add(
        "app/run.sh",
        data=b'#!/bin/sh\necho "hello from the layerfs sample image on $(uname -m)"\ncat /etc/hostname\n',
        mode=0o755,
    )
    app.add("app/data.bin", data=b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(40000)))
    return [base, change, app]


def write_layout(out: str, busybox_path: str) -> str:
    """Write the OCI layout at ``out``; returns the manifest digest."""
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    layers, diff_ids = [], []
    for layer in build_layers(busybox):
        blob, raw = layer.blob()
        layers.append(bytes_blob(blob, MT_OCI_LAYER + "+gzip"))
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    # the busybox is this userland's (a 32-bit Raspberry Pi OS on a 64-bit kernel: arm/v7)
    arch, variant = userland_arch()
    created = "2023-11-14T22:13:20Z"
    config = {
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/app/run.sh"],
            "WorkingDir": "/app",
            "Labels": {"org.opencontainers.image.title": "layerfs sample"},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": created, "created_by": "layerfs sample: busybox base"},
            {"created": created, "created_by": "layerfs sample: delete, replace, link"},
            {"created": created, "created_by": "layerfs sample: app"},
            {"created": created, "created_by": 'CMD ["/app/run.sh"]', "empty_layer": True},
        ],
    }
    if arch == "arm":
        config["variant"] = variant
    config_blob = bytes_blob(json.dumps(config, sort_keys=True).encode(), MT_OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": config_blob.digest, "size": config_blob.size},
        "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b in layers],
    }
    manifest_blob = bytes_blob(json.dumps(manifest, sort_keys=True).encode(), MT_OCI_MANIFEST)
    write_oci_dir(out, [ImageExport(config_blob.digest, [REF_NAME], config_blob, manifest_blob, layers)])
    return manifest_blob.digest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m layerfs.tools.sample", description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory to write the OCI image layout to")
    p.add_argument("--busybox", help="busybox binary to use (default: the host's)")
    args = p.parse_args(argv)
    digest = write_layout(args.out, args.busybox or find_busybox())
    print(f"{args.out}: {REF_NAME} ({digest})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
