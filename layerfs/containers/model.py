"""A container as it is kept: its record (``container.json``), its directory, its lock, and
finding containers by name or id.

A container is a directory under the store, ``containers/<id>/``::

    container.json   what it was created from, and its state
    upper/ work/     its changes (the union view's upper and work directories)
    rootfs/          where the image is mounted while it runs
    config.json      the OCI runtime spec written for each start (the bundle)
    container.log    stdout and stderr of detached runs

State changes are whole-file replacements of ``container.json`` (write, then
rename), so a reader never sees half a record.  What happens to a container
(create, run, stop, remove) is ``lifecycle``'s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from layerfs import procfs
from layerfs.containers import ContainerError
from layerfs.containers.runc import runtime_status
from layerfs.containers.spec import ProcessOptions, Volume
from layerfs.store import Store


@dataclass
class Container:
    id: str
    name: str
    image: str  # image id (hex) it was created from
    image_ref: str  # as the user named it
    created: float
    options: dict[str, Any]  # ProcessOptions fields
    init_paths: list[str]  # runtime mount points the image lacks: not changes of the container
    state: dict[str, Any] = field(default_factory=lambda: {"status": "created"})
    auto_remove: bool = False  # run --rm: removed when it exits (by the monitor when detached)
    dir: str = ""

    @property
    def upper(self) -> str:
        return os.path.join(self.dir, "upper")

    @property
    def work(self) -> str:
        return os.path.join(self.dir, "work")

    @property
    def rootfs(self) -> str:
        return os.path.join(self.dir, "rootfs")

    @property
    def log(self) -> str:
        return os.path.join(self.dir, "container.log")

    @property
    def process(self) -> ProcessOptions:
        o = dict(self.options)
        o["volumes"] = [Volume(**v) for v in o.get("volumes", [])]
        return ProcessOptions(**o)

    @property
    def skip(self) -> list[bytes]:
        return [os.fsencode(p) for p in self.init_paths]

    def save(self) -> None:
        record = {k: v for k, v in asdict(self).items() if k != "dir"}
        fd, tmp = tempfile.mkstemp(prefix=".container.json.", dir=self.dir)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, "container.json"))

    def try_lock(self) -> int | None:
        """The container's lock, held by whoever runs it (a foreground run or the monitor) from
        mount to unmount; None if someone holds it.  Closing the descriptor releases it.

        A POSIX record lock, owned by this process alone: the mount daemon, forked meanwhile,
        does not hold it (a flock would be shared with it, and outlive a killed monitor).  The
        process must not open and close the file otherwise while it holds the lock."""
        fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return None
            raise
        return fd

    def waiter_alive(self) -> bool:
        """Is the process that waits for it (the foreground ``run`` or the monitor) alive?"""
        return procfs.is_alive(self.state)

    def running(self) -> bool:
        """Recorded as running, and its waiting process is alive; or, if that one died (kill
        -9), runc still has it running."""
        if self.state.get("status") != "running":
            return False
        if self.waiter_alive():
            return True
        return self.state.get("boot") == procfs.boot_id() and runtime_status(self.id) in ("running", "paused")

    def status(self) -> str:
        """``docker ps``'s STATUS column."""
        st = self.state
        if st.get("status") == "running" and self.running():
            return "Up " + _ago(st.get("started", 0))
        if st.get("status") == "created":
            return "Created"
        code = "?" if st.get("exit_code") is None else st["exit_code"]
        finished = st.get("finished")
        return f"Exited ({code}) {_ago(finished)} ago" if finished else f"Exited ({code})"


def _ago(ts: float) -> str:
    s = max(0.0, time.time() - ts)
    for unit, secs in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= 2 * secs:
            return f"{int(s // secs)} {unit}"
    if s >= 60:
        return "About a minute"
    return f"{int(s)} seconds" if s >= 2 else "Less than a second"


def containers_dir(store: Store) -> str:
    # 0700: a container's files (setuid ones too) must not be reachable by other host users,
    # through its upper directory or its allow_other mount
    path = os.path.join(store.path, "containers")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def load(path: str) -> Container:
    with open(os.path.join(path, "container.json")) as f:
        rec = json.load(f)
    return Container(**rec, dir=path)


def all_containers(store: Store) -> list[Container]:
    base = containers_dir(store)
    out = []
    for cid in os.listdir(base):
        with contextlib.suppress(OSError, ValueError, TypeError):
            out.append(load(os.path.join(base, cid)))
    return sorted(out, key=lambda c: -c.created)


def find(store: Store, ref: str) -> Container:
    """By name, full id or unique id prefix, as docker resolves container references."""
    every = all_containers(store)
    for c in every:
        if ref in (c.name, c.id):
            return c
    matches = [c for c in every if len(ref) >= 1 and c.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ContainerError(f"multiple containers match the id prefix {ref}")
    raise ContainerError(f"no such container: {ref}")


def users_of(store: Store, image_id: bytes) -> list[Container]:
    return [c for c in all_containers(store) if c.image == image_id.hex()]
