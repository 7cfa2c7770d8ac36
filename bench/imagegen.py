"""Deterministic generator of a realistic multi-layer OCI image layout for the benchmarks.

The image (``image-a``) has the shape of a typical distro + language runtime + app image:

* ``base``: merged-/usr root symlinks, ``/etc`` configs, ``/usr/share/doc`` (README,
  changelog and ``copyright`` files; the latter are verbatim copies of a few license texts,
  as in a real distro), man pages, dpkg file lists, shared libraries (``.so``, 16 KiB-1 MiB,
  each with a soname symlink), three large executables and a hardlink;
* ``python``: thousands of small Python-like sources, extension modules, symlinks;
* ``app``: JavaScript-like sources, a few libraries and two large binaries;
* ``upgrade``: a package upgrade on top: a fraction of the earlier text files re-written
  (most byte-identical, some changed), some libraries and one large executable changed,
  whiteouts of removed files, one directory replaced with an opaque marker, a few new files.

``image-b`` shares the first three layers (same blobs) and has a different, small top layer
(configuration files and two whiteouts).

Text is pseudo-text from a Zipf-weighted word list (so gzip/zstd ratios are like real
text); binaries mix LZ-matchable "code", string tables, pointer tables, zero padding and
random bytes, so they compress about like real ELF files (~43 % with gzip -6; zstd -3
per 64 KiB chunk ~5 % larger than that, as on real x86-64 binaries).
Everything comes from ``random.Random(seed)``: the same parameters give the same bytes.
Layers are gzip'd at level 6 (as docker does).

``ensure_image(cache_root, params)`` generates the layouts once into
``cache_root/<params key>/`` and reuses them afterwards.

Run as a script to generate a layout: ``python bench/imagegen.py OUT_DIR [--scale 0.2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import tarfile
import zlib
from array import array
from dataclasses import dataclass
from typing import Any

GENERATOR_VERSION = 2
TAG = "bench"
MTIME = 1_700_000_000
KiB, MiB = 1 << 10, 1 << 20

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class ImageParams:
    seed: int = 20240601
    text_files: int = 6000  # small text files over base/python/app (200 B - 8 KiB)
    text_min: int = 200
    text_max: int = 8 * KiB
    so_files: int = 300  # shared libraries / extension modules (16 KiB - 1 MiB)
    so_min: int = 16 * KiB
    so_max: int = 1 * MiB
    big_sizes: tuple[int, ...] = (16 * MiB, 12 * MiB, 8 * MiB, 14 * MiB, 6 * MiB)
    upgrade_fraction: float = 0.2  # of the earlier text files re-written by the upgrade layer
    upgrade_changed: float = 0.4  # of those, the fraction whose content changes
    upgrade_libs: int = 25  # libraries re-written by the upgrade (60 % changed)
    whiteouts: int = 150
    new_files: int = 60
    gzip_level: int = 6

    def key(self) -> str:
        blob = json.dumps([GENERATOR_VERSION, dataclasses.asdict(self)], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def scaled(self, scale: float) -> ImageParams:
        """Fewer/smaller everything (for quick runs); ``scale=1`` is the real benchmark."""
        if scale == 1:
            return self
        n = lambda v: max(1, int(v * scale))  # noqa: E731
        return dataclasses.replace(
            self,
            text_files=n(self.text_files),
            so_files=n(self.so_files),
            big_sizes=tuple(max(MiB, int(s * scale)) for s in self.big_sizes),
            upgrade_libs=n(self.upgrade_libs),
            whiteouts=n(self.whiteouts),
            new_files=n(self.new_files),
        )


# -- pseudo-text ---------------------------------------------------------------------------

_SYLLABLES = (
    "a ab ac ad al am an ar as at ba be bi bo bu ca ce ci co cu da de di do du el em en er es et "
    "fa fe fi fo ga ge gi go ha he hi ho il im in is it ka ke ki ko la le li lo lu ma me mi mo mu "
    "na ne ni no nu ob od ol om on or os pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to "
    "tu ul um un ur us va ve vi vo xa ya ze zo"
).split()
_COMMON = (
    "the of and to in is for that this with be on as it by are not or from at file an which "
    "if can use data value default return set option see also must should when new name "
    "error path list type string number will may used function object module version"
).split()


class TextGen:
    """Zipf-weighted pseudo-words; line- and file-shaped output of several kinds."""

    def __init__(self, rng: random.Random) -> None:
        words = list(_COMMON)
        seen = set(words)
        while len(words) < 4000:
            w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.words = words
        weights = [1.0 / (i + 1) ** 1.05 for i in range(len(words))]
        total = 0.0
        self.cum: list[float] = []
        for w in weights:
            total += w
            self.cum.append(total)
        self.licenses = [self.doc(rng, rng.randint(2 * KiB, 8 * KiB)) for _ in range(6)]

    def w(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self.cum, k=k)

    def ident(self, rng: random.Random) -> str:
        return "_".join(self.w(rng, rng.choice((1, 1, 2, 2, 3))))

    def sentences(self, rng: random.Random, approx: int) -> str:
        out = []
        n = 0
        while n < approx:
            ws = self.w(rng, rng.randint(5, 18))
            s = " ".join(ws)
            out.append(s[0].upper() + s[1:] + ".")
            n += len(s) + 2
        return " ".join(out)

    def _wrap(self, text: str, width: int = 72) -> str:
        lines, line = [], []
        n = 0
        for word in text.split(" "):
            if n + len(word) > width and line:
                lines.append(" ".join(line))
                line, n = [], 0
            line.append(word)
            n += len(word) + 1
        lines.append(" ".join(line))
        return "\n".join(lines) + "\n"

    @staticmethod
    def _fit(text: str, size: int) -> bytes:
        data = text.encode()
        return data[: size - 1] + b"\n" if len(data) >= size else data

    def doc(self, rng: random.Random, size: int) -> bytes:
        parts = []
        n = 0
        while n < size:
            para = self._wrap(self.sentences(rng, rng.randint(200, 700)))
            parts.append(para)
            n += len(para) + 1
        return self._fit("\n".join(parts), size)

    def changelog(self, rng: random.Random, size: int, pkg: str) -> bytes:
        parts = []
        n = 0
        version = [rng.randint(0, 9), rng.randint(0, 30), rng.randint(0, 9)]
        while n < size:
            version[2] -= 1
            items = "".join(
                f"  * {self.sentences(rng, rng.randint(30, 120))}\n" for _ in range(rng.randint(1, 5))
            )
            e = (
                f"{pkg} ({version[0]}.{version[1]}.{abs(version[2])}-1) unstable; urgency=medium\n\n{items}\n"
                f" -- {' '.join(self.w(rng, 2)).title()} <{self.ident(rng)}@debian.org>  "
                f"Mon, {rng.randint(1, 28)} Jan 20{rng.randint(10, 23)} 12:00:00 +0000\n\n"
            )
            parts.append(e)
            n += len(e)
        return self._fit("".join(parts), size)

    def man(self, rng: random.Random, size: int, name: str) -> bytes:
        parts = [f'.TH {name.upper()} 1 "2023" "{name}" "User Commands"\n.SH NAME\n{name} \\- ']
        parts.append(self.sentences(rng, 60) + "\n.SH SYNOPSIS\n.B " + name + "\n[\\fIOPTION\\fR]...\n")
        n = sum(map(len, parts))
        while n < size:
            opt = self.ident(rng).replace("_", "-")
            e = f".TP\n\\fB\\-\\-{opt}\\fR\n{self._wrap(self.sentences(rng, rng.randint(60, 300)))}"
            parts.append(e)
            n += len(e)
        return self._fit("".join(parts), size)

    def conf(self, rng: random.Random, size: int) -> bytes:
        parts = []
        n = 0
        while n < size:
            if rng.random() < 0.3:
                e = "# " + self._wrap(self.sentences(rng, rng.randint(40, 160))).replace("\n", "\n# ")[:-2]
            else:
                e = f"{self.ident(rng)} = {' '.join(self.w(rng, rng.randint(1, 3)))}\n"
            parts.append(e)
            n += len(e)
        return self._fit("".join(parts), size)

    def filelist(self, rng: random.Random, size: int, paths: list[str]) -> bytes:
        text = "/.\n" + "".join(f"/{p}\n" for p in paths)
        while len(text) < size:
            text += f"/usr/share/{self.ident(rng)}/{self.ident(rng)}\n"
        return self._fit(text, size)

    def python(self, rng: random.Random, size: int) -> bytes:
        mods = self.w(rng, rng.randint(2, 6))
        parts = [f'"""{self.sentences(rng, rng.randint(60, 300))}"""\n\n']
        parts += [f"import {m}\n" for m in mods] + ["\n\n"]
        n = sum(map(len, parts))
        while n < size:
            fn, a, b = self.ident(rng), self.ident(rng), self.ident(rng)
            if rng.random() < 0.25:
                e = (
                    f"class {fn.title().replace('_', '')}({rng.choice(mods)}.{self.ident(rng).title()}):\n"
                    f'    """{self.sentences(rng, rng.randint(30, 120))}"""\n\n'
                    f"    def __init__(self, {a}, {b}=None):\n        self.{a} = {a}\n        self.{b} = {b}\n\n"
                )
            else:
                e = (
                    f"def {fn}({a}, {b}=None):\n"
                    f'    """{self.sentences(rng, rng.randint(20, 160))}"""\n'
                    f"    if {b} is None:\n        {b} = {rng.choice(mods)}.{self.ident(rng)}({a})\n"
                    f"    for {self.ident(rng)} in {a}:\n        {b}.append({rng.randint(0, 512)})\n"
                    f"    return {b}\n\n\n"
                )
            parts.append(e)
            n += len(e)
        return self._fit("".join(parts), size)

    def js(self, rng: random.Random, size: int) -> bytes:
        parts = ['"use strict";\n', f"const {self.ident(rng)} = require('{self.ident(rng)}');\n\n"]
        n = sum(map(len, parts))
        while n < size:
            fn, a = self.ident(rng), self.ident(rng)
            e = (
                f"function {fn}({a}, options) {{\n  // {self.sentences(rng, rng.randint(20, 90))}\n"
                f"  if (!{a}) {{ throw new TypeError('{' '.join(self.w(rng, 4))}'); }}\n"
                f"  return {a}.{self.ident(rng)}(options || {{}});\n}}\nmodule.exports.{fn} = {fn};\n\n"
            )
            parts.append(e)
            n += len(e)
        return self._fit("".join(parts), size)


def mutate_text(rng: random.Random, tg: TextGen, data: bytes) -> bytes:
    """An upgraded version of a text file: some lines replaced, some added."""
    lines = data.split(b"\n")
    for _ in range(max(1, len(lines) // 15)):
        i = rng.randrange(len(lines))
        lines[i] = " ".join(tg.w(rng, rng.randint(3, 10))).encode()
    lines.insert(rng.randrange(len(lines) + 1), tg.sentences(rng, 80).encode())
    return b"\n".join(lines)


# -- pseudo-ELF ------------------------------------------------------------------------------


class BinGen:
    """Binaries that compress like real ones: code-ish, strings, tables, zeros, random."""

    KINDS = ("code", "strings", "table", "zeros", "random")
    WEIGHTS = (0.56, 0.18, 0.10, 0.12, 0.04)

    def __init__(self, rng: random.Random, tg: TextGen) -> None:
        # x86-like byte frequencies: a few opcodes/registers/small immediates dominate
        alphabet = bytes(rng.choices(range(256), weights=[1 / (i + 1) ** 0.9 for i in range(256)], k=256))
        snippets = [bytes(rng.choices(alphabet, k=rng.randint(2, 12))) for _ in range(3000)]
        self.code = b"".join(rng.choices(snippets, k=300_000))
        syms, n = [], 0
        while n < 512 * KiB:
            syms.append(("_ZN" if rng.random() < 0.3 else "") + tg.ident(rng) + "\0")
            n += len(syms[-1])
        self.strings = "".join(syms).encode()

    def _slices(self, rng: random.Random, pool: bytes, n: int, noise: bool) -> bytes:
        out, got = [], 0
        while got < n:
            ln = rng.randint(256, 4096)
            off = rng.randrange(len(pool) - ln)
            out.append(pool[off : off + ln])
            got += ln
            if noise:  # addresses and immediates: the part of code that does not repeat
                r = rng.randbytes(rng.randint(8, 48))
                out.append(r)
                got += len(r)
        return b"".join(out)[:n]

    def segment(self, rng: random.Random, kind: str, n: int) -> bytes:
        if kind == "code":
            return self._slices(rng, self.code, n, True)
        if kind == "strings":
            return self._slices(rng, self.strings, n, False)
        if kind == "table":
            base, step = rng.randrange(1 << 40), rng.choice((8, 16, 24, 32))
            return array("Q", range(base, base + step * (n // 8 + 1), step)).tobytes()[:n]
        if kind == "zeros":
            return bytes(n)
        return rng.randbytes(n)

    def binary(self, rng: random.Random, size: int) -> bytes:
        parts = [b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x03\x00\x3e\x00" + rng.randbytes(44)]
        got = len(parts[0])
        while got < size:
            kind = rng.choices(self.KINDS, weights=self.WEIGHTS)[0]
            n = int(math.exp(rng.uniform(math.log(4 * KiB), math.log(256 * KiB))))
            if kind == "zeros":
                n //= 4
            n = min(n, size - got)
            parts.append(self.segment(rng, kind, n))
            got += n
        return b"".join(parts)

    def mutate(self, rng: random.Random, data: bytes, regions: int) -> bytes:
        """An upgraded build: some regions rewritten, a little added at the end."""
        out = bytearray(data)
        for _ in range(regions):
            n = rng.randint(1 * KiB, 32 * KiB)
            off = rng.randrange(max(1, len(out) - n))
            out[off : off + n] = self.segment(rng, rng.choice(("code", "random", "strings")), n)
        out += self.segment(rng, "code", rng.randint(1 * KiB, 16 * KiB))
        return bytes(out)


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# -- tar layers ------------------------------------------------------------------------------


class LayerBuilder:
    """An uncompressed layer tar: parents first, fixed owners and mtimes, PAX as needed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.dirs: set[str] = set()
        self.counts = {"files": 0, "dirs": 0, "symlinks": 0, "hardlinks": 0, "whiteouts": 0}
        self.file_bytes = 0

    def _info(self, path: str, typ: bytes, mode: int) -> tarfile.TarInfo:
        self._parents(path)
        ti = tarfile.TarInfo(path)
        ti.type, ti.mode, ti.mtime = typ, mode, MTIME
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        return ti

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dir(d)

    def dir(self, path: str, mode: int = 0o755) -> None:
        if path in self.dirs:
            return
        self.dirs.add(path)
        self.tar.addfile(self._info(path, tarfile.DIRTYPE, mode))
        self.counts["dirs"] += 1

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        ti = self._info(path, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data))
        self.counts["files"] += 1
        self.file_bytes += len(data)

    def symlink(self, path: str, target: str) -> None:
        ti = self._info(path, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)
        self.counts["symlinks"] += 1

    def hardlink(self, path: str, target: str) -> None:
        ti = self._info(path, tarfile.LNKTYPE, 0o755)
        ti.linkname = target
        self.tar.addfile(ti)
        self.counts["hardlinks"] += 1

    def whiteout(self, path: str) -> None:
        head, _, base = path.rpartition("/")
        self.file(f"{head}/.wh.{base}" if head else f".wh.{base}", b"")
        self.counts["files"] -= 1
        self.counts["whiteouts"] += 1

    def opaque(self, path: str) -> None:
        self.dir(path)
        self.file(f"{path}/.wh..wh..opq", b"")
        self.counts["files"] -= 1
        self.counts["whiteouts"] += 1

    def finish(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


# -- the image ---------------------------------------------------------------------------------


def _pkg_names(rng: random.Random, tg: TextGen, n: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = "-".join(tg.w(rng, rng.choice((1, 1, 2))))
        if name not in seen and len(name) > 1:
            seen.add(name)
            names.append(name)
    return names


def build_layers(p: ImageParams) -> tuple[list[LayerBuilder], LayerBuilder]:
    """The four layers of image A and the top layer of image B (all uncompressed)."""
    rng = random.Random(p.seed)
    tg = TextGen(random.Random(p.seed + 1))
    bg = BinGen(random.Random(p.seed + 2), tg)
    # every earlier text file: path -> (bytes, layer index); the upgrade picks from these
    texts: dict[str, bytes] = {}
    libs: dict[str, bytes] = {}
    bigs: dict[str, bytes] = {}
    hardlinked: set[str] = set()

    n_text = [int(p.text_files * f) for f in (0.42, 0.40)]
    n_text.append(p.text_files - sum(n_text))
    n_so = [int(p.so_files * f) for f in (0.55, 0.25)]
    n_so.append(p.so_files - sum(n_so))
    bigs_of = [p.big_sizes[:3], (), p.big_sizes[3:]]

    def text_size() -> int:
        return log_uniform(rng, p.text_min, p.text_max)

    def so_size() -> int:
        return log_uniform(rng, p.so_min, p.so_max)

    # ---- base: a debian-like root
    base = LayerBuilder("base")
    for d in ("bin", "lib", "lib64", "sbin"):
        base.symlink(d, f"usr/{d}")
    for d in ("tmp", "var/tmp"):
        base.dir(d, 0o1777)
    pkgs = _pkg_names(rng, tg, max(4, n_text[0] // 3))
    made = 0
    for i, pkg in enumerate(pkgs):
        if made >= n_text[0]:
            break
        paths = []
        doc = f"usr/share/doc/{pkg}"
        # copyright files: verbatim copies of a few licenses (real distros dedup well here)
        files = [
            (f"{doc}/copyright", rng.choice(tg.licenses)),
            (f"{doc}/changelog.Debian", tg.changelog(rng, text_size(), pkg)),
            (f"usr/share/man/man1/{pkg}.1", tg.man(rng, text_size(), pkg)),
        ]
        if i % 2 == 0:
            files.append((f"{doc}/README", tg.doc(rng, text_size())))
        if i % 3 == 0:
            files.append((f"etc/{pkg}/{pkg}.conf", tg.conf(rng, text_size())))
        for path, data in files[: n_text[0] - made - 1]:
            base.file(path, data)
            texts[path] = data
            paths.append(path)
            made += 1
        lst = tg.filelist(rng, text_size(), paths)
        base.file(f"var/lib/dpkg/info/{pkg}.list", lst)
        texts[f"var/lib/dpkg/info/{pkg}.list"] = lst
        made += 1
    sonames: set[str] = set()
    for _ in range(n_so[0]):
        name = "lib" + tg.ident(rng).replace("_", "-")
        major = rng.randint(0, 6)
        path = f"usr/lib/x86_64-linux-gnu/{name}.so.{major}.{rng.randint(0, 40)}.{rng.randint(0, 9)}"
        if f"{name}.so.{major}" in sonames:
            continue
        sonames.add(f"{name}.so.{major}")
        libs[path] = bg.binary(rng, so_size())
        base.file(path, libs[path])
        base.symlink(f"usr/lib/x86_64-linux-gnu/{name}.so.{major}", path.rpartition("/")[2])
    for j, size in enumerate(bigs_of[0]):
        path = f"usr/bin/{tg.ident(rng)}{j}"
        bigs[path] = bg.binary(rng, size)
        base.file(path, bigs[path], 0o755)
        if j == 0:  # like perl / perl5.36.0
            base.hardlink(path + "-5.36", path)
            hardlinked.add(path)
    for k in range(30):  # alternatives: absolute symlinks
        alt = tg.ident(rng)
        base.symlink(f"usr/bin/{alt}{k}", f"/etc/alternatives/{alt}{k}")
        base.symlink(f"etc/alternatives/{alt}{k}", "/" + next(iter(bigs)))

    # ---- python: a language runtime with its stdlib
    py = LayerBuilder("python")
    stdlib = "usr/lib/python3.11"
    py_pkgs = _pkg_names(rng, tg, max(2, n_text[1] // 12))
    py_dirs = []
    made = 0
    while made < n_text[1]:
        for pkg in py_pkgs:
            if made >= n_text[1]:
                break
            d = f"{stdlib}/{pkg}"
            if d not in py_dirs:
                py_dirs.append(d)
            path = f"{d}/{tg.ident(rng)}.py"
            if path in texts:
                continue
            texts[path] = tg.python(rng, text_size())
            py.file(path, texts[path])
            made += 1
    for _ in range(n_so[1]):
        path = f"{stdlib}/lib-dynload/_{tg.ident(rng)}.cpython-311-x86_64-linux-gnu.so"
        libs[path] = bg.binary(rng, so_size())
        py.file(path, libs[path])
    py.symlink("usr/bin/python3", "python3.11")
    py.symlink("usr/bin/python", "python3")

    # ---- app: JavaScript-ish sources, libraries and two big binaries
    app = LayerBuilder("app")
    app_pkgs = _pkg_names(rng, tg, max(2, n_text[2] // 10))
    made = 0
    while made < n_text[2]:
        for pkg in app_pkgs:
            if made >= n_text[2]:
                break
            path = f"app/node_modules/{pkg}/lib/{tg.ident(rng)}.js"
            if path in texts:
                continue
            texts[path] = tg.js(rng, text_size())
            app.file(path, texts[path])
            made += 1
    for pkg in app_pkgs:  # package.json: tiny, near-identical
        app.file(
            f"app/node_modules/{pkg}/package.json", f'{{"name": "{pkg}", "version": "1.0.0"}}\n'.encode()
        )
    for _ in range(n_so[2]):
        path = f"app/node_modules/{rng.choice(app_pkgs)}/build/{tg.ident(rng)}.node"
        libs[path] = bg.binary(rng, so_size())
        app.file(path, libs[path], 0o755)
    app_bins = []
    for j, size in enumerate(bigs_of[2]):
        path = f"app/bin/{tg.ident(rng)}{j}"
        bigs[path] = bg.binary(rng, size)
        app.file(path, bigs[path], 0o755)
        app_bins.append(path)
    if app_bins:
        app.symlink("usr/local/bin/app", "/" + app_bins[0])

    # ---- upgrade: re-written packages, whiteouts, an opaque directory
    up = LayerBuilder("upgrade")
    opaque_dir = py_dirs[0]
    candidates = sorted(t for t in texts if not t.startswith(opaque_dir + "/"))
    rng.shuffle(candidates)
    n_up = int(len(candidates) * p.upgrade_fraction)
    rewritten, rest = candidates[:n_up], candidates[n_up:]
    for path in sorted(rewritten):
        data = texts[path]
        if rng.random() < p.upgrade_changed:
            data = mutate_text(rng, tg, data)
        up.file(path, data)
    up.opaque(opaque_dir)
    for path in sorted(t for t in texts if t.startswith(opaque_dir + "/"))[::2]:
        up.file(path, mutate_text(rng, tg, texts[path]))
    for path in sorted(rng.sample(rest, min(p.whiteouts, len(rest)))):
        up.whiteout(path)
    lib_paths = sorted(libs)
    for i, path in enumerate(sorted(rng.sample(lib_paths, min(p.upgrade_libs, len(lib_paths))))):
        up.file(path, bg.mutate(rng, libs[path], 4) if i % 5 < 3 else libs[path])
    target = next(b for b in sorted(bigs) if b not in hardlinked)
    up.file(target, bg.mutate(rng, bigs[target], 40), 0o755)
    for k in range(p.new_files):
        up.file(f"usr/share/doc/{rng.choice(pkgs)}/NEWS.{k}", tg.doc(rng, text_size()))

    # ---- image B's own top layer: configuration only
    cfg = LayerBuilder("config")
    for k in range(80):
        cfg.file(f"etc/app/conf.d/{k:02d}-{tg.ident(rng)}.conf", tg.conf(rng, text_size()))
    for path in sorted(rng.sample(rest, 2)):
        cfg.whiteout(path)
    return [base, py, app, up], cfg


def _gzip(raw: bytes, level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, 31)  # gzip wrapper, mtime 0: deterministic
    return c.compress(raw) + c.flush()


def _put(layout: str, data: bytes, link_from: str | None = None) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    if not os.path.exists(path):
        other = os.path.join(link_from, "blobs", "sha256", digest) if link_from else ""
        if other and os.path.exists(other):
            os.link(other, path)  # image B shares image A's blobs on disk too
        else:
            with open(path, "wb") as f:
                f.write(data)
    return "sha256:" + digest


def _write_layout(
    layout: str, layers: list[dict[str, Any]], blobs: dict[str, bytes], link_from: str | None = None
) -> dict[str, Any]:
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    for layer in layers:
        _put(layout, blobs[layer["digest"]], link_from)
    created = "2023-11-14T22:13:20Z"
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/usr/local/bin/app"]},
        "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"] for layer in layers]},
        "history": [{"created": created, "created_by": f"bench: {layer['name']}"} for layer in layers],
    }
    cfg = json.dumps(config, sort_keys=True).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": _put(layout, cfg), "size": len(cfg)},
            "layers": [
                {"mediaType": MT_LAYER_GZIP, "digest": layer["digest"], "size": layer["gz_bytes"]}
                for layer in layers
            ],
        },
        sort_keys=True,
    ).encode()
    man = _put(layout, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": man,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": TAG},
            }
        ],
    }
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return {"path": layout, "manifest": man, "layers": layers}


