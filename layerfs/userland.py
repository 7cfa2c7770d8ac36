"""Which machine this userland is built for: the architecture of the programs it runs.

The kernel's name (``uname -m``, ``platform.machine()``) is not it: 32-bit Raspberry Pi OS on a
64-bit kernel says ``aarch64``, a 32-bit x86 userland on a 64-bit kernel ``x86_64``, and so do
their containers; what runs there is arm (v7) and 386.  The Python build knows its own target:
its multiarch triplet (``arm-linux-gnueabihf``, ``aarch64-linux-gnu``) where Debian and most
distributions set one, else the kernel's name corrected by this build's pointer size.
Stateless; safe from any thread.
"""

from __future__ import annotations

import platform
import struct
import sys

# the CPU part of a GNU triplet (or a kernel's machine name) -> OCI architecture
_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "i386": "386",
    "i486": "386",
    "i586": "386",
    "i686": "386",
    "aarch64": "arm64",
    "arm64": "arm64",
    "arm": "arm",
    "armhf": "arm",
    "armel": "arm",
    "armv5l": "arm",
    "armv5tel": "arm",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "powerpc64le": "ppc64le",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64el": "mips64le",
    "mipsel": "mipsle",
    "loongarch64": "loong64",
}
# what a 64-bit kernel's name means for a 32-bit userland on it
_ARCH_32 = {"amd64": "386", "arm64": "arm"}


def userland_arch(
    machine: str | None = None, multiarch: str | None = None, pointer_size: int | None = None
) -> tuple[str, str]:
    """(architecture, variant) of this userland as OCI names them: ``("amd64", "")``,
    ``("arm64", "v8")``, ``("arm", "v7")``, ``("386", "")``.  The arguments stand in for the
    kernel's machine name, the Python build's multiarch triplet and its pointer size (tests)."""
    machine = (platform.machine() if machine is None else machine).lower()
    if multiarch is None:
        multiarch = getattr(sys.implementation, "_multiarch", "") or ""
    pointer_size = struct.calcsize("P") if pointer_size is None else pointer_size
    cpu = multiarch.split("-", 1)[0].lower()
    arch = _ARCH.get(cpu) or _ARCH.get(machine, machine)
    if not cpu and pointer_size == 4:
        arch = _ARCH_32.get(arch, arch)
    if arch == "arm64":
        return arch, "v8"
    if arch == "arm":
        # the kernel's name tells an ARMv6 or v5 board (Raspberry Pi 1 and Zero); a v7 or v8 CPU
        # runs a 32-bit userland as v7, which is what containerd calls it too
        for old in ("v5", "v6"):
            if machine.startswith("arm" + old):
                return arch, old
        return arch, "v7"
    return arch, ""


def userland_platform() -> str:
    """``linux/ARCH[/VARIANT]`` of this userland (arm64 without its default variant, as docker
    prints it): the platform of the images its programs run."""
    arch, variant = userland_arch()
    return f"linux/{arch}/{variant}" if variant and arch != "arm64" else f"linux/{arch}"
