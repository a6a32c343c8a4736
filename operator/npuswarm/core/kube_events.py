"""Kubernetes Events worth telling a person (a pass's, from what it planned and wrote), and a
filter so a stuck state is not repeated on every resync. Not Swarm's event stream, which only
asks for a pass (runtime/)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import structlog

from npuswarm.api import labels
from npuswarm.api.deployment import AutoscalerStatus, ModelDeployment, ModelDeploymentStatus
from npuswarm.core.diff import Applied, PassPlan
from npuswarm.core.groups import members_by_group

# The pass's placement lines keep the logger they always had.
log = structlog.get_logger("npuswarm.reconcile")

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass
class EventFilter:
    """Lets an identical event (same object, reason and message) through once per window."""

    window_seconds: float = 3600.0
    _last_sent: dict[tuple[str, str, str], float] = field(default_factory=dict)
    _pruned_at: float | None = None

    def admit(self, obj: str, event: Event, now: float | None = None) -> bool:
        moment = time.monotonic() if now is None else now
        self._prune(moment)
        key = (obj, event.reason, event.message)
        sent = self._last_sent.get(key)
        if sent is not None and moment - sent < self.window_seconds:
            return False
        self._last_sent[key] = moment
        return True

    def _prune(self, moment: float) -> None:
        """Drop entries whose window has passed: a deployment that lives for months and
        changes messages (each with a node, an NPU count, an error text) would otherwise
        keep every key it ever had. Once per window, so admit stays O(1) on average."""
        if self._pruned_at is not None and moment - self._pruned_at < self.window_seconds:
            return
        self._pruned_at = moment
        expired = [k for k, sent in self._last_sent.items() if moment - sent >= self.window_seconds]
        for key in expired:
            del self._last_sent[key]

    def __len__(self) -> int:
        return len(self._last_sent)

    def forget(self, obj: str) -> None:
        for key in [k for k in self._last_sent if k[0] == obj]:
            del self._last_sent[key]


def deployment_events(md: ModelDeployment, whole: PassPlan, writes: Applied) -> list[Event]:
    snapshot, placement = whole.snapshot, whole.placement
    events: list[Event] = []
    for action in writes.done:
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
                log.info(
                    "placement decided",
                    deployment=md.key,
                    replica=action.slot,
                    where=where,
                    reason=action.reason,
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
    # A group's members are unplaced together, for one reason: one event, its leader's.
    followers = (
        {r.key for r in whole.plans[md.key].requests if r.member > 0}
        if md.spec.multi_node and md.key in whole.plans
        else set()
    )
    for key, unplaced in placement.unplaced_of(md.key):
        if key not in followers:
            # Waiting for a node's first validation probe is no warning.
            kind: EventType = (
                "Normal"
                if unplaced.reason in ("NodeValidationPending", "Preempting", "NPUsReleasing")
                else "Warning"
            )
            events.append(
                Event(kind, unplaced.reason, f"replica {unplaced.slot}: {unplaced.message}")
            )
    for slot, error in sorted(writes.rejected.items()):
        events.append(Event("Warning", "SwarmRejected", f"replica {slot}: {error}"))
    for owner, message in placement.conflicts:
        if owner == md.key:
            events.append(Event("Warning", "NPUConflict", message))
    return events


def group_events(md: ModelDeployment, whole: PassPlan) -> list[Event]:
    """A multi-node replica restarted whole, or waiting for its back-off (core/groups.py)."""
    plan = whole.plans.get(md.key)
    if not md.spec.multi_node or plan is None:
        return []
    found = []
    for group in members_by_group(plan.requests):
        fate = whole.groups.fates.get((md.key, group))
        if fate is None:
            continue
        if fate.restart:
            message = f"group {group} restarts whole (generation {fate.generation}): {fate.restart}"
            found.append(Event("Warning", "GroupRestarted", message))
        elif fate.waiting:
            found.append(Event("Warning", "GroupBackingOff", f"group {group}: {fate.waiting}"))
    return found


def task_failure_events(status: ModelDeploymentStatus) -> list[Event]:
    return [
        Event("Warning", "TaskFailed", f"replica {r.replica} on {r.hostname}: {r.lastError}")
        for r in status.replicaStatuses
        if r.lastError and not r.ready
    ]


def autoscaler_events(status: AutoscalerStatus, previous: object) -> list[Event]:
    """A scale decision the status has not recorded yet, once; spec.replicas not obeyed."""
    before = previous if isinstance(previous, dict) else {}
    found = []
    last = (status.lastScaleTime, status.lastScaleMessage)
    if status.lastScaleTime and last != (
        before.get("lastScaleTime"),
        before.get("lastScaleMessage"),
    ):
        # Going to and coming back from zero are told apart: a client waited for the second.
        zero = status.lastScaleReason in ("ScaledToZero", "ScaledFromZero")
        reason = status.lastScaleReason if zero else "Autoscaled"
        found.append(Event("Normal", reason or "Autoscaled", status.lastScaleMessage or ""))
    if "is not obeyed" in status.message:
        # Identical events are sent at most once an hour (EventFilter).
        note = status.message[status.message.find("spec.replicas=") :]
        found.append(Event("Warning", "ReplicasNotOwned", note))
    return found
