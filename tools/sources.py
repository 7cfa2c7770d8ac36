"""Image sources: OCI image layouts, OCI archives and ``docker save`` archives.

A source answers two questions: which images does it hold (``images()``:
manifest, config and layer descriptors, names), and what are the bytes of a
blob (``open_blob``).  It verifies nothing by itself; ``tools.image`` checks
every digest and size while importing.

Formats recognised (by content, not by file name):

* OCI image layout directory: ``oci-layout`` + ``index.json`` + ``blobs/``;
* a tar of the same (OCI archive, as ``skopeo copy oci-archive:`` writes);
* ``docker save`` archives: legacy (``manifest.json`` + ``<id>/layer.tar``)
  and Docker 25+ (an OCI layout that also carries ``manifest.json``; its
  ``RepoTags`` are used for names when present).

Tar sources may be gzip-compressed as a whole (``docker save | gzip``).
Not thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Any

from layerfs.userland import userland_platform

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
LAYER_TYPES = (
    MT_OCI_LAYER,
    MT_OCI_LAYER + "+gzip",
    MT_OCI_LAYER + "+zstd",
    MT_DOCKER_LAYER,
    MT_DOCKER_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)
# Manifests and configs are small JSON; anything claiming to be bigger is hostile.
MAX_JSON = 16 << 20


class SourceError(ValueError):
    """The source is not an image we can read; the message says why."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
)


class NotRegular(OSError):
    """``open_regular`` found something else than a regular file; ``kind`` says what."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def open_regular(path: str, *, follow: bool) -> IO[bytes]:
    """Open a regular file for reading, and nothing else: opening or reading a FIFO blocks
    until a writer comes (forever), opening a device node can act on the device.  The path is
    resolved with O_PATH, which opens nothing, checked with fstat, and only then opened,
    through /proc/self/fd (the very inode checked).  ``follow=False`` refuses a symbolic
    link as the last component.  Raises FileNotFoundError, or NotRegular."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(next((kind for test, kind in _KINDS if test(mode)), "not a file"))
        return open(f"/proc/self/fd/{fd}", "rb")
    finally:
        os.close(fd)


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    path: str | None = None  # legacy docker archives name blobs by path, not digest

    @classmethod
    def parse(cls, d: Any) -> Descriptor:
        try:
            digest, size = d["digest"], d["size"]
        except (TypeError, KeyError):
            raise SourceError(f"malformed descriptor: {d!r}"[:200]) from None
        if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
            raise SourceError(f"unsupported or malformed digest {digest!r}")
        try:
            bytes.fromhex(digest[7:])
        except ValueError:
            raise SourceError(f"malformed digest {digest!r}") from None
        if not isinstance(size, int) or size < 0:
            raise SourceError(f"malformed size in descriptor of {digest}")
        return cls(d.get("mediaType", ""), digest, size, d.get("annotations") or {}, d.get("platform"))


@dataclass
class ImageRef:
    """One image found in a source, before verification."""

    manifest: Descriptor | None  # None for legacy docker archives (no manifest blob)
    names: list[str]
    platform: str = ""
    legacy: tuple[str, list[str]] | None = None  # legacy docker save: (config path, layer paths)


def host_platform() -> str:
    """The platform of the images this machine runs (its userland's, not its kernel's: a 32-bit
    Raspberry Pi OS on a 64-bit kernel runs ``linux/arm/v7``), the default of import and pull."""
    return userland_platform()


