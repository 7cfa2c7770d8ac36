"""OCI runtime bundles: ``config.json`` for runc from an image config and ``run`` options.

The process follows the image config the way docker does: ``Entrypoint`` +
(``CMD`` given on the command line, else the image's ``Cmd``), ``Env`` with the
``-e`` values over it (and docker's default ``PATH`` when none is set),
``WorkingDir``, ``User`` resolved in the image's own ``/etc/passwd`` and
``/etc/group``.  The rest is runc's default spec (``runc spec``): private
mount, pid, ipc and uts namespaces, a fresh /proc, a tmpfs /dev with
/dev/pts, /dev/shm and /dev/mqueue, a read-only /sys, masked and read-only
kernel paths.  What differs from runc's default is what docker users expect:
docker's default capability set (``--cap-add``, ``--cap-drop``), docker's
default seccomp profile (``seccomp.py``; ``--security-opt seccomp=unconfined``
drops it), ``--privileged``, and a network: docker's default ``bridge``, a
namespace of its own that ``network.py`` connects (``bundle``, which sets up no
network, gives an empty one), ``--network host`` or ``none`` (loopback only).
On the host network ``CAP_NET_RAW`` is dropped unless added back: raw sockets
on the host's interfaces would let a container sniff and spoof host traffic.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

from layerfs.containers.seccomp import linux_seccomp
from layerfs.userland import userland_arch

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# docker's default capability set (moby oci/caps/defaults.go)
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
# every capability, in the kernel's order (bit numbers); --privileged gets those we have
ALL_CAPABILITIES = [
    "CAP_" + name
    for name in (
        "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
        "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO "
        "SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME "
        "SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG "
        "WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
    ).split()
]
# directories runc mounts over; made in a rootfs that lacks them, and not counted as changes
RUNTIME_DIRS = (b"proc", b"sys", b"dev")


class RuntimeError_(ValueError):
    """The container cannot be set up as asked; the message says why."""


@dataclass
class Volume:
    source: str
    destination: str
    readonly: bool = False

    @classmethod
    def parse(cls, spec: str) -> Volume:
        """``HOST:CONTAINER[:ro|rw]``, as ``docker run -v`` takes it (host paths only)."""
        parts = spec.split(":")
        mode = ""
        if len(parts) == 3:
            mode = parts.pop()
        if len(parts) != 2 or not parts[0] or not parts[1] or mode not in ("", "ro", "rw"):
            raise RuntimeError_(f"invalid volume specification {spec!r}: use HOST:CONTAINER[:ro]")
        src, dst = parts
        if not os.path.isabs(src):
            raise RuntimeError_(f"invalid volume specification {spec!r}: the host path must be absolute")
        if not os.path.isabs(dst):
            raise RuntimeError_(f"invalid volume specification {spec!r}: the container path must be absolute")
        if os.path.normpath(dst) == "/":  # docker's words
            raise RuntimeError_(f"invalid volume specification {spec!r}: destination can't be '/'")
        return cls(src, os.path.normpath(dst), mode == "ro")


@dataclass
class ProcessOptions:
    command: list[str] = field(default_factory=list)  # replaces the image's Cmd
    entrypoint: list[str] | None = None  # replaces the image's Entrypoint
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    volumes: list[Volume] = field(default_factory=list)
    hostname: str = ""
    tty: bool = False
    interactive: bool = False  # -i: stdin stays open (a detached container's never ends)
    network: str = "bridge"  # docker's name: a namespace of its own, connected by pasta; host; none
    publish: list[str] = field(default_factory=list)  # -p [IP:]HOST:CONTAINER[/tcp|udp]
    privileged: bool = False  # every capability, no seccomp profile, no masked kernel paths
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)  # seccomp=unconfined, no-new-privileges


def _cap_name(name: str, flag: str) -> str:
    cap = name.strip().upper()
    if cap == "ALL":
        return cap
    cap = cap if cap.startswith("CAP_") else "CAP_" + cap
    if cap not in ALL_CAPABILITIES:
        raise RuntimeError_(f'invalid {flag}: unknown capability: "{cap}"')
    return cap


def _our_capabilities() -> list[str]:
    """Every capability we can give: those of our bounding set (this kernel's, less any the
    machine we run in withholds)."""
    try:
        with open("/proc/self/status") as f:
            bounding = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    except (OSError, ValueError, StopIteration):
        return list(CAPABILITIES)
    return [c for bit, c in enumerate(ALL_CAPABILITIES) if bounding >> bit & 1]


def capabilities(opts: ProcessOptions) -> list[str]:
    """docker's default set (without CAP_NET_RAW on the host network), then --cap-drop and
    --cap-add (ALL drops or adds every one); every capability with --privileged."""
    drop = [_cap_name(c, "--cap-drop") for c in opts.cap_drop]
    add = [_cap_name(c, "--cap-add") for c in opts.cap_add]
    every = _our_capabilities()
    if opts.privileged or "ALL" in add:
        caps = list(every)
    elif "ALL" in drop:
        caps = []
    else:
        # raw sockets on the host's own interfaces would let a container sniff and spoof host traffic
        caps = [c for c in CAPABILITIES if not (opts.network == "host" and c == "CAP_NET_RAW")]
    caps += [c for c in add if c != "ALL" and c not in caps]
    if not opts.privileged and "ALL" not in add:
        caps = [c for c in caps if c not in drop or c in add]
    return [c for c in ALL_CAPABILITIES if c in caps]


def security(opts: ProcessOptions) -> tuple[bool, bool]:
    """(seccomp profile on, no_new_privileges) from --security-opt and --privileged."""
    seccomp, no_new_privs = not opts.privileged, False
    for item in opts.security_opt:
        key, _, value = item.partition("=") if "=" in item else item.partition(":")  # docker takes both
        if key == "seccomp" and value == "unconfined":
            seccomp = False
        elif key == "no-new-privileges" and value in ("", "true", "false"):
            no_new_privs = value != "false"
        else:
            raise RuntimeError_(
                f"invalid --security-opt {item!r}: layerfs takes seccomp=unconfined and no-new-privileges[=true|false]"
            )
    return seccomp, no_new_privs


_ARCH = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386", "i686": "386"}
_ARM = {"armv5l": "v5", "armv6l": "v6", "armv7l": "v7", "armv8l": "v8", "armhf": "v7", "armel": "v6"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def host_platform() -> tuple[str, str, str]:
    """(os, architecture, variant) of this machine, as docker (containerd) names it: its
    userland's (a 32-bit Raspberry Pi OS on a 64-bit kernel is arm/v7), amd64 with its
    microarchitecture level (v2, v3, v4: the x86-64 psABI's, from the CPU flags)."""
    arch, variant = userland_arch()
    if arch == "amd64":
        flags = _cpu_flags()
        v2 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
        v3 = v2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
        v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
        variant = next((v for v, need in (("v4", v4), ("v3", v3), ("v2", v2)) if need <= flags), "")
    return "linux", arch, variant


def _level(variant: str) -> float:
    try:
        return float(variant.lstrip("v") or 1)
    except ValueError:
        return 1.0


def platform_mismatch(image: dict[str, Any]) -> str | None:
    """docker's warning when an image (its config: os, architecture, variant) is not for this
    machine; None when it is (an amd64 host runs 386 and lower amd64 levels, arm64 runs arm)."""
    os_ = str(image.get("os") or "linux").lower()
    arch = str(image.get("architecture") or "")
    if not arch:
        return None
    variant = str(image.get("variant") or "")
    if arch in _ARM:
        arch, variant = "arm", variant or _ARM[arch]
    arch = _ARCH.get(arch, arch)
    host_os, host_arch, host_variant = host_platform()
    runs = os_ == host_os and (
        (arch == host_arch and (arch not in ("amd64", "arm") or _level(variant) <= _level(host_variant)))
        or (host_arch == "amd64" and arch == "386")
        or (host_arch == "arm64" and arch == "arm")
    )
    if runs:
        return None
    want = "/".join(p for p in (os_, arch, variant) if p)
    have = "/".join(p for p in (host_os, host_arch, host_variant) if p)
    return (
        f"The requested image's platform ({want}) does not match the detected host platform ({have}) "
        "and no specific platform was requested"
    )


def process_args(image_config: dict[str, Any], opts: ProcessOptions) -> list[str]:
    entrypoint = opts.entrypoint if opts.entrypoint is not None else image_config.get("Entrypoint") or []
    cmd = opts.command or ([] if opts.entrypoint is not None else image_config.get("Cmd") or [])
    args = [*entrypoint, *cmd]
    if not args:
        raise RuntimeError_(
            "no command specified: the image has no Entrypoint or Cmd, give one after the image"
        )
    return args


def environment(image_config: dict[str, Any], opts: ProcessOptions) -> list[str]:
    env: dict[str, str] = {}
    if opts.tty:  # docker's default for a terminal; the image's Env and -e may say otherwise
        env["TERM"] = "xterm"
    for item in image_config.get("Env") or []:
        k, _, v = item.partition("=")
        env[k] = v
    if "PATH" not in env:
        env["PATH"] = DEFAULT_PATH[5:]
    if opts.hostname:
        env["HOSTNAME"] = opts.hostname
    for item in opts.env:
        k, eq, v = item.partition("=")
        if not k:
            raise RuntimeError_(f"invalid environment variable {item!r}")
        if eq:
            env[k] = v
        elif k in os.environ:  # -e NAME passes the caller's value on, as docker does
            env[k] = os.environ[k]
    return [f"{k}={v}" for k, v in env.items()]


def in_root(root: str, path: str, *, follow_last: bool = True) -> str:
    """The host path of ``path`` inside ``root``, its symlinks resolved as a chroot would.

    The rootfs is the image, mounted: the host kernel would follow an image's symlink
    (``/etc/passwd -> /etc/shadow``, ``esc -> /``) out of it.  Here every link is read and
    resolved against ``root``, and ``..`` stops at it, so the result is always inside."""
    pending = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        host = os.path.join(root, *done, part)
        if (pending or follow_last) and os.path.islink(host):
            links += 1
            if links > 40:
                raise RuntimeError_(f"too many levels of symbolic links in {path} (in the image)")
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        done.append(part)
    return os.path.join(root, *done)


_MAX_DB = 4 << 20
_MAX_ID = 2**31 - 1  # the kernel's uid_t is 32 bits, and runc takes no more than 2^31 - 1


def _read_db(rootfs: str, name: str) -> list[list[str]]:
    """An /etc database of the image: a regular file only (not a device or FIFO a hostile image
    links to), read up to a size limit."""
    try:
        fd = os.open(in_root(rootfs, f"/etc/{name}"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        text = f.read(_MAX_DB).decode(errors="replace")
    return [line.split(":") for line in text.splitlines() if line.strip() and not line.startswith("#")]


def resolve_user(rootfs: str, user: str) -> tuple[int, int, list[int]]:
    """``name|uid[:group|gid]`` -> (uid, gid, additional gids), looked up in the image."""
    if not user:
        return 0, 0, []
    try:
        return _resolve_user(rootfs, user)
    except (ValueError, IndexError) as exc:
        if isinstance(exc, RuntimeError_):
            raise
        raise RuntimeError_(
            f"cannot resolve user {user!r}: the image's /etc/passwd or /etc/group is malformed"
        ) from None


def _resolve_user(rootfs: str, user: str) -> tuple[int, int, list[int]]:
    name, _, group = user.partition(":")
    passwd = [p for p in _read_db(rootfs, "passwd") if len(p) >= 4]
    groups = [g for g in _read_db(rootfs, "group") if len(g) >= 3]
    entry = next((p for p in passwd if p[0] == name), None)
    if entry is None and name.isdigit():
        entry = next((p for p in passwd if p[2] == name), None)
        uid, gid, login = int(name), int(entry[3]) if entry else 0, entry[0] if entry else None
    elif entry is None:
        raise RuntimeError_(f"unable to find user {name}: no matching entries in passwd file")
    else:
        uid, gid, login = int(entry[2]), int(entry[3]), entry[0]
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((g for g in groups if g[0] == group), None)
            if g is None:
                raise RuntimeError_(f"unable to find group {group}: no matching entries in group file")
            gid = int(g[2])
    extra = sorted(
        {
            int(g[2])
            for g in groups
            if login and g[2].isdigit() and login in g[3].split(",") and int(g[2]) != gid
        }
    )
    if not all(0 <= i <= _MAX_ID for i in (uid, gid, *extra)):  # runc's words
        raise RuntimeError_(f"invalid user {user!r}: uids and gids must be in range 0-{_MAX_ID}")
    return uid, gid, extra


def spec(
    image_config: dict[str, Any],
    rootfs: str,
    opts: ProcessOptions,
    *,
    root_path: str = "rootfs",
    netns: str | None = None,
    resolv_conf: str | None = None,
) -> dict[str, Any]:
    """The runtime spec (config.json) of a bundle whose root filesystem is mounted at ``rootfs``.
    ``netns``: the namespace made for the bridge network (without it, a new empty one);
    ``resolv_conf``: a file bound over the image's /etc/resolv.conf, if it has one."""
    uid, gid, extra = resolve_user(
        rootfs, opts.user if opts.user is not None else image_config.get("User") or ""
    )
    cwd = opts.workdir or image_config.get("WorkingDir") or "/"
    if not os.path.isabs(cwd):
        raise RuntimeError_(f"the working directory {cwd!r} is not an absolute path")
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]
    if opts.network not in ("bridge", "host", "none"):
        raise RuntimeError_(f"network {opts.network!r}: layerfs has bridge (the default), host and none")
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if opts.network == "none" or (opts.network == "bridge" and netns is None):
        namespaces.append({"type": "network"})
    elif opts.network == "bridge" and netns is not None:
        namespaces.append({"type": "network", "path": netns})
    if resolv_conf is not None and os.path.isfile(in_root(rootfs, "/etc/resolv.conf")):
        # over the image's own file only: a mount point made for it would be a change of the
        # container (docker hides it in its init layer)
        mounts.append(
            {
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": resolv_conf,
                "options": ["rbind", "rprivate", "rw"],
            }
        )
    caps = capabilities(opts)
    seccomp, no_new_privs = security(opts)
    for v in opts.volumes:
        mounts.append(
            {
                "destination": v.destination,
                "type": "bind",
                "source": os.path.abspath(v.source),
                "options": ["rbind", "rprivate", "ro" if v.readonly else "rw"],
            }
        )
    linux: dict[str, Any] = {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": namespaces,
        "maskedPaths": [
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/sys/firmware",
            "/proc/scsi",
        ],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    }
    if seccomp:
        linux["seccomp"] = linux_seccomp(caps)
    if opts.privileged:  # as docker: every device allowed, the kernel's files not hidden, /sys writable
        linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
        del linux["maskedPaths"], linux["readonlyPaths"]
        for m in mounts:
            if m["destination"] in ("/sys", "/sys/fs/cgroup"):
                m["options"] = [o for o in m["options"] if o != "ro"] + ["rw"]
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": opts.tty,
            "user": {"uid": uid, "gid": gid, **({"additionalGids": extra} if extra else {})},
            "args": process_args(image_config, opts),
            "env": environment(image_config, opts),
            "cwd": cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": no_new_privs,  # as docker: only when asked for
        },
        "root": {"path": root_path, "readonly": False},
        "hostname": opts.hostname,
        "mounts": mounts,
        "linux": linux,
    }


def prepare_rootfs(rootfs: str, cwd: str) -> None:
    """Make the mount points runc needs and the working directory, where the image lacks them
    (inside the rootfs: see ``in_root``)."""
    for d in RUNTIME_DIRS:
        path = os.path.join(rootfs, os.fsdecode(d))
        if not os.path.lexists(path):
            os.mkdir(path, 0o755)
    target = in_root(rootfs, cwd)
    if not os.path.isdir(target):
        try:
            os.makedirs(target, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RuntimeError_(f"the working directory {cwd} is not a directory in the image") from None


def executable_exists(rootfs: str, name: str, env: list[str]) -> bool:
    """Is there something called ``name`` to execute in the image (a path, or found on its $PATH)?
    Links are resolved inside the image (``in_root``), never on the host."""
    if "/" in name:
        candidates = [name]
    else:
        path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH[5:])
        candidates = [os.path.join(d or ".", name) for d in path.split(":")]
    absolute = [c for c in candidates if c.startswith("/")]
    if not absolute:
        return True  # a relative $PATH: leave the lookup to the runtime
    return any(os.path.lexists(in_root(rootfs, c)) for c in absolute)
