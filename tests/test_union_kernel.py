"""A layerfs mount against the kernel's overlay filesystem: the kernel is the reference.

Each image's layers are extracted (with ``tarfile``, see tests/unionutil.py) into
overlayfs layer directories and mounted with ``mount -t overlay``; the same image is
imported into a store and mounted with ``layerfs mount``.  Then:

(i)   read-only: both trees are the same (type, mode incl. setuid/sticky, owner, size,
      content, symlink target, device numbers, nlink, user.*/security.* xattrs, mtime in
      ns of non-directories, hardlink groups);
(ii)  read-write: one operation sequence is run on both mounts; what each step gives
      (errno, listings, contents) and the resulting trees are the same, and the upper
      directories use the same format (0/0 character device whiteouts,
      ``trusted.overlay.opaque``);
(iii) persistence: layerfs remounted on the same upper shows the same tree, and the
      kernel overlay mounted on layerfs's upper directory shows it too.

Known, accepted differences (not compared): directory mtimes; what gets copied up
(the kernel with ``index=on`` copies a hardlinked lower file's other names up lazily;
layerfs links them all at once); the kernel marks every new directory in a merged
directory opaque, layerfs only one that hides a lower object.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import make_layout, member, tar_bytes
from unionutil import (  # noqa: F401 - no_mount_left_behind is an autouse fixture
    Ops,
    assert_same,
    assert_same_steps,
    extract_layers,
    fuse_unavailable,
    kernel_overlay,
    layerfs_mount,
    make_cli,
    no_mount_left_behind,
    overlay_unavailable,
    snapshot,
    upper_snapshot,
)

# each core serves every case: the twin and the C core must not drift
pytestmark = pytest.mark.usefixtures("fuse_core")

MT = 1_700_000_000
# vfs_cap_data revision 2 (20 bytes): cap_net_bind_service,cap_net_raw+ep
CAPABILITY = struct.pack("<IIIII", 0x02000001, (1 << 10) | (1 << 13), 0, 0, 0)


# -- image builders -------------------------------------------------------------------------------
def m(
    name: str,
    data: bytes = b"",
    *,
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    link: str = "",
    uid: int = 0,
    gid: int = 0,
    mtime: int = MT,
    pax_mtime: str | None = None,
    xattrs: dict[str, bytes] | None = None,
    dev: tuple[int, int] = (0, 0),
) -> tuple[tarfile.TarInfo, bytes]:
    info, data = member(name, data, kind=kind, mode=mode, link=link, mtime=mtime)
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.devmajor, info.devminor = dev
    pax: dict[str, str] = {}
    if pax_mtime is not None:
        pax["mtime"] = pax_mtime
    for k, v in (xattrs or {}).items():
        pax["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info, data


def d(name: str, mode: int = 0o755, **kw: Any) -> tuple[tarfile.TarInfo, bytes]:
    return m(name, kind=tarfile.DIRTYPE, mode=mode, **kw)


def hl(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return m(name, kind=tarfile.LNKTYPE, link=target)


def sym(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return m(name, kind=tarfile.SYMTYPE, link=target, mode=0o777)


def wh(name: str) -> tuple[tarfile.TarInfo, bytes]:
    parent, _, base = name.rpartition("/")
    return m(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opq(dirname: str) -> tuple[tarfile.TarInfo, bytes]:
    return m(f"{dirname}/.wh..wh..opq")


def layers_whiteouts() -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """Whiteout of a file and of a non-empty dir, an opaque dir, a file replacing a dir
    and a dir replacing a file."""
    base = [
        d("d"),
        m("d/f1", b"f1"),
        d("d/sub"),
        m("d/sub/f2", b"f2"),
        m("f", b"file"),
        d("o"),
        m("o/old1", b"old1"),
        m("o/old2", b"old2"),
        d("o/keep"),
        m("o/keep/x", b"x"),
        d("r"),
        m("r/inner", b"inner"),
        m("q", b"q is a file"),
        d("keep"),
        m("keep/a", b"a"),
    ]
    top = [
        wh("f"),
        wh("d"),
        d("o", mode=0o750),
        opq("o"),
        m("o/new", b"new"),
        m("r", b"r is a file now"),
        d("q"),
        m("q/child", b"child"),
        d("keep"),
        m("keep/b", b"b"),
    ]
    return [base, top]


def ops_whiteouts(o: Ops) -> None:
    o.listdir("")
    o.listdir("o")
    o.create("f", b"back")
    o.do("mkdir d", os.mkdir, o.p("d"))
    o.listdir("d")
    o.do("unlink r", os.unlink, o.p("r"))
    o.do("mkdir r", os.mkdir, o.p("r"))
    o.listdir("r")
    o.do("rmdir q (not empty)", os.rmdir, o.p("q"))
    o.do("unlink q/child", os.unlink, o.p("q/child"))
    o.do("rmdir q", os.rmdir, o.p("q"))
    o.create("q", b"q is a file again")
    o.do("unlink o/new", os.unlink, o.p("o/new"))
    o.listdir("o")
    o.do("rmdir o", os.rmdir, o.p("o"))
    o.do("mkdir o", os.mkdir, o.p("o"))
    o.listdir("o")
    o.do("unlink keep/a", os.unlink, o.p("keep/a"))
    o.listdir("keep")


def layers_opaque() -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """Re-created nested opaque directories (in one layer and across three layers) and a
    directory deleted and re-created in the same layer."""
    base = [
        d("a"),
        m("a/z", b"z"),
        d("a/b"),
        m("a/b/y", b"y"),
        d("a/b/c"),
        m("a/b/c/x", b"x"),
        d("a/b/c/deep"),
        m("a/b/c/deep/f", b"f"),
        d("p"),
        d("p/q"),
        d("p/q/r"),
        m("p/q/r/x", b"x"),
        d("s"),
        d("s/t"),
        m("s/t/old", b"old"),
        d("n"),
        d("n/m"),
        m("n/m/lower", b"lower"),
        d("v"),
        d("v/w"),
        m("v/w/old", b"old"),
        m("v/gone", b"gone"),
    ]
    middle = [
        d("a"),
        opq("a"),
        d("a/b"),
        opq("a/b"),
        d("a/b/c"),
        m("a/b/c/new", b"new"),
        wh("p"),
        wh("s"),
        d("s"),
        d("s/t"),
        m("s/t/u", b"u"),
        d("n"),
        d("n/m"),
        opq("n/m"),
        d("n/m/k"),
        opq("n/m/k"),
        m("n/m/k/mid", b"mid"),
        d("v"),
        opq("v"),
        d("v/w"),  # re-created below an opaque dir, not opaque itself
        m("v/w/new", b"new"),
    ]
    top = [
        d("p"),
        d("p/q"),
        d("p/q/r"),
        m("p/q/r/y", b"y"),
        d("n"),
        d("n/m"),
        m("n/m/top", b"top"),
    ]
    return [base, middle, top]


def ops_opaque(o: Ops) -> None:
    for rel in ("a", "a/b", "a/b/c", "p/q/r", "s/t", "n/m", "n/m/k", "v", "v/w"):
        o.listdir(rel)
    o.do("unlink a/b/c/new", os.unlink, o.p("a/b/c/new"))
    o.do("rmdir a/b/c", os.rmdir, o.p("a/b/c"))
    o.do("rmdir a/b", os.rmdir, o.p("a/b"))
    o.listdir("a")
    o.do("rmdir a", os.rmdir, o.p("a"))
    for rel in ("a", "a/b", "a/b/c"):
        o.do(f"mkdir {rel}", os.mkdir, o.p(rel))
        o.listdir(rel)
    o.do("rmdir a/b/c again", os.rmdir, o.p("a/b/c"))
    o.do("rmdir a/b again", os.rmdir, o.p("a/b"))
    o.do("rmdir a again", os.rmdir, o.p("a"))
    o.do("rmtree p", shutil.rmtree, o.p("p"))
    o.do("makedirs p/q/r", os.makedirs, o.p("p/q/r"))
    o.listdir("p/q/r")
    o.create("p/q/r/file", b"file")
    o.do("rmtree s", shutil.rmtree, o.p("s"))
    o.do("makedirs s/t", os.makedirs, o.p("s/t"))
    o.listdir("s/t")
    o.do("rmtree n/m", shutil.rmtree, o.p("n/m"))
    o.do("makedirs n/m/k", os.makedirs, o.p("n/m/k"))
    o.listdir("n/m")
    o.listdir("n/m/k")
    o.do("rmdir n/m/k", os.rmdir, o.p("n/m/k"))
    o.do("rmdir n/m", os.rmdir, o.p("n/m"))
    o.listdir("n")
    o.create("v/w/upper", b"upper")
    o.do("unlink v/w/new", os.unlink, o.p("v/w/new"))
    o.listdir("v/w")
    o.do("rmtree v", shutil.rmtree, o.p("v"))
    o.do("makedirs v/w", os.makedirs, o.p("v/w"))
    o.create("v/w/f", b"f")
    o.rename("v", "v2")  # a re-created (opaque) dir has no lower contents: it may move
    o.listdir("v2/w")
    o.listdir("v")
    o.rename("v2", "v")  # back, onto its own whiteout
    o.listdir("v")
    o.listdir("v/w")


def layers_links() -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """A hardlink group in a lower layer; a symlinked directory in a lower layer with entries
    under a same-named real directory (explicit and implicit) in an upper layer."""
    base = [
        d("h"),
        m("h/one", b"one", mode=0o640, uid=5, gid=6),
        hl("h/two", "h/one"),
        hl("h/three", "h/one"),
        d("real"),
        m("real/lowerfile", b"lower"),
        sym("s", "real"),
        sym("s2", "real"),
        d("t"),
        m("t/f", b"f"),
    ]
    top = [
        d("s"),
        m("s/upperfile", b"upper"),
        m("s2/implicit", b"implicit"),  # no directory member: s2 becomes an implicit dir
        sym("t", "real"),
        hl("h/four", "h/one"),  # a hardlink to a lower layer's file: a copy
    ]
    return [base, top]


def ops_links(o: Ops) -> None:
    o.write("h/one", b"ONE", 0)
    o.changed("h/two", "h/three")
    o.read("h/two")
    o.read("h/three")
    o.read("h/four")
    o.append("h/three", b"+appended")
    o.changed("h/one", "h/two")
    o.read("h/one")
    o.read("h/two")
    o.attrs("h/three")
    o.do("unlink h/two", os.unlink, o.p("h/two"))
    o.attrs("h/three")  # at once: one name fewer
    o.rename("h/one", "h/uno")
    o.link("h/three", "h/five")
    o.listdir("s")
    o.listdir("s2")
    o.create("s/another", b"another")
    o.listdir("t")
    o.listdir("real")
    o.do("unlink t", os.unlink, o.p("t"))
    o.do("mkdir t", os.mkdir, o.p("t"))
    o.listdir("t")


def layers_attrs() -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """Modes with setuid/setgid/sticky, owners, nanosecond mtimes, xattrs (security.capability
    with a binary value), device nodes, FIFOs and implicit parent directories."""
    base = [
        d("etc", mode=0o750, uid=7, gid=8, pax_mtime="1600000000.5"),
        m("etc/conf", b"conf", mode=0o600, uid=7, gid=8),
        d("bin"),
        m("bin/suid", b"#!/bin/sh\n", mode=0o4755),
        m("bin/sgid", b"#!/bin/sh\n", mode=0o2755, gid=50),
        m("bin/ping", b"\x7fELF fake", mode=0o755, xattrs={"security.capability": CAPABILITY}),
        m("bin/none", b"nobody may", mode=0o000),
        d("tmp", mode=0o1777),
        d("shared", mode=0o2775, gid=100),
        m("shared/f", b"shared", uid=1000, gid=100),
        d("x", mode=0o700, uid=1, gid=1, xattrs={"user.dir": b"on a dir"}),
        m(
            "x/t",
            b"times",
            pax_mtime="1700000000.123456789",
            xattrs={"user.text": b"hello", "user.bin": b"\xff\x00\xfe\x80", "user.empty": b""},
        ),
        m("x/old", b"before 1970", pax_mtime="-100.25"),
        m("x/far", b"after 2038", mtime=4_000_000_000),
        m("dev/null", kind=tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        m("dev/loop0", kind=tarfile.BLKTYPE, mode=0o660, gid=6, dev=(7, 0)),
        m("dev/big", kind=tarfile.CHRTYPE, mode=0o600, dev=(300, 70000)),
        m("dev/pipe", kind=tarfile.FIFOTYPE, mode=0o640),
        m("implicit/y/z/file", b"below implicit dirs"),
    ]
    top = [
        m("etc/newfile", b"new", pax_mtime="1700000001.000000001"),  # etc keeps layer 1's attributes
        m("more/implicit/file", b"more"),
        m("bin/ping2", b"cap", mode=0o750, uid=3, gid=4, xattrs={"security.capability": CAPABILITY}),
    ]
    return [base, top]


def ops_attrs(o: Ops) -> None:
    o.do("chown bin/suid", os.chown, o.p("bin/suid"), 1000, 1000)
    o.stat("bin/suid")
    o.do("chmod bin/sgid", os.chmod, o.p("bin/sgid"), 0o6711)
    o.write("bin/ping", b"\x7fELF changed", 0)  # writing drops security.capability
    o.do("chown bin/ping2", os.chown, o.p("bin/ping2"), 3, 9)  # so does chown
    o.read("bin/none")
    o.do("mkdir shared/sub", os.mkdir, o.p("shared/sub"))  # setgid dir: group and bit inherited
    o.stat("shared/sub")
    o.create("shared/new", b"new")
    o.stat("shared/new")
    o.create("tmp/file", b"sticky tmp")
    o.do("chmod tmp", os.chmod, o.p("tmp"), 0o1770)
    o.do("utime x/t", os.utime, o.p("x/t"), ns=(1_500_000_000_000_000_001, 1_600_000_000_999_999_999))
    o.do("utime x/old", os.utime, o.p("x/old"), ns=(5, -3_000_000_001))
    o.do("setxattr x", os.setxattr, o.p("x"), "user.dir", b"changed")
    o.do("removexattr x/t user.bin", os.removexattr, o.p("x/t"), "user.bin")
    o.do("removexattr x/t missing", os.removexattr, o.p("x/t"), "user.missing")
    o.do("setxattr create existing", os.setxattr, o.p("x/t"), "user.text", b"x", os.XATTR_CREATE)
    o.do("setxattr replace missing", os.setxattr, o.p("x/t"), "user.nope", b"x", os.XATTR_REPLACE)
    o.do("chown etc", os.chown, o.p("etc"), 70, 80)
    o.do("mknod chr", os.mknod, o.p("dev/zero"), stat.S_IFCHR | 0o640, os.makedev(1, 5))
    o.changed("dev/zero")
    o.do("chmod fifo", os.chmod, o.p("dev/pipe"), 0o606)
    o.do("chown dev/big", os.chown, o.p("dev/big"), 9, 9)


def layers_rw() -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """Targets for the general read-write sequence."""
    base = [
        d("data"),
        m("data/edit", b"0123456789" * 10),
        m("data/append", b"line1\n"),
        m("data/trunc0", b"x" * 100),
        m("data/truncn", b"abcdefghij" * 5),
        m("data/mode", b"mode"),
        m("data/owner", b"#!/bin/sh\n", mode=0o4755),
        m("data/times", b"times"),
        m("data/xattr", b"xattr", xattrs={"user.keep": b"1", "user.drop": b"2"}),
        m("data/gone", b"gone"),
        m("data/rename-me", b"rename me"),
        m("data/over-src", b"src"),
        m("data/over-dst", b"dst"),
        m("data/link-src", b"link source", mode=0o600, uid=3, gid=4),
        m("data/l0-only", b"hidden by layer 2"),
        d("emptydir"),
        d("tree"),
        d("tree/a"),
        d("tree/a/b"),
        m("tree/a/b/f1", b"f1"),
        m("tree/a/f2", b"f2"),
        m("tree/x", b"x"),
        hl("tree/a/b/hl", "tree/x"),
        sym("tree/sym", "a"),
        d("lowerdir"),
        m("lowerdir/f", b"f"),
        d("lowerdir/sub"),
        m("lowerdir/sub/g", b"g"),
        d("pair"),
        m("pair/one", b"pair"),
        hl("pair/two", "pair/one"),
        d("merged"),
        m("merged/l0", b"l0"),
    ]
    top = [
        d("data"),
        m("data/from-l1", b"l1"),
        wh("data/l0-only"),
        d("merged"),
        m("merged/l1", b"l1"),
        d("tree"),
        m("tree/l1file", b"l1"),
        d("emptydir2"),
    ]
    return [base, top]


def ops_rw(o: Ops) -> None:
    o.write("data/edit", b"XY", 3)
    o.append("data/append", b"line2\n")
    o.truncate("data/trunc0", 0)
    o.truncate("data/truncn", 7)
    o.truncate("data/from-l1", 10)
    o.do("chmod data/mode", os.chmod, o.p("data/mode"), 0o600)
    o.do("chmod lowerdir/sub", os.chmod, o.p("lowerdir/sub"), 0o700)
    o.do("chown data/owner", os.chown, o.p("data/owner"), 1234, 5678)
    o.do(
        "utime data/times",
        os.utime,
        o.p("data/times"),
        ns=(1_600_000_000_111_222_333, 1_650_000_000_987_654_321),
    )
    o.do("setxattr data/xattr", os.setxattr, o.p("data/xattr"), "user.new", b"v")
    o.do("removexattr data/xattr", os.removexattr, o.p("data/xattr"), "user.drop")
    o.do("removexattr missing", os.removexattr, o.p("data/edit"), "user.none")
    o.create("data/new", b"new file\n")
    o.do("mkdir newdir", os.mkdir, o.p("newdir"))
    o.mkfifo("newdir/fifo")
    o.symlink("../data/edit", "newdir/sym")
    o.link("data/link-src", "newdir/hl-lower")
    o.link("data/new", "newdir/hl-new")
    o.do("unlink data/gone", os.unlink, o.p("data/gone"))
    o.do("rmdir emptydir", os.rmdir, o.p("emptydir"))
    o.do("rmdir emptydir2", os.rmdir, o.p("emptydir2"))
    o.do("rmtree tree", shutil.rmtree, o.p("tree"))
    o.listdir("")
    o.do("mkdir tree", os.mkdir, o.p("tree"))
    o.listdir("tree")
    o.do("mkdir tree/a", os.mkdir, o.p("tree/a"))
    o.listdir("tree/a")
    o.rename("data/over-src", "data/over-dst")
    o.rename("data/rename-me", "data/renamed")
    o.do("mkdir updir", os.mkdir, o.p("updir"))
    o.create("updir/f", b"in an upper dir")
    o.rename("updir", "updir2")
    o.rename("lowerdir", "lowerdir2")  # EXDEV without redirect_dir; works on both here
    o.rename("merged", "merged2")
    o.rename("data/new", "data/edit")  # an upper file over a copied-up one
    o.attrs("pair/one")
    o.attrs("pair/two")
    o.write("pair/one", b"PAIR", 0)
    o.changed("pair/two")
    o.read("pair/two")
    o.attrs("pair/one")
    o.append("pair/two", b"+more")
    o.changed("pair/one")
    o.attrs("pair/one")  # the other name's size at once, before a read could refresh it
    o.read("pair/one")
    o.create("data/gone", b"back")  # over a whiteout
    o.do("rmdir merged (not empty)", os.rmdir, o.p("merged"))
    o.do("unlink merged", os.unlink, o.p("merged"))
    o.rename("updir2", "data/edit")  # ENOTDIR
    o.rename("data/edit", "updir2")  # EISDIR
    o.do("rmtree lowerdir", shutil.rmtree, o.p("lowerdir"))
    o.rename("updir2", "lowerdir")  # an upper dir onto a deleted lower dir
    o.listdir("lowerdir")
    o.listdir("merged")
    o.listdir("data")
    o.listdir("newdir")


def ops_sample(o: Ops) -> None:
    o.write("etc/passwd", b"ROOT", 0)
    o.append("etc/group", b"staff:x:50:\n")
    o.truncate("etc/hostname", 0)
    o.truncate("etc/os-release", 5)
    o.do("chmod etc/tagged", os.chmod, o.p("etc/tagged"), 0o600)
    o.do("chown bin/su-demo", os.chown, o.p("bin/su-demo"), 1000, 1000)
    o.do("utime state.db", os.utime, o.p("var/lib/app/state.db"), ns=(1, 1_234_567_890_123_456_789))
    o.do("setxattr etc/tagged", os.setxattr, o.p("etc/tagged"), "user.extra", b"more")
    o.do("removexattr etc/tagged", os.removexattr, o.p("etc/tagged"), "user.layerfs")
    o.create("etc/new-file", b"new\n")
    o.do("rmdir home", os.rmdir, o.p("home"))
    o.do("mkdir home", os.mkdir, o.p("home"))
    o.listdir("home")
    o.do("mkdir home/user", os.mkdir, o.p("home/user"))
    o.mkfifo("home/user/pipe")
    o.symlink("busybox", "bin/vi")
    o.link("bin/busybox", "bin/busybox-hl")
    o.link("etc/new-file", "home/user/new-hl")
    o.do("unlink bin/cat", os.unlink, o.p("bin/cat"))
    o.do("unlink app/data.bin", os.unlink, o.p("app/data.bin"))
    o.write("usr/share/doc/README", b"CHANGED", 0)
    o.changed("usr/share/doc/README.link")
    o.read("usr/share/doc/README.link")
    o.read("usr/share/doc/README.again")
    o.do("rmtree usr/share/doc", shutil.rmtree, o.p("usr/share/doc"))
    o.do("mkdir usr/share/doc", os.mkdir, o.p("usr/share/doc"))
    o.listdir("usr/share/doc")
    o.rename("etc/group", "etc/os-release")
    o.rename("etc/hostname", "etc/hostname.old")
    o.rename("home/user", "home/user2")
    o.rename("var/lib", "var/lib2")
    o.rename("app", "app2")
    o.listdir("etc")


@dataclass
class Case:
    name: str
    layers: Callable[[], list[list[tuple[tarfile.TarInfo, bytes]]]] | None
    ops: Callable[[Ops], None]
    # steps whose result is known (re-created directories are empty, renames, ...): both
    # mounts must give exactly these
    expect: list[tuple[str, Any]] = field(default_factory=list)


README = b"a file and its hardlink share one inode\n"
CASES = [
    Case(
        "sample",
        None,
        ops_sample,
        [
            ("ls home", []),
            ("ls usr/share/doc", []),
            ("read usr/share/doc/README.link", b"CHANGED" + README[7:]),
            ("read usr/share/doc/README.again", README),  # a copy, not a link (docs/FORMAT.md)
            ("rename var/lib var/lib2", "ok"),
            ("rename app app2", "ok"),
            ("nlink bin/busybox", 2),
        ],
    ),
    Case(
        "whiteouts",
        layers_whiteouts,
        ops_whiteouts,
        [("ls /", ["keep", "o", "q", "r"]), ("ls d", []), ("ls r", []), ("rmdir q (not empty)", "ENOTEMPTY")],
    ),
    Case(
        "opaque",
        layers_opaque,
        ops_opaque,
        [
            ("ls a", ["b"]),
            ("ls a/b", ["c"]),
            ("ls a/b/c", ["new"]),
            ("ls a/b/c", []),
            ("rmdir a", "ok"),
            ("rmdir a again", "ok"),
            ("ls p/q/r", ["y"]),
            ("ls p/q/r", []),
            ("ls s/t", ["u"]),
            ("ls s/t", []),
            ("ls n/m", ["k", "top"]),
            ("ls n/m/k", ["mid"]),
            ("ls n/m/k", []),
            ("ls v/w", ["new"]),
            ("ls v/w", ["upper"]),
            ("ls v/w", ["f"]),
        ],
    ),
    Case(
        "links",
        layers_links,
        ops_links,
        [
            ("read h/two", b"ONE"),
            ("read h/four", b"one"),
            ("read h/one", b"ONE+appended"),
            ("size,nlink h/three", (12, 2)),
            ("ls s", ["upperfile"]),
            ("ls s2", ["implicit"]),
            ("ls t", ["lowerfile"]),  # a symlink to real/
            ("ls t", []),
        ],
    ),
    Case("attrs", layers_attrs, ops_attrs, [("stat shared/sub", ("dir", "0o2755", 0, 100))]),
    Case(
        "rw",
        layers_rw,
        ops_rw,
        [
            ("ls tree", []),
            ("ls tree/a", []),
            ("rename lowerdir lowerdir2", "ok"),
            ("rename merged merged2", "ok"),
            ("read pair/two", b"PAIR"),
            ("size,nlink pair/one", (9, 2)),
            ("read pair/one", b"PAIR+more"),
            ("nlink data/link-src", 2),
            ("ls lowerdir", ["f"]),
        ],
    ),
]


# -- fixtures -------------------------------------------------------------------------------------
@dataclass
class Image:
    case: Case
    ref: str
    lowers: list[str]
    cli: Callable[..., Any]
    tmp: str


@dataclass
class RWResult:
    kernel_log: list[tuple[str, Any]] = field(default_factory=list)
    layerfs_log: list[tuple[str, Any]] = field(default_factory=list)
    kernel: dict[str, Any] = field(default_factory=dict)
    layerfs: dict[str, Any] = field(default_factory=dict)
    kernel_upper: dict[str, str] = field(default_factory=dict)
    layerfs_upper: dict[str, str] = field(default_factory=dict)
    before_umount: dict[str, Any] = field(default_factory=dict)
    after_remount: dict[str, Any] = field(default_factory=dict)
    kernel_on_our_upper: dict[str, Any] = field(default_factory=dict)
    remounted: dict[str, Any] = field(default_factory=dict)
    warm_log: list[tuple[str, Any]] = field(default_factory=list)
    warm: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Image:
    reason = fuse_unavailable() or overlay_unavailable(str(tmp_path_factory.getbasetemp()))
    if reason:
        pytest.skip(reason)
    case: Case = request.param
    tmp = str(tmp_path_factory.mktemp(case.name))
    if case.layers is None:
        layout = request.getfixturevalue("sample_layout")
        ref = "layerfs-sample:latest"
    else:
        ref = f"{case.name}:latest"
        layout = make_layout(
            os.path.join(tmp, "layout"), [tar_bytes(layer) for layer in case.layers()], ref=ref
        )
    lowers = extract_layers(layout, os.path.join(tmp, "layers"))
    cli = make_cli(os.path.join(tmp, "store"))
    cli("import", layout)
    return Image(case, ref, lowers, cli, tmp)


@pytest.fixture(scope="module")
def rw(image: Image, fuse_core: str) -> Iterator[RWResult]:
    """The case's operation sequence run on the kernel overlay and on a layerfs mount, then
    layerfs remounted, then the kernel overlay mounted on layerfs's upper directory.  Once per
    FUSE core (``fuse_core`` is a parameter here, so the sequence runs again on each)."""
    t, r = os.path.join(image.tmp, fuse_core), RWResult()
    os.makedirs(t)
    k = Ops(os.path.join(t, "k-mnt"))
    with kernel_overlay(image.lowers, os.path.join(t, "k-upper"), os.path.join(t, "k-work"), k.root):
        image.case.ops(k)
        r.kernel = snapshot(k.root, volatile=k.volatile)
    r.kernel_log = k.log
    r.kernel_upper = upper_snapshot(os.path.join(t, "k-upper"))

    upper = os.path.join(t, "l-upper")
    lo = Ops(os.path.join(t, "l-mnt"))
    with layerfs_mount(image.cli, image.ref, lo.root, upper=upper):
        image.case.ops(lo)
        r.layerfs = snapshot(lo.root, volatile=lo.volatile)
        r.before_umount = snapshot(lo.root, dir_mtimes=True)
    r.layerfs_log = lo.log
    r.layerfs_upper = upper_snapshot(upper)
    with layerfs_mount(image.cli, image.ref, lo.root, upper=upper):
        r.after_remount = snapshot(lo.root, dir_mtimes=True)
        r.remounted = snapshot(lo.root)
    km = os.path.join(t, "k2-mnt")
    with kernel_overlay(image.lowers, upper, os.path.join(t, "k2-work"), km, index=False):
        r.kernel_on_our_upper = snapshot(km)
    # once more on a fresh upper, with the whole image looked up and listed first: the kernel
    # then holds every lower node when the changes come (the C core serves those from the store
    # until a change reaches them)
    warm = Ops(os.path.join(t, "w-mnt"))
    with layerfs_mount(image.cli, image.ref, warm.root, upper=os.path.join(t, "w-upper")):
        snapshot(warm.root)
        image.case.ops(warm)
        r.warm = snapshot(warm.root, volatile=warm.volatile)
    r.warm_log = warm.log
    yield r


# -- (i) read-only ----------------------------------------------------------------------------------
def test_readonly_matches_kernel(image: Image) -> None:
    t = image.tmp
    with kernel_overlay(
        image.lowers, os.path.join(t, "ro-upper"), os.path.join(t, "ro-work"), os.path.join(t, "ro-k")
    ) as km:
        expected = snapshot(km)
    with layerfs_mount(image.cli, image.ref, os.path.join(t, "ro-l")) as lm:
        got = snapshot(lm)
    assert_same(expected, got, f"read-only tree of {image.case.name}")


# -- (ii) read-write ---------------------------------------------------------------------------------
def test_operations_give_what_the_kernel_gives(rw: RWResult) -> None:
    assert_same_steps(rw.kernel_log, rw.layerfs_log, "layerfs")
    assert_same_steps(rw.kernel_log, rw.warm_log, "layerfs, every node looked up first")


def test_known_results(rw: RWResult, image: Image) -> None:
    """The kernel gives these (a check of the reference); so must layerfs."""
    for step in image.case.expect:
        assert step in rw.kernel_log, f"kernel: {step} not in {rw.kernel_log}"
    missing = [step for step in image.case.expect if step not in rw.layerfs_log]
    assert not missing, f"layerfs did not give {missing}"


def test_readwrite_tree_matches_kernel(rw: RWResult) -> None:
    assert_same(rw.kernel, rw.layerfs, "tree after the operations")
    assert_same(rw.kernel, rw.warm, "tree after the operations, every node looked up first")


def test_upper_format_matches_kernel(rw: RWResult, image: Image) -> None:
    """Whiteouts are 0/0 character devices at the same paths; directories that hide a lower
    directory carry trusted.overlay.opaque in both.  (Where copy-up differs, a path is only
    in one upper directory: not compared.)"""
    k, lfs = rw.kernel_upper, rw.layerfs_upper
    assert not [p for p, v in lfs.items() if v == "wh-file"], "layerfs used .wh. files although root"
    lower_dirs = {p for p, v in snapshot_lower_dirs(image).items()}
    # a renamed lower directory: the kernel (redirect_dir) keeps it merged with its lower
    # origin and needs whiteouts inside it; layerfs copied it up whole and made it opaque
    moved = [p + "/" for p, v in lfs.items() if v == "opaque dir" and p not in lower_dirs]
    wk = sorted(p for p, v in k.items() if v == "whiteout" and not p.startswith(tuple(moved)))
    wl = sorted(p for p, v in lfs.items() if v == "whiteout")
    assert wk == wl, f"whiteouts: kernel {wk}, layerfs {wl}"
    opaque_diff = [
        (p, k[p], lfs[p])
        for p in sorted(set(k) & set(lfs) & lower_dirs)
        if k[p].endswith("dir") and lfs[p].endswith("dir") and k[p] != lfs[p]
    ]
    assert not opaque_diff, (
        f"opaque flags differ where a lower dir exists (path, kernel, layerfs): {opaque_diff}"
    )


_lower_dirs: dict[str, dict[str, str]] = {}


def snapshot_lower_dirs(image: Image) -> dict[str, str]:
    """Directories the image itself (no upper) shows, by path."""
    if image.ref not in _lower_dirs:
        t = image.tmp
        with kernel_overlay(
            image.lowers, os.path.join(t, "ld-upper"), os.path.join(t, "ld-work"), os.path.join(t, "ld-k")
        ) as km:
            snap = snapshot(km)
        _lower_dirs[image.ref] = {
            p: v["type"] for p, v in snap.items() if p != "#hardlinks" and v["type"] == "dir"
        }
    return _lower_dirs[image.ref]


# -- (iii) persistence ------------------------------------------------------------------------------
def test_remount_shows_the_same_tree(rw: RWResult) -> None:
    assert_same(rw.before_umount, rw.after_remount, "tree across a remount", ("before", "after"))


def test_kernel_reads_our_upper_directory(rw: RWResult) -> None:
    assert_same(rw.kernel_on_our_upper, rw.remounted, "tree of layerfs's upper dir")
