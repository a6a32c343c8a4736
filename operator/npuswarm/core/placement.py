"""Placement: which node and which NPUs each replica of every ModelDeployment gets. Pure.

Step 2 of the pass (core/pipeline.py): place_all turns every deployment into replica requests
and places them all at once. The same inputs always give the same result, whatever order
allocations were listed in: requests come in priority order (spec.priority, higher first,
then the oldest deployment first), and everything else is sorted. Replicas that find no NPUs
may take them from lower-priority ones in step 2b (core/preemption.py). Step 5 (the surge)
takes spare NPUs from the same result with spare_assignment.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from npuswarm.api import labels
from npuswarm.api.deployment import ModelDeployment
from npuswarm.core import gang, hostfiles, topology
from npuswarm.core.nodes import NodeInfo, NodeLimits

ReplicaKey = tuple[str, str]  # (deployment "namespace/name", slot)
# (nodeSelector, pinned node, nodes excluded for host files): one candidate list per key.
CandidateKey = tuple[tuple[tuple[str, str], ...], str | None, tuple[str, ...]]
UnplacedReason = Literal[
    "NoMatchingNode",
    "NodesUnavailable",
    "InsufficientNPUs",
    "NodeValidationFailed",
    "NodeValidationPending",
    "HostFilesUnavailable",
    # Preemption (core/preemption.py): a replica stopped for a higher-priority one, and the
    # higher-priority one waiting for the NPUs it stops.
    "Preempted",
    "Preempting",
    # Fits once replicas still stopping on a node have exited: their NPUs are held for it.
    "NPUsReleasing",
    # The namespace's NPU quota is used up (core/quota.py).
    "QuotaExceeded",
]
# At most this many blocked nodes are named in one message; the rest are counted.
MAX_NAMED_BLOCKED = 3


class ReplicaRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    deployment: str
    slot: str
    npus: int
    node_selector: dict[str, str] = {}
    pinned_node: str | None = None  # PerNode mode: the one node this slot lives on
    one_per_node: bool = False  # a host-mode published port fits once per node
    npu_ids: frozenset[int] | None = None  # spec.npuIds: these NPUs or none
    # Nodes this replica should not go to now (it kept failing there, failing.py); used
    # only while another node fits.
    avoid_nodes: frozenset[str] = frozenset()
    # Nodes where its host files are missing, unchecked or escape their root (core/hostfiles):
    # no new replica there (-> why); ``evict_nodes`` also makes one running there move.
    exclude_nodes: dict[str, str] = {}
    evict_nodes: dict[str, str] = {}
    exclude_pending: frozenset[str] = frozenset()  # of those, only not yet checked
    exclude_key: tuple[str, ...] = ()  # sorted(exclude_nodes): part of the candidate key
    # A member of a multi-node replica (core/gang.py): its group's index, its rank among the
    # group's nodes (0 leads) and the group's size; placed with the rest of its group or not.
    group: str | None = None
    member: int = 0
    members: int = 1
    topology_key: str | None = None

    @property
    def key(self) -> ReplicaKey:
        return (self.deployment, self.slot)

    @property
    def group_key(self) -> ReplicaKey | None:
        return (self.deployment, self.group) if self.group is not None else None


def member_slot(group: int | str, member: int) -> str:
    """The slot of one member of a multi-node replica: group index, then member index."""
    return f"{group}-m{member}"


class Allocation(BaseModel):
    """An NPU claim read back from a Swarm service: npuswarm's labels, or a foreign service."""

    model_config = ConfigDict(frozen=True)

    deployment: str
    slot: str
    node_id: str
    npus: frozenset[int]
    service: str
    # Held by a service npuswarm does not own: taken, reported, never moved or kept.
    foreign: bool = False
    # A member of a multi-node replica: its group's host port block (core/gang.py).
    port_block: int | None = None
    # Held by a task still stopping (its stop grace period), its service removed or updated:
    # taken until Swarm no longer lists the task, never kept or moved.
    stopping: bool = False

    @property
    def key(self) -> ReplicaKey:
        return (self.deployment, self.slot)

    def kept(self) -> Assignment:
        """The assignment that leaves this replica where it is."""
        return Assignment(
            deployment=self.deployment,
            slot=self.slot,
            node_id=self.node_id,
            npus=self.npus,
            kept=True,
        )


class GroupSeat(BaseModel):
    """Where a member of a multi-node replica sits in its group, for rendering."""

    model_config = ConfigDict(frozen=True)

    member: int  # 0 leads (serves the API); the others run --headless
    members: int
    leader_address: str  # the leader's node address: --data-parallel-address
    address: str  # this member's node address: HCCL_IF_IP
    interface: str  # the node's npuswarm.io/hccl-interface label ("" = the operator default)
    ports: gang.GroupPorts
    # Raised to restart the whole group (core/groups.py); 0 renders no label, as before.
    generation: int = 0


class Assignment(BaseModel):
    model_config = ConfigDict(frozen=True)

    deployment: str
    slot: str
    node_id: str
    npus: frozenset[int]
    kept: bool  # True: the replica stays where it runs (sticky)
    group: GroupSeat | None = None  # a member of a multi-node replica

    @property
    def key(self) -> ReplicaKey:
        return (self.deployment, self.slot)


