"""What the container verbs share: ``run``/``create`` options and container lookup."""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from layerfs.cli.common import CLIError, with_store
from layerfs.store import Store, StoreError
from layerfs.tools.refs import RefError

if TYPE_CHECKING:
    from layerfs.containers.model import Container
    from layerfs.containers.spec import ProcessOptions

EXIT_SETUP = 125  # docker run's code when the container could not be set up


def add_process_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="name the container (default: a random adjective_name)")
    p.add_argument(
        "-e", "--env", action="append", default=[], metavar="K=V", help="set an environment variable"
    )
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("-u", "--user", help="user[:group] or uid[:gid] to run as")
    p.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="HOST:CTR[:ro]",
        help="bind mount a host directory or file",
    )
    p.add_argument("--entrypoint", help='replace the image\'s entrypoint ("" clears it)')
    p.add_argument("--hostname", default="", help="container host name (default: the short id)")
    p.add_argument(
        "--network",
        "--net",
        default="bridge",
        choices=["bridge", "host", "none"],
        help="bridge (default: a network namespace of its own, connected by pasta), host, or none (loopback only)",
    )
    p.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[IP:]HOST:CTR[/udp]",
        help="publish a container's port on the host",
    )
    p.add_argument(
        "--privileged", action="store_true", help="every capability, no seccomp profile (as docker)"
    )
    p.add_argument(
        "--cap-add", action="append", default=[], metavar="CAP", help="add a capability (ALL: every one)"
    )
    p.add_argument(
        "--cap-drop", action="append", default=[], metavar="CAP", help="drop a capability (ALL: every one)"
    )
    p.add_argument(
        "--security-opt",
        action="append",
        default=[],
        metavar="OPT",
        help="seccomp=unconfined (no seccomp profile) or no-new-privileges",
    )


def process_options(args: argparse.Namespace) -> ProcessOptions:
    from layerfs.containers.spec import ProcessOptions, Volume

    return ProcessOptions(
        command=list(args.command),
        entrypoint=None if args.entrypoint is None else ([args.entrypoint] if args.entrypoint else []),
        env=list(args.env),
        workdir=args.workdir,
        user=args.user,
        volumes=[Volume.parse(v) for v in args.volume],
        hostname=args.hostname,
        tty=bool(getattr(args, "tty", False)),
        interactive=bool(getattr(args, "interactive", False)),
        network=args.network,
        publish=list(args.publish),
        privileged=args.privileged,
        cap_add=list(args.cap_add),
        cap_drop=list(args.cap_drop),
        security_opt=list(args.security_opt),
    )


@contextmanager
def errors(code: int = 1) -> Iterator[None]:
    """Container, runtime, ref and store errors as one line with exit status ``code``."""
    from layerfs.containers import ContainerError
    from layerfs.containers.commit import CommitError
    from layerfs.containers.spec import RuntimeError_

    try:
        yield
    except ContainerError as exc:
        raise CLIError(str(exc), exc.exit_code or code) from None
    except OSError as exc:  # the system's words, without Python's "[Errno N]"
        from layerfs.mount import error_text

        reason = error_text(exc)
        if exc.errno in (errno.EPERM, errno.EACCES) and os.geteuid() != 0:
            reason += " (containers need root: runc makes their namespaces, mounts and devices)"
        raise CLIError(reason, code) from None
    except (RuntimeError_, CommitError, RefError, StoreError) as exc:
        raise CLIError(str(exc), code) from None


@with_store
def each_container(args: argparse.Namespace, store: Store, action: Callable[[Store, Container], None]) -> int:
    """``action`` on every container ``args.containers`` names, printing each name as docker does."""
    from layerfs.containers.model import find

    with errors():
        for ref in args.containers:
            action(store, find(store, ref))
            print(ref)
    return 0
