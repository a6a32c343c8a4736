"""The diff: from rendered specs and a Swarm snapshot to the writes that converge Swarm. Pure.

The data a pass hands from step to step (PassPlan, with one DeploymentPlan per deployment) and
steps 4 to 7 of core/pipeline.py: the diff of each deployment's rendered services against
what Swarm runs, the surge copies on spare NPUs, the rolling-update limit, and the orphans
and networks of the whole pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from npuswarm.api.deployment import ModelDeployment
from npuswarm.api.labels import SPEC_HASH
from npuswarm.core.groups import GroupPlan
from npuswarm.core.nodes import NodeLimits
from npuswarm.core.placement import PlacementResult, ReplicaRequest, spare_assignment
from npuswarm.core.preemption import Preemption
from npuswarm.core.render import Renderer, SlotSpec, service_name, swarm_name
from npuswarm.core.snapshot import ObservedService, SwarmSnapshot

ActionKind = Literal["create", "update", "remove"]
DriftKind = Literal["service_recreated", "service_updated", "replica_replaced"]
SURGE = "surge"


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


@dataclass(frozen=True)
class Update:
    """An update the diff found (step 4), before the surge and the rollout limit decide how."""

    action: Action
    ready: bool  # the replica runs its current spec now: updating it takes it down


@dataclass
class DeploymentPlan:
    """One deployment as it goes down the pipeline; each step fills its part."""

    md: ModelDeployment
    requests: list[ReplicaRequest]  # step 2, in slot order
    # Its services in Swarm, by replica slot (wanted or not).
    by_slot: dict[str, list[ObservedService]]
    slots: dict[str, SlotSpec] = field(default_factory=dict)  # step 3, in slot order
    desired: dict[str, dict[str, Any]] = field(default_factory=dict)  # slot -> spec (step 4)
    actions: list[Action] = field(default_factory=list)  # writes (steps 4 to 6)
    # Updates of step 4 that steps 5 and 6 have not decided yet.
    updates: list[Update] = field(default_factory=list)
    # Updates held back by maxUnavailable; they go out on a later reconcile (step 6).
    deferred: list[Action] = field(default_factory=list)

    @property
    def deployment(self) -> str:
        return self.md.key


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
    # Overlay networks a deployment names that do not exist yet, and the namespace each is
    # created for (its oldest deployment's): created before any service.
    networks_to_create: dict[str, str] = field(default_factory=dict)
    # npuswarm's own networks nothing of npuswarm's uses any more: (name, id), removed last.
    networks_to_remove: list[tuple[str, str]] = field(default_factory=list)
    # Owners whose services look orphaned but whose absence no complete read confirmed (the
    # API server down, a partial page): kept, and asked again soon rather than at the resync.
    unconfirmed_orphans: frozenset[str] = frozenset()
    # How long a replica waits on a node that is not ready before it is placed elsewhere.
    lost_node_grace_seconds: float = 0.0
    # What node checks kept out of this placement (for the NPU gauges).
    limits: NodeLimits | None = None
    # Multi-node replicas: each group's generation, restart and back-off (core/groups.py).
    groups: GroupPlan = field(default_factory=GroupPlan)
    # Replicas stopped for higher-priority ones in this pass (core/preemption.py).
    preemptions: list[Preemption] = field(default_factory=list)

    @property
    def actions(self) -> list[Action]:
        return [a for plan in self.plans.values() for a in plan.actions] + self.orphans


def hold_writes(whole: PassPlan, services: frozenset[str]) -> list[Action]:
    """Take the writes to ``services`` out of this pass and return them: each deployment's
    wait with its rollout-held updates (reported as waiting, asked again), orphans' until a
    later pass."""
    taken: list[Action] = []
    for plan in whole.plans.values():
        held = [a for a in plan.actions if a.service_name in services]
        if held:
            plan.actions = [a for a in plan.actions if a.service_name not in services]
            plan.deferred.extend(held)
            taken += held
    taken += [a for a in whole.orphans if a.service_name in services]
    whole.orphans = [a for a in whole.orphans if a.service_name not in services]
    return taken


def services_by_slot(snapshot: SwarmSnapshot, deployment: str) -> dict[str, list[ObservedService]]:
    by_slot: dict[str, list[ObservedService]] = {}
    for service in snapshot.services_of(deployment):
        by_slot.setdefault(service.slot, []).append(service)
    return by_slot


# --- step 4: the diff -----------------------------------------------------------------------


def diff(
    plan: DeploymentPlan,
    placement: PlacementResult,
    known_services: frozenset[str],
    renderer: Renderer,
) -> None:
    """Each placed replica's rendered spec against its service: create, keep, or an update
    for steps 5 and 6 to decide; duplicates and replicas no longer wanted are removed.

    ``known_services`` are names this deployment's status last reported: one of them missing
    was removed by hand (drift), not merely never created."""
    md, key = plan.md, plan.deployment
    for slot, target in plan.slots.items():
        plan.desired[slot] = target.spec
        primary = target.primary
        if target.settled:
            assert primary is not None
            if primary.running_current_spec:
                plan.actions.extend(
                    _remove(s, f"surge copy {primary.name} is ready")
                    for s in target.services
                    if s is not primary
                )
            continue
        spec = target.spec
        for extra in target.services:
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
                    owner=key,
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
        action = update_action(primary, spec, reason, drift)
        plan.updates.append(Update(action, primary.running_current_spec and moved is None))

    wanted = {request.slot for request in plan.requests}
    for slot, services in sorted(plan.by_slot.items()):
        if slot not in wanted:
            plan.actions.extend(_remove(s, "replica no longer wanted") for s in services)
    # A member whose group cannot be placed whole serves nothing alone (its leader or peers
    # are gone): removing it gives its NPUs back instead of holding them while it waits.
    for request in plan.requests:
        evicted = placement.evicted.get(request.key)
        if evicted is not None:
            # Preempted or beyond its namespace's quota: still wanted, but it gives its NPUs
            # back (the gateways drop it first, like every removal).
            plan.actions.extend(_remove(s, evicted) for s in plan.by_slot.get(request.slot, []))
            continue
        unplaced = placement.unplaced.get(request.key)
        if request.group is not None and unplaced is not None and request.slot not in plan.slots:
            plan.actions.extend(
                _remove(s, f"its group cannot be placed whole: {unplaced.message}")
                for s in plan.by_slot.get(request.slot, [])
            )


# --- step 5: surge copies on spare NPUs -------------------------------------------------------


def surge(plan: DeploymentPlan, placement: PlacementResult, renderer: Renderer) -> None:
    """Turn updates of ready replicas into surge copies while spare NPUs and maxSurge allow;
    the rest stay for step 6. Spares are taken out of ``placement``, deployment by deployment
    in priority order, so two surges of one pass never share NPUs."""
    md = plan.md
    budget = md.spec.updateStrategy.maxSurge - sum(1 for s in plan.by_slot.values() if len(s) > 1)
    requests_by_slot = {r.slot: r for r in plan.requests}
    remaining: list[Update] = []
    for update in plan.updates:
        action = update.action
        request = requests_by_slot.get(action.slot)
        spare = None
        if update.ready and budget > 0 and action.drift is None and request is not None:
            spare = spare_assignment(placement, request)
        if spare is None:
            remaining.append(update)
            continue
        base = service_name(md, action.slot)
        # Within Swarm's 63 characters: a base name already 63 long would otherwise be refused.
        name = swarm_name(base, SURGE) if action.service_name == base else base
        plan.actions.append(
            Action(
                kind="create",
                slot=action.slot,
                service_name=name,
                spec=renderer.render(md, spare, name=name),
                reason=f"spec changed: surge copy on spare NPUs before {action.service_name} stops",
                owner=plan.deployment,
            )
        )
        budget -= 1
    plan.updates = remaining


# --- step 6: the rolling-update limit ---------------------------------------------------------


def limit_rollout(plan: DeploymentPlan) -> None:
    """Roll replica by replica: restarting a ready replica is allowed only while fewer than
    maxUnavailable replicas are down. Replicas that are down anyway are updated at once."""
    by_slot = plan.by_slot
    not_ready = sum(
        1 for slot in plan.desired if not any(s.running_current_spec for s in by_slot.get(slot, []))
    )
    budget = max(0, plan.md.spec.updateStrategy.maxUnavailable - not_ready)
    for update in plan.updates:
        if not update.ready:
            plan.actions.append(update.action)
        elif budget > 0:
            plan.actions.append(update.action)
            budget -= 1
        else:
            plan.deferred.append(update.action)
    plan.updates = []


# --- step 7: orphans and networks -----------------------------------------------------------


def orphans_and_networks(
    whole: PassPlan, admitted: list[ModelDeployment], orphan_owners: frozenset[str]
) -> None:
    """Services whose owner is confirmed gone are removed; a network a deployment names that
    does not exist is created first, and npuswarm's networks nothing uses any more go last."""
    snapshot, plans = whole.snapshot, whole.plans
    whole.orphans = [
        _remove(service, f"owner ModelDeployment {owner} no longer exists")
        for owner in sorted(orphan_owners - plans.keys())
        for service in snapshot.services_of(owner)
    ]
    wanted: dict[str, str] = {}
    for md in admitted:  # in priority order: the oldest deployment's namespace gets it
        if md.spec.network is not None:
            wanted.setdefault(md.spec.network.name, md.metadata.namespace)
    removed = {
        a.service_name for plan in plans.values() for a in plan.actions if a.kind == "remove"
    }
    removed |= {a.service_name for a in whole.orphans}
    in_use = {
        network.get("Target")
        # A ModelGateway's service keeps its network too (gateway/service.py).
        for service in [*snapshot.services, *snapshot.gateway_services]
        if service.name not in removed
        for network in (service.spec.get("TaskTemplate") or {}).get("Networks") or []
    }
    whole.networks_to_create = {
        name: namespace
        for name, namespace in sorted(wanted.items())
        if name not in snapshot.networks
    }
    whole.networks_to_remove = sorted(
        (name, network_id)
        for name, network_id in snapshot.own_networks.items()
        if name not in wanted and name not in in_use
    )


def update_action(
    service: ObservedService, spec: dict[str, Any], reason: str, drift: DriftKind | None = None
) -> Action:
    """An update of ``service`` (at the version observed) to ``spec``."""
    return Action(
        kind="update",
        slot=service.slot,
        service_name=service.name,
        service_id=service.id,
        version=service.version,
        spec=spec,
        reason=reason,
        drift=drift,
        owner=service.deployment,
    )


def _remove(service: ObservedService, reason: str) -> Action:
    return Action(
        kind="remove",
        slot=service.slot,
        service_name=service.name,
        service_id=service.id,
        reason=reason,
        owner=service.deployment,
    )


def reported_services(status: Mapping[str, Any]) -> frozenset[str]:
    """The service names a deployment's status last reported (for the diff's drift)."""
    return frozenset(r["service"] for r in status.get("replicaStatuses", []) if r.get("service"))
