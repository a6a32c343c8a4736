"""One reconcile: observe Swarm, place every deployment, diff one, apply, compute its status.

Placement and writes happen under one lock, so two deployments reconciled at the same time
cannot both be handed the same free NPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from npuswarm import labels, metrics, policy
from npuswarm.api import ModelDeployment, ModelDeploymentStatus
from npuswarm.events import Event
from npuswarm.npus import parse_npu_ids
from npuswarm.observed import SwarmSnapshot
from npuswarm.placement import PlacementResult, ReplicaRequest
from npuswarm.plan import Action, DeploymentPlan, place_all, plan_deployment
from npuswarm.settings import Settings
from npuswarm.status import deployment_status
from npuswarm.swarm import Swarm, SwarmRejected

log = structlog.get_logger("npuswarm.reconcile")


@dataclass
class Outcome:
    status: ModelDeploymentStatus
    events: list[Event] = field(default_factory=list)
    # Reconcile again soon (a rollout is under way) rather than at the next resync.
    requeue: bool = False
    applied: list[Action] = field(default_factory=list)
    unplaced_reasons: dict[str, int] = field(default_factory=dict)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Reconciler:
    def __init__(
        self,
        swarm: Swarm,
        settings: Settings,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.swarm = swarm
        self.settings = settings
        self.clock = clock
        self.lock = threading.Lock()

    def plan(
        self,
        target: ModelDeployment,
        everyone: Iterable[ModelDeployment],
        known_services: frozenset[str] = frozenset(),
    ) -> tuple[SwarmSnapshot, PlacementResult, DeploymentPlan, list[ReplicaRequest]]:
        """Observe, place every deployment and diff ``target``; writes nothing.

        A reconcile applies the result while it still holds the lock.
        """
        snapshot = self.swarm.observe()
        refused = policy.network_violations(target, snapshot.networks)
        if refused:
            raise policy.Refused("; ".join(refused))
        placement, requests = place_all(
            _with_target(target, everyone),
            snapshot,
            now=self.clock(),
            lost_node_grace_seconds=self.settings.lost_node_grace_seconds,
        )
        own_requests = requests[target.key]
        plan = plan_deployment(target, own_requests, placement, snapshot, known_services)
        return snapshot, placement, plan, own_requests

    def reconcile(
        self,
        target: ModelDeployment,
        everyone: Iterable[ModelDeployment],
        previous_status: dict[str, Any],
    ) -> Outcome:
        bound = log.bind(deployment=target.key)
        known = frozenset(
            r["service"] for r in previous_status.get("replicaStatuses", []) if r.get("service")
        )
        with self.lock:
            snapshot, placement, plan, own_requests = self.plan(target, everyone, known)
            applied, rejected = self._apply(plan, bound)
        _record_npus(snapshot, applied)
        events = _events(target, placement, plan, applied, rejected, snapshot, bound)
        status = deployment_status(
            target,
            own_requests,
            placement,
            plan,
            snapshot,
            applied,
            rejected,
            previous_status.get("conditions", []),
            self.clock(),
        )
        events.extend(_task_failure_events(status))
        requeue = bool(applied or plan.deferred) or status.readyReplicas < status.placedReplicas
        unplaced: dict[str, int] = {}
        for key, item in placement.unplaced.items():
            if key[0] == target.key:
                unplaced[item.reason] = unplaced.get(item.reason, 0) + 1
        return Outcome(
            status=status,
            events=events,
            requeue=requeue,
            applied=applied,
            unplaced_reasons=unplaced,
        )

    def _apply(
        self, plan: DeploymentPlan, bound: structlog.typing.FilteringBoundLogger
    ) -> tuple[list[Action], dict[str, str]]:
        """Writes in plan order. A refused write is reported for its replica and the rest go
        on; SwarmUnavailable propagates, so the caller retries the whole reconcile."""
        applied: list[Action] = []
        rejected: dict[str, str] = {}
        for action in plan.actions:
            try:
                if action.kind == "create":
                    assert action.spec is not None
                    self.swarm.create_service(action.spec)
                elif action.kind == "update":
                    assert action.spec is not None and action.service_id is not None
                    self.swarm.update_service(action.service_id, action.version or 0, action.spec)
                else:
                    assert action.service_id is not None
                    self.swarm.remove_service(action.service_id)
            except SwarmRejected as error:
                rejected[action.slot] = str(error)
                bound.warning(
                    "swarm refused a write",
                    action=action.kind,
                    service=action.service_name,
                    error=str(error),
                )
                continue
            applied.append(action)
            if action.drift is not None:
                metrics.drift_corrections_total.labels(action.drift).inc()
            bound.info(
                "service written",
                action=action.kind,
                service=action.service_name,
                reason=action.reason,
            )
        return applied, rejected

    def finalize(self, namespace: str, name: str) -> int:
        """Remove every service this deployment owns (found by label, never by name)."""
        with self.lock:
            snapshot = self.swarm.observe()
            owned = snapshot.services_of(f"{namespace}/{name}")
            for service in owned:
                self.swarm.remove_service(service.id)
        return len(owned)


def _with_target(
    target: ModelDeployment, everyone: Iterable[ModelDeployment]
) -> list[ModelDeployment]:
    """Every live deployment, with the freshest copy of the one being reconciled in its place.

    Its place matters where priority falls back to list order (no creationTimestamp).
    """
    live = [md for md in everyone if md.metadata.deletionTimestamp is None]
    if any(md.key == target.key for md in live):
        return [target if md.key == target.key else md for md in live]
    return [*live, target]


def _events(
    md: ModelDeployment,
    placement: PlacementResult,
    plan: DeploymentPlan,
    applied: list[Action],
    rejected: dict[str, str],
    snapshot: SwarmSnapshot,
    bound: structlog.typing.FilteringBoundLogger,
) -> list[Event]:
    events: list[Event] = []
    for action in applied:
        if action.kind != "remove" and action.spec is not None:
            service_labels = action.spec["Labels"]
            node = snapshot.node(service_labels[labels.NODE])
            where = (
                f"node {node.hostname if node else service_labels[labels.NODE]} "
                f"NPUs {service_labels[labels.NPUS]}"
            )
            if action.kind == "create" or action.drift == "replica_replaced":
                message = f"replica {action.slot} placed on {where} ({action.reason})"
                events.append(Event("Normal", "Placed", message))
                bound.info(
                    "placement decided", replica=action.slot, where=where, reason=action.reason
                )
        if action.drift is not None:
            events.append(
                Event(
                    "Normal",
                    "DriftCorrected",
                    f"{action.kind} of {action.service_name}: {action.reason}",
                )
            )
        elif action.kind == "remove":
            events.append(Event("Normal", "Removed", f"{action.service_name}: {action.reason}"))
    for key, unplaced in sorted(placement.unplaced.items()):
        if key[0] == md.key:
            events.append(
                Event("Warning", unplaced.reason, f"replica {unplaced.slot}: {unplaced.message}")
            )
    for slot, error in sorted(rejected.items()):
        events.append(Event("Warning", "SwarmRejected", f"replica {slot}: {error}"))
    for owner, message in placement.conflicts:
        if owner == md.key:
            events.append(Event("Warning", "NPUConflict", message))
    return events


def _task_failure_events(status: ModelDeploymentStatus) -> list[Event]:
    return [
        Event("Warning", "TaskFailed", f"replica {r.replica} on {r.hostname}: {r.lastError}")
        for r in status.replicaStatuses
        if r.lastError and not r.ready
    ]


def _record_npus(snapshot: SwarmSnapshot, applied: list[Action]) -> None:
    """npuswarm_npus{node,state}: the claims in Swarm labels once this pass's writes landed."""
    claims = {a.service: (a.node_id, a.npus) for a in snapshot.allocations()}
    for action in applied:
        if action.kind == "remove":
            claims.pop(action.service_name, None)
        elif action.spec is not None:
            service_labels = action.spec["Labels"]
            claims[action.service_name] = (
                service_labels[labels.NODE],
                parse_npu_ids(service_labels[labels.NPUS]),
            )
    claimed: dict[str, set[int]] = {}
    for node_id, npus in claims.values():
        claimed.setdefault(node_id, set()).update(npus)
    metrics.npus.clear()
    for node in snapshot.nodes:
        allocated = claimed.get(node.id, set()) & node.npus
        reserved = len(node.reserved & node.npus)
        if node.state == "ready":
            counts = {
                "allocated": len(allocated),
                "reserved": reserved,
                "free": len(node.usable_npus - allocated),
                "unhealthy": 0,
            }
        else:
            counts = {
                "allocated": 0,
                "reserved": reserved,
                "free": 0,
                "unhealthy": len(node.usable_npus),
            }
        for state, count in counts.items():
            metrics.npus.labels(node.hostname or node.id, state).set(count)
