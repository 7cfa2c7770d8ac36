"""A container's own network: a namespace connected to the host's network by pasta.

docker's default (``bridge``) gives a container a network namespace of its own, with outbound
access through NAT and the ports ``-p`` publishes.  layerfs makes the namespace (``ip netns
add``, so it outlives no process and runc can join it by path) and has pasta (Debian package
``passt``) connect it: pasta copies the host's addresses and routes into it, carries its TCP
and UDP traffic out through the host's own sockets (no bridge, no NAT rules, nothing changed
on the host), and listens on the host for the published ports.  As with docker's bridge the
gateway address leads to the host itself (pasta's --map-gw).

A container's network is made before ``runc create`` and taken down after its process ends
(``teardown``: pasta is stopped, the namespace deleted); its pasta's pid file lives in the
container's directory, so a leftover is easy to find.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from layerfs.containers.spec import RuntimeError_

NETNS_DIR = "/run/netns"  # where ip-netns(8) keeps named namespaces


class NetworkError(RuntimeError_):
    """The container's network cannot be set up; the message says why."""


@dataclass(frozen=True)
class Port:
    """``-p [IP:]HOST:CONTAINER[/tcp|udp]``, as ``docker run -p`` takes it."""

    host: int
    container: int
    proto: str = "tcp"
    ip: str = ""

    @classmethod
    def parse(cls, spec: str) -> Port:
        text, _, proto = spec.partition("/")
        proto = proto or "tcp"
        parts = text.rsplit(":", 2)
        usage = f"invalid port specification {spec!r}: use [IP:]HOST:CONTAINER[/tcp|udp]"
        if proto not in ("tcp", "udp") or len(parts) < 2:
            raise NetworkError(usage)
        ip = parts[0] if len(parts) == 3 else ""
        if ip:
            try:
                ipaddress.ip_address(ip.strip("[]"))
            except ValueError:
                raise NetworkError(usage) from None
        try:
            host, container = int(parts[-2]), int(parts[-1])
        except ValueError:
            raise NetworkError(usage) from None
        if not (0 < host < 65536 and 0 < container < 65536):
            raise NetworkError(f"invalid port specification {spec!r}: ports are 1-65535")
        return cls(host, container, proto, ip.strip("[]"))

    def pasta(self) -> str:
        return f"{self.ip + '/' if self.ip else ''}{self.host}:{self.container}"


def netns_name(cid: str) -> str:
    return f"layerfs-{cid[:12]}"


def netns_path(cid: str) -> str:
    return os.path.join(NETNS_DIR, netns_name(cid))


def pasta() -> str:
    path = shutil.which("pasta")
    if path is None:
        raise NetworkError(
            "the default network needs pasta (Debian: apt install passt); "
            "or use --network host or --network none"
        )
    return path


def setup(cid: str, state_dir: str, ports: list[Port]) -> int:
    """Make the container's namespace and connect it; pasta's pid."""
    pasta_bin = pasta()
    ip = shutil.which("ip")
    if ip is None:
        raise NetworkError("the default network needs ip(8) (Debian: apt install iproute2)")
    teardown(cid, state_dir)  # a crashed run's leftovers
    res = subprocess.run([ip, "netns", "add", netns_name(cid)], capture_output=True, text=True)
    if res.returncode != 0:
        raise NetworkError(f"cannot make the container's network namespace: {res.stderr.strip()}")
    pid_file = os.path.join(state_dir, "pasta.pid")
    tcp = ",".join(p.pasta() for p in ports if p.proto == "tcp") or "none"
    udp = ",".join(p.pasta() for p in ports if p.proto == "udp") or "none"
    args = [
        pasta_bin,
        "--runas", "0",  # it would drop to nobody, who may not join a namespace of root's
        "--config-net",
        "--quiet",
        "--pid", pid_file,
        "--tcp-ports", tcp,
        "--udp-ports", udp,
        "--tcp-ns", "none",  # nothing of the host's loopback is offered inside
        "--udp-ns", "none",
        "--netns", netns_path(cid),
    ]  # fmt: skip
    # pasta forks into the background once the namespace is connected and its ports listen
    res = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        teardown(cid, state_dir)
        said = [line for line in res.stderr.splitlines() if line.strip() and "syslog" not in line]
        raise NetworkError(
            f"pasta could not connect the container's network: {said[-1] if said else res.returncode}"
        )
    return _pasta_pid(state_dir) or 0


def _pasta_pid(state_dir: str) -> int | None:
    """The pid in the container's pasta pid file, if that process is still its pasta."""
    pid_file = os.path.join(state_dir, "pasta.pid")
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if pid_file.encode() not in f.read():
                return None
    except (OSError, ValueError):
        return None
    return pid


def teardown(cid: str, state_dir: str) -> None:
    """Stop the container's pasta and delete its namespace (both may be gone already)."""
    pid = _pasta_pid(state_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while _pasta_pid(state_dir) == pid and time.monotonic() < deadline:
            time.sleep(0.01)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(state_dir, "pasta.pid"))
    if os.path.lexists(netns_path(cid)):
        ip = shutil.which("ip") or "ip"
        subprocess.run([ip, "netns", "delete", netns_name(cid)], capture_output=True)


def resolv_conf() -> str:
    """The host's resolv.conf for a container, as docker writes it for its bridge: the host's
    nameservers (the container reaches them through pasta), not those on the host's loopback
    (the container's is its own), docker's fallback (Google's) when none is left."""
    lines: list[str] = []
    servers = 0
    with contextlib.suppress(OSError), open("/etc/resolv.conf") as f:
        for line in f:
            words = line.split()
            if words[:1] == ["nameserver"] and len(words) > 1:
                with contextlib.suppress(ValueError):
                    if ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                        continue
                servers += 1
            lines.append(line.rstrip("\n"))
    if not servers:
        lines += ["nameserver 8.8.8.8", "nameserver 8.8.4.4"]
    return "\n".join(lines) + "\n"