class Unplaced(BaseModel):
    model_config = ConfigDict(frozen=True)

    deployment: str
    slot: str
    reason: UnplacedReason
    message: str


@dataclass
class PlacementResult:
    assignments: dict[ReplicaKey, Assignment] = field(default_factory=dict)
    unplaced: dict[ReplicaKey, Unplaced] = field(default_factory=dict)
    # Why an existing allocation was not kept (conflict, lost node, ...), per replica.
    moved: dict[ReplicaKey, str] = field(default_factory=dict)
    # Services whose NPU claims overlap an earlier claim: reported, never double-booked.
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (deployment, message)
    # NPUs held by services npuswarm does not own, per node: (npu, service name).
    foreign: dict[str, dict[int, str]] = field(default_factory=dict)
    # NPUs claimed per node once everything is placed; what is left over is spare.
    taken: dict[str, set[int]] = field(default_factory=dict)
    # Usable NPUs nobody claims, per node, kept in step with ``taken``.
    free: dict[str, set[int]] = field(default_factory=dict)
    # Nodes that already run a replica of a deployment (for one-replica-per-node requests).
    nodes_used: dict[str, set[str]] = field(default_factory=dict)
    # Each deployment's replica requests, by deployment key, in placement order.
    requests: dict[str, list[ReplicaRequest]] = field(default_factory=dict)
    # Multi-node replicas placed away from their groupTopologyKey: (deployment, group) -> why.
    group_notes: dict[ReplicaKey, str] = field(default_factory=dict)
    # Host port blocks of groups, per node (core/gang.py), and the block each member's
    # service records.
    port_blocks: dict[str, set[int]] = field(default_factory=dict)
    port_range: gang.PortRange = field(default_factory=gang.PortRange)
    _block_of: dict[ReplicaKey, int] = field(default_factory=dict)
    _by_deployment: dict[str, dict[str, Assignment]] = field(default_factory=dict)
    # Per candidate list: why its blocked nodes take no new replica, and the reason's kind
    # (node states do not change during a placement).
    _blocked: dict[CandidateKey, tuple[str, UnplacedReason]] = field(default_factory=dict)
    # unplaced's keys by deployment, and the size of ``unplaced`` it was built for.
    _unplaced_index: tuple[int, dict[str, list[ReplicaKey]]] | None = None
    _candidates: dict[CandidateKey, list[NodeInfo]] = field(default_factory=dict)
    _accepting: dict[CandidateKey, list[NodeInfo]] = field(default_factory=dict)
    _nodes: dict[str, NodeInfo] = field(default_factory=dict)
    # Per candidate set: heaps of (hostname, id) by free NPU count. Free counts only fall
    # during a pass, so a node enters each bucket at most once; stale entries are dropped
    # when met. This keeps best fit near O(1) per replica on clusters of hundreds of nodes.
    _buckets: dict[CandidateKey, dict[int, list[tuple[str, str]]]] = field(default_factory=dict)
    _keys_of_node: dict[str, list[CandidateKey]] = field(default_factory=dict)
    # Hostname order makes ties deterministic and lets a scan stop at the first exact fit.
    _ordered: list[NodeInfo] = field(default_factory=list)
    # NPUs held by stopping tasks (of removed or updated services), per node: free once they
    # exit.
    releasing: dict[str, set[int]] = field(default_factory=dict)
    # Of those, the ones a waiting replica will take once they are free (_await_release).
    awaited: dict[str, set[int]] = field(default_factory=dict)
    # Replicas whose running service must stop although they are still wanted (preempted,
    # beyond their namespace's quota) -> why; the diff removes their services.
    evicted: dict[ReplicaKey, str] = field(default_factory=dict)
    # NPUs each namespace with a quota may still be given (core/quota.py).
    quota_room: dict[str, int] = field(default_factory=dict)
    # (node, NPU) -> (deployment, service) of whoever claimed it (foreign: no deployment).
    _holders: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)

    def claim(self, node_id: str, npus: frozenset[int]) -> None:
        self.taken.setdefault(node_id, set()).update(npus)
        free = self.free.get(node_id)
        if free is None:
            return
        free.difference_update(npus)
        for key in self._keys_of_node.get(node_id, ()):
            entry = (self._nodes[node_id].hostname, node_id)
            heapq.heappush(self._buckets[key].setdefault(len(free), []), entry)

    def hold(self, node_id: str, npus: frozenset[int], deployment: str, service: str) -> None:
        """``claim``, remembering who holds each NPU (to name it in a conflict)."""
        self.claim(node_id, npus)
        for npu in npus:
            self._holders[(node_id, npu)] = (deployment, service)

    def assign(self, assignment: Assignment) -> None:
        self.assignments[assignment.key] = assignment
        self.nodes_used.setdefault(assignment.deployment, set()).add(assignment.node_id)
        self._by_deployment.setdefault(assignment.deployment, {})[assignment.slot] = assignment

    def unassign(self, key: ReplicaKey) -> None:
        """Take back a kept assignment (its service still runs, so its NPUs stay taken)."""
        self.assignments.pop(key, None)
        self._by_deployment.get(key[0], {}).pop(key[1], None)

    def scratch(self) -> PlacementResult:
        """A copy that assign/unassign/claim and preemption may change without touching this
        one (the autoscaler asks "what would the next pass do" of the last pass's result,
        which the status and the next round still read). Best-fit buckets are not carried:
        a scratch copy is never placed into."""
        return replace(
            self,
            assignments=dict(self.assignments),
            unplaced=dict(self.unplaced),
            evicted=dict(self.evicted),
            taken={node: set(npus) for node, npus in self.taken.items()},
            free={node: set(npus) for node, npus in self.free.items()},
            nodes_used={key: set(nodes) for key, nodes in self.nodes_used.items()},
            requests=dict(self.requests),
            _by_deployment={key: dict(slots) for key, slots in self._by_deployment.items()},
            _unplaced_index=None,
            _keys_of_node={},
        )

    def nodes(self) -> list[NodeInfo]:
        """The nodes placement saw, by hostname."""
        return self._ordered

    def for_deployment(self, deployment: str) -> list[Assignment]:
        """In slot order; looked up, not scanned: every deployment of a pass asks."""
        slots = self._by_deployment.get(deployment, {})
        return [slots[slot] for slot in sorted(slots)]

    def unplaced_of(self, deployment: str) -> list[tuple[ReplicaKey, Unplaced]]:
        """One deployment's unplaced replicas, in key order, from an index built once the
        placement is done: asked per deployment by its status and its events, a scan of every
        unplaced replica was deployments x unplaced (4 million steps, 10 s a pass, while a
        fresh fleet's 1,000 nodes awaited their first node check)."""
        if self._unplaced_index is None or self._unplaced_index[0] != len(self.unplaced):
            index: dict[str, list[ReplicaKey]] = {}
            for key in sorted(self.unplaced):
                index.setdefault(key[0], []).append(key)
            self._unplaced_index = (len(self.unplaced), index)
        keys = self._unplaced_index[1].get(deployment, [])
        return [(key, self.unplaced[key]) for key in keys if key in self.unplaced]


