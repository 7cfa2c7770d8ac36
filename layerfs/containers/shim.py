"""Running one container's process with runc, as its parent: what docker's shim does.

``runc create`` sets the container up (namespaces, mounts, user, the command looked up) and
leaves its init process waiting; ``runc start`` lets it run the command.  The process that
calls them (a foreground ``run``, or a detached container's monitor) is a child subreaper,
so the init, orphaned when ``runc create`` exits, becomes its child: it waits for it and
has its exit status, and forwards signals to it.  With ``-t`` runc hands over the master
side of the container's terminal on a unix socket (``--console-socket``), and the shim
copies between it and its own terminal or output.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from layerfs import procfs

RUN_DIR = "/run/layerfs"  # console sockets (the path of a unix socket must be short)
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants (a container's init once ``runc create`` exits) become our children."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def _copy(src: int, dst: int, on_eof: Callable[[], None] | None = None) -> None:
    """Copy until ``src`` ends (EOF, or EIO: a terminal's other side is closed everywhere)."""
    while True:
        try:
            data = os.read(src, 65536)
        except OSError:
            data = b""
        if not data:
            if on_eof is not None:
                on_eof()
            return
        try:
            while data:
                data = data[os.write(dst, data) :]
        except OSError:  # the reader went away: keep draining, so the writer never blocks
            pass


class Console:
    """The container's terminal: runc sends its master side to our socket during create."""

    def __init__(self) -> None:
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="console-", dir=RUN_DIR)
        self.path = os.path.join(self.dir, "sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.master = -1
        self.threads: list[threading.Thread] = []
        self.saved: list[Any] | None = None  # our terminal's modes, while it is raw
        self.raw_fd = -1
        self.old_winch: object = None

    def receive(self, timeout: float = 10.0) -> None:
        """The master side, sent by the container's init while ``runc create`` ran."""
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise OSError("runc sent no terminal")
        self.master = fds[0]

    def attach(self, stdin: int, out: int) -> None:
        """Copy the container's terminal to ``out``, and ``stdin`` (if any) to it.  When
        ``stdin`` is our terminal it is made raw (keys go to the container as typed)."""
        size_from = next((fd for fd in (stdin, out) if os.isatty(fd)), None)
        if size_from is not None:
            self._resize(size_from)
            self.old_winch = signal.signal(signal.SIGWINCH, lambda s, f: self._resize(size_from))
        if os.isatty(stdin):
            self.saved = termios.tcgetattr(stdin)
            tty.setraw(stdin, termios.TCSANOW)  # no flush: what was typed already counts
            self.raw_fd = stdin
        t = threading.Thread(target=_copy, args=(stdin, self.master), daemon=True)
        t.start()  # never joined: it may wait on our input for good
        reader = threading.Thread(target=_copy, args=(self.master, out), daemon=True)
        reader.start()
        self.threads.append(reader)

    def _resize(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)

    def close(self) -> None:
        for t in self.threads:  # the output, to its end (EIO once the container's side is closed)
            t.join(timeout=10)
        if self.saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.raw_fd, termios.TCSADRAIN, self.saved)
        if self.old_winch is not None:
            signal.signal(signal.SIGWINCH, self.old_winch)  # type: ignore[arg-type]
        if self.master >= 0:
            os.close(self.master)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Run:
    """One run of a container's process."""

    runc: list[str]  # the runtime with its global options
    bundle: str
    cid: str
    tty: bool
    stdin: int | None = None  # None: ours
    stdout: int | None = None  # stdout and stderr; None: ours
    on_started: Callable[[int], None] = lambda pid: None  # told the init's pid once it runs
    pid: int = 0
    terminated: int = 0  # a signal to pass on as soon as there is a process
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, signum: int) -> None:
        """Pass ``signum`` on to the container's process (later, if it is not there yet)."""
        with self._lock:
            if self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signum)
            else:
                self.terminated = signum

    def execute(self) -> int:
        """Create, start, wait; the exit code (128+N for a signal), as ``runc run`` gives it.
        StartError if runc could not make or start the container (nothing of it ran)."""
        become_subreaper()
        pid_file = os.path.join(self.bundle, "init.pid")
        log = os.path.join(self.bundle, "runc.log")
        for path in (pid_file, log):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        runc = [*self.runc, "--log", log, "--log-format", "json"]
        console = Console() if self.tty else None
        # runc says why it failed on its stderr too, which without -t is the container's: a pipe,
        # copied to ours once the container is made (what it held is runc's, and goes); a file
        # (a detached container's log) is the container's stderr itself, cut back on a failure
        # (no copying process it would depend on)
        to_file = self.stdout is not None and stat.S_ISREG(os.fstat(self.stdout).st_mode)
        err_r, err_w = (-1, -1) if to_file and console is None else os.pipe()
        relay: threading.Thread | None = None
        try:
            args = [*runc, "create", "--bundle", self.bundle, "--pid-file", pid_file]
            io: dict[str, Any]
            if console is not None:
                args += ["--console-socket", console.path]
                io = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": err_w}
            else:
                io = {"stdin": self.stdin, "stdout": self.stdout, "stderr": self.stdout if to_file else err_w}
            log_size = os.fstat(self.stdout).st_size if to_file and self.stdout is not None else 0
            # runc in a session of its own: the terminal's ^C is for the container's process
            # (which runc's init puts in a session of its own too), passed on by us
            create = subprocess.run([*args, self.cid], **io, start_new_session=True)
            if err_w >= 0:
                os.close(err_w)
                err_w = -1
            if create.returncode != 0:
                said = ""
                if err_r >= 0:
                    said = _read_all(err_r)
                elif self.stdout is not None:
                    os.ftruncate(self.stdout, log_size)
                raise start_error(log, said)
            with open(pid_file) as f:
                pid = int(f.read().strip())
            if console is not None:
                console.receive()
                console.attach(
                    0 if self.stdin is None else self.stdin, 1 if self.stdout is None else self.stdout
                )
            elif err_r >= 0:
                out = 2 if self.stdout is None else self.stdout
                relay = threading.Thread(target=_copy, args=(err_r, out), daemon=True)
                relay.start()
            started = subprocess.run(
                [*runc, "start", self.cid], capture_output=True, text=True, start_new_session=True
            )
            # signals from now on are the container's process's (runc's init, before, would die
            # of them); one that came meanwhile is passed on now
            with self._lock:
                self.pid = pid
                if self.terminated:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, self.terminated)
            if started.returncode == 0:
                self.on_started(pid)
            elif procfs.alive(pid):  # runc could not start it, yet it is there: end it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait(pid)
                raise start_error(log, started.stderr)
            return _wait(pid)
        finally:
            with self._lock:
                self.pid = 0
            if relay is not None:
                relay.join(timeout=10)
            if console is not None:
                console.close()
            for fd in (err_r, err_w):
                if fd >= 0 and not (relay is not None and relay.is_alive() and fd == err_r):
                    os.close(fd)
            subprocess.run(
                [*self.runc, "delete", "--force", self.cid], capture_output=True, start_new_session=True
            )


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


