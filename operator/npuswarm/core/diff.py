"""From desired ModelDeployments and a Swarm snapshot to the writes that converge Swarm. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.labels import SPEC_HASH
from npuswarm.core import hostpolicy
from npuswarm.core.nodes import NodeInfo, NodeLimits
from npuswarm.core.placement import (
    PlacementResult,
    ReplicaRequest,
    place,
    spare_assignment,
)
from npuswarm.core.render import Renderer, free_service_name, service_name
from npuswarm.core.snapshot import ObservedService, SwarmSnapshot

ActionKind = Literal["create", "update", "remove"]
DriftKind = Literal["service_recreated", "service_updated", "replica_replaced"]


def priority(md: ModelDeployment, position: int) -> tuple[str, int, str, str]:
    """Older deployments are placed first, so a newcomer can never take NPUs from them.

    Objects not yet created (files given to `npuswarm plan`) come last, in the given order.
    """
    created = md.metadata.creationTimestamp
    return (created or "~", 0 if created else position, md.metadata.namespace, md.metadata.name)


def replica_requests(md: ModelDeployment, nodes: Iterable[NodeInfo]) -> list[ReplicaRequest]:
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
    if spec.mode == "Replicated":
        return [ReplicaRequest(slot=str(index), **common) for index in range(spec.replicas)]
    # PerNode: every matching node with NPUs, including one that is down right now: its
    # replica waits for it rather than being dropped and recreated on every flap.
    return [
        ReplicaRequest(slot=node.id, pinned_node=node.id, **common)
        for node in sorted(nodes, key=lambda n: n.id)
        if node.matches(spec.nodeSelector) and node.usable_npus and not node.drained
    ]


def place_all(
    deployments: list[ModelDeployment],
    snapshot: SwarmSnapshot,
    *,
    now: datetime,
    lost_node_grace_seconds: float,
    limits: NodeLimits | None = None,
) -> tuple[PlacementResult, dict[str, list[ReplicaRequest]]]:
    """One placement over every deployment, so each reconcile sees the same global answer.

    ``limits`` (node validation and NPU health): nodes that get no new replica (what runs
    there stays) and NPUs given to nobody (a replica holding one moves)."""
    requests_by_deployment: dict[str, list[ReplicaRequest]] = {}
    ordered: list[ReplicaRequest] = []
    nodes = limits.apply(snapshot.nodes) if limits is not None else snapshot.nodes
    ranked = sorted(enumerate(deployments), key=lambda item: priority(item[1], item[0]))
    avoid = limits.avoid if limits is not None else {}
    for _, md in ranked:
        requests = replica_requests(md, nodes)
        if avoid:
            requests = [
                r.model_copy(update={"avoid_nodes": avoid[r.key]}) if r.key in avoid else r
                for r in requests
            ]
        requests_by_deployment[md.key] = requests
        ordered.extend(requests)
    result = place(
        nodes,
        ordered,
        snapshot.allocations(),
        now=now,
        lost_node_grace_seconds=lost_node_grace_seconds,
        move=limits.move if limits is not None else None,
    )
    return result, requests_by_deployment


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    slot: str
    service_name: str
    reason: str
    service_id: str | None = None
    version: int | None = None
    spec: dict[str, Any] | None = None
    drift: DriftKind | None = None
    owner: str = ""  # the deployment (namespace/name) the service belongs to


@dataclass
class Applied:
    """What the apply step did for one deployment: the writes made, and Swarm's refusals."""

    done: list[Action] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # slot -> error


@dataclass
class DeploymentPlan:
    deployment: str
    desired: dict[str, dict[str, Any]]  # slot -> rendered service spec
    actions: list[Action] = field(default_factory=list)
    # Updates held back by maxUnavailable; they go out on a later reconcile.
    deferred: list[Action] = field(default_factory=list)
    requests: list[ReplicaRequest] = field(default_factory=list)


@dataclass
class PassPlan:
    """Every deployment's plan from one snapshot and one placement of them all."""

    snapshot: SwarmSnapshot
    placement: PlacementResult
    plans: dict[str, DeploymentPlan]  # by deployment key, in priority order
    # Removals of services whose owner no longer exists.
    orphans: list[Action] = field(default_factory=list)
    # Deployments the operator's policy refuses once Swarm is seen: key -> why.
    refused: dict[str, str] = field(default_factory=dict)
    # Overlay networks a deployment names that do not exist yet: created before any service.
    networks_to_create: list[str] = field(default_factory=list)
    # npuswarm's own networks nothing of npuswarm's uses any more: (name, id), removed last.
    networks_to_remove: list[tuple[str, str]] = field(default_factory=list)
    # Owners whose services look orphaned but whose absence no complete read confirmed (the
    # API server down, a partial page): kept, and asked again soon rather than at the resync.
    unconfirmed_orphans: frozenset[str] = frozenset()
    # How long a replica waits on a node that is not ready before it is placed elsewhere.
    lost_node_grace_seconds: float = 0.0
    # What node checks kept out of this placement (for the NPU gauges).
    limits: NodeLimits | None = None

    @property
    def actions(self) -> list[Action]:
        return [a for plan in self.plans.values() for a in plan.actions] + self.orphans


