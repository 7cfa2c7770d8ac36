"""``layerfs logout [REGISTRY]``: forget the credentials of a registry (in docker's and podman's files)."""

from __future__ import annotations

import argparse

from layerfs.cli.common import CLIError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("logout", help="log out from a registry (docker.io by default)")
    p.add_argument("registry", nargs="?", default="docker.io", metavar="REGISTRY")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerfs.tools.registry.auth import AuthError, remove_credentials
    from layerfs.tools.registry.reference import registry_host

    host = registry_host(args.registry)
    try:
        changed = remove_credentials(host)
    except (AuthError, OSError) as exc:
        raise CLIError(f"logout from {host} failed: {exc}") from None
    # docker's words; not being logged in is no failure
    print(f"Removing login credentials for {host}" if changed else f"Not logged in to {host}")
    return 0
