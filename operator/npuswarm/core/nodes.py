"""Swarm nodes as npuswarm sees them: which NPUs each has, and whether it can take replicas."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from npuswarm.api import labels
from npuswarm.core.clock import parse_engine_time
from npuswarm.core.npus import npu_id_from_device, parse_npu_ids

if TYPE_CHECKING:
    from npuswarm.core.hostfiles import PathCheck

Topology = Literal["any", "rings-of-4"]
TOPOLOGIES: tuple[Topology, ...] = ("any", "rings-of-4")


class NodeInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    hostname: str
    state: str  # Swarm: ready, down, unknown, disconnected
    availability: str  # Swarm: active, pause, drain
    labels: dict[str, str] = {}
    npus: frozenset[int] = frozenset()
    reserved: frozenset[int] = frozenset()
    topology: Topology = "any"
    status_since: datetime | None = None
    problems: tuple[str, ...] = ()
    addr: str = ""  # where the node is reached (gateway admin ports are published there)
    engine: str = ""  # Docker Engine version: a change asks for a new validation probe
    # Why new replicas must not go here (failed or pending validation, see nodehealth/checks.py).
    blocked: str = ""
    # ``blocked`` only until its first validation check answers (not a failure).
    validating: bool = False
    # NPUs kept out of use by npu-smi readings (nodehealth/npusmi.py), with why; also in
    # ``reserved``.
    withheld: dict[int, str] = {}
    # Why the node takes no member of a multi-node group: its NPUs' RoCE links are down or
    # unhealthy (nodehealth/roce.py); "" when fine or not known.
    roce_problem: str = ""

    @property
    def usable_npus(self) -> frozenset[int]:
        return self.npus - self.reserved

    @property
    def accepts_new_replicas(self) -> bool:
        return self.state == "ready" and self.availability == "active" and not self.blocked

    @property
    def drained(self) -> bool:
        return self.availability == "drain"

    def is_lost(self, now: datetime, grace_seconds: float) -> bool:
        """Down for longer than the grace: its replicas are placed elsewhere.

        Swarm records no "down since"; UpdatedAt changes when the node's status does, which
        is close enough for a grace period measured in tens of seconds.
        """
        if self.state == "ready":
            return False
        if self.status_since is None:
            return True
        return (now - self.status_since).total_seconds() >= grace_seconds

    def matches(self, selector: dict[str, str]) -> bool:
        return all(self.labels.get(key) == value for key, value in selector.items())


@dataclass(frozen=True)
class NodeLimits:
    """What node checks keep out of placement for one pass: whole nodes (id -> why: no new
    replica there) and NPUs (node id -> NPU -> why: given to nobody, and a replica holding
    one moves)."""

    nodes: Mapping[str, str] = field(default_factory=dict)
    # Those of ``nodes`` that only wait for their first validation probe.
    pending: frozenset[str] = frozenset()
    npus: Mapping[str, Mapping[int, str]] = field(default_factory=dict)  # unhealthy
    # NPUs running processes npuswarm did not start: taken, like a foreign claim.
    busy: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    # Replicas (deployment, slot) that failing.py moves now (-> why), and the nodes each
    # must avoid for a cool-down.
    move: Mapping[tuple[str, str], str] = field(default_factory=dict)
    avoid: Mapping[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    # Node id -> why it takes no multi-node group member (RoCE links, nodehealth/roce.py).
    roce: Mapping[str, str] = field(default_factory=dict)
    # Node id -> host path -> what its agent found there (core/hostfiles.py); None: no agents
    # read the nodes' files, so only the lexical host policy applies.
    files: Mapping[str, Mapping[str, PathCheck]] | None = None
    # Replicas (deployment, slot) to restart in place, on the same node and NPUs (-> why):
    # a fault graded RestartRequest/RestartBusiness on an NPU they hold (nodehealth/faults).
    restart: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def apply(self, nodes: list[NodeInfo]) -> list[NodeInfo]:
        if not self.nodes and not self.npus and not self.busy and not self.roce:
            return nodes
        limited = []
        for node in nodes:
            update: dict[str, Any] = {}
            if node.id in self.nodes:
                # A label problem (node_from_engine) stays in view: it is no pending check.
                why = self.nodes[node.id]
                update["blocked"] = f"{node.blocked}; {why}" if node.blocked else why
                update["validating"] = node.id in self.pending and not node.blocked
            asked = {**(self.busy.get(node.id) or {}), **(self.npus.get(node.id) or {})}
            withheld = {n: why for n, why in asked.items() if n in node.npus}
            if withheld:
                update["withheld"] = withheld
                update["reserved"] = node.reserved | frozenset(withheld)
            if node.id in self.roce:
                update["roce_problem"] = self.roce[node.id]
            limited.append(node.model_copy(update=update) if update else node)
        return limited


def node_from_engine(attrs: dict[str, Any]) -> NodeInfo:
    """Build a NodeInfo from ``GET /nodes`` output; bad NPU labels become problems, not errors."""
    spec = attrs.get("Spec") or {}
    description = attrs.get("Description") or {}
    node_labels: dict[str, str] = dict(spec.get("Labels") or {})
    problems: list[str] = []

    npus = _generic_resource_npus(description)
    if not npus and labels.NODE_NPUS in node_labels:
        npus = _label_ids(node_labels, labels.NODE_NPUS, problems)
    # A label npuswarm cannot read blocks new replicas (unknown reservations could cover any
    # NPU, an unknown topology could forbid any set) but moves none: a typo in a label must
    # not evict what runs. The NPUs stay known, so what runs there keeps them.
    label_problems = len(problems)
    reserved = _label_ids(node_labels, labels.NODE_NPUS_RESERVED, problems)
    topology_label = node_labels.get(labels.NODE_TOPOLOGY, "any")
    topology: Topology = "any"
    if topology_label in TOPOLOGIES:
        topology = topology_label
    else:
        problems.append(
            f"unknown {labels.NODE_TOPOLOGY}={topology_label!r} (known: {', '.join(TOPOLOGIES)})"
        )
    blocked = ""
    if len(problems) > label_problems:
        blocked = "; ".join(problems[label_problems:]) + ": no new replicas until it is fixed"

    return NodeInfo(
        id=attrs["ID"],
        hostname=description.get("Hostname", ""),
        state=(attrs.get("Status") or {}).get("State", "unknown"),
        availability=spec.get("Availability", "active"),
        labels=node_labels,
        npus=npus,
        reserved=reserved,
        topology=topology,
        status_since=parse_engine_time(attrs.get("UpdatedAt")),
        problems=tuple(problems),
        blocked=blocked,
        addr=node_address(attrs),
        engine=str((description.get("Engine") or {}).get("EngineVersion") or ""),
    )


def node_address(attrs: dict[str, Any]) -> str:
    """Status.Addr, or a manager's ManagerStatus.Addr where Status.Addr says 0.0.0.0 (as
    managers that listen on all addresses report it)."""
    addr = str((attrs.get("Status") or {}).get("Addr") or "")
    if addr in ("", "0.0.0.0"):
        manager = str((attrs.get("ManagerStatus") or {}).get("Addr") or "")
        addr = manager.rpartition(":")[0] if ":" in manager else manager
    return addr


def _generic_resource_npus(description: dict[str, Any]) -> frozenset[int]:
    ids = set()
    resources = (description.get("Resources") or {}).get("GenericResources") or []
    for resource in resources:
        named = resource.get("NamedResourceSpec")
        if named and named.get("Kind") == "NPU":
            npu_id = npu_id_from_device(str(named.get("Value", "")))
            if npu_id is not None:
                ids.add(npu_id)
    return frozenset(ids)


def _label_ids(node_labels: dict[str, str], key: str, problems: list[str]) -> frozenset[int]:
    text = node_labels.get(key)
    if text is None:
        return frozenset()
    try:
        return parse_npu_ids(text)
    except ValueError as error:
        problems.append(f"label {key}: {error}")
        return frozenset()