def age(md: ModelDeployment, position: int) -> tuple[str, int, str, str]:
    """Older deployments first, so a newcomer of the same priority can never take NPUs
    from them. Objects not yet created (files given to `npuswarm plan`) come last, in the
    given order."""
    created = md.metadata.creationTimestamp
    return (created or "~", 0 if created else position, md.metadata.namespace, md.metadata.name)


def priority(md: ModelDeployment, position: int) -> tuple[int, tuple[str, int, str, str]]:
    """spec.priority, higher first; age breaks ties (docs/priority.md)."""
    return (-md.spec.priority, age(md, position))


def by_priority(deployments: list[ModelDeployment]) -> list[ModelDeployment]:
    ranked = sorted(enumerate(deployments), key=lambda item: priority(item[1], item[0]))
    return [md for _, md in ranked]


def by_age(deployments: list[ModelDeployment]) -> list[ModelDeployment]:
    ranked = sorted(enumerate(deployments), key=lambda item: age(item[1], item[0]))
    return [md for _, md in ranked]


def replica_requests(
    md: ModelDeployment, nodes: Iterable[NodeInfo], slots: Sequence[str] | None = None
) -> list[ReplicaRequest]:
    """``slots``: the replicas a Replicated deployment keeps (core/scaledown.py); None: the
    first spec.replicas."""
    spec = md.spec
    common: dict[str, Any] = {
        "deployment": md.key,
        "npus": spec.npus_per_replica,
        "node_selector": spec.nodeSelector,
        # Fixed NPU ids, like a host port, can be taken only once per node.
        "one_per_node": spec.npuIds is not None
        or (spec.publish is not None and spec.publish.mode == "host"),
        "npu_ids": frozenset(spec.npuIds) if spec.npuIds is not None else None,
    }
    if spec.multi_node:
        return [
            ReplicaRequest(
                slot=member_slot(group, member),
                group=str(group),
                member=member,
                members=spec.nodesPerReplica,
                topology_key=spec.groupTopologyKey,
                **common,
            )
            for group in range(spec.replicas)
            for member in range(spec.nodesPerReplica)
        ]
    if spec.mode == "Replicated":
        chosen = slots if slots is not None else [str(i) for i in range(spec.replicas)]
        return [ReplicaRequest(slot=slot, **common) for slot in chosen]
    # PerNode: every matching node with NPUs, including one that is down right now: its
    # replica waits for it rather than being dropped and recreated on every flap.
    return [
        ReplicaRequest(slot=node.id, pinned_node=node.id, **common)
        for node in sorted(nodes, key=lambda n: n.id)
        if node.matches(spec.nodeSelector) and node.usable_npus and not node.drained
    ]


@dataclass
class Admission:
    """Which replica requests may be placed at all (core/quota.py decides)."""

    admitted: list[ReplicaRequest]  # in the order given
    refused: dict[ReplicaKey, Unplaced] = field(default_factory=dict)
    # Refused replicas that run now: their services stop (-> why).
    evicted: dict[ReplicaKey, str] = field(default_factory=dict)
    # NPUs each namespace with a quota may still be given (for the autoscaler's headroom).
    room: dict[str, int] = field(default_factory=dict)


