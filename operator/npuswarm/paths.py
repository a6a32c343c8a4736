"""Host paths as the node will see them: lexical normalisation and the paths never mounted. Pure."""

from __future__ import annotations

import posixpath

# Host paths a ModelDeployment may never mount, allow-list or not: each hands a container
# control of the node (Docker/containerd sockets, kernel and device interfaces, credentials).
# "/" itself is refused; paths below it only through the other entries.
DENIED_HOST_PATHS = (
    "/",
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/run",
    "/var/run",
    "/root",
    "/var/lib/docker",
    "/var/lib/containerd",
)
# A Unix socket anywhere (docker.sock, containerd.sock, ...) is an API into the node.
SOCKET_SUFFIX = ".sock"


def normalise_host_path(path: str) -> str:
    """Resolve ``..``, ``.``, ``//`` and a trailing ``/`` the way the node's kernel would.

    Lexical only: symlinks on the node cannot be seen from the operator.
    """
    if not path.startswith("/"):
        return path
    # normpath keeps a leading '//' (POSIX leaves it implementation-defined); Linux reads '/'.
    return posixpath.normpath("/" + path.lstrip("/"))


def is_within(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both normalised)."""
    return root in ("/", path) or path.startswith(root + "/")


def denied_root(path: str) -> str | None:
    """The entry of DENIED_HOST_PATHS that refuses the normalised ``path``, if any."""
    if path == "/":
        return "/"
    return next((d for d in DENIED_HOST_PATHS if d != "/" and is_within(path, d)), None)
