"""``layerfs login [-u USER] [-p PASS | --password-stdin] [REGISTRY]``: check credentials with the
registry and keep them where docker and podman look (see ``tools.registry.auth``)."""

from __future__ import annotations

import argparse
import getpass
import sys

from layerfs.cli.common import EXIT_USAGE, CLIError
from layerfs.cli.pull_cmd import add_tls_options


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("login", help="log in to a registry (docker.io by default)")
    p.add_argument("registry", nargs="?", default="docker.io", metavar="REGISTRY")
    p.add_argument("-u", "--username")
    p.add_argument(
        "-p", "--password", help="the password (visible to other users in ps: prefer --password-stdin)"
    )
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add_tls_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.tools.registry.auth import AuthError, Credentials, store_credentials
    from layerfs.tools.registry.client import Registry, RegistryError
    from layerfs.tools.registry.reference import registry_host

    host = registry_host(args.registry)
    if args.password is not None and args.password_stdin:
        raise CLIError("--password and --password-stdin are mutually exclusive", EXIT_USAGE)
    user = args.username
    if args.password_stdin:
        if not user:
            raise CLIError("must provide --username with --password-stdin", EXIT_USAGE)
        password = sys.stdin.read().rstrip("\r\n")
    elif args.password is not None:
        password = args.password
    else:
        if not sys.stdin.isatty():
            raise CLIError("cannot ask for a password: stdin is not a terminal (use --password-stdin)")
        user = user or input("Username: ").strip()
        password = getpass.getpass("Password: ")
    if not user:
        raise CLIError("a username is needed (-u USER)", EXIT_USAGE)
    if not password:
        raise CLIError("a password is needed", EXIT_USAGE)
    creds = Credentials(user, password)
    try:
        with Registry(host, insecure=not args.tls_verify, cert_dir=args.cert_dir, credentials=creds) as reg:
            reg.check_login()
        store_credentials(host, creds)
    except (RegistryError, AuthError, OSError) as exc:
        raise CLIError(f"login to {host} failed: {exc}") from None
    print("Login Succeeded")
    return 0