Admit = Callable[[list[ReplicaRequest], Sequence[Allocation]], Admission]


def place_all(
    ranked: list[ModelDeployment],
    nodes: list[NodeInfo],
    allocations: Sequence[Allocation],
    *,
    now: datetime,
    lost_node_grace_seconds: float,
    limits: NodeLimits | None = None,
    port_range: gang.PortRange | None = None,
    slots: Mapping[str, Sequence[str]] | None = None,
    admit: Admit | None = None,
) -> PlacementResult:
    """One placement over every deployment (``ranked``: by_priority's order), so each
    deployment of a pass sees the same global answer; ``result.requests`` keeps each one's
    requests. ``limits`` (node checks, failing replicas): nodes that get no new replica (what
    runs there stays), NPUs given to nobody (a replica holding one moves), replicas that move
    and the nodes each avoids. ``slots``: the replicas a deployment keeps when it is not its
    first spec.replicas (core/scaledown.py). ``admit``: which requests may be placed at all
    (the namespaces' NPU quotas); the others are unplaced, and stop if they run."""
    placeable = limits.apply(nodes) if limits is not None else nodes
    avoid = limits.avoid if limits is not None else {}
    reports = limits.files if limits is not None else None
    files_seen: dict[Any, hostfiles.NodeFiles] = {}
    requests_by_deployment: dict[str, list[ReplicaRequest]] = {}
    ordered: list[ReplicaRequest] = []
    for md in ranked:
        requests = replica_requests(md, placeable, (slots or {}).get(md.key))
        if avoid:
            requests = [
                r.model_copy(update={"avoid_nodes": avoid[r.key]}) if r.key in avoid else r
                for r in requests
            ]
        if reports is not None and md.spec.volumes:
            requests = _with_host_files(md, requests, placeable, reports, files_seen)
        requests_by_deployment[md.key] = requests
        ordered.extend(requests)
    admission = admit(ordered, allocations) if admit is not None else Admission(ordered)
    result = place(
        placeable,
        admission.admitted,
        allocations,
        now=now,
        lost_node_grace_seconds=lost_node_grace_seconds,
        move=limits.move if limits is not None else None,
        port_range=port_range,
    )
    result.requests = requests_by_deployment
    result.unplaced.update(admission.refused)
    result.evicted.update(admission.evicted)
    result.quota_room = admission.room
    return result


def _with_host_files(
    md: ModelDeployment,
    requests: list[ReplicaRequest],
    nodes: list[NodeInfo],
    reports: Mapping[str, Mapping[str, hostfiles.PathCheck]],
    seen: dict[Any, hostfiles.NodeFiles],
) -> list[ReplicaRequest]:
    """The nodes each request may not use because of its host files; deployments of the same
    selector and paths share one look at the nodes (O(distinct models x nodes) a pass)."""
    key = (tuple(sorted(md.spec.nodeSelector.items())), hostfiles.needed_paths(md))
    found = seen.get(key)
    if found is None:
        found = seen[key] = hostfiles.node_files(md, nodes, reports)
    if not found.exclude:
        return requests
    update = {
        "exclude_nodes": dict(found.exclude),
        "evict_nodes": dict(found.evict),
        "exclude_pending": found.pending,
        "exclude_key": tuple(sorted(found.exclude)),
    }
    return [r.model_copy(update=update) for r in requests]


def place(
    nodes: list[NodeInfo],
    requests: list[ReplicaRequest],
    allocations: Sequence[Allocation],
    *,
    now: datetime,
    lost_node_grace_seconds: float,
    move: Mapping[ReplicaKey, str] | None = None,
    port_range: gang.PortRange | None = None,
) -> PlacementResult:
    """Keep every valid allocation, then place what is missing, best fit, in request order.
    ``move``: replicas that must leave their allocation (-> why) although it is valid."""
    moving = move or {}
    result = PlacementResult(port_range=port_range or gang.PortRange())
    result._ordered = sorted(nodes, key=lambda n: (n.hostname, n.id))
    result._nodes.update({node.id: node for node in nodes})
    result.taken.update({node.id: set() for node in nodes})
    result.free.update({node.id: set(node.usable_npus) for node in nodes})
    requests_by_key = {request.key: request for request in requests}
    groups: dict[ReplicaKey, list[ReplicaRequest]] = {}
    for member in requests:
        if member.group_key is not None:
            groups.setdefault(member.group_key, []).append(member)
    for allocation in allocations:
        if allocation.port_block is None:
            continue
        # Taken while the service runs, wanted or not, like its NPUs; and while a removed
        # member's task still stops (snapshot.stopping).
        result.port_blocks.setdefault(allocation.node_id, set()).add(allocation.port_block)
        if not allocation.foreign and not allocation.stopping:
            result._block_of[allocation.key] = allocation.port_block
    for allocation in _claim_order(allocations, requests):
        if allocation.foreign:
            _hold_foreign(result, allocation)
            continue
        if allocation.stopping:
            _hold_releasing(result, allocation)
            continue
        request = requests_by_key.get(allocation.key)
        _keep_or_move(result, allocation, request, moving, now, lost_node_grace_seconds)
    for request in requests:
        if request.group_key is not None:
            if request.member == 0:  # a group is placed at its leader's place in the order
                _place_group(groups[request.group_key], result)
            continue
        if request.key in result.assignments:
            continue
        assignment = _best_fit(request, result)
        if isinstance(assignment, Unplaced):
            if assignment.reason == "InsufficientNPUs" and result.releasing:
                assignment = _await_release(request, result) or assignment
            result.unplaced[request.key] = assignment
            continue
        result.assign(assignment)
        result.hold(
            assignment.node_id,
            assignment.npus,
            request.deployment,
            f"{request.deployment}[{request.slot}]",
        )
    return result