def generate(out: str, p: ImageParams) -> dict[str, Any]:
    """Write ``out/image-a`` and ``out/image-b`` (OCI layouts) and ``out/meta.json``."""
    layer_builders, cfg_builder = build_layers(p)
    blobs: dict[str, bytes] = {}
    described = []
    for b in [*layer_builders, cfg_builder]:
        raw = b.finish()
        gz = _gzip(raw, p.gzip_level)
        digest = "sha256:" + hashlib.sha256(gz).hexdigest()
        blobs[digest] = gz
        described.append(
            {
                "name": b.name,
                "digest": digest,
                "diff_id": "sha256:" + hashlib.sha256(raw).hexdigest(),
                "gz_bytes": len(gz),
                "tar_bytes": len(raw),
                "file_bytes": b.file_bytes,
                **b.counts,
            }
        )
    a = _write_layout(os.path.join(out, "image-a"), described[:4], blobs)
    b = _write_layout(os.path.join(out, "image-b"), described[:3] + described[4:], blobs, a["path"])
    meta = {"params": dataclasses.asdict(p), "key": p.key(), "tag": TAG, "image_a": a, "image_b": b}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


@dataclass
class GeneratedImage:
    root: str
    meta: dict[str, Any]

    @property
    def layout_a(self) -> str:
        return str(self.meta["image_a"]["path"])

    @property
    def layout_b(self) -> str:
        return str(self.meta["image_b"]["path"])

    @property
    def tag(self) -> str:
        return str(self.meta["tag"])

    def layers(self, image: str = "a") -> list[dict[str, Any]]:
        return list(self.meta[f"image_{image}"]["layers"])

    def blob_path(self, layer: dict[str, Any], image: str = "a") -> str:
        layout = self.layout_a if image == "a" else self.layout_b
        return os.path.join(layout, "blobs", "sha256", layer["digest"][7:])

    def raw_layer(self, name: str) -> bytes:
        """The uncompressed tar of one of image A's layers."""
        layer = next(layer for layer in self.layers() if layer["name"] == name)
        with open(self.blob_path(layer), "rb") as f:
            return zlib.decompress(f.read(), 31)

    def describe(self) -> str:
        ls = self.layers()
        files = sum(layer["files"] for layer in ls)
        tar = sum(layer["tar_bytes"] for layer in ls)
        gz = sum(layer["gz_bytes"] for layer in ls)
        return (
            f"{len(ls)} layers, {files} files, {tar / 1e6:.1f} MB tar, {gz / 1e6:.1f} MB gzip "
            f"({gz / tar:.2f}); "
            + ", ".join(f"{x['name']} {x['tar_bytes'] / 1e6:.1f}/{x['files']}" for x in ls)
        )


def ensure_image(cache_root: str, p: ImageParams) -> GeneratedImage:
    """Generate the layouts for ``p`` once (under an flock); later calls reuse them."""
    root = os.path.join(cache_root, p.key())
    meta_path = os.path.join(root, "meta.json")
    os.makedirs(cache_root, exist_ok=True)
    with open(os.path.join(cache_root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(meta_path):
            tmp = f"{root}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            generate(tmp, p)
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)
            # the layouts were written under the temporary name
            with open(meta_path) as f:
                meta = json.load(f)
            for img in ("image_a", "image_b"):
                meta[img]["path"] = os.path.join(root, os.path.basename(meta[img]["path"]))
            with open(meta_path, "w") as f:
                json.dump(meta, f, indent=1)
        with open(meta_path) as f:
            return GeneratedImage(root, json.load(f))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="cache directory (the layouts go to OUT/<params key>/)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=ImageParams.seed)
    args = ap.parse_args(argv)
    img = ensure_image(args.out, dataclasses.replace(ImageParams(seed=args.seed).scaled(args.scale)))
    print(img.root)
    print(img.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
