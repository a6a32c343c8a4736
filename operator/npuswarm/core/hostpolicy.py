"""Host safety: what a ModelDeployment may ask of a node, by the operator's settings. Pure.

The schema (api/deployment.py) already refuses what no cluster could allow: relative or ``..``
paths, bad env names, privileged fields (there are none to ask for). This module holds the
rules that depend on the cluster admin's settings, so the operator enforces them itself instead
of trusting RBAC to keep such objects out. Host paths are read as the node will see them:
normalised lexically, and checked against the paths never mounted.
"""

from __future__ import annotations

import posixpath
from collections.abc import Collection, Mapping

from npuswarm.api.deployment import ModelDeployment

# Where model weights and caches usually live on a node; anything else must be allowed
# explicitly by the cluster admin (NPUSWARM_ALLOWED_HOST_PATHS).
DEFAULT_ALLOWED_HOST_PATHS = ("/models", "/data")
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


# The condition reason of a deployment that violates the policy (Degraded, no Swarm write).
REASON = "PolicyViolation"


class Refused(Exception):
    """A rule that needs what Swarm holds (its networks) refused the deployment: no write."""


def host_path_violation(host_path: str, allowed: tuple[str, ...]) -> str | None:
    """Why ``host_path`` may not be mounted, or None. ``allowed`` are normalised roots."""
    path = normalise_host_path(host_path)
    shown = host_path if path == host_path else f"{host_path} (= {path})"
    if not path.startswith("/"):
        return f"hostPath {host_path!r} is not an absolute path"
    denied = denied_root(path)
    if denied is not None:
        what = "/" if denied == "/" else f"{denied} and everything below it"
        return f"hostPath {shown} is never allowed ({what} would give the container the node)"
    if path.rsplit("/", 1)[-1].endswith(SOCKET_SUFFIX):
        return f"hostPath {shown} is a socket path; sockets such as docker.sock are never allowed"
    if not any(is_within(path, root) for root in allowed):
        roots = ", ".join(allowed) if allowed else "none"
        return (
            f"hostPath {shown} is outside the allowed host paths ({roots}); "
            "the cluster admin sets them with NPUSWARM_ALLOWED_HOST_PATHS"
        )
    return None


def violations(md: ModelDeployment, allowed_host_paths: tuple[str, ...]) -> list[str]:
    """Every reason the operator refuses ``md`` on this cluster (``allowed_host_paths``: the
    normalised roots of NPUSWARM_ALLOWED_HOST_PATHS); empty when it may run."""
    found = []
    for index, volume in enumerate(md.spec.volumes):
        problem = host_path_violation(volume.hostPath, allowed_host_paths)
        if problem is not None:
            found.append(f"spec.volumes[{index}]: {problem}")
    return found


def network_violations(
    md: ModelDeployment, networks: Mapping[str, str], network_ids: Collection[str] = ()
) -> list[str]:
    """The network must be swarm-scoped, or not exist yet: npuswarm then creates an overlay
    network under exactly this name before any service names it.

    Docker resolves a service's network by id, then name, then id *prefix*: a name that no
    network has, such as ``efd`` or ``mwi``, could select the host network; once a network of
    that exact name exists, the name wins. ``networks`` maps the names Swarm lists to their
    scope ("swarm", "local" or "ingress").
    """
    network = md.spec.network
    if network is None:
        return []
    if network.name in network_ids:
        # An id wins over a name, even over a network npuswarm would create with that name.
        return [
            f"spec.network.name: {network.name!r} is the id of an existing network; "
            "Docker would attach the replicas to that network, whatever its name"
        ]
    kind = networks.get(network.name)
    if kind is None:
        return []
    if kind != "swarm":
        return [
            f"spec.network.name: {network.name!r} is a {kind} network; replicas join only "
            "swarm-scoped networks of your own (overlay)"
        ]
    return []