def _claim_order(
    allocations: Sequence[Allocation], requests: list[ReplicaRequest]
) -> list[Allocation]:
    """Desired replicas claim first (by priority), then allocations nobody wants any more:
    those still run until removed, so their NPUs stay taken in this pass; then the tasks of
    removed services that are still stopping (``releasing``). Foreign claims
    come last: a replica that already runs keeps its NPUs when a foreign service appears
    on them (both keep running, the conflict is reported), and no new replica is ever
    placed on them."""
    priority = {request.key: index for index, request in enumerate(requests)}
    return sorted(
        allocations,
        key=lambda a: (
            a.foreign,
            a.stopping,
            priority.get(a.key, len(priority)),
            a.deployment,
            a.slot,
            a.service,
        ),
    )


def _overlap(result: PlacementResult, allocation: Allocation) -> list[int]:
    taken = result.taken.get(allocation.node_id, ())
    return sorted(npu for npu in allocation.npus if npu in taken)


def _hold_foreign(result: PlacementResult, allocation: Allocation) -> None:
    """NPUs a service npuswarm does not own holds: taken, whoever else claims them."""
    held = result.foreign.setdefault(allocation.node_id, {})
    held.update(dict.fromkeys(allocation.npus, allocation.service))
    overlap = _overlap(result, allocation)
    if not overlap:
        result.hold(allocation.node_id, allocation.npus, "", allocation.service)
        return
    owner, other = result._holders[(allocation.node_id, overlap[0])]
    if owner:  # two foreign services overlapping is not npuswarm's to report
        result.conflicts.append(
            (
                owner,
                f"service {allocation.service}, not managed by npuswarm, also uses "
                f"NPUs {overlap} on node {allocation.node_id} held by {other}",
            )
        )
    result.hold(allocation.node_id, allocation.npus - result.taken[allocation.node_id], "", "")


def _hold_releasing(result: PlacementResult, allocation: Allocation) -> None:
    """NPUs a stopping task still holds: nobody gets them until it has exited."""
    held = allocation.npus - result.taken.get(allocation.node_id, set())
    if not held:
        return
    result.releasing.setdefault(allocation.node_id, set()).update(held)
    result.hold(allocation.node_id, frozenset(held), "", allocation.service)


def _keep_or_move(
    result: PlacementResult,
    allocation: Allocation,
    request: ReplicaRequest | None,
    moving: Mapping[ReplicaKey, str],
    now: datetime,
    grace: float,
) -> None:
    """One of npuswarm's allocations: kept when its replica is still wanted and may stay;
    its NPUs stay taken while its service runs (unless its node is lost); one that overlaps
    an earlier claim is a conflict, reported and never double-booked."""
    overlap = _overlap(result, allocation)
    if overlap:
        _, other = result._holders[(allocation.node_id, overlap[0])]
        result.conflicts.append(
            (
                allocation.deployment,
                f"service {allocation.service} claims NPUs {overlap} on node "
                f"{allocation.node_id} already claimed by {other}",
            )
        )
        if request is not None and allocation.key not in result.assignments:
            result.moved[allocation.key] = f"NPUs {overlap} are also claimed by {other}"
        return
    if request is not None and allocation.key not in result.assignments:
        nodes_by_id = result._nodes
        problem = moving.get(allocation.key) or _keep_problem(
            allocation, request, nodes_by_id, now, grace, result
        )
        if problem is None:
            result.assign(allocation.kept())
        else:
            result.moved[allocation.key] = problem
            if _node_lost(allocation.node_id, nodes_by_id, now, grace):
                # A lost node's NPUs are unreachable anyway; not claiming them lets the
                # replica's service be re-pointed without waiting for the node.
                return
    result.hold(allocation.node_id, allocation.npus, allocation.deployment, allocation.service)


def spare_assignment(result: PlacementResult, request: ReplicaRequest) -> Assignment | None:
    """Place one extra copy of a replica on NPUs nobody was given (a surge during updates).

    The claim is recorded in ``result`` so two surges of one pass never share NPUs.
    """
    if request.group is not None:
        return None  # one member alone on spare NPUs is no use: a group is replaced whole
    assignment = _best_fit(request, result)
    if isinstance(assignment, Unplaced):
        return None
    result.claim(assignment.node_id, assignment.npus)
    return assignment


