"""What happens to a container: create, run (in the foreground or under a monitor), stop,
pause, remove.

Running means: mount the image read-write on ``rootfs`` with the container's
upper directory, write ``config.json`` from the image config, and run the
directory as a bundle with ``runc create`` and ``runc start``, waiting for the
container's process as its parent (``shim``).  A foreground ``run`` does that
itself; ``start`` (and ``run -d``) leaves a small monitor process behind that
does, records the exit code and unmounts, as docker's shim does.  The record and
directory of a container are ``model``'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from layerfs import hosttree, procfs
from layerfs.containers import ContainerError, network, shim
from layerfs.containers.commit import Change, CommitError, CommitResult, changes, commit
from layerfs.containers.model import Container, all_containers, containers_dir, load
from layerfs.containers.runc import runc_command, runtime
from layerfs.containers.spec import (
    RUNTIME_DIRS,
    ProcessOptions,
    RuntimeError_,
    capabilities,
    executable_exists,
    platform_mismatch,
    prepare_rootfs,
    process_args,
    security,
    spec,
)
from layerfs.mount import MountError, MountSpec, mount, mounted_fuse, umount
from layerfs.store import Store
from layerfs.store.records import ImageRecord
from layerfs.tools import refs
from layerfs.union.index import ChainIndex, build
from layerfs.union.lower import ChainLayer

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_ADJECTIVES = "brave calm eager fond gentle happy jolly keen lucid merry nifty proud quirky sharp tender vivid witty zen".split()
_NAMES = "babbage curie darwin euler fermi gauss hopper knuth lovelace noether pascal ritchie shannon turing wozniak".split()


def reconcile(store: Store, c: Container) -> None:
    """A container recorded as running whose waiting process died (kill -9) and that runc no
    longer runs: record its end (the status is unknown) and unmount it, as its waiter would
    have (and remove it if it was run with --rm).  Nothing if someone holds its lock."""
    if c.state.get("status") == "running" and not c.running():
        _cleanup_dead(store, c, timeout=0)


def _image(store: Store, image_id: bytes) -> ImageRecord:
    image = store.get_image(image_id)
    if image is None:
        raise ContainerError(f"image sha256:{image_id.hex()} is not in the store (removed with rmi -f?)")
    return image


def _config(store: Store, image_id: bytes) -> Any:
    """The image's config blob, parsed (an OCI image config)."""
    return json.loads(store.read_object(_image(store, image_id).config))


def _image_config(store: Store, image_id: bytes) -> dict[str, Any]:
    """The config's ``config``: what a container runs (Entrypoint, Cmd, Env, ...)."""
    return dict(_config(store, image_id).get("config") or {})


def warnings(store: Store, c: Container) -> list[str]:
    """docker's warnings for a new container: an image for another machine (it will likely fail
    with "exec format error"), published ports without a network of its own."""
    out = []
    config = _config(store, bytes.fromhex(c.image))
    mismatch = platform_mismatch(config) if isinstance(config, dict) else None
    if mismatch:
        out.append(mismatch)
    opts = c.process
    if opts.publish and opts.network != "bridge":
        out.append(f"Published ports are discarded when using {opts.network} network mode")
    return out


def _layers(store: Store, image_id: bytes) -> list[bytes]:
    return list(_image(store, image_id).layers)