def platform_string(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    s = f"{p.get('os', '')}/{p.get('architecture', '')}"
    if p.get("variant"):
        s += "/" + p["variant"]
    return s


class PlatformError(ValueError):
    """A --platform value that names no platform."""


# what containerd's platforms package knows (GOOS and GOARCH values)
_KNOWN_OS = {
    "aix", "android", "darwin", "dragonfly", "freebsd", "hurd", "illumos", "ios", "js", "linux", "nacl",
    "netbsd", "openbsd", "plan9", "solaris", "wasip1", "windows", "zos",
}  # fmt: skip
_KNOWN_ARCH = {
    "386", "amd64", "amd64p32", "arm", "armbe", "arm64", "arm64be", "loong64", "mips", "mipsle", "mips64",
    "mips64le", "mips64p32", "mips64p32le", "ppc", "ppc64", "ppc64le", "riscv", "riscv64", "s390", "s390x",
    "sparc", "sparc64", "wasm",
}  # fmt: skip


def _norm_os(os_: str) -> str:
    os_ = os_.lower()
    return "darwin" if os_ == "macos" else os_


def _norm_arch(arch: str, variant: str) -> tuple[str, str]:
    """containerd's normalizeArch, except that arm64's default variant is spelled ``v8`` (so
    ``linux/arm64`` and ``linux/arm64/v8`` are one platform) and arm's is ``v7``."""
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        if variant in ("", "8", "v8", "v8.0"):
            return "arm64", "v8"
        return "arm64", "v9" if variant in ("9", "9.0", "v9.0") else variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            return "arm", "v7"
        return "arm", "v" + variant if variant in ("5", "6", "8") else variant
    return arch, variant


def _triple(p: str) -> tuple[str, str, str]:
    """os, architecture, variant of a normalised or stored ``os/arch[/variant]``, comparable."""
    os_, _, rest = p.partition("/")
    arch, _, variant = rest.partition("/")
    return (_norm_os(os_), *_norm_arch(arch, variant))


def normalize_platform(spec: str) -> str:
    """A --platform value as containerd's platforms.Parse reads it, written ``os/arch[/variant]``:
    ``arm64`` and ``aarch64`` are ``linux/arm64/v8``, ``x86_64`` and ``x86-64`` are ``linux/amd64``,
    ``armhf`` ``linux/arm/v7``, ``armel`` ``linux/arm/v6``, ``arm`` ``linux/arm/v7``; a bare
    architecture means linux, a bare operating system this machine's architecture."""
    parts = spec.strip().split("/")
    if "*" in spec or len(parts) > 3 or not all(parts):
        raise PlatformError(f"invalid platform {spec!r}: the form is os/arch[/variant] (linux/arm64, arm64)")
    if len(parts) == 1:
        if _norm_os(parts[0]) in _KNOWN_OS:
            os_, (_, arch, variant) = _norm_os(parts[0]), _triple(host_platform())
            return f"{os_}/{arch}/{variant}" if variant else f"{os_}/{arch}"
        arch, variant = _norm_arch(parts[0], "")
        if arch not in _KNOWN_ARCH:
            raise PlatformError(f"invalid platform {spec!r}: unknown operating system or architecture")
        os_ = "linux"
    else:
        os_ = _norm_os(parts[0])
        arch, variant = _norm_arch(parts[1], parts[2] if len(parts) == 3 else "")
    return f"{os_}/{arch}/{variant}" if variant else f"{os_}/{arch}"


def platform_rank(want: str, have: str) -> int | None:
    """How well an image for ``have`` serves ``want`` (0 best), None if it does not: the same
    platform once both are normalised (``linux/arm64`` is ``linux/arm64/v8``), or, as containerd
    falls back for 32-bit arm, an older arm variant (v7 runs v6 and v5 images)."""
    if not have:
        return None
    w, h = _triple(want), _triple(have)
    if w == h:
        return 0
    if w[:2] == h[:2] and w[1] == "arm" and w[2][1:].isdigit() and h[2][1:].isdigit():
        older = int(w[2][1:]) - int(h[2][1:])
        return older if 0 < older and int(h[2][1:]) >= 5 else None
    return None


def platform_matches(want: str, have: str) -> bool:
    """``linux/arm64`` matches ``linux/arm64/v8`` and ``linux/arm64``; ``arm`` matches
    ``linux/arm/v7`` (and, failing that, v6 or v5)."""
    return platform_rank(want, have) is not None


class Source:
    name: str

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        raise NotImplementedError

    def read_json_blob(self, desc: Descriptor) -> tuple[bytes, Any]:
        if desc.size > MAX_JSON:
            raise SourceError(f"{desc.digest}: {desc.size} bytes is too large for a manifest or config")
        with self.open_blob(desc) as f:
            data = f.read(MAX_JSON + 1)
        try:
            return data, json.loads(data)
        except ValueError:
            raise SourceError(f"{desc.digest} is not valid JSON") from None

    def close(self) -> None:
        pass

    # -- what images are here -----------------------------------------------
    def images(self, platform: str | None) -> list[ImageRef]:
        raise NotImplementedError

    def _from_index(self, index: Any, platform: str | None, default_name: str) -> list[ImageRef]:
        manifests = [Descriptor.parse(m) for m in (index.get("manifests") or [])]
        if not manifests:
            raise SourceError(f"{self.name}: index.json lists no images")
        groups: dict[str, list[Descriptor]] = {}
        for m in manifests:
            groups.setdefault(_ref_name(m), []).append(m)
        out = []
        for ref, descs in groups.items():
            names = _names(ref, descs[0].annotations, default_name)
            if not ref and len(descs) > 1 and not any(d.platform for d in descs):
                # several nameless images (docker save of ids): each is an image, not a platform
                out += [self._pick([d], platform, []) for d in descs]
            else:
                out.append(self._pick(descs, platform, names))
        return out

    def _pick(self, descs: list[Descriptor], platform: str | None, names: list[str]) -> ImageRef:
        """Resolve nested indexes and choose the platform among several manifests."""
        candidates: list[Descriptor] = []
        for d in descs:
            if d.media_type in INDEX_TYPES:
                data, nested = self.read_json_blob(d)
                if len(data) != d.size or "sha256:" + hashlib.sha256(data).hexdigest() != d.digest:
                    raise SourceError(f"image index {d.digest} does not match its digest or size")
                candidates += [Descriptor.parse(m) for m in nested.get("manifests") or []]
            else:
                candidates.append(d)
        candidates = [c for c in candidates if not _is_attestation(c)]
        if len(candidates) == 1 and platform is None:
            only = candidates[0]
            return ImageRef(only, names, platform_string(only.platform))
        best = choose_platform(candidates, platform)
        if best is None:
            raise SourceError(no_platform(candidates, platform, self.name))
        return ImageRef(best, names, platform_string(best.platform))  # none: checked on the config


def choose_platform(candidates: list[Descriptor], platform: str | None) -> Descriptor | None:
    """The manifest for ``platform`` (the host's by default) among an index's, as docker picks
    it: the best platform match, the first in the index among equals; else a lone manifest that
    names no platform (its config says); None if nothing fits."""
    want = platform or host_platform()
    ranked = [
        (rank, i, c)
        for i, c in enumerate(candidates)
        if c.platform and (rank := platform_rank(want, platform_string(c.platform))) is not None
    ]
    if ranked:
        return min(ranked, key=lambda r: r[:2])[2]
    if len(candidates) == 1 and not candidates[0].platform:
        return candidates[0]
    return None


def no_platform(candidates: list[Descriptor], platform: str | None, where: str) -> str:
    """The one line for an index ``choose_platform`` found nothing in."""
    have = ", ".join(sorted(platform_string(c.platform) or "unknown" for c in candidates)) or "nothing"
    return f"no image for platform {platform or host_platform()} in {where} (it has: {have}); use --platform"


def _is_attestation(d: Descriptor) -> bool:
    # buildkit attaches provenance as manifests for platform unknown/unknown
    return bool(d.platform and d.platform.get("os") == "unknown")


def _ref_name(d: Descriptor) -> str:
    a = d.annotations
    return a.get("io.containerd.image.name") or a.get("org.opencontainers.image.ref.name") or ""


def _names(ref: str, annotations: dict[str, str], default_name: str) -> list[str]:
    if not ref:
        return []
    if "/" not in ref and ":" not in ref:
        # a bare OCI ref name ("latest", as umoci writes) is a tag of the source's name
        return [f"{default_name}:{ref}"]
    return [ref]


class LayoutDir(Source):
    def __init__(self, path: str) -> None:
        self.path = path
        self.name = path

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        p = os.path.join(self.path, "blobs", "sha256", desc.digest[7:])
        try:
            return open_regular(p, follow=False)
        except FileNotFoundError:
            raise SourceError(f"blob {desc.digest} is missing from {self.name}") from None
        except NotRegular as exc:
            raise SourceError(
                f"blob {desc.digest} in {self.name} is {exc.kind}, not a regular file"
            ) from None

    def images(self, platform: str | None) -> list[ImageRef]:
        try:
            with open_regular(os.path.join(self.path, "index.json"), follow=False) as f:
                index = json.loads(f.read(MAX_JSON))
        except NotRegular as exc:
            raise SourceError(f"{self.name}: index.json is {exc.kind}, not a regular file") from None
        except (OSError, ValueError) as exc:
            raise SourceError(f"{self.name}: cannot read index.json: {exc}") from None
        return self._from_index(index, platform, _default_name(self.path))


class TarSource(Source):
    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self._file = open_regular(path, follow=True)  # a link to an archive is fine
        except NotRegular as exc:
            raise SourceError(f"{path} is {exc.kind}, not a regular file") from None
        except OSError as exc:
            raise SourceError(f"{path}: not a readable image archive: {exc}") from None
        try:
            self._tar = tarfile.open(fileobj=self._file, mode="r:*")
        except tarfile.ReadError:  # tarfile's message lists every compression it tried, a line each
            self._file.close()
            empty = "an empty file, so " if os.path.getsize(path) == 0 else ""
            raise SourceError(
                f"{path} is {empty}not an image archive (OCI archive, docker save archive) or layout"
            ) from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            self._file.close()
            raise SourceError(f"{path}: cannot read it: {exc}") from None
        try:
            self._members = {os.path.normpath(m.name).lstrip("/"): m for m in self._tar.getmembers()}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            self._tar.close()
            self._file.close()
            raise SourceError(f"{path}: a damaged or truncated archive: {exc}") from None
        self._default = _default_name(path)

    def close(self) -> None:
        self._tar.close()
        self._file.close()

    def has(self, name: str) -> bool:
        return name in self._members

    def open_member(self, name: str) -> IO[bytes]:
        m = self._members.get(os.path.normpath(name).lstrip("/"))
        # follow symlinks/hardlinks inside the archive (legacy docker saves link duplicate layers)
        for _ in range(8):
            if m is None or not (m.issym() or m.islnk()):
                break
            target = m.linkname if m.islnk() else os.path.join(os.path.dirname(m.name), m.linkname)
            m = self._members.get(os.path.normpath(target).lstrip("/"))
        if m is None or not m.isfile():
            raise SourceError(f"{name} is missing from {self.name}")
        f = self._tar.extractfile(m)
        assert f is not None
        return f

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        return self.open_member(desc.path or f"blobs/sha256/{desc.digest[7:]}")

    def images(self, platform: str | None) -> list[ImageRef]:
        repo_tags: dict[str, list[str]] = {}
        legacy: list[ImageRef] = []
        if self.has("manifest.json"):
            with self.open_member("manifest.json") as f:
                try:
                    docker = json.loads(f.read(MAX_JSON))
                except ValueError:
                    raise SourceError(f"{self.name}: manifest.json is not valid JSON") from None
            if not isinstance(docker, list):
                raise SourceError(f"{self.name}: manifest.json is not a docker save manifest")
            for item in docker:
                try:
                    cfg, layers = item["Config"], item["Layers"]
                except (TypeError, KeyError):
                    raise SourceError(f"{self.name}: malformed manifest.json entry") from None
                tags = [t for t in item.get("RepoTags") or [] if isinstance(t, str)]
                repo_tags[os.path.basename(cfg).split(".")[0]] = tags
                legacy.append(ImageRef(None, tags, legacy=(cfg, list(layers))))
        if self.has("index.json") and self.has("oci-layout"):
            with self.open_member("index.json") as f:
                try:
                    index = json.loads(f.read(MAX_JSON))
                except ValueError:
                    raise SourceError(f"{self.name}: index.json is not valid JSON") from None
            refs = self._from_index(index, platform, self._default)
            if repo_tags:  # Docker 25+: manifest.json's RepoTags are the names docker users know
                for r in refs:
                    assert r.manifest is not None
                    _, manifest = self.read_json_blob(r.manifest)
                    cfg_hex = (manifest.get("config") or {}).get("digest", "")[7:]
                    if cfg_hex in repo_tags:
                        r.names = repo_tags[cfg_hex] or r.names
            return refs
        if legacy:
            return legacy
        raise SourceError(f"{self.name}: neither an OCI archive nor a docker save archive")


def _default_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for ext in (".tar.gz", ".tgz", ".tar", ".oci"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base.lower() or "image"


def open_source(path: str) -> Source:
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "oci-layout")):
            raise SourceError(f"{path}: a directory but not an OCI image layout (no oci-layout file)")
        return LayoutDir(path)
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file or directory")
    return TarSource(path)