def _await_release(request: ReplicaRequest, result: PlacementResult) -> Unplaced | None:
    """A replica that fits a node once its stopping tasks have exited waits for that node:
    the free NPUs it will need there are held for it, so a replica later in the order (lower
    priority, younger) cannot take them meanwhile and keep it out for good."""
    for node_id in sorted(result.releasing, key=lambda n: (result._nodes[n].hostname, n)):
        node = result._nodes[node_id]
        used = result.nodes_used.get(request.deployment, set())
        if (
            not node.accepts_new_replicas
            or not node.matches(request.node_selector)
            or (request.pinned_node is not None and request.pinned_node != node_id)
            or ((request.one_per_node or request.npu_ids is not None) and node_id in used)
        ):
            continue
        free = result.free.get(node_id, set())
        releasing = result.releasing[node_id] - result.awaited.get(node_id, set())
        room = frozenset(free | releasing)
        if request.npu_ids is not None:
            fits = request.npu_ids <= room and topology.is_valid_set(request.npu_ids, node.topology)
            chosen = request.npu_ids if fits else None
        else:
            chosen = topology.choose(room, request.npus, node.topology)
        if chosen is None or not chosen & releasing:
            continue
        result.claim(node_id, chosen & frozenset(free))
        result.awaited.setdefault(node_id, set()).update(chosen & releasing)
        return _unplaced(
            request,
            "NPUsReleasing",
            f"waiting for NPUs {sorted(chosen & releasing)} on {node.hostname}: replicas that "
            "held them are still stopping (their stop grace)",
        )
    return None


def _node_lost(node_id: str, nodes_by_id: dict[str, NodeInfo], now: datetime, grace: float) -> bool:
    node = nodes_by_id.get(node_id)
    return node is None or node.is_lost(now, grace)


def _keep_problem(
    allocation: Allocation,
    request: ReplicaRequest,
    nodes_by_id: dict[str, NodeInfo],
    now: datetime,
    grace: float,
    result: PlacementResult,
) -> str | None:
    """None when the replica may stay where it is, else why it must move."""
    node = nodes_by_id.get(allocation.node_id)
    if node is None:
        return f"node {allocation.node_id} left the swarm"
    if request.pinned_node is None and node.is_lost(now, grace):
        return f"node {node.hostname} is {node.state} for longer than {grace:g}s"
    if node.drained:
        return f"node {node.hostname} is drained"
    if node.id in request.evict_nodes:
        return request.evict_nodes[node.id]
    if not node.matches(request.node_selector):
        return f"node {node.hostname} no longer matches the nodeSelector"
    if request.pinned_node is not None and request.pinned_node != node.id:
        return "replica is pinned to another node"
    if len(allocation.npus) != request.npus:
        return f"holds {len(allocation.npus)} NPUs, needs {request.npus}"
    if request.npu_ids is not None and allocation.npus != request.npu_ids:
        return f"holds NPUs {sorted(allocation.npus)}, pinned to {sorted(request.npu_ids)}"
    withheld = sorted(npu for npu in allocation.npus if npu in node.withheld)
    if withheld:
        return "; ".join(node.withheld[npu] for npu in withheld)
    if not allocation.npus <= node.usable_npus:
        return f"NPUs {sorted(allocation.npus - node.usable_npus)} are reserved or absent"
    if not topology.is_valid_set(allocation.npus, node.topology):
        return f"NPUs {sorted(allocation.npus)} break the {node.topology} rule of the node"
    if request.one_per_node and node.id in result.nodes_used.get(request.deployment, ()):
        return f"another replica already publishes the port on {node.hostname}"
    return None


def _best_fit(request: ReplicaRequest, result: PlacementResult) -> Assignment | Unplaced:
    """The node this replica fills most (least slack), the first by hostname among equals."""
    key: CandidateKey = (
        tuple(sorted(request.node_selector.items())),
        request.pinned_node,
        request.exclude_key,
    )
    matching = _candidates(key, request, result)
    if not matching:
        files = _host_files_reason(request, result)
        if files is not None:
            return files
        return _unplaced(
            request,
            "NoMatchingNode",
            f"no node with NPUs matches nodeSelector {request.node_selector or '{}'}",
        )
    if request.one_per_node or request.npu_ids is not None or request.avoid_nodes:
        used = result.nodes_used.get(request.deployment, set())
        available = [n for n in matching if n.accepts_new_replicas and n.id not in used]
        preferred = [n for n in available if n.id not in request.avoid_nodes]
        found = _scan(request, preferred, result) if preferred else None
        if found is None and request.avoid_nodes:
            # No other node fits: other NPUs of an avoided node. Never the ones the replica
            # held: its service still claims them while it moves.
            found = _scan(request, available, result)
    else:
        available = result._accepting[key]
        found = _from_buckets(request, key, result)
    blocked, validation = _blocked_of(key, matching, result)
    if not available:
        files = _host_files_reason(request, result)
        if files is not None:
            return files
        if blocked:
            return _unplaced(
                request,
                validation,
                f"{len(matching)} matching node(s) take no new replicas: {blocked}",
            )
        return _unplaced(
            request,
            "NodesUnavailable",
            f"{len(matching)} matching node(s) are down, drained, paused"
            + (" or already run a replica publishing the port" if request.one_per_node else ""),
        )
    if found is None and request.npu_ids is not None:
        return _unplaced(
            request,
            "InsufficientNPUs",
            f"pinned NPUs {sorted(request.npu_ids)} are not free on any matching node without a "
            "replica of this deployment",
        )
    if found is None:
        most_free = max(len(result.free[n.id]) for n in available)
        short = (
            f"needs {request.npus} free NPUs on one node; the most free on a matching "
            f"node is {most_free}"
        )
        files = _host_files_reason(request, result)
        if files is not None:
            # Nodes without its files would perhaps have had room: that is what to fix.
            return _unplaced(request, files.reason, f"{short}; not used: {files.message}")
        # Nodes that failed validation would perhaps have had room: that is what to fix.
        return _unplaced(
            request,
            validation if blocked else "InsufficientNPUs",
            short + (f"; not used: {blocked}" if blocked else ""),
        )
    node, chosen = found
    return Assignment(
        deployment=request.deployment,
        slot=request.slot,
        node_id=node.id,
        npus=chosen,
        kept=False,
    )