class StartError(Exception):
    """runc could not create or start the container: its reason, and docker's status for it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


_PREFIXES = (
    "runc create failed: ",
    "runc start failed: ",
    "unable to start container process: ",
    "error during container init: ",
)


def start_error(log: str, fallback: str) -> StartError:
    """runc's reason (the last error of its JSON log), without its prefixes, and docker's status:
    for a command that could not be run, 127 when it is not there and 126 when it cannot be
    invoked (docker's CLI looks for these words in the daemon's message); 125 otherwise."""
    message = ""
    with contextlib.suppress(OSError), open(log, errors="replace") as f:
        for line in f:
            with contextlib.suppress(ValueError, AttributeError):
                entry = json.loads(line)
                if entry.get("level") in ("error", "fatal") and entry.get("msg"):
                    message = str(entry["msg"])
    message = " ".join((message or fallback or "the OCI runtime failed").split())
    stripped = True
    while stripped:
        stripped = False
        for p in _PREFIXES:
            if message.startswith(p):
                message, stripped = message[len(p) :], True
    code = 125
    if message.startswith(("exec: ", "exec ")):  # the command itself
        if "executable file not found" in message or "no such file or directory" in message:
            code = 127
        elif "permission denied" in message or "is a directory" in message:
            code = 126
    return StartError(message, code)


def _wait(pid: int) -> int:
    """The exit code of our child ``pid`` (an adopted container init)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # not adopted (another subreaper was closer): watch it instead
        while procfs.alive(pid):
            time.sleep(0.05)
        return 255
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code