SURGE_SUFFIX = "-surge"


def plan_deployment(
    md: ModelDeployment,
    requests: list[ReplicaRequest],
    placement: PlacementResult,
    snapshot: SwarmSnapshot,
    known_services: frozenset[str] = frozenset(),
    renderer: Renderer | None = None,
) -> DeploymentPlan:
    """Diff the rendered services of one deployment against the owned services found in Swarm.

    ``known_services`` are names this deployment's status last reported: one of them missing
    was removed by hand (drift), not merely never created. Surge copies take spare NPUs out
    of ``placement`` so that two of them never share NPUs.
    """
    renderer = renderer or Renderer()
    assignments = {a.slot: a for a in placement.for_deployment(md.key)}
    requests_by_slot = {r.slot: r for r in requests}
    by_slot: dict[str, list[ObservedService]] = {}
    for service in snapshot.services_of(md.key):
        by_slot.setdefault(service.slot, []).append(service)

    plan = DeploymentPlan(deployment=md.key, desired={}, requests=requests)
    updates: list[tuple[Action, bool]] = []  # (action, replica currently ready)
    for slot, assignment in sorted(assignments.items()):
        services = sorted(by_slot.get(slot, []), key=lambda s: s.name)
        if len(services) > 1 and _settle_surge(md, slot, services, plan, renderer):
            continue
        primary = next((s for s in services if s.name == service_name(md, slot)), None)
        if primary is None and services:
            primary = services[0]
        name = primary.name if primary else free_service_name(md, slot, snapshot.names())
        spec = renderer.render(md, assignment, name=name)
        plan.desired[slot] = spec
        for extra in services:
            if extra is not primary:
                plan.actions.append(_remove(extra, "duplicate service for the replica"))
        if primary is None:
            recreated = spec["Name"] in known_services
            plan.actions.append(
                Action(
                    kind="create",
                    slot=slot,
                    service_name=spec["Name"],
                    spec=spec,
                    reason="service removed outside npuswarm" if recreated else "new replica",
                    drift="service_recreated" if recreated else None,
                )
            )
            continue
        if renderer.matches(primary.id, primary.version, primary.spec, spec):
            continue
        moved = placement.moved.get((md.key, slot))
        drift: DriftKind | None
        if moved is not None:
            reason, drift = f"re-placed: {moved}", "replica_replaced"
        elif primary.spec_hash == spec["Labels"].get(SPEC_HASH):
            reason, drift = "service edited outside npuswarm", "service_updated"
        else:
            reason, drift = "spec changed", None
        action = Action(
            kind="update",
            slot=slot,
            service_name=primary.name,
            service_id=primary.id,
            version=primary.version,
            spec=spec,
            reason=reason,
            drift=drift,
        )
        updates.append((action, primary.running_current_spec and moved is None))

    for slot, services in sorted(by_slot.items()):
        if slot not in requests_by_slot:
            plan.actions.extend(_remove(s, "replica no longer wanted") for s in services)

    updates = _surge(md, updates, requests_by_slot, placement, by_slot, plan, renderer)
    _limit_unavailable(plan, updates, md, by_slot)
    plan.actions = [replace(a, owner=md.key) for a in plan.actions]
    plan.deferred = [replace(a, owner=md.key) for a in plan.deferred]
    return plan


def plan_pass(
    deployments: list[ModelDeployment],
    snapshot: SwarmSnapshot,
    *,
    now: datetime,
    lost_node_grace_seconds: float,
    known_services: dict[str, frozenset[str]] | None = None,
    orphan_owners: frozenset[str] = frozenset(),
    renderer: Renderer | None = None,
    limits: NodeLimits | None = None,
) -> PassPlan:
    """One placement of every deployment, then each one's diff; writes nothing.

    ``known_services`` per deployment: the names its status last reported (see
    plan_deployment). ``orphan_owners``: deployments known to be gone, whose services are
    removed; the caller decides that only from a complete read of the ModelDeployments.
    """
    known = known_services or {}
    renderer = renderer or Renderer()
    renderer.new_pass()
    # Read against what Swarm has: refused deployments ask for nothing and change nothing.
    refused = {
        md.key: "; ".join(found)
        for md in deployments
        if (found := hostpolicy.network_violations(md, snapshot.networks, snapshot.network_ids))
    }
    deployments = [md for md in deployments if md.key not in refused]
    placement, requests = place_all(
        deployments,
        snapshot,
        now=now,
        lost_node_grace_seconds=lost_node_grace_seconds,
        limits=limits,
    )
    plans = {
        key: plan_deployment(
            md, requests[key], placement, snapshot, known.get(key, frozenset()), renderer
        )
        for key, md in ((md.key, md) for md in _by_priority(deployments))
    }
    orphans = [
        _remove(service, f"owner ModelDeployment {owner} no longer exists")
        for owner in sorted(orphan_owners - plans.keys())
        for service in snapshot.services_of(owner)
    ]
    wanted = {md.spec.network.name for md in deployments if md.spec.network is not None}
    removed = {
        a.service_name for plan in plans.values() for a in plan.actions if a.kind == "remove"
    }
    removed |= {a.service_name for a in orphans}
    in_use = {
        network.get("Target")
        # A ModelGateway's service keeps its network too (gateway/service.py).
        for service in [*snapshot.services, *snapshot.gateway_services]
        if service.name not in removed
        for network in (service.spec.get("TaskTemplate") or {}).get("Networks") or []
    }
    return PassPlan(
        snapshot=snapshot,
        placement=placement,
        plans=plans,
        orphans=orphans,
        refused=refused,
        lost_node_grace_seconds=lost_node_grace_seconds,
        networks_to_create=sorted(wanted - snapshot.networks.keys()),
        networks_to_remove=sorted(
            (name, network_id)
            for name, network_id in snapshot.own_networks.items()
            if name not in wanted and name not in in_use
        ),
        limits=limits,
    )


