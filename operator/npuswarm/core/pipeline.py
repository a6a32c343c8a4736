"""The pass as numbered steps, each over every deployment, handing one PassPlan on. Pure.

A reader follows a deployment down without coming back up (kueue's scheduling cycle is the
model):

    1 refuse   the host policy that needs Swarm's networks      core/hostpolicy.py
    2 place    every replica, by priority then age, sticky     core/placement.py
               within each namespace's NPU quota                 core/quota.py
    2b preempt lower priorities for replicas without NPUs      core/preemption.py
    2c groups  multi-node replicas: restart a group whole       core/groups.py
    3 render   each placed replica's spec and its service       core/render.py
    4 diff     rendered against observed: create, update, remove  core/diff.py
    5 surge    spare NPUs for updates that would take a ready replica down, in priority order
    6 limit    the rolling update (maxUnavailable)
    6b restart replicas a graded NPU fault restarts in place       core/inplace.py
    7 orphans  services of deleted deployments; networks to create and to remove

Then the writes happen (reconcile.py: the gateways first, then Swarm), and:

    8 report   each deployment's status and events from what was planned and written
                                                      core/status.py, core/kube_events.py
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from npuswarm.api.deployment import AutoscalerStatus, ModelDeployment, ModelDeploymentStatus
from npuswarm.api.gateway import ModelGateway
from npuswarm.api.meta import split_key
from npuswarm.core import groups, hostpolicy, preemption, scaledown
from npuswarm.core.diff import (
    Action,
    Applied,
    DeploymentPlan,
    PassPlan,
    diff,
    limit_rollout,
    orphans_and_networks,
    services_by_slot,
    surge,
)
from npuswarm.core.gang import PortRange
from npuswarm.core.inplace import restart_in_place
from npuswarm.core.kube_events import (
    Event,
    autoscaler_events,
    deployment_events,
    group_events,
    task_failure_events,
)
from npuswarm.core.nodes import NodeLimits
from npuswarm.core.placement import by_age, by_priority, place_all
from npuswarm.core.quota import Quotas
from npuswarm.core.render import Renderer, render_slots
from npuswarm.core.snapshot import SwarmSnapshot
from npuswarm.core.status import deployment_status, invalid_spec_status, scaling_condition


@dataclass(frozen=True)
class Desired:
    """What Kubernetes asks for, as a pass reads it (from kopf's index)."""

    deployments: list[ModelDeployment] = field(default_factory=list)
    # Deployments whose spec npuswarm refuses: key -> (generation, reason, why). Their
    # services are left as they are; they ask for nothing new.
    invalid: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    # Deployments being deleted: their finalizer removes their services, the pass leaves them.
    deleting: frozenset[str] = frozenset()
    # The last status each deployment has (key -> status dict), for conditions and drift.
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The namespaces this operator watches; None: all. Services of others are never judged.
    namespaces: frozenset[str] | None = None
    # ModelGateways (gateway/) and the last status of each, by namespace/name.
    gateways: list[ModelGateway] = field(default_factory=list)
    gateway_previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The built-in autoscaler's state of each autoscaled deployment (runtime/autoscaler.py);
    # their decided counts are already in ``deployments``.
    autoscaler: Mapping[str, AutoscalerStatus] = field(default_factory=dict)
    # Each namespace's NPU quota (its Namespace's npuswarm.io/npu-quota annotation).
    quotas: Quotas = field(default_factory=Quotas)

    def known(self) -> set[str]:
        return {md.key for md in self.deployments} | set(self.invalid) | set(self.deleting)

    def watches(self, owner: str) -> bool:
        return self.namespaces is None or split_key(owner)[0] in self.namespaces


def plan_pass(
    deployments: list[ModelDeployment],
    snapshot: SwarmSnapshot,
    *,
    now: datetime,
    lost_node_grace_seconds: float,
    known_services: Mapping[str, frozenset[str]] | None = None,
    orphan_owners: frozenset[str] = frozenset(),
    renderer: Renderer | None = None,
    limits: NodeLimits | None = None,
    policy: hostpolicy.TenantPolicy | None = None,
    group_tracker: groups.GroupTracker | None = None,
    port_range: PortRange | None = None,
    quotas: Quotas | None = None,
) -> PassPlan:
    """Steps 1 to 7: one placement of every deployment, then each one's writes; writes nothing.

    ``known_services`` per deployment: the names its status last reported (a missing one was
    removed by hand). ``orphan_owners``: deployments known to be gone, whose services are
    removed; the caller decides that only from a complete read of the ModelDeployments.
    ``limits``: what node checks and failing replicas keep out of placement.
    ``quotas``: each namespace's NPU quota.
    ``renderer`` remembers specs across passes (the operator keeps one); ``group_tracker``
    the back-off of multi-node replicas that keep failing (core/groups.py)."""
    known = known_services or {}
    renderer = renderer or Renderer()
    renderer.new_pass()

    # 1. Refuse what the host policy forbids once Swarm's networks are known: a refused
    #    deployment asks for nothing and changes nothing.
    refused = refuse_networks(by_age(deployments), snapshot, policy or hostpolicy.TenantPolicy())
    admitted = by_priority([md for md in deployments if md.key not in refused])

    # 2. Place every replica of every deployment at once, highest priority first, then the
    #    oldest deployment first; a scale-down keeps the replicas core/scaledown.py chooses
    #    (the others are removed).
    by_slot = {md.key: services_by_slot(snapshot, md.key) for md in admitted}
    kept = {md.key: scaledown.kept_slots(md, by_slot[md.key]) for md in admitted}
    placement = place_all(
        admitted,
        snapshot.nodes,
        snapshot.allocations(),
        now=now,
        lost_node_grace_seconds=lost_node_grace_seconds,
        limits=limits,
        port_range=port_range,
        slots={key: slots for key, slots in kept.items() if slots is not None},
        admit=quotas.admit if quotas is not None and quotas.npus else None,
    )

    # 2b. Replicas that found no NPUs take them from lower-priority ones: the victims are
    #     removed by the diff (gateways first), the preemptor placed once they have exited.
    preempted = preemption.preempt(placement, preemption.ranks(admitted))
    # 2c. Multi-node replicas live and die together: each group's generation, raised on
    #     every member to restart the whole group when one member ended or moved (after
    #     preemption: a group it stops is stopped whole, not restarted).
    tracker = group_tracker or groups.GroupTracker()
    group_plan = tracker.decide(placement, snapshot, now)
    whole = PassPlan(
        snapshot=snapshot,
        placement=placement,
        plans={
            md.key: DeploymentPlan(md, placement.requests[md.key], by_slot[md.key])
            for md in admitted
        },
        refused=refused,
        lost_node_grace_seconds=lost_node_grace_seconds,
        limits=limits,
        groups=group_plan,
        preemptions=preempted.preemptions,
    )
    plans = list(whole.plans.values())

    # 3. Render each placed replica's spec, and pick the service it is compared with.
    for plan in plans:
        assignments = placement.for_deployment(plan.deployment)
        plan.slots = render_slots(plan.md, assignments, plan.by_slot, snapshot, renderer)

    # 4. Diff the rendered specs against Swarm: creates, removals, candidate updates.
    for plan in plans:
        diff(plan, placement, known.get(plan.deployment, frozenset()), renderer)

    # 5. Surge: updates of ready replicas start a copy on spare NPUs first (maxSurge), in
    #    priority order, so older deployments get the spare NPUs first.
    for plan in plans:
        surge(plan, placement, renderer)

    # 6. Limit the rollout: the remaining updates, within maxUnavailable (a group of a
    #    multi-node replica counts as one replica, and is updated whole).
    for plan in plans:
        if plan.md.spec.multi_node:
            groups.limit_rollout(plan, group_plan.fates)
        else:
            limit_rollout(plan)

    # 6b. Restart in place the replicas a fault graded "restart" asks it of (same node, NPUs).
    if limits is not None and limits.restart:
        for plan in plans:
            restart_in_place(plan, limits.restart)

    # 7. Orphans and networks, for the pass as a whole.
    orphans_and_networks(whole, admitted, orphan_owners)
    return whole


def refuse_networks(
    ranked: list[ModelDeployment], snapshot: SwarmSnapshot, policy: hostpolicy.TenantPolicy
) -> dict[str, str]:
    """Deployments (oldest first) that may not join their network -> why; a network that does
    not exist yet is created for the namespace of the oldest one that names it."""
    claimed: dict[str, str] = {}
    refused: dict[str, str] = {}
    for md in ranked:
        if md.spec.network is None:
            continue
        name, namespace = md.spec.network.name, md.metadata.namespace
        why = hostpolicy.network_violation(namespace, name, snapshot, policy, claimed)
        if why is not None:
            refused[md.key] = why
        elif name not in snapshot.networks:
            claimed.setdefault(name, namespace)
    return refused


@dataclass
class DeploymentView:
    """One deployment as a pass served it."""

    key: str
    status: ModelDeploymentStatus
    events: list[Event] = field(default_factory=list)
    applied: list[Action] = field(default_factory=list)
    # Work under way (a rollout step, replicas starting): look again soon, not at the resync.
    requeue: bool = False
    unplaced_reasons: dict[str, int] = field(default_factory=dict)


def report(
    desired: Desired, whole: PassPlan, applied: Mapping[str, Applied], now: datetime
) -> dict[str, DeploymentView]:
    """Step 8, after the writes: every deployment's status and events, in the order the pass
    read them; refused and invalid ones say why and change nothing."""
    views: dict[str, DeploymentView] = {}
    for md in desired.deployments:
        if md.key in whole.refused:
            continue
        writes = applied.get(md.key, Applied())
        previous = desired.previous.get(md.key, {})
        status = deployment_status(md, whole, writes, previous.get("conditions", []), now)
        preemption.remember(status, previous)
        events = (
            deployment_events(md, whole, writes)
            + group_events(md, whole)
            + task_failure_events(status)
        )
        scaler = desired.autoscaler.get(md.key)
        if scaler is not None:
            status.autoscaler = scaler
            status.conditions.append(
                scaling_condition(
                    scaler, previous.get("conditions", []), md.metadata.generation, now
                )
            )
            events += autoscaler_events(scaler, previous.get("autoscaler"))
        unplaced: dict[str, int] = {}
        # A group's members are unplaced together and count as one replica: its leader.
        followers = (
            {r.key for r in whole.plans[md.key].requests if r.member > 0}
            if md.spec.multi_node
            else set()
        )
        for replica, item in whole.placement.unplaced_of(md.key):
            if replica not in followers:
                unplaced[item.reason] = unplaced.get(item.reason, 0) + 1
        views[md.key] = DeploymentView(
            key=md.key,
            status=status,
            events=events,
            applied=writes.done,
            requeue=bool(writes.done or whole.plans[md.key].deferred)
            or status.readyReplicas < status.placedReplicas,
            unplaced_reasons=unplaced,
        )
    refusals = dict(desired.invalid)
    for md in desired.deployments:
        if md.key in whole.refused:
            refusals[md.key] = (md.metadata.generation, hostpolicy.REASON, whole.refused[md.key])
    for invalid_key, (generation, reason, message) in refusals.items():
        previous = desired.previous.get(invalid_key, {})
        views[invalid_key] = DeploymentView(
            key=invalid_key,
            status=invalid_spec_status(generation, message, previous, now, reason),
            events=[Event("Warning", reason, message)],
        )
    return views
