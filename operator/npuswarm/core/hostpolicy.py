"""Host safety: what a ModelDeployment may ask of a node, by the operator's settings. Pure.

The schema (api/deployment.py) already refuses what no cluster could allow: relative or ``..``
paths, bad env names, privileged fields (there are none to ask for). This module holds the
rules that depend on the cluster admin's settings, so the operator enforces them itself instead
of trusting RBAC to keep such objects out. Host paths are read as the node will see them:
normalised lexically, and checked against the paths never mounted.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from npuswarm.api.deployment import ModelDeployment

if TYPE_CHECKING:  # core/snapshot imports placement, which imports core/hostfiles -> here
    from npuswarm.core.snapshot import SwarmSnapshot

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
# Container environment that Ascend Docker Runtime reads when it creates the container (which
# devices and host files it mounts, and from where): set by a tenant, they would pull in the
# admin's mount lists, host sockets (MOUNT_BY_RUNTIME_FOR_DP mounts /run/docker.sock) or a host
# directory to restore from (host_snapshot_path). From MindCluster's ascend-docker-runtime
# (component/ascend-common/api/default_name.go, runtime/process, runtime/grus); docs/security.md.
RUNTIME_ENV = frozenset(
    {
        "ASCEND_VISIBLE_DEVICES",
        "ASCEND_RT_VISIBLE_DEVICES",
        "ASCEND_RUNTIME_OPTIONS",
        "ASCEND_RUNTIME_MOUNTS",
        "ASCEND_ALLOW_LINK",
        "ASCEND_VNPU_SPECS",
        "ASCEND_DOCKER_RUNTIME",
        "DISABLE_UB_MOUNT",
        "MOUNT_BY_RUNTIME_FOR_DP",
        "host_snapshot_path",
        "pod_name",
        "GRUS_SNAPSHOT_RESTORED_FLAG",
        "CRIU_LOG_LEVEL",
    }
)
# The two the operator sets from the placement: never a tenant's, whatever the admin allows.
PLACEMENT_ENV = frozenset({"ASCEND_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"})
# The dynamic loader's variables (ld.so(8), glibc's unsecvars.h) that make a process load
# code or data of the caller's choice: every LD_* name, and these.
LOADER_ENV = frozenset({"GLIBC_TUNABLES", "GCONV_PATH", "MALLOC_TRACE", "NLSPATH", "LOCPATH"})
LOADER_PREFIX = "LD_"


def reserved_env(name: str) -> str | None:
    """Why an env name is reserved (None: it is not)."""
    if name in RUNTIME_ENV:
        return "Ascend Docker Runtime reads it to decide what to mount into the container"
    if name in LOADER_ENV or name.startswith(LOADER_PREFIX):
        return "it makes the dynamic loader load code or data of the caller's choice"
    return None


@dataclass(frozen=True)
class HostRoot:
    """A host directory ModelDeployments may mount, with everything below it."""

    path: str  # normalised
    writable: bool = False


@dataclass(frozen=True)
class TenantPolicy:
    """What the cluster admin lets a namespace's ModelDeployments and ModelGateways ask of a
    node (settings.Settings.tenant_policy builds it; docs/security.md lists each)."""

    host_roots: tuple[HostRoot, ...] = tuple(HostRoot(p) for p in DEFAULT_ALLOWED_HOST_PATHS)
    # Reserved env names the admin allows anyway (never the placement's two).
    allowed_env: frozenset[str] = frozenset()
    # Image references allowed (fnmatch patterns, e.g. "registry.example.com/ai/*"); empty:
    # any image.
    images: tuple[str, ...] = ()
    # Networks the admin shares: name -> namespaces that may join it ("*": every one).
    shared_networks: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Namespaces that may run multi-node replicas, whose members use the node's network
    # stack ("*": every one); none by default.
    host_network_namespaces: frozenset[str] = frozenset()

    def shares(self, network: str, namespace: str) -> bool:
        granted = self.shared_networks.get(network, frozenset())
        return namespace in granted or "*" in granted

    @property
    def allowed_host_paths(self) -> tuple[str, ...]:
        return tuple(root.path for root in self.host_roots)

    def root_of(self, path: str) -> HostRoot | None:
        """The most specific allowed root holding ``path`` (normalised)."""
        holding = [r for r in self.host_roots if is_within(path, r.path)]
        return max(holding, key=lambda r: len(r.path), default=None)

    def image_violation(self, image: str, what: str) -> str | None:
        if not self.images or any(fnmatch.fnmatchcase(image, p) for p in self.images):
            return None
        return (
            f"{what} {image!r} is not an allowed image ({', '.join(self.images)}); "
            "the cluster admin sets them with NPUSWARM_ALLOWED_IMAGES"
        )


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


def violations(md: ModelDeployment, policy: TenantPolicy) -> list[str]:
    """Every reason the operator refuses ``md`` on this cluster; empty when it may run."""
    found = []
    for index, volume in enumerate(md.spec.volumes):
        problem = host_path_violation(volume.hostPath, policy.allowed_host_paths)
        if problem is None and not volume.readOnly:
            root = policy.root_of(normalise_host_path(volume.hostPath))
            if root is not None and not root.writable:
                problem = (
                    f"hostPath {volume.hostPath} may only be mounted read-only (readOnly: true): "
                    f"the cluster admin allows writes under a root with NPUSWARM_ALLOWED_HOST_PATHS"
                    f"=...,{root.path}:rw"
                )
        if problem is not None:
            found.append(f"spec.volumes[{index}]: {problem}")
    for name in sorted(md.spec.engine.env):
        why = reserved_env(name)
        if why is not None and (name in PLACEMENT_ENV or name not in policy.allowed_env):
            found.append(
                f"spec.engine.env: {name} is reserved ({why}); the cluster admin may allow it "
                "with NPUSWARM_ALLOWED_RESERVED_ENV"
            )
    image = policy.image_violation(md.spec.image, "spec.image")
    if image is not None:
        found.append(image)
    granted = policy.host_network_namespaces
    if md.spec.multi_node and not (md.metadata.namespace in granted or "*" in granted):
        found.append(
            "spec.nodesPerReplica: a multi-node replica runs on the host network; the cluster "
            "admin allows it per namespace with NPUSWARM_HOST_NETWORK_NAMESPACES"
        )
    return found


def network_violation(
    namespace: str,
    network: str,
    snapshot: SwarmSnapshot,
    policy: TenantPolicy,
    claimed: Mapping[str, str] | None = None,
) -> str | None:
    """Why a namespace's deployment or gateway may not join ``network``, or None.

    A namespace joins networks npuswarm created for it (or creates one that does not exist
    yet); another namespace's network, or one npuswarm did not make, only where the admin
    shares it (NPUSWARM_SHARED_NETWORKS). A network of npuswarm's from before networks had a
    namespace stays open to the namespaces already on it. ``claimed``: networks this pass
    creates, and for which namespace (the oldest deployment that names it wins).

    Docker resolves a service's network by id, then name, then id *prefix*: a name that no
    network has, such as ``efd`` or ``mwi``, could select the host network; once a network of
    that exact name exists, the name wins.
    """
    where = "spec.network.name"
    if network in snapshot.network_ids:
        # An id wins over a name, even over a network npuswarm would create with that name.
        return (
            f"{where}: {network!r} is the id of an existing network; "
            "Docker would attach the replicas to that network, whatever its name"
        )
    kind = snapshot.networks.get(network)
    if kind is None:
        creator = (claimed or {}).get(network, namespace)
        if creator == namespace or policy.shares(network, namespace):
            return None
        return f"{where}: {network!r} is being created for namespace {creator}"
    if kind != "swarm":
        return (
            f"{where}: {network!r} is a {kind} network; replicas join only "
            "swarm-scoped networks of your own (overlay)"
        )
    if policy.shares(network, namespace):
        return None
    owner = snapshot.network_namespace.get(network)
    if owner == namespace:
        return None
    if owner is None and network in snapshot.own_networks:
        users = snapshot.network_users.get(network, frozenset())
        if not users or namespace in users:
            return None  # made before networks had a namespace: its users keep it
        owner = ", ".join(sorted(users))
    what = f"namespace {owner}" if owner else "no namespace (npuswarm did not create it)"
    return (
        f"{where}: {network!r} belongs to {what}; the cluster admin shares a network with "
        f"NPUSWARM_SHARED_NETWORKS={network}={namespace}"
    )
