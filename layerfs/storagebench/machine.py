"""What a bench report says about where it ran: the board, CPU, memory, kernel and Python;
the disk and filesystem under the measured directory; and throttling or under-voltage.

Everything is read from /proc, /sys and the device tree, and is optional: a field that cannot
be found says ``"unknown"`` (``"not available"`` for throttling), never fails the run.
Stateless functions, thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import stat
import subprocess
import sys
from typing import Any

from layerfs import procfs

UNKNOWN = "unknown"
NOT_AVAILABLE = "not available"
MODEL_FILES = ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model")
THROTTLED_SYSFS = "/sys/devices/platform/soc/soc:firmware/get_throttled"

# the Raspberry Pi firmware's get_throttled bits: low bits now, bits 16+ since boot
THROTTLE_BITS = {
    0: "under-voltage",
    1: "arm frequency capped",
    2: "throttled",
    3: "soft temperature limit",
}


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace").strip("\0 \n")
    except OSError:
        return None


def board_model() -> str:
    """The board as the device tree names it (``Raspberry Pi 4 Model B Rev 1.5``); x86 has none."""
    for path in MODEL_FILES:
        text = _read(path)
        if text:
            return text
    return UNKNOWN


# ARM's part numbers (/proc/cpuinfo "CPU part" of implementer 0x41): arm64 kernels print no
# model name, and the "Model" line names the board, not the CPU
ARM_PARTS = {
    "0xd03": "ARM Cortex-A53",  # Raspberry Pi 3, Zero 2
    "0xd04": "ARM Cortex-A35",
    "0xd05": "ARM Cortex-A55",
    "0xd07": "ARM Cortex-A57",
    "0xd08": "ARM Cortex-A72",  # Raspberry Pi 4, 400, CM4
    "0xd09": "ARM Cortex-A73",
    "0xd0b": "ARM Cortex-A76",  # Raspberry Pi 5
    "0xd0c": "ARM Neoverse-N1",
    "0xc07": "ARM Cortex-A7",  # Raspberry Pi 2
    "0xb76": "ARM1176",  # Raspberry Pi 1, Zero
}


def cpu_model(cpuinfo: str) -> str:
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("CPU implementer") == "0x41" and fields.get("CPU part") in ARM_PARTS:
        return ARM_PARTS[fields["CPU part"]]
    for key in ("model name", "cpu model", "Processor", "cpu"):
        if fields.get(key):
            return fields[key]
    return UNKNOWN


def cpu() -> dict[str, Any]:
    model = cpu_model(_read("/proc/cpuinfo") or "")
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    max_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    return {
        "model": model or UNKNOWN,
        "count": os.cpu_count() or 0,
        "governor": governor or UNKNOWN,
        "max_mhz": int(max_khz) // 1000 if max_khz and max_khz.isdigit() else UNKNOWN,
    }


def memory() -> dict[str, Any]:
    out: dict[str, Any] = {"total_bytes": UNKNOWN, "available_bytes": UNKNOWN}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key in ("MemTotal", "MemAvailable") and parts and parts[0].isdigit():
            out["total_bytes" if key == "MemTotal" else "available_bytes"] = int(parts[0]) * 1024
    return out


def describe_machine() -> dict[str, Any]:
    uname = os.uname()
    return {
        "board": board_model(),
        "hostname": uname.nodename,
        "cpu": cpu(),
        "memory": memory(),
        "kernel": f"{uname.sysname} {uname.release} {uname.version}",
        "machine": uname.machine,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "arch": platform.machine(),
            "bits": 64 if sys.maxsize > 2**32 else 32,
        },
    }


# -- the disk -------------------------------------------------------------------------------------
def _block_dir(device: str) -> str | None:
    """The /sys/block/DISK directory of the disk that holds block device ``MAJ:MIN``."""
    link = f"/sys/dev/block/{device}"
    if not os.path.exists(link):
        return None
    real = os.path.realpath(link)
    if os.path.exists(os.path.join(real, "partition")):  # a partition: its disk is the parent
        real = os.path.dirname(real)
    return real


def _disk_info(block: str) -> dict[str, Any]:
    name = os.path.basename(block)
    rot = _read(os.path.join(block, "queue", "rotational"))
    size = _read(os.path.join(block, "size"))
    model = _read(os.path.join(block, "device", "model")) or _read(os.path.join(block, "device", "name"))
    kind = _read(os.path.join(block, "device", "type"))  # SD, MMC (mmcblk)
    return {
        "disk": name,
        "model": model or UNKNOWN,
        "type": kind or ("sd/mmc" if name.startswith("mmcblk") else UNKNOWN),
        "rotational": {"0": False, "1": True}.get(rot or "", UNKNOWN),
        "size_bytes": int(size) * 512 if size and size.isdigit() else UNKNOWN,
        "scheduler": _read(os.path.join(block, "queue", "scheduler")) or UNKNOWN,
    }


def describe_disk(path: str) -> dict[str, Any]:
    """The filesystem ``path`` is on (the mount that holds it) and, if it is a block device,
    the disk under it."""
    real = os.path.realpath(path)
    best: procfs.Mount | None = None
    for m in procfs.mountinfo():
        mp = m.mountpoint.rstrip("/") + "/"
        if (real + "/").startswith(mp) and (best is None or len(m.mountpoint) >= len(best.mountpoint)):
            best = m
    out: dict[str, Any] = {"path": real}
    st = os.statvfs(real)
    out["free_bytes"] = st.f_bavail * st.f_frsize
    if best is None:
        return dict(out, device=UNKNOWN, fstype=UNKNOWN, mount_options=UNKNOWN)
    out.update(
        mountpoint=best.mountpoint,
        device=best.source,
        fstype=best.fstype,
        mount_options=",".join(o for o in (best.options + "," + best.super_options).split(",") if o),
    )
    block = _block_dir(best.device)
    if block is None and best.source.startswith("/dev/"):  # btrfs and others: an anonymous st_dev
        with contextlib.suppress(OSError):
            st_source = os.stat(best.source)
            if stat.S_ISBLK(st_source.st_mode):
                rdev = st_source.st_rdev
                block = _block_dir(f"{os.major(rdev)}:{os.minor(rdev)}")
    out["block"] = _disk_info(block) if block else "none (not a block device)"
    return out


# -- throttling -------------------------------------------------------------------------------------
def throttled() -> dict[str, Any]:
    """The firmware's throttling word (Raspberry Pi): ``vcgencmd get_throttled``, else the
    firmware's sysfs file.  ``{"available": False}`` elsewhere."""
    raw: str | None = None
    source = None
    if shutil.which("vcgencmd"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            res = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=5)
            if res.returncode == 0 and "=" in res.stdout:
                raw, source = res.stdout.strip().partition("=")[2], "vcgencmd get_throttled"
    if raw is None:
        text = _read(THROTTLED_SYSFS)
        if text:
            raw, source = text, THROTTLED_SYSFS
    if raw is None:
        return {"available": False}
    try:
        value = int(raw, 16)  # both print hex: vcgencmd as 0x50000, the sysfs file without 0x
    except ValueError:
        return {"available": False, "raw": raw}
    return {"available": True, "source": source, "value": value, **decode_throttled(value)}