def _place_group(members: list[ReplicaRequest], result: PlacementResult) -> None:
    """Every member of one group has a node after this, or none has (core/gang.py): kept
    members stay, the missing ones get distinct nodes; when they cannot, the kept ones are
    let go too, so a group that waits holds no NPUs once its services are removed."""
    missing = [m for m in members if m.key not in result.assignments]
    if not missing:
        _seat_group(members, result)
        return
    leader = members[0]
    kept = [result.assignments[m.key] for m in members if m.key in result.assignments]
    excluded = dict.fromkeys((a.node_id for a in kept), "runs a member of this group already")
    if leader.one_per_node:
        for node_id in result.nodes_used.get(leader.deployment, ()):
            excluded.setdefault(node_id, "another replica of the deployment holds its NPUs")
    key: CandidateKey = (tuple(sorted(leader.node_selector.items())), None, leader.exclude_key)
    matching = _candidates(key, leader, result)
    domain = None
    if leader.topology_key is not None and kept:
        domain = result._nodes[kept[0].node_id].labels.get(leader.topology_key)
    ask = gang.GangAsk(
        members=leader.members,
        missing=len(missing),
        npus=leader.npus,
        npu_ids=leader.npu_ids,
        topology_key=leader.topology_key,
        domain=domain,
        avoid=frozenset().union(*(m.avoid_nodes for m in members)),
    )
    outcome = gang.choose(ask, matching, result.free, excluded)
    if isinstance(outcome, gang.GangShortfall):
        reason: UnplacedReason = "InsufficientNPUs"
        if not matching:
            reason = "NoMatchingNode"
        elif _blocked_nodes(matching):
            reason = _validation_reason(matching)
        message = f"group {leader.group} of {leader.members} nodes: {outcome.message}"
        _let_group_go(members, result, reason, message, outcome.message)
        return
    for member, seat in zip(missing, outcome.seats, strict=True):
        result.assign(
            Assignment(
                deployment=member.deployment,
                slot=member.slot,
                node_id=seat.node.id,
                npus=seat.npus,
                kept=False,
            )
        )
        result.hold(
            seat.node.id, seat.npus, member.deployment, f"{member.deployment}[{member.slot}]"
        )
    if outcome.preference_unmet and leader.group_key is not None:
        result.group_notes[leader.group_key] = outcome.preference_unmet
    _seat_group(members, result)


def _let_group_go(
    members: list[ReplicaRequest],
    result: PlacementResult,
    reason: UnplacedReason,
    message: str,
    why: str,
) -> None:
    for member in members:
        if member.key in result.assignments:
            result.unassign(member.key)
            result.moved[member.key] = f"its group cannot be placed whole: {why}"
        result.unplaced[member.key] = _unplaced(member, reason, message)


def _seat_group(members: list[ReplicaRequest], result: PlacementResult) -> None:
    """Every member placed: give the group its port block (kept while every member's node
    has it; else the lowest block free on all of them) and each member its seat."""
    placed = [result.assignments[m.key] for m in members]
    node_ids = [a.node_id for a in placed]
    recorded = {result._block_of.get(m.key) for m in members}
    block = next(iter(recorded)) if len(recorded) == 1 else None
    if block is not None:
        # Its own services claimed it on their nodes; any other claim there is another group's.
        others = [n for n, a in zip(node_ids, placed, strict=True) if not a.kept]
        if any(block in result.port_blocks.get(n, ()) for n in others):
            block = None
    if block is None:
        block = gang.free_block(result.port_blocks, node_ids, result.port_range)
    if block is None:
        leader = members[0]
        span = result.port_range
        why = (
            f"no free host port block on nodes {sorted(node_ids)} "
            f"({span.blocks} blocks in {span.first}-{span.last})"
        )
        _let_group_go(members, result, "InsufficientNPUs", f"group {leader.group}: {why}", why)
        return
    for node_id in node_ids:
        result.port_blocks.setdefault(node_id, set()).add(block)
    ports = gang.GroupPorts.of_block(block, result.port_range)
    leader_node = result._nodes.get(placed[0].node_id)
    for member, assignment in zip(members, placed, strict=True):
        node = result._nodes.get(assignment.node_id)
        seat = GroupSeat(
            member=member.member,
            members=member.members,
            leader_address=leader_node.addr if leader_node else "",
            address=node.addr if node else "",
            interface=node.labels.get(labels.NODE_HCCL_INTERFACE, "") if node else "",
            ports=ports,
        )
        result.assign(assignment.model_copy(update={"group": seat}))