def plan_many(
    deployments: list[ModelDeployment],
    snapshot: SwarmSnapshot,
    *,
    now: datetime,
    lost_node_grace_seconds: float,
) -> tuple[PlacementResult, dict[str, tuple[list[ReplicaRequest], DeploymentPlan]]]:
    """plan_pass for the files given to `npuswarm plan` or `export-stack`, by deployment."""
    whole = plan_pass(
        deployments, snapshot, now=now, lost_node_grace_seconds=lost_node_grace_seconds
    )
    return whole.placement, {key: (p.requests, p) for key, p in whole.plans.items()}


def _by_priority(deployments: list[ModelDeployment]) -> list[ModelDeployment]:
    ranked = sorted(enumerate(deployments), key=lambda item: priority(item[1], item[0]))
    return [md for _, md in ranked]


def _settle_surge(
    md: ModelDeployment,
    slot: str,
    services: list[ObservedService],
    plan: DeploymentPlan,
    renderer: Renderer,
) -> bool:
    """A replica with an old and a surge copy: drop the old one once the new one is Ready.

    Returns False when no copy is up to date, leaving the slot to the ordinary diff.
    """
    current = [s for s in services if _up_to_date(md, s, renderer)]
    if not current:
        return False
    newest = current[0]
    allocation = newest.allocation()
    assert allocation is not None  # _up_to_date renders from the allocation
    plan.desired[slot] = renderer.render(md, allocation.kept(), name=newest.name)
    if newest.running_current_spec:
        plan.actions.extend(
            _remove(s, f"surge copy {newest.name} is ready") for s in services if s is not newest
        )
    return True


def _up_to_date(md: ModelDeployment, service: ObservedService, renderer: Renderer) -> bool:
    allocation = service.allocation()
    if allocation is None:
        return False
    rendered = renderer.render(md, allocation.kept(), name=service.name)
    return renderer.matches(service.id, service.version, service.spec, rendered)


def _surge(
    md: ModelDeployment,
    updates: list[tuple[Action, bool]],
    requests_by_slot: dict[str, ReplicaRequest],
    placement: PlacementResult,
    by_slot: dict[str, list[ObservedService]],
    plan: DeploymentPlan,
    renderer: Renderer,
) -> list[tuple[Action, bool]]:
    """Turn updates of ready replicas into surge copies while spare NPUs and maxSurge allow.

    Returns the updates still to be done in place.
    """
    budget = md.spec.updateStrategy.maxSurge - sum(1 for s in by_slot.values() if len(s) > 1)
    remaining: list[tuple[Action, bool]] = []
    for action, ready in updates:
        request = requests_by_slot.get(action.slot)
        spare = None
        if ready and budget > 0 and action.drift is None and request is not None:
            spare = spare_assignment(placement, request)
        if spare is None:
            remaining.append((action, ready))
            continue
        base = service_name(md, action.slot)
        name = base + SURGE_SUFFIX if action.service_name == base else base
        plan.actions.append(
            Action(
                kind="create",
                slot=action.slot,
                service_name=name,
                spec=renderer.render(md, spare, name=name),
                reason=f"spec changed: surge copy on spare NPUs before {action.service_name} stops",
            )
        )
        budget -= 1
    return remaining


def _remove(service: ObservedService, reason: str) -> Action:
    return Action(
        kind="remove",
        slot=service.slot,
        service_name=service.name,
        service_id=service.id,
        reason=reason,
        owner=service.deployment,
    )


def _limit_unavailable(
    plan: DeploymentPlan,
    updates: list[tuple[Action, bool]],
    md: ModelDeployment,
    by_slot: dict[str, list[ObservedService]],
) -> None:
    """Roll replica by replica: restarting a ready replica is allowed only while fewer than
    maxUnavailable replicas are down. Replicas that are down anyway are updated at once."""
    not_ready = sum(
        1 for slot in plan.desired if not any(s.running_current_spec for s in by_slot.get(slot, []))
    )
    budget = max(0, md.spec.updateStrategy.maxUnavailable - not_ready)
    for action, ready in updates:
        if not ready:
            plan.actions.append(action)
        elif budget > 0:
            plan.actions.append(action)
            budget -= 1
        else:
            plan.deferred.append(action)