def decode_throttled(value: int) -> dict[str, list[str]]:
    return {
        "now": [name for bit, name in THROTTLE_BITS.items() if value & (1 << bit)],
        "since_boot": [name for bit, name in THROTTLE_BITS.items() if value & (1 << (bit + 16))],
    }


def temperature() -> float | None:
    """The SoC/CPU temperature in °C (thermal zone 0), if the kernel has one."""
    text = _read("/sys/class/thermal/thermal_zone0/temp")
    return int(text) / 1000 if text and text.lstrip("-").isdigit() else None


def throttling_summary(before: dict[str, Any], after: dict[str, Any], samples: list[dict[str, Any]]) -> Any:
    """What the report says: ``"not available"``, or what was seen during the run."""
    if not before.get("available") and not after.get("available"):
        return NOT_AVAILABLE
    seen: set[str] = set()
    for s in [before, *samples, after]:
        seen.update(s.get("now", []))
    new_since_boot = sorted(set(after.get("since_boot", [])) - set(before.get("since_boot", [])))
    return {
        "source": after.get("source") or before.get("source"),
        "before": hex(before.get("value", 0)),
        "after": hex(after.get("value", 0)),
        "seen_during_run": sorted(seen | set(new_since_boot)),
        "ok": not seen and not new_since_boot,
    }
