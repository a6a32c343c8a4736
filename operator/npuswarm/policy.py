"""Host safety: what a ModelDeployment may ask of a node, by the operator's settings. Pure.

The schema (api.py) already refuses what no cluster could allow: relative or ``..`` paths,
bad env names, privileged fields (there are none to ask for). This module holds the rules
that depend on the cluster admin's settings, so the operator enforces them itself instead of
trusting RBAC to keep such objects out.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from npuswarm.paths import SOCKET_SUFFIX, denied_root, is_within, normalise_host_path

if TYPE_CHECKING:
    from npuswarm.api.deployment import ModelDeployment
    from npuswarm.settings import Settings

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


def violations(md: ModelDeployment, settings: Settings) -> list[str]:
    """Every reason the operator refuses ``md`` on this cluster; empty when it may run."""
    found = []
    for index, volume in enumerate(md.spec.volumes):
        problem = host_path_violation(volume.hostPath, settings.allowed_host_paths)
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
