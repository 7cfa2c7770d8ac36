"""Containers: an image mounted writable and run by an OCI runtime (runc), as docker runs them.

``model`` is a container as it is kept (its record and directory under the store),
``lifecycle`` what happens to it (create, run, stop, remove), ``spec`` the OCI runtime
spec written for it (process, capabilities, mounts; ``seccomp`` its syscall filter),
``shim`` the process that waits for it as docker's shim does, ``runc`` the runtime's
command line, ``network`` its network namespace, and ``commit`` its changes as a new
layer and image.
"""


class ContainerError(ValueError):
    """One line for the user; ``exit_code``, when set, is the status docker gives for it."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
