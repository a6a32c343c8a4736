"""Status and conditions of a ModelDeployment, computed from what was planned and seen. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from npuswarm.api import labels
from npuswarm.api.deployment import (
    AutoscalerStatus,
    GroupStatus,
    ModelDeployment,
    ModelDeploymentStatus,
    Phase,
    ReplicaStatus,
)
from npuswarm.api.labels import SPEC_HASH
from npuswarm.api.meta import Condition, ConditionStatus, ConditionType
from npuswarm.core import groups
from npuswarm.core.clock import TIMESTAMP, timestamp
from npuswarm.core.diff import Action, Applied, DeploymentPlan, PassPlan
from npuswarm.core.nodes import NodeInfo, NodeLimits
from npuswarm.core.npus import parse_npu_ids
from npuswarm.core.placement import Assignment, PlacementResult, Unplaced
from npuswarm.core.render import network_alias
from npuswarm.core.snapshot import SwarmSnapshot

MAX_MESSAGE = 1024
# Unplaced for a reason that resolves by itself, soon: Progressing, never Degraded.
PROGRESS_REASONS = frozenset({"NodeValidationPending", "Preempting", "NPUsReleasing"})
# Unplaced because the fleet (or the namespace's quota) has no NPUs for it now: a deployment
# that serves meanwhile is waiting for NPUs, not broken (docs/autoscaling.md, priority.md).
WAITING_REASONS = frozenset({"InsufficientNPUs", "Preempted", "QuotaExceeded"})
# A Swarm outage reads as work under way (Reconciling) this long, then as Stalled (Degraded):
# a manager restart or a network blip should not fail a Flux or Argo CD sync, a lasting
# outage should, with its reason, instead of leaving them waiting until their timeout.
SWARM_UNAVAILABLE_STALLS_AFTER = timedelta(minutes=5)


@dataclass(frozen=True)
class ConditionValue:
    status: ConditionStatus
    reason: str
    message: str = ""


def kstatus_conditions(
    ready: ConditionValue, progressing: ConditionValue, degraded: ConditionValue
) -> dict[ConditionType, ConditionValue]:
    """kstatus's abnormal-true conditions, derived from npuswarm's three so that kstatus
    (Flux, kpt, cli-utils) and health.lua (Argo CD) give one verdict: Stalled exactly when
    Degraded is True (Failed / Degraded), else Reconciling unless Ready is True
    (InProgress / Progressing); neither when Ready (Current / Healthy)."""
    if degraded.status == "True":
        return {
            "Reconciling": ConditionValue("False", "Stalled"),
            "Stalled": ConditionValue("True", degraded.reason, degraded.message),
        }
    not_stalled = ConditionValue("False", "AsExpected")
    if ready.status == "True":
        return {
            "Reconciling": ConditionValue("False", ready.reason, ready.message),
            "Stalled": not_stalled,
        }
    why = progressing if progressing.status == "True" else ready
    return {"Reconciling": ConditionValue("True", why.reason, why.message), "Stalled": not_stalled}


def conditions(
    values: dict[ConditionType, ConditionValue],
    previous: Sequence[dict[str, Any]],
    generation: int,
    now: datetime,
) -> list[Condition]:
    """Kubernetes-style conditions; lastTransitionTime moves only when the status flips.
    kstatus's pair is added to npuswarm's three, so every status carries all five."""
    before = {c.get("type"): c for c in previous}
    result = []
    derived = kstatus_conditions(values["Ready"], values["Progressing"], values["Degraded"])
    for kind, value in {**values, **derived}.items():
        old = before.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == value.status else None
        result.append(
            # Built from values this module computed: validating them again was a third of
            # a no-op pass's CPU at 2,000 deployments.
            Condition.model_construct(
                type=kind,
                status=value.status,
                reason=value.reason,
                message=value.message[:MAX_MESSAGE],
                lastTransitionTime=since or timestamp(now),
                observedGeneration=generation,
            )
        )
    return result


AS_EXPECTED = ConditionValue("False", "AsExpected")


@dataclass(frozen=True)
class ConditionSet:
    """npuswarm's three conditions of one object, ModelDeployment or ModelGateway: the
    phase and the written conditions (kstatus's two derived from them) follow by one rule."""

    ready: ConditionValue
    progressing: ConditionValue
    degraded: ConditionValue

    def standing(self) -> Literal["Pending", "Ready", "Degraded"]:
        """Degraded wins, then Ready, else Pending."""
        if self.degraded.status == "True":
            return "Degraded"
        if self.ready.status == "True":
            return "Ready"
        return "Pending"

    def phase(self, started: bool) -> Phase:
        """The standing, with Pending read as Progressing once anything was placed
        (``started``)."""
        standing = self.standing()
        return "Progressing" if standing == "Pending" and started else standing

    def conditions(
        self, previous: Sequence[dict[str, Any]], generation: int, now: datetime
    ) -> list[Condition]:
        values: dict[ConditionType, ConditionValue] = {
            "Ready": self.ready,
            "Progressing": self.progressing,
            "Degraded": self.degraded,
        }
        return conditions(values, previous, generation, now)


@dataclass
class ReplicaReport:
    """Every replica's status, and the messages the deployment's conditions take from them."""

    statuses: list[ReplicaStatus] = field(default_factory=list)
    failing: list[str] = field(default_factory=list)  # "replica X: <task error>"
    stranded: list[str] = field(default_factory=list)  # replicas on a node that is not ready


def deployment_status(
    md: ModelDeployment,
    whole: PassPlan,
    writes: Applied,
    previous_conditions: Sequence[dict[str, Any]],
    now: datetime,
) -> ModelDeploymentStatus:
    """One deployment's status from the pass that served it and the writes made for it."""
    plan = whole.plans[md.key]
    placement = whole.placement
    replicas = replica_report(whole, plan, writes)
    desired_count = len(plan.requests)
    ready_count = sum(1 for r in replicas.statuses if r.ready)
    placed = [r for r in replicas.statuses if r.nodeId is not None]
    unplaced = [u for _, u in placement.unplaced_of(md.key)]
    # Waiting a few seconds for a node's first validation check, or for the replicas it
    # preempted to stop, is progress, not a fault.
    validating = [u for u in unplaced if u.reason in PROGRESS_REASONS]
    unplaced = [u for u in unplaced if u.reason not in PROGRESS_REASONS]
    conflicts = [message for owner, message in placement.conflicts if owner == md.key]
    if md.spec.multi_node:
        # A group restarting whole in this pass has dealt with its members' failures.
        replicas.failing = groups.outside_restarts(
            md.key, plan.requests, whole.groups, replicas.failing
        )
    short = waiting_for_npus(md.key, unplaced, placement.moved, ready_count)
    faults = [] if short else unplaced
    degraded = _degraded(md.key, replicas, faults, writes.rejected, conflicts, placement.moved)
    rolling = bool(writes.done or plan.deferred)
    starting = any(r.nodeId and not r.ready for r in replicas.statuses)
    progressing = _progressing(rolling, writes, plan.deferred, starting, validating, degraded)
    if short and degraded.status == "False" and not rolling:
        progressing = ConditionValue(
            "True",
            unplaced[0].reason,  # InsufficientNPUs, or Preempted, QuotaExceeded
            f"wanted {desired_count}, placed {len(placed)}: waiting for NPUs; "
            + "; ".join(f"replica {u.slot}: {u.message}" for u in unplaced),
        )
    all_ready = ready_count == desired_count and not rolling and degraded.status == "False"
    counted = f"{ready_count}/{desired_count} replicas ready"
    placed_count = len(placed)
    group_rows: list[GroupStatus] = []
    if md.spec.multi_node:
        # A group is one replica: every count, condition and gauge reads groups.
        group_rows = groups.group_statuses(
            plan.requests, replicas.statuses, whole.groups.fates, _leaders(md, placement)
        )
        desired_count = len(group_rows)
        ready_count = sum(1 for g in group_rows if g.ready)
        placed_count = sum(1 for g in group_rows if g.state != "Pending")
        backing_off = [g for g in group_rows if g.state == "BackingOff"]
        restarting = [g for g in group_rows if g.state == "Restarting"]
        if backing_off and degraded.status == "False":
            degraded = ConditionValue(
                "True",
                "GroupBackingOff",
                "; ".join(f"group {g.group}: {g.message}" for g in backing_off),
            )
            progressing = ConditionValue("False", "Stalled", degraded.message)
        elif restarting and degraded.status == "False":
            progressing = ConditionValue(
                "True",
                "GroupRestarting",
                "; ".join(f"group {g.group}: {g.message}" for g in restarting),
            )
        all_ready = ready_count == desired_count and not rolling and degraded.status == "False"
        nodes = md.spec.nodesPerReplica
        counted = f"{ready_count}/{desired_count} replicas ready (groups of {nodes} nodes)"
    if all_ready:
        reason = "ScaledToZero" if desired_count == 0 else "AllReplicasReady"
        ready = ConditionValue("True", reason, counted)
    else:
        ready = ConditionValue("False", "ReplicasNotReady", counted)
    verdict = ConditionSet(ready, progressing, degraded)
    return ModelDeploymentStatus.model_construct(
        observedGeneration=md.metadata.generation,
        phase=verdict.phase(started=bool(placed)),
        replicas=desired_count,
        selector=replica_selector(md.metadata.name),
        readyReplicas=ready_count,
        placedReplicas=placed_count,
        npus=sum(len(r.npus) for r in placed),
        endpoint=_endpoint(md, placement.for_deployment(md.key)),
        replicaStatuses=replicas.statuses,
        groupStatuses=group_rows,
        conditions=verdict.conditions(previous_conditions, md.metadata.generation, now),
    )


def scaling_condition(
    scaler: AutoscalerStatus,
    previous: Sequence[dict[str, Any]],
    generation: int,
    now: datetime,
) -> Condition:
    """Whether the built-in autoscaler has the load it decides from: False (and the count
    kept) while no ModelGateway serving the model reports it."""
    active: ConditionStatus = "False" if scaler.reason == "NoLoadReading" else "True"
    old = next((c for c in previous if c.get("type") == "ScalingActive"), {})
    since = old.get("lastTransitionTime") if old.get("status") == active else None
    return Condition.model_construct(
        type="ScalingActive",
        status=active,
        reason=scaler.reason,
        message=scaler.message[:MAX_MESSAGE],
        lastTransitionTime=since or timestamp(now),
        observedGeneration=generation,
    )


def replica_selector(name: str) -> str:
    """The scale subresource's selector: the owner labels every replica's service carries
    (the namespace is the deployment's own, as HPA reads it)."""
    return f"{labels.MANAGED_BY}={labels.MANAGED_BY_VALUE},{labels.OWNER_NAME}={name}"


def replica_report(whole: PassPlan, plan: DeploymentPlan, writes: Applied) -> ReplicaReport:
    """Each requested replica: where it is, whether it is ready, and why not."""
    placement, snapshot = whole.placement, whole.snapshot
    touched = {a.slot for a in writes.done}
    deferred = {a.slot for a in plan.deferred}
    observed = {s.name: s for s in snapshot.services_of(plan.deployment)}
    report = ReplicaReport()
    for request in plan.requests:
        key = request.key
        assignment = placement.assignments.get(key)
        desired = plan.desired.get(request.slot)
        service = observed.get(desired["Name"]) if desired else None
        node = snapshot.node(assignment.node_id) if assignment else None
        node_down = node_unavailable(node, whole.lost_node_grace_seconds)
        replica_ready = bool(
            node_down is None
            and service is not None
            and desired is not None
            and request.slot not in touched
            and service.spec_hash == desired["Labels"].get(SPEC_HASH)
            and service.running_current_spec
        )
        # On a node that stopped reporting, Swarm's task errors (a replacement task with "no
        # suitable node") say less than the node's own state, which the message gives.
        error = (
            service.current_error
            if service is not None and not replica_ready and node_down is None
            else None
        )
        message = None
        unplaced_here = placement.unplaced.get(key)
        if unplaced_here is not None:
            message = _unplaced_message(unplaced_here, placement.moved.get(key))
        elif request.slot in writes.rejected:
            message = writes.rejected[request.slot]
        elif key in placement.moved:
            message = f"moving: {placement.moved[key]}"
        elif node_down is not None:
            message = node_down
            report.stranded.append(f"replica {request.slot}: {node_down}")
        elif request.slot in deferred:
            message = "waiting for its turn in the rolling update (updateStrategy)"
        elif request.slot in touched:
            message = "service written, waiting for the task to run"
        group_note = placement.group_notes.get(request.group_key) if request.group_key else None
        if group_note is not None:
            message = f"{message}; {group_note}" if message else group_note
        if error:
            report.failing.append(f"replica {request.slot}: {error}")
        newest = service.newest_task if service is not None else None
        report.statuses.append(
            ReplicaStatus.model_construct(
                replica=request.slot,
                nodeId=assignment.node_id if assignment else None,
                hostname=node.hostname if node else None,
                npus=sorted(assignment.npus) if assignment else [],
                service=desired["Name"] if desired else None,
                taskState=newest.state if newest else None,
                ready=replica_ready,
                lastError=service.last_error if service is not None else None,
                message=message,
            )
        )
    return report


def waiting_for_npus(
    key: str,
    unplaced: Sequence[Unplaced],
    moved: Mapping[tuple[str, str], str],
    ready_count: int,
) -> bool:
    """Demand beyond the fleet, not a fault: a deployment that serves (a replica is ready)
    and whose only missing replicas are new ones waiting for free NPUs (a scale-up by hand,
    HPA, KEDA or minReplicas). It is Progressing, not Degraded: nothing is broken, and the
    replicas start by themselves when NPUs are freed (docs/autoscaling.md). A replica that
    lost its place (a node gone) and found no other is a fault, as is a deployment with
    nothing running."""
    return (
        bool(unplaced)
        and ready_count > 0
        and all(u.reason in WAITING_REASONS and (key, u.slot) not in moved for u in unplaced)
    )


def _degraded(
    key: str,
    replicas: ReplicaReport,
    unplaced: list[Unplaced],
    rejected: Mapping[str, str],
    conflicts: list[str],
    moved: Mapping[tuple[str, str], str],
) -> ConditionValue:
    """The first fault, most telling first: failing tasks, replicas stranded on a node that
    is not ready, replicas without a place, writes Swarm refused, NPU conflicts."""
    if replicas.failing:
        return ConditionValue("True", "TaskFailed", "; ".join(replicas.failing))
    if replicas.stranded:
        return ConditionValue("True", "NodeUnavailable", "; ".join(replicas.stranded))
    if unplaced:
        return ConditionValue(
            "True",
            unplaced[0].reason,
            "; ".join(
                f"replica {u.slot}: {_unplaced_message(u, moved.get((key, u.slot)))}"
                for u in unplaced
            ),
        )
    if rejected:
        return ConditionValue(
            "True", "SwarmRejected", "; ".join(f"replica {s}: {m}" for s, m in rejected.items())
        )
    if conflicts:
        return ConditionValue("True", "NPUConflict", "; ".join(conflicts))
    return AS_EXPECTED


def _progressing(
    rolling: bool,
    writes: Applied,
    deferred: list[Action],
    starting: bool,
    validating: list[Unplaced],
    degraded: ConditionValue,
) -> ConditionValue:
    if rolling:
        return ConditionValue(
            "True", "RollingOut", f"{len(writes.done)} write(s) made, {len(deferred)} waiting"
        )
    if starting and degraded.status == "False":
        return ConditionValue("True", "ReplicasStarting", "waiting for tasks to run")
    for reason in ("Preempting", "NPUsReleasing"):
        waiting = [u for u in validating if u.reason == reason]
        if waiting and degraded.status == "False":
            return ConditionValue(
                "True", reason, "; ".join(f"replica {u.slot}: {u.message}" for u in waiting)
            )
    if validating and degraded.status == "False":
        return ConditionValue(
            "True",
            "ValidatingNodes",
            "; ".join(f"replica {u.slot}: {u.message}" for u in validating),
        )
    if degraded.status == "True":
        return ConditionValue("False", "Stalled", degraded.message)
    return ConditionValue("False", "Complete", "all replicas run the current spec")


def _unplaced_message(unplaced: Unplaced, left_because: str | None) -> str:
    """Why a replica has no place, and why it left the one it had (e.g. a lost node)."""
    if left_because is None:
        return unplaced.message
    return f"left its place ({left_because}) and {unplaced.message}"


def node_unavailable(node: NodeInfo | None, grace_seconds: float) -> str | None:
    """Why a replica kept on a node that is not ready cannot serve, or None. Swarm may still
    list its task as running: nothing on the node reports any more."""
    if node is None or node.state == "ready":
        return None
    since = f" since {timestamp(node.status_since)}" if node.status_since else ""
    return (
        f"node {node.hostname} is {node.state}{since}; the replica is placed elsewhere "
        f"if the node is not back within the lost-node grace of {grace_seconds:g}s"
    )


def _leaders(md: ModelDeployment, placement: PlacementResult) -> dict[str, str]:
    """Each placed group's leader, ``<leader node address>:<API port>`` by group index."""
    return {
        a.slot.split("-m")[0]: f"{a.group.leader_address}:{a.group.ports.api}"
        for a in placement.for_deployment(md.key)
        if a.group is not None and a.group.member == 0
    }


def _endpoint(md: ModelDeployment, assignments: Sequence[Assignment]) -> str | None:
    if md.spec.multi_node:
        # On the host network: each group is reached at its leader's node address and port.
        leaders = [a.group for a in assignments if a.group is not None and a.group.member == 0]
        return ", ".join(f"{s.leader_address}:{s.ports.api}" for s in leaders) or None
    alias = network_alias(md)
    if alias is not None:
        return f"{alias}:{md.spec.engine.port}"
    if md.spec.publish is not None:
        return f"<node>:{md.spec.publish.port}"
    return None


def invalid_spec_status(
    generation: int,
    message: str,
    previous: dict[str, Any],
    now: datetime,
    reason: str = "InvalidSpec",
) -> ModelDeploymentStatus:
    """A spec that does not validate, or that the operator's policy refuses (``reason``):
    say why, keep the last known replicas, change nothing."""
    return _held_status(
        generation,
        previous,
        now,
        phase="Invalid",
        ready=ConditionValue("False", reason, message),
        degraded=ConditionValue("True", reason, message),
        progressing=ConditionValue("False", reason, "fix the spec to continue"),
    )


def unavailable_status(
    generation: int,
    message: str,
    previous: dict[str, Any],
    now: datetime,
    stalls_after: timedelta = SWARM_UNAVAILABLE_STALLS_AFTER,
) -> ModelDeploymentStatus:
    """Swarm could not be asked: nothing is known to have changed, so nothing is removed, but
    nothing may be called Ready either. Degraded stays Unknown (retrying) for ``stalls_after``
    from the outage's start, then turns True (Stalled)."""
    since = outage_since(previous.get("conditions", []), now)
    lasting = now - since >= stalls_after
    return _held_status(
        generation,
        previous,
        now,
        phase="Degraded" if lasting else "Progressing",
        ready=ConditionValue("Unknown", "SwarmUnavailable", message),
        degraded=ConditionValue("True" if lasting else "Unknown", "SwarmUnavailable", message),
        progressing=ConditionValue(
            "Unknown",
            "SwarmUnavailable",
            f"unreachable since {timestamp(since)}; retrying with backoff"
            + ("" if lasting else f", Stalled after {stalls_after.total_seconds():.0f}s"),
        ),
    )


def outage_since(previous: Sequence[dict[str, Any]], now: datetime) -> datetime:
    """When the current Swarm outage began: Ready turns Unknown (reason SwarmUnavailable) on an
    outage's first pass and stays so until Swarm answers, so its lastTransitionTime is the start.
    ``now`` when there is no outage yet (or the timestamp is unreadable)."""
    ready = next((c for c in previous if c.get("type") == "Ready"), {})
    if ready.get("status") != "Unknown" or ready.get("reason") != "SwarmUnavailable":
        return now
    try:
        since = datetime.strptime(str(ready.get("lastTransitionTime")), TIMESTAMP)
    except ValueError:
        return now
    return min(since.replace(tzinfo=now.tzinfo), now)


def _held_status(
    generation: int,
    previous: dict[str, Any],
    now: datetime,
    *,
    phase: Phase,
    ready: ConditionValue,
    degraded: ConditionValue,
    progressing: ConditionValue,
) -> ModelDeploymentStatus:
    kept = {
        k: previous[k]
        for k in ("replicas", "selector", "readyReplicas", "placedReplicas", "npus", "endpoint")
        if k in previous
    }
    replica_statuses = [
        ReplicaStatus.model_validate(r) for r in previous.get("replicaStatuses", [])
    ]
    group_statuses = [GroupStatus.model_validate(g) for g in previous.get("groupStatuses", [])]
    return ModelDeploymentStatus(
        observedGeneration=generation,
        phase=phase,
        replicaStatuses=replica_statuses,
        groupStatuses=group_statuses,
        conditions=ConditionSet(ready, progressing, degraded).conditions(
            previous.get("conditions", []), generation, now
        ),
        **kept,
    )


NPU_STATES = ("allocated", "foreign", "reserved", "free", "unhealthy")


def npu_states(
    snapshot: SwarmSnapshot,
    foreign: Mapping[str, Mapping[int, str]],
    applied: Iterable[Action],
    limits: NodeLimits | None = None,
) -> dict[tuple[str, str], int]:
    """NPUs per (node, state) once this pass's writes landed: npuswarm's claims from its
    labels, NPUs that services npuswarm does not own hold (or processes it did not start
    use), reserved, free, and unhealthy: every NPU of a node that is not ready, and those
    npu-smi reads unhealthy that no replica holds."""
    claims = {a.service: (a.node_id, a.npus) for a in snapshot.allocations() if not a.foreign}
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
    counts: dict[tuple[str, str], int] = {}
    for node in snapshot.nodes:
        name = node.hostname or node.id
        allocated = claimed.get(node.id, set()) & node.npus
        held = set(foreign.get(node.id, {})) & node.npus - allocated
        reserved = node.reserved & node.npus
        sick: set[int] = set()
        if limits is not None:
            held |= set(limits.busy.get(node.id) or {}) & node.usable_npus - allocated
            sick = set(limits.npus.get(node.id) or {}) & node.usable_npus - allocated - held
        if node.state == "ready":
            values = {
                "allocated": len(allocated),
                "foreign": len(held),
                "reserved": len(reserved),
                "free": len(node.usable_npus - allocated - held - sick),
                "unhealthy": len(sick),
            }
        else:
            values = dict.fromkeys(NPU_STATES, 0)
            values["reserved"] = len(reserved)
            values["unhealthy"] = len(node.usable_npus)
        counts.update({(name, state): value for state, value in values.items()})
    return counts
