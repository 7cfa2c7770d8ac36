"""Pure-Python twin of the ``layerfs._ctar`` streaming tar parser (``layerfs.tar.reader``
chooses between them).

Both backends implement exactly the same API and must produce byte-identical
event streams for the same input (the test suite checks this).  This module is
the reference: when the two disagree, the C code is wrong or this is.

``TarParser(read, chunk_size=65536)`` iterates over a tar stream read with the
callable ``read(n) -> bytes`` (short reads allowed, ``b""`` means EOF) and yields
events:

* ``(EV_ENTRY, header)`` for every member, where ``header`` is the tuple
  ``(name, linkname, type, mode, uid, gid, size, mtime_ns, devmajor, devminor,
  uname, gname, xattrs)``: ``name``/``linkname``/``uname``/``gname`` are bytes
  exactly as archived (no normalisation), ``type`` is one of ``b"0123456"`` as
  an int (``\\0`` and ``7`` are reported as ``0``), ``size`` is 0 for every type
  but regular files, ``mtime_ns`` is an int, and ``xattrs`` is a dict of
  ``SCHILY.xattr.*`` PAX records (name without the prefix -> raw value bytes).
* ``(EV_DATA, bytes)`` for a regular file's contents, cut into pieces of exactly
  ``chunk_size`` bytes (the last one shorter); none for an empty file.
* ``(EV_END, sha256_digest)`` after the data of every regular file (32 bytes).

``parser.offset`` is the number of stream bytes parsed so far: read right after
an ``EV_ENTRY`` it is where that member's data starts, which is what lets an
importer keep a layer's headers and padding apart from its file contents.

Formats: ustar (with the 155-byte prefix), PAX extended headers (``x``) with
``path``, ``linkpath``, ``size``, ``uid``, ``gid``, ``uname``, ``gname``,
``mtime`` and ``SCHILY.xattr.*``, GNU long names (``L``) and long links
(``K``), octal and base-256 numeric fields.  Where several of these describe
one member, they apply as Go's archive/tar applies them (docker and
containerd extract layers with it): the last ``x`` header alone, and a GNU
long name or link over the PAX ``path`` or ``linkpath``; an empty one of
these names nothing (the header's own name or link stays).  A PAX global header (``g``) is
read (its records must be well-formed) and applies to no member, as in Go's
archive/tar, which docker and containerd extract layers with: Go hands it out
as an entry of its own, which they skip, and the ``x``/``L``/``K`` headers
read before it go with it.  Anything else is refused with ``TarError``:
sparse files (``S`` or ``GNU.sparse.*``), unknown types, bad checksums,
truncated streams, extended headers over ``MAX_EXT``.

Not thread-safe: one parser is iterated by one thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

EV_ENTRY, EV_DATA, EV_END = 0, 1, 2
BLOCK = 512
# Extended headers (PAX records, GNU long names) above this are refused: a real
# one holds paths and xattrs (kilobytes); a hostile one could ask for gigabytes.
MAX_EXT = 1 << 20
READ_SIZE = 1 << 20

HEADER_ONLY_TYPES = b"123456"
Header = tuple[bytes, bytes, int, int, int, int, int, int, int, int, bytes, bytes, dict[bytes, bytes]]


class TarError(ValueError):
    """The stream is not a tar archive layerfs accepts; the message says why."""


def _number(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:
        # base-256 (GNU/star): big-endian two's complement, top bit as marker
        value = int.from_bytes(field, "big")
        if field[0] & 0x40:
            value -= 1 << (8 * len(field))  # 0xff marker: negative
        else:
            value &= (1 << (8 * len(field) - 1)) - 1
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"invalid octal number in {what} field: {field!r}") from None


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _pax_time_ns(value: bytes) -> int:
    text = value.decode("ascii", "replace")
    try:
        negative = text.startswith("-")
        whole, _, frac = text.lstrip("-").partition(".")
        if not whole.isdigit() or (frac and not frac.isdigit()):
            raise ValueError
        ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
        return -ns if negative else ns
    except ValueError:
        raise TarError(f"invalid PAX mtime {value!r}") from None


def _pax_int(value: bytes, key: str) -> int:
    if not value.isdigit():
        raise TarError(f"invalid PAX {key} {value!r}")
    try:
        return int(value)
    except ValueError:  # more digits than int() accepts
        raise TarError(f"invalid PAX {key} {value!r}") from None


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise TarError("malformed PAX record length")
        try:
            length = int(data[pos:space])
        except ValueError:  # more digits than int() accepts
            raise TarError("malformed PAX record length") from None
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise TarError("malformed PAX record")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise TarError("malformed PAX record: no '='")
        records[key] = value
        pos = end
    return records


class TarParser:
    def __init__(self, read: Callable[[int], bytes], chunk_size: int = 65536) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self._read = read
        self._chunk_size = chunk_size
        self._buf = bytearray()
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._eof = False
        self._iter = self._events()

    def __iter__(self) -> Iterator[tuple[int, object]]:
        return self

    def __next__(self) -> tuple[int, object]:
        return next(self._iter)

    @property
    def offset(self) -> int:
        """Bytes of the stream parsed so far: after an EV_ENTRY event, where the member's data starts."""
        return self._base + self._pos

    # -- buffered input -------------------------------------------------------
    def _fill(self, need: int) -> bool:
        """Make ``need`` bytes available from ``_pos``; False at a clean EOF."""
        while len(self._buf) - self._pos < need and not self._eof:
            if self._pos:
                del self._buf[: self._pos]
                self._base += self._pos
                self._pos = 0
            data = self._read(max(READ_SIZE, need))
            if not data:
                self._eof = True
            else:
                self._buf += data
        return len(self._buf) - self._pos >= need

    def _take(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise TarError(f"truncated tar stream in {what}")
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    def _skip_padding(self, size: int, what: str) -> None:
        pad = -size % BLOCK
        if pad:
            self._take(pad, what)

    def _ext_data(self, size: int, what: str) -> bytes:
        if size > MAX_EXT:
            raise TarError(f"{what} of {size} bytes exceeds the {MAX_EXT}-byte limit")
        data = self._take(size, what)
        self._skip_padding(size, what)
        return data

    # -- the event stream -----------------------------------------------------
    def _events(self) -> Iterator[tuple[int, object]]:
        ext_pending = 0  # each extended header is capped; many of them add up
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            if not self._fill(BLOCK):
                if self._pos != len(self._buf):
                    raise TarError("truncated tar stream in header")
                if pax or long_name is not None or long_link is not None:
                    raise TarError("truncated tar stream after extended header")
                return  # EOF without the zero-block trailer: accepted
            block = self._take(BLOCK, "header")
            if block.count(0) == BLOCK:
                return  # end-of-archive marker; the rest is padding
            self._check_sum(block)
            typ = block[156]
            size = _number(block[124:136], "size")
            if size < 0:
                raise TarError("negative size in tar header")
            if typ in b"xLK" and size <= MAX_EXT:
                if ext_pending + size > MAX_EXT:
                    raise TarError(f"extended headers exceed the {MAX_EXT}-byte limit in total")
                ext_pending += size
            if typ in b"xg":
                records = _parse_pax(self._ext_data(size, "PAX header"))
                if typ == ord("x"):
                    pax = records  # a later x header replaces an earlier one, as in Go
                else:  # global: an entry of its own that applies to nothing (see above)
                    pax = {}
                    long_name = long_link = None
                    ext_pending = 0
                continue
            if typ in b"LK":
                data = _cstr(self._ext_data(size, "GNU long name"))
                if typ == ord("L"):
                    long_name = data
                else:
                    long_link = data
                continue
            header = self._header(block, typ, size, pax, long_name, long_link)
            pax = {}
            long_name = long_link = None
            ext_pending = 0
            yield EV_ENTRY, header
            if header[2] == 0x30:
                yield from self._file_data(header[6])

    def _check_sum(self, block: bytes) -> None:
        stored = _number(block[148:156], "checksum")
        unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        if stored == unsigned:
            return
        signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 0x20
        if stored != signed:
            raise TarError("tar header checksum mismatch (not a tar stream, or corrupt)")

    def _header(
        self,
        block: bytes,
        typ: int,
        size: int,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> Header:
        if typ == 0 or typ == ord("7"):
            typ = ord("0")
        if typ == ord("S") or any(k.startswith(b"GNU.sparse.") for k in pax):
            raise TarError("sparse files are not supported")
        if typ not in b"0123456":
            raise TarError(f"unsupported tar entry type {chr(typ)!r}")
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\0":  # POSIX ustar: name may be split at prefix
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        linkname = _cstr(block[157:257])
        mode = _number(block[100:108], "mode")
        uid = _number(block[108:116], "uid")
        gid = _number(block[116:124], "gid")
        mtime_ns = _number(block[136:148], "mtime") * 1_000_000_000
        uname = _cstr(block[265:297])
        gname = _cstr(block[297:329])
        devmajor = _number(block[329:337], "devmajor")
        devminor = _number(block[337:345], "devminor")
        if long_name:  # an empty GNU long name or PAX path counts as none, as in Go
            name = long_name
        if long_link:
            linkname = long_link
        xattrs: dict[bytes, bytes] = {}
        for key, value in pax.items():
            # a GNU long name or link wins over the PAX record, as in Go's archive/tar
            if key == b"path":
                if not long_name and value:
                    name = value
            elif key == b"linkpath":
                if not long_link and value:
                    linkname = value
            elif key == b"size":
                size = _pax_int(value, "size")
            elif key == b"uid":
                uid = _pax_int(value, "uid")
            elif key == b"gid":
                gid = _pax_int(value, "gid")
            elif key == b"uname":
                uname = value
            elif key == b"gname":
                gname = value
            elif key == b"mtime":
                mtime_ns = _pax_time_ns(value)
            elif key.startswith(b"SCHILY.xattr."):
                xattrs[key[13:]] = value
        if typ in HEADER_ONLY_TYPES:
            size = 0
        return (
            name,
            linkname,
            typ,
            mode & 0o7777,
            uid,
            gid,
            size,
            mtime_ns,
            devmajor,
            devminor,
            uname,
            gname,
            xattrs,
        )

    def _file_data(self, size: int) -> Iterator[tuple[int, object]]:
        digest = hashlib.sha256()
        left = size
        while left:
            n = min(self._chunk_size, left)
            piece = self._take(n, "file data")
            digest.update(piece)
            left -= n
            yield EV_DATA, piece
        self._skip_padding(size, "file data")
        yield EV_END, digest.digest()