def _host_files_reason(request: ReplicaRequest, result: PlacementResult) -> Unplaced | None:
    """Every matching node that would take the replica lacks its host files, has not
    reported them yet, or refuses them: say so per node."""
    found = (result._nodes.get(node_id) for node_id in request.exclude_key)
    excluded = [n for n in found if n is not None and n.accepts_new_replicas]
    if not excluded:
        return None
    reason: UnplacedReason = hostfiles.MISSING
    if all(n.id in request.exclude_pending for n in excluded):
        reason = "NodeValidationPending"
    shown = [request.exclude_nodes[n.id] for n in excluded[:MAX_NAMED_BLOCKED]]
    more = len(excluded) - len(shown)
    return _unplaced(
        request,
        reason,
        "; ".join(shown) + (f"; and {more} more node(s)" if more > 0 else ""),
    )


def _validation_reason(nodes: list[NodeInfo]) -> UnplacedReason:
    """Failed when a blocked node failed its probe; pending when they all still wait for
    their first one (a few seconds: not a fault)."""
    if any(n.blocked and not n.validating for n in nodes):
        return "NodeValidationFailed"
    return "NodeValidationPending"


def _blocked_of(
    key: CandidateKey, matching: list[NodeInfo], result: PlacementResult
) -> tuple[str, UnplacedReason]:
    """_blocked_nodes and _validation_reason of one candidate list, once per placement: per
    replica they were replicas x nodes (2 million steps at 1,000 x 2,000)."""
    found = result._blocked.get(key)
    if found is None:
        found = result._blocked[key] = (_blocked_nodes(matching), _validation_reason(matching))
    return found


def _blocked_nodes(nodes: list[NodeInfo]) -> str:
    """Why nodes that would otherwise take replicas do not (failed node validation), so the
    status says which node and which check instead of a bare count."""
    reasons = [n.blocked for n in nodes if n.blocked]
    shown = "; ".join(reasons[:MAX_NAMED_BLOCKED])
    more = len(reasons) - MAX_NAMED_BLOCKED
    return shown + (f"; and {more} more node(s)" if more > 0 else "")


def _candidates(
    key: CandidateKey, request: ReplicaRequest, result: PlacementResult
) -> list[NodeInfo]:
    """Nodes with NPUs that match a request's selector and pin and that its host files do
    not rule out, computed once per pass and key."""
    matching = result._candidates.get(key)
    if matching is None:
        excluded = request.exclude_nodes
        matching = [
            node
            for node in result._ordered
            if node.usable_npus
            and node.matches(request.node_selector)
            and (request.pinned_node is None or node.id == request.pinned_node)
            and node.id not in excluded
        ]
        result._candidates[key] = matching
        result._accepting[key] = [n for n in matching if n.accepts_new_replicas]
        buckets: dict[int, list[tuple[str, str]]] = {}
        for node in result._accepting[key]:
            free = len(result.free[node.id])
            heapq.heappush(buckets.setdefault(free, []), (node.hostname, node.id))
            result._keys_of_node.setdefault(node.id, []).append(key)
        result._buckets[key] = buckets
    return matching


def _from_buckets(
    request: ReplicaRequest, key: CandidateKey, result: PlacementResult
) -> tuple[NodeInfo, frozenset[int]] | None:
    buckets = result._buckets[key]
    for count in sorted(c for c in buckets if c >= request.npus):
        heap = buckets[count]
        passed_over: list[tuple[str, str]] = []
        found = None
        while heap:
            entry = heap[0]
            node = result._nodes[entry[1]]
            free = result.free[node.id]
            if len(free) != count:
                heapq.heappop(heap)  # stale: the node has moved to a fuller bucket
                continue
            chosen = topology.choose(frozenset(free), request.npus, node.topology)
            if chosen is not None:
                found = (node, chosen)
                break
            passed_over.append(heapq.heappop(heap))  # enough NPUs, but not in one ring
        for entry in passed_over:
            heapq.heappush(heap, entry)
        if found is not None:
            return found
    return None


def _scan(
    request: ReplicaRequest, available: list[NodeInfo], result: PlacementResult
) -> tuple[NodeInfo, frozenset[int]] | None:
    """Linear best fit, for requests whose allowed nodes change with each replica placed
    (one replica per node) or whose NPUs are fixed."""
    best: tuple[int, NodeInfo, frozenset[int]] | None = None
    for node in available:
        free = result.free[node.id]
        slack = len(free) - request.npus
        if slack < 0 or (best is not None and slack >= best[0]):
            continue
        if request.npu_ids is not None:
            pinned = request.npu_ids
            fits = pinned <= free and topology.is_valid_set(pinned, node.topology)
            chosen = pinned if fits else None
        else:
            chosen = topology.choose(frozenset(free), request.npus, node.topology)
        if chosen is not None:
            best = (slack, node, chosen)
            if slack == 0:
                break
    return (best[1], best[2]) if best is not None else None


def _unplaced(request: ReplicaRequest, reason: UnplacedReason, message: str) -> Unplaced:
    return Unplaced(
        deployment=request.deployment, slot=request.slot, reason=reason, message=message
    )
