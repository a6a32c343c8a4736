"""Host files on each node: which host paths a deployment needs there, and which nodes it may
not use because of what the node agents found at those paths. Pure (docs/node-health.md,
"Model weights and host paths"; docs/security.md, "Host paths").

The spec alone cannot see a node's filesystem: core/hostpolicy.py checks a hostPath lexically
against the admin's roots, and the node agent (nodehealth/agent.py) reports, per path the
operator asks about, whether it exists, its size, and where its resolution leads when it
leaves its root (symbolic links resolved as the node's kernel would, i.e. as Docker does when
it mounts the path). This module turns those reports into placement limits:

- a path whose resolution leaves its root: the node is refused for the deployment, and a
  replica of it running there moves (Swarm would mount the link's target on its next start);
- a path missing on a node: no new replica of the deployment there (Docker would refuse the
  mount, or vLLM would fail to load the model); one already running stays;
- a path not yet reported on a node: no new replica there until it is (a check is seconds
  away); one already running stays.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.hostpolicy import is_within, normalise_host_path
from npuswarm.core.nodes import NodeInfo

# At most this many paths are asked of one node per read: the request and the agent's work
# stay bounded whatever the number of deployments (more are reported as not checked).
MAX_PATHS_PER_NODE = 64
# The reasons a replica is not placed because of host files (status: Degraded or Progressing).
MISSING: Final = "HostFilesUnavailable"


@dataclass(frozen=True)
class PathCheck:
    """One host path as a node's agent found it."""

    exists: bool
    size: int = 0  # bytes of the regular files below it (a bounded listing)
    files: int = 0
    truncated: bool = False  # the listing stopped at its bound: size and files are at least
    root: str = ""  # the allowed root it was resolved in
    escapes: str = ""  # where its resolution leads when that is outside ``root``; "" stays
    error: str = ""  # the agent could not check it (outside every root, unreadable, ...)

    @classmethod
    def from_answer(cls, found: Mapping[str, object]) -> PathCheck:
        def number(key: str) -> int:
            value = found.get(key)
            return value if isinstance(value, int) else 0

        return cls(
            exists=found.get("exists") is True,
            size=number("size"),
            files=number("files"),
            truncated=found.get("truncated") is True,
            root=str(found.get("root") or ""),
            escapes=str(found.get("escapes") or ""),
            error=str(found.get("error") or ""),
        )

    def problem(self, path: str, host: str, what: str = "") -> str:
        """Why ``path`` (``what`` it is to a deployment, if named) cannot be mounted on
        ``host``, or "" when it can."""
        named = f"{what} {path}" if what else path
        if self.escapes:
            return (
                f"hostPath {path} resolves to {self.escapes} on {host}, outside its allowed "
                f"root {self.root or '?'}: refused on that node"
            )
        if self.error:
            return f"{named} unreadable on {host}: {self.error}"
        if not self.exists:
            return f"{named} missing on {host}"
        return ""


@dataclass(frozen=True)
class NeededPath:
    """A host path a deployment needs on its node, and what it is to the deployment."""

    path: str  # normalised host path
    what: str  # "model" (the weights spec.model names) or "hostPath" (a volume's source)


def needed_paths(md: ModelDeployment) -> tuple[NeededPath, ...]:
    """The host paths ``md`` needs on a node: every volume's source, and the model's own
    directory when spec.model is a path inside one of them (a model id needs nothing)."""
    if not md.spec.volumes:
        return ()
    return _needed(md.spec.model, tuple((v.hostPath, v.mountPath) for v in md.spec.volumes))


@functools.lru_cache(maxsize=8192)
def _needed(model: str, volumes: tuple[tuple[str, str], ...]) -> tuple[NeededPath, ...]:
    """Remembered: every pass asks it of every deployment, and few distinct ones exist."""
    found: dict[str, NeededPath] = {}
    for host_path, mount_path in volumes:
        source = normalise_host_path(host_path)
        found.setdefault(source, NeededPath(source, "hostPath"))
        mount = posixpath.normpath(mount_path)
        if model.startswith("/") and is_within(posixpath.normpath(model), mount):
            inside = posixpath.relpath(posixpath.normpath(model), mount)
            host = source if inside == "." else posixpath.join(source, inside)
            found[host] = NeededPath(host, "model")
    return tuple(found[p] for p in sorted(found))


def paths_by_node(
    deployments: Iterable[ModelDeployment],
    nodes: Sequence[NodeInfo],
    limit: int = MAX_PATHS_PER_NODE,
) -> dict[str, tuple[str, ...]]:
    """Node id -> the host paths its agent is asked about: those of the deployments whose
    nodeSelector matches it. Deployments are grouped by selector first, so the cost is
    O(deployments + nodes x distinct selectors)."""
    by_selector: dict[tuple[tuple[str, str], ...], set[str]] = {}
    for md in deployments:
        needed = needed_paths(md)
        if needed:
            key = tuple(sorted(md.spec.nodeSelector.items()))
            by_selector.setdefault(key, set()).update(p.path for p in needed)
    asked: dict[str, tuple[str, ...]] = {}
    for node in nodes:
        wanted: set[str] = set()
        for selector, paths in by_selector.items():
            if all(node.labels.get(k) == v for k, v in selector):
                wanted |= paths
        if wanted:
            asked[node.id] = tuple(sorted(wanted)[:limit])
    return asked


@dataclass(frozen=True)
class NodeFiles:
    """What a deployment may do on each node because of its host files: nodes that take no
    new replica (-> why) and nodes a running replica must leave (-> why, also in ``exclude``)."""

    exclude: Mapping[str, str] = field(default_factory=dict)
    evict: Mapping[str, str] = field(default_factory=dict)
    # Nodes excluded only because their agent has not reported the paths yet.
    pending: frozenset[str] = frozenset()


def node_files(
    md: ModelDeployment,
    nodes: Iterable[NodeInfo],
    reports: Mapping[str, Mapping[str, PathCheck]],
) -> NodeFiles:
    """``reports``: node id -> path -> what its agent found (the nodes whose agents run)."""
    needed = needed_paths(md)
    if not needed:
        return NodeFiles()
    exclude: dict[str, str] = {}
    evict: dict[str, str] = {}
    pending: set[str] = set()
    for node in nodes:
        if not node.npus or not node.matches(md.spec.nodeSelector):
            continue
        found = reports.get(node.id, {})
        host = node.hostname or node.id
        problems: list[str] = []
        unknown: list[str] = []
        for need in needed:
            check = found.get(need.path)
            if check is None:
                unknown.append(need.path)
            elif check.escapes:
                evict[node.id] = check.problem(need.path, host)
            elif problem := check.problem(need.path, host, need.what):
                problems.append(problem)
        if node.id in evict:
            exclude[node.id] = evict[node.id]
        elif problems:
            exclude[node.id] = "; ".join(problems)
        elif unknown:
            exclude[node.id] = f"{', '.join(unknown)} not yet checked on {host}"
            pending.add(node.id)
    return NodeFiles(exclude, evict, frozenset(pending))