def create(
    store: Store, image_ref: str, opts: ProcessOptions, name: str | None = None, *, auto_remove: bool = False
) -> Container:
    image_id = refs.resolve(store, image_ref)
    config = _image_config(store, image_id)
    process_args(config, opts)  # no command, an unknown capability or option: refused now, not at start
    capabilities(opts)
    security(opts)
    for p in opts.publish:
        network.Port.parse(p)
    if opts.network == "bridge":
        network.pasta()
    taken = {c.name for c in all_containers(store)}
    if name is None:
        while True:
            name = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NAMES)}"
            if name not in taken:
                break
    elif not _NAME.match(name):
        raise ContainerError(f"invalid container name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
    elif name in taken:
        raise ContainerError(f'the container name "{name}" is already in use')
    cid = secrets.token_hex(32)
    lower = ChainLayer(store, ChainIndex(store, build(store, _layers(store, image_id))))
    missing = [os.fsdecode(d) for d in RUNTIME_DIRS if lower.lookup(d) is None]
    options = asdict(opts)
    options["hostname"] = opts.hostname or cid[:12]
    c = Container(
        cid, name, image_id.hex(), image_ref, time.time(), options, missing, auto_remove=auto_remove
    )
    c.dir = os.path.join(containers_dir(store), cid)
    for d in (c.dir, c.upper, c.work, c.rootfs):
        os.makedirs(d, mode=0o700, exist_ok=True)
    c.save()
    return c


def mount_writable(store: Store, image_id: bytes, rootfs: str, upper: str, work: str, name: str) -> None:
    """The image on ``rootfs``, writable into ``upper``, for a runtime (``allow_other``: the
    container's processes may run as any user)."""
    spec_ = MountSpec(
        image_id, _layers(store, image_id), rootfs, upper=upper, work=work, name=name, allow_other=True
    )
    try:
        mount(store, spec_)
    except MountError as exc:
        raise ContainerError(f"cannot mount {name} on {rootfs}: {exc}") from None
    finally:
        store.reopen()  # mount() hands the environment to its daemon


def _mount(store: Store, c: Container) -> None:
    if mounted_fuse(c.rootfs) is not None:  # left by a crashed run: start from a clean mount
        with contextlib.suppress(MountError):
            umount(store, c.rootfs)
    mount_writable(store, bytes.fromhex(c.image), c.rootfs, c.upper, c.work, c.image_ref)


def _unmount(store: Store, c: Container) -> None:
    if mounted_fuse(c.rootfs) is not None:
        with contextlib.suppress(MountError):
            umount(store, c.rootfs)


def write_runtime_config(
    store: Store,
    image_id: bytes,
    rootfs: str,
    opts: ProcessOptions,
    path: str,
    *,
    netns: str | None = None,
    resolv_conf: str | None = None,
) -> None:
    """``config.json`` for the image mounted on ``rootfs``; the mount points, working directory
    and volume sources it needs are made, and a command the image lacks is refused."""
    runtime_spec = spec(_image_config(store, image_id), rootfs, opts, netns=netns, resolv_conf=resolv_conf)
    process = runtime_spec["process"]
    prepare_rootfs(rootfs, process["cwd"])
    for v in opts.volumes:
        if not os.path.exists(v.source):
            os.makedirs(v.source)  # docker creates a missing host directory too
    if not executable_exists(rootfs, process["args"][0], process["env"]):
        # docker's message and status; runc would only say "exec failed" and exit 1
        raise ContainerError(f'exec: "{process["args"][0]}": executable file not found in $PATH', 127)
    _write_new(path, json.dumps(runtime_spec, indent=1).encode())


def _write_new(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` without following anything planted there: a new file
    (O_EXCL | O_NOFOLLOW) beside it, renamed over it (a symlink at ``path`` is replaced, its
    target never written; `bundle` writes into a directory the user names)."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bundle(store: Store, c: Container) -> None:
    opts = c.process
    netns = resolv = None
    if opts.network == "bridge":  # its own namespace, which network.setup connects
        netns = network.netns_path(c.id)
        resolv = os.path.join(c.dir, "resolv.conf")
        with open(resolv, "w") as f:
            f.write(network.resolv_conf())
    write_runtime_config(
        store,
        bytes.fromhex(c.image),
        c.rootfs,
        opts,
        os.path.join(c.dir, "config.json"),
        netns=netns,
        resolv_conf=resolv,
    )


def _set_running(c: Container) -> None:
    # the waiting process (this one) as it can be found again: ``Container.waiter_alive``
    c.state = {"status": "running", **procfs.identity(os.getpid()), "started": time.time()}
    c.save()


def _set_exited(c: Container, code: int | None) -> None:
    c.state = dict(c.state, status="exited", exit_code=code, finished=time.time())
    c.save()


_PROXIED = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)  # and SIGTERM


def execute(store: Store, c: Container, *, stdin: int | None = None, stdout: int | None = None) -> int:
    """Mount, run the container's process to its end with runc, unmount; the exit code."""
    runc = runc_command()
    lock = c.try_lock()
    if lock is None:
        raise ContainerError(f"container {c.name} is already running")
    try:
        return _execute_locked(store, c, runc, stdin, stdout)
    finally:
        os.close(lock)


def _execute_locked(
    store: Store,
    c: Container,
    runc: list[str],
    stdin: int | None,
    stdout: int | None,
    started_hook: Callable[[], None] = lambda: None,
) -> int:
    _mount(store, c)
    code: int | None = None
    started = False
    failure: shim.StartError | None = None

    def on_started(pid: int) -> None:
        c.state = dict(c.state, init=pid)
        c.save()
        started_hook()

    run = shim.Run(runc, c.dir, c.id, c.process.tty, stdin, stdout, on_started)
    # SIGTERM to us (a monitor being stopped) goes to the container's process
    old_term = signal.signal(signal.SIGTERM, lambda signum, frame: run.send(signum))
    bridge = c.process.network == "bridge"
    try:
        write_bundle(store, c)
        subprocess.run([*runc, "delete", "--force", c.id], capture_output=True)  # a crashed run's leftovers
        if bridge:
            network.setup(c.id, c.dir, [network.Port.parse(p) for p in c.process.publish])
        _set_running(c)
        started = True
        # as docker's sig-proxy: signals to us are the container's process's (it is in a
        # session of its own: the terminal's ^C reaches only us)
        old = {s: signal.signal(s, lambda signum, frame: run.send(signum)) for s in _PROXIED}
        try:
            code = run.execute()
        except shim.StartError as exc:
            failure = exc
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if bridge:
            network.teardown(c.id, c.dir)
        # unmounted before "exited" is recorded: a start right after a stop must not lose its
        # new mount to this run's unmount
        _unmount(store, c)
        if failure is not None:  # as docker: still created, the status and reason kept
            c.state = dict(c.state, status="created", exit_code=failure.exit_code, error=str(failure))
            c.save()
        elif started:
            _set_exited(c, code)
    if failure is not None:
        raise ContainerError(f"cannot start container {c.name}: {failure}", failure.exit_code)
    assert code is not None
    return code


def run_detached(store: Store, c: Container) -> None:
    """``run -d``: start the new container; one run with ``--rm`` that could not start is
    removed again."""
    try:
        start(store, c)
    except BaseException:
        if c.auto_remove:
            with contextlib.suppress(ContainerError, OSError):
                remove(store, load(c.dir), force=True)
        raise


def run_attached(store: Store, c: Container, *, stdin: int | None = None) -> int:
    """``run``: the new container's process in the foreground, to its end; its exit code.  One
    run with ``--rm`` is removed after, whatever happened."""
    try:
        return execute(store, c, stdin=stdin)
    finally:
        if c.auto_remove:
            remove(store, load(c.dir), force=True)


def start(store: Store, c: Container, *, timeout: float = 30.0) -> None:
    """Run the container in the background: a monitor process runs it and records its end.
    Back once the container's process runs (as docker), or with why it could not start."""
    if c.running():
        return  # docker start of a running container is a no-op
    runtime()
    log = os.open(c.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    report_r, report_w = os.pipe()  # the monitor's one line: "started", or its failure as JSON
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "layerfs.containers.lifecycle",
                "monitor",
                store.path,
                c.id,
                str(report_w),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            pass_fds=(report_w,),
            # not the caller's directory: "python -m" puts it first on sys.path, and a layerfs/
            # there (a checkout, say) would be run instead of the installed package
            cwd="/",
        )
    finally:
        os.close(log)
        os.close(report_w)
    line = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in line and time.monotonic() < deadline:
            ready, _, _ = select.select([report_r], [], [], 0.05)
            if ready:
                chunk = os.read(report_r, 4096)
                line += chunk
                if not chunk:
                    break
            elif proc.poll() is not None:  # gone without a word (another start won the lock)
                break
    finally:
        os.close(report_r)
    with contextlib.suppress(FileNotFoundError):  # run -d --rm: maybe removed already
        c.state = load(c.dir).state
    if line.startswith(b"{"):
        failure = json.loads(line.decode(errors="replace").splitlines()[0])
        raise ContainerError(str(failure.get("error")), failure.get("exit_code") or 125)
    if not line and proc.poll() is not None and proc.returncode != 0:
        raise ContainerError(f"container {c.name} failed to start: {_last_line(c.log)}")


def _last_line(path: str) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
        return lines[-1] if lines else "no output"
    return "no output"


def stop(store: Store, c: Container, *, timeout: float = 10.0) -> None:
    """SIGTERM to the container's process, SIGKILL after ``timeout`` seconds, as docker stop does."""
    if not c.running():
        _cleanup_dead(store, c)
        return
    runc = runc_command()
    for sig, wait in (("TERM", timeout), ("KILL", 10.0)):
        sent = False
        deadline = time.monotonic() + wait
        while True:
            if not sent:  # runc may not have created the container yet: try again
                sent = subprocess.run([*runc, "kill", c.id, sig], capture_output=True).returncode == 0
            try:
                c.state = load(c.dir).state
            except FileNotFoundError:  # a foreground run --rm removed it as it ended
                return
            if not c.running():
                if c.state.get("status") == "running":  # nobody waits for it (kill -9): we clean up
                    _cleanup_dead(store, c)
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    raise ContainerError(f"container {c.name} did not stop")


@contextlib.contextmanager
def paused(c: Container) -> Iterator[None]:
    """Freeze a running container's processes (``docker commit`` pauses too): its upper
    directory holds still while it is read, and nothing in it can be swapped for a link."""
    if not c.running():
        yield
        return
    runc = runc_command()
    res = subprocess.run([*runc, "pause", c.id], capture_output=True, text=True)
    if res.returncode != 0:
        raise ContainerError(f"cannot pause container {c.name}: {res.stderr.strip() or 'runc pause failed'}")
    try:
        yield
    finally:
        subprocess.run([*runc, "resume", c.id], capture_output=True)


def _wait_lock(c: Container, timeout: float) -> int | None:
    """The container's lock, waiting out a short holder (another rm or stop cleaning up);
    None if a run holds it that long.  FileNotFoundError if the container is gone."""
    deadline = time.monotonic() + timeout
    while True:
        fd = c.try_lock()
        if fd is not None or time.monotonic() >= deadline:
            return fd
        time.sleep(0.02)


def _release(store: Store, c: Container) -> None:
    """With the lock held: a container recorded as running has no process left (kill -9 of its
    monitor, a reboot): mark it exited, drop runc's state, unmount."""
    if c.state.get("status") == "running":
        with contextlib.suppress(ContainerError):
            subprocess.run([*runc_command(), "delete", "--force", c.id], capture_output=True)
        _set_exited(c, c.state.get("exit_code"))
    network.teardown(c.id, c.dir)
    _unmount(store, c)


def _cleanup_dead(store: Store, c: Container, timeout: float = 5.0) -> None:
    try:
        lock = _wait_lock(c, timeout)
    except FileNotFoundError:
        return  # removed meanwhile (a foreground run --rm as it ended)
    if lock is None:
        return  # being run again: nothing of it is dead
    try:
        c.state = load(c.dir).state
        if c.auto_remove and c.state.get("status") == "running" and not c.running():
            _delete_locked(store, c)  # run -d --rm whose monitor was killed
        else:
            _release(store, c)
    except FileNotFoundError:
        pass
    finally:
        os.close(lock)


def remove(store: Store, c: Container, *, force: bool = False) -> None:
    if c.running():
        if not force:
            raise ContainerError(
                f"cannot remove container {c.name}: it is running (stop it first, or use rm -f)"
            )
        stop(store, c, timeout=0)
    try:
        lock = _wait_lock(c, 5.0)
    except FileNotFoundError:
        return  # a foreground run --rm removed it as it ended
    if lock is None:
        raise ContainerError(f"cannot remove container {c.name}: it is being started (stop it, or retry)")
    try:  # locked to the end: no start can mount it while it is deleted
        try:
            c.state = load(c.dir).state
        except FileNotFoundError:
            return
        _delete_locked(store, c)
    finally:
        os.close(lock)


def _delete_locked(store: Store, c: Container) -> None:
    """With the lock held: remove the container and its changes."""
    _release(store, c)
    if mounted_fuse(c.rootfs) is not None:  # never delete through a mount
        raise ContainerError(f"cannot remove container {c.name}: {c.rootfs} is still mounted")
    hosttree.remove(c.dir)  # a container decides how deep its tree goes


def existing(store: Store) -> list[Container]:
    """Every container, newest first, its state brought up to date: one recorded as running
    whose waiting process was killed and that has ended since is recorded as ended now (and
    removed, if it was run with --rm)."""
    every = all_containers(store)
    for i, c in enumerate(every):
        if c.state.get("status") == "running" and not c.running():
            reconcile(store, c)
            with contextlib.suppress(OSError, ValueError):
                every[i] = load(c.dir)
    return [c for c in every if os.path.isdir(c.dir)]


def diff(store: Store, c: Container) -> list[Change]:
    """``docker diff``: what the container added, changed and deleted in its image."""
    image = store.get_image(bytes.fromhex(c.image))
    if image is None:
        raise ContainerError(f"the image of container {c.name} is no longer in the store")
    return changes(store, list(image.layers), c.upper, c.skip)


def commit_container(
    store: Store, c: Container, name: str | None, *, message: str, author: str, change: list[str]
) -> CommitResult:
    """``docker commit``: the container's changes as a new image, named ``name`` (checked as
    every new name is); a running container is paused meanwhile.  Its history entry says the
    container's command, as docker's does."""
    new_name = refs.normalize(name) if name is not None else None
    cmd = c.options.get("command") or []
    with paused(c):
        return commit(
            store,
            bytes.fromhex(c.image),
            c.upper,
            new_name,
            message=message,
            author=author,
            created_by=shlex.join(cmd) if cmd else f"layerfs commit {c.name}",
            changes=change,
            skip=c.skip,
        )


def bundle(store: Store, image_id: bytes, directory: str, opts: ProcessOptions, name: str) -> str:
    """An OCI runtime bundle for another runtime: ``DIR/config.json``, and the image mounted
    writable on ``DIR/rootfs`` with its changes in ``DIR/upper`` (``layerfs umount
    DIR/rootfs`` releases it); ``name`` is how the image was named.  Returns the bundle's
    absolute path."""
    bundle_dir = os.path.abspath(directory)
    rootfs = os.path.join(bundle_dir, "rootfs")
    # 0700: the image's files (setuid ones too) are reachable through the allow_other mount
    os.makedirs(bundle_dir, mode=0o700, exist_ok=True)
    os.chmod(bundle_dir, 0o700)
    os.makedirs(rootfs, exist_ok=True)
    if os.listdir(rootfs):
        raise ContainerError(f"{rootfs} is not empty (already a bundle?)")
    upper, work = os.path.join(bundle_dir, "upper"), os.path.join(bundle_dir, "work")
    mount_writable(store, image_id, rootfs, upper, work, name)
    try:
        write_runtime_config(store, image_id, rootfs, opts, os.path.join(bundle_dir, "config.json"))
    except BaseException:
        umount(store, rootfs)
        raise
    return bundle_dir


def monitor(store_path: str, cid: str, report_fd: int = -1) -> int:
    """The detached side of ``start``: run to the end, with output in the container's log.
    ``report_fd`` gets one line for ``start``: "started" once the process runs, or the failure."""

    def report(line: bytes) -> None:
        nonlocal report_fd
        if report_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(report_fd, line + b"\n")
                os.close(report_fd)
            report_fd = -1

    if report_fd >= 0:
        os.set_inheritable(report_fd, False)
    store = Store(store_path)
    c = load(os.path.join(containers_dir(store), cid))
    lock = c.try_lock()
    if lock is None:
        return 0  # started by someone else meanwhile: docker start of a running container is a no-op
    # -i: stdin open for good (nothing is attached to write to it), as docker keeps it open
    stdin, keep_open = os.pipe() if c.process.interactive else (os.open(os.devnull, os.O_RDONLY), -1)
    try:
        return _execute_locked(store, c, runc_command(), stdin, 1, lambda: report(b"started"))
    except (ContainerError, RuntimeError_, CommitError, OSError) as exc:
        print(f"layerfs: {exc}", file=sys.stderr)
        code = getattr(exc, "exit_code", None) or 125
        report(json.dumps({"error": str(exc), "exit_code": code}).encode())
        if not (c.state.get("status") == "created" and c.state.get("error")):  # runc refused it
            _set_exited(c, None)
        return code
    finally:
        if c.auto_remove:  # run -d --rm
            with contextlib.suppress(ContainerError, OSError):
                _delete_locked(store, c)
        os.close(lock)
        for fd in (stdin, keep_open):
            if fd >= 0:
                os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) in (3, 4) and argv[0] == "monitor":
        return monitor(argv[1], argv[2], int(argv[3]) if len(argv) == 4 else -1)
    print("usage: python -m layerfs.containers.lifecycle monitor STORE ID [REPORT_FD]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
