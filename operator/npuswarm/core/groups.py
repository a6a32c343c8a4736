"""Multi-node replicas live and die together. Pure, but for GroupTracker's memory across passes.

A group's members are one vLLM engine spread over several nodes: a member that dies or moves
leaves the others hanging in HCCL or exiting, and vLLM's leader takes no late member. So
npuswarm never restarts one member: every member's spec carries the group's generation
(label npuswarm.io/group-generation), and raising it on all of them at once makes Swarm
replace every member's task (members run with restart condition "none": Swarm restarts none
alone). Here, after placement (step 2 of core/pipeline.py):

- a group with a member placed anew (its node lost, its NPUs unhealthy, its service removed
  by hand) while others are kept restarts at once;
- a group with a member whose task of the current spec ended (failed, rejected, exited)
  restarts, the first time at once, then after a back-off doubling from the failing-replica
  back-off up to the cool-down (the NPUSWARM_FAILING_REPLICA_* settings, as
  core/relocation.py uses for single replicas); a group that ran for a cool-down since its
  last restart starts from scratch;
- a rolling update replaces whole groups, one group counting as one replica against
  maxUnavailable (step 6, limit_rollout);
- the status reads a group as one replica: Ready when every member runs its current spec
  (the leader's task runs only once its health check passes).

Only multi-node deployments do any of this work; a pass over single-node replicas only looks
at the first request of each deployment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from npuswarm.api import labels
from npuswarm.api.deployment import GroupState, GroupStatus, ReplicaStatus
from npuswarm.core.clock import timestamp
from npuswarm.core.placement import PlacementResult, ReplicaKey, ReplicaRequest
from npuswarm.core.snapshot import ObservedService, SwarmSnapshot

if TYPE_CHECKING:  # diff.py holds the pass's plan, and a GroupPlan in it
    from npuswarm.core.diff import Action, DeploymentPlan, Update

GroupKey = ReplicaKey  # (deployment "namespace/name", group index)

# A task of the current spec in one of these states ran and stopped: its member is gone.
ENDED = frozenset({"failed", "rejected", "complete", "shutdown", "orphaned", "remove"})


@dataclass(frozen=True)
class GroupRules:
    """The back-off of a group that keeps failing: the second restart in a row waits
    ``backoff_seconds``, each further one twice as long, at most ``max_backoff_seconds``; a
    group that ran that long since its last restart starts from scratch."""

    backoff_seconds: float = 60.0
    max_backoff_seconds: float = 600.0


@dataclass(frozen=True)
class GroupHistory:
    restarts: int = 0  # restarts in a row after a member ended
    last_restart: datetime | None = None


@dataclass(frozen=True)
class GroupFate:
    """What a pass does with one placed group."""

    generation: int
    restart: str = ""  # why the whole group restarts in this pass ("": it does not)
    waiting: str = ""  # a member ended and the restart waits for its back-off
    restarts: int = 0


@dataclass
class GroupPlan:
    fates: dict[GroupKey, GroupFate] = field(default_factory=dict)
    histories: dict[GroupKey, GroupHistory] = field(default_factory=dict)


def generation_of(service: ObservedService) -> int:
    text = service.labels.get(labels.GROUP_GENERATION, "")
    return int(text) if text.isdigit() else 0


def ended(service: ObservedService) -> str | None:
    """How the newest task of the service's current spec stopped, or None if it did not."""
    current = [t for t in service.tasks if t.spec_hash in (None, service.spec_hash)]
    task = max(current, key=lambda t: (t.created, t.id), default=None)
    if task is None or task.state not in ENDED:
        return None
    return f"{task.state}: {task.error}" if task.error else task.state


def members_by_group(requests: Sequence[ReplicaRequest]) -> dict[str, list[ReplicaRequest]]:
    found: dict[str, list[ReplicaRequest]] = {}
    for request in requests:
        if request.group is not None:
            found.setdefault(request.group, []).append(request)
    return found


def decide(
    placement: PlacementResult,
    snapshot: SwarmSnapshot,
    histories: Mapping[GroupKey, GroupHistory],
    now: datetime,
    rules: GroupRules,
) -> GroupPlan:
    """Each placed group's generation for this pass, and whether it restarts; every
    assignment of a member gets its group's generation (rendered into its spec)."""
    plan = GroupPlan()
    for deployment, requests in placement.requests.items():
        if not requests or requests[0].group is None:
            continue
        by_slot: dict[str, list[ObservedService]] = {}
        for service in snapshot.services_of(deployment):
            by_slot.setdefault(service.slot, []).append(service)
        for group, members in members_by_group(requests).items():
            key = (deployment, group)
            services = [s for m in members for s in by_slot.get(m.slot, [])]
            history = histories.get(key, GroupHistory())
            fate, history = _fate(members, services, placement, history, now, rules)
            if history != GroupHistory():
                plan.histories[key] = history
            if fate is None:
                continue
            plan.fates[key] = fate
            for member in members:
                assignment = placement.assignments[member.key]
                if assignment.group is not None:
                    seat = assignment.group.model_copy(update={"generation": fate.generation})
                    placement.assign(assignment.model_copy(update={"group": seat}))
    # A group not seen this pass (unplaced, deleted) keeps its back-off only while it counts.
    for key, history in histories.items():
        if key not in plan.histories and _counts(history, now, rules):
            plan.histories[key] = history
    return plan


def _fate(
    members: list[ReplicaRequest],
    services: list[ObservedService],
    placement: PlacementResult,
    history: GroupHistory,
    now: datetime,
    rules: GroupRules,
) -> tuple[GroupFate | None, GroupHistory]:
    generation = max((generation_of(s) for s in services), default=0)
    assignments = [placement.assignments.get(m.key) for m in members]
    if any(a is None for a in assignments):
        return None, history  # not placed whole: it holds nothing, nothing to restart
    placed_anew = [m for m, a in zip(members, assignments, strict=True) if a and not a.kept]
    if services and placed_anew:
        first = placed_anew[0]
        why = placement.moved.get(first.key, "its service is gone")
        restart = f"member {first.slot} placed anew ({why})"
        # A move is no failure of the group: its back-off count stays.
        return (
            GroupFate(generation + 1, restart=restart, restarts=history.restarts),
            replace(history, last_restart=now),
        )
    current = [s for s in services if generation_of(s) == generation]
    down = next(((s, how) for s in current if (how := ended(s)) is not None), None)
    if down is None:
        if not _counts(history, now, rules):
            history = GroupHistory()
        return GroupFate(generation, restarts=history.restarts), history
    service, how = down
    why = f"member {service.slot} ended ({how})"
    due = _due(history, rules)
    if due is not None and now < due:
        waiting = (
            f"{why}; the group restarts at {timestamp(due)} "
            f"(back-off after {history.restarts} restart(s) in a row)"
        )
        return GroupFate(generation, waiting=waiting, restarts=history.restarts), history
    restarts = history.restarts + 1
    return (
        GroupFate(generation + 1, restart=why, restarts=restarts),
        GroupHistory(restarts=restarts, last_restart=now),
    )


def _due(history: GroupHistory, rules: GroupRules) -> datetime | None:
    """When the next restart after a failure may happen (None: at once)."""
    if history.restarts == 0 or history.last_restart is None:
        return None
    wait = min(rules.backoff_seconds * 2 ** (history.restarts - 1), rules.max_backoff_seconds)
    return history.last_restart + timedelta(seconds=wait)


def _counts(history: GroupHistory, now: datetime, rules: GroupRules) -> bool:
    """Whether the back-off still counts: a restart within the last max back-off."""
    return history.last_restart is not None and now - history.last_restart <= timedelta(
        seconds=rules.max_backoff_seconds
    )


class GroupTracker:
    """The groups' back-off histories across passes (the Reconciler keeps one)."""

    def __init__(self, rules: GroupRules | None = None) -> None:
        self.rules = rules or GroupRules()
        self.histories: dict[GroupKey, GroupHistory] = {}

    def decide(
        self, placement: PlacementResult, snapshot: SwarmSnapshot, now: datetime
    ) -> GroupPlan:
        """The pass's fates; the histories are kept only by ``remember`` (a dry-run plan,
        `npuswarm plan`, changes nothing)."""
        return decide(placement, snapshot, self.histories, now, self.rules)

    def remember(self, plan: GroupPlan, held: Sequence[Action] = ()) -> None:
        """Keep the pass's histories, except for groups whose writes the pass held back (a
        gateway may still list the group): their restart did not happen, and the next pass
        decides it again rather than counting it as a second failure."""
        histories = dict(plan.histories)
        for key in {(a.owner, a.slot.partition("-m")[0]) for a in held if "-m" in a.slot}:
            if key in self.histories:
                histories[key] = self.histories[key]
            else:
                histories.pop(key, None)
        self.histories = histories


# --- the status: a group read as one replica ----------------------------------------------


def group_statuses(
    requests: Sequence[ReplicaRequest],
    replicas: Sequence[ReplicaStatus],
    fates: Mapping[GroupKey, GroupFate],
    endpoints: Mapping[str, str],
) -> list[GroupStatus]:
    """Each group's own state with its members' rows (``replicas``, in request order)."""
    rows = {r.replica: r for r in replicas}
    found = []
    for group, members in members_by_group(requests).items():
        key = (members[0].deployment, group)
        member_rows = [rows[m.slot] for m in members if m.slot in rows]
        fate = fates.get(key)
        state, message = _group_state(member_rows, fate)
        found.append(
            GroupStatus.model_construct(
                group=group,
                state=state,
                ready=state == "Ready",
                generation=fate.generation if fate else 0,
                restarts=fate.restarts if fate else 0,
                endpoint=endpoints.get(group),
                message=message,
                members=member_rows,
            )
        )
    return found


def outside_restarts(
    deployment: str, requests: Sequence[ReplicaRequest], plan: GroupPlan, failing: list[str]
) -> list[str]:
    """``failing`` ("replica <slot>: <error>") without the members of groups this pass
    restarts: their failures are what the restart answers, not a fault left standing."""
    restarting = {
        f"replica {m.slot}: "
        for group, members in members_by_group(requests).items()
        if (fate := plan.fates.get((deployment, group))) is not None and fate.restart
        for m in members
    }
    return [f for f in failing if not any(f.startswith(prefix) for prefix in restarting)]


def _group_state(rows: list[ReplicaStatus], fate: GroupFate | None) -> tuple[GroupState, str]:
    if fate is None or any(r.nodeId is None for r in rows):
        unplaced = next((r.message for r in rows if r.message), "")
        return "Pending", unplaced or "waiting for a place for every member"
    if fate.restart:
        return "Restarting", f"restarting every member: {fate.restart}"
    if fate.waiting:
        return "BackingOff", fate.waiting
    if rows and all(r.ready for r in rows):
        return "Ready", "every member runs the current spec and the leader is healthy"
    waiting = [r.replica for r in rows if not r.ready]
    detail = next((r.message for r in rows if r.message and not r.ready), None)
    text = f"waiting for member(s) {', '.join(waiting)}"
    return "Starting", f"{text}: {detail}" if detail else text


# --- step 6: the rolling update, a group at a time ------------------------------------------


def limit_rollout(plan: DeploymentPlan, fates: Mapping[GroupKey, GroupFate]) -> None:
    """core/diff.limit_rollout for groups: a group's updates go out together or wait
    together. A group that is down or restarting is updated at once; a ready group only while
    fewer than maxUnavailable groups are down, each counting as one."""
    members = members_by_group(plan.requests)
    by_slot = plan.by_slot

    def up(group: str) -> bool:
        return all(
            any(s.running_current_spec for s in by_slot.get(m.slot, [])) for m in members[group]
        )

    group_of = {r.slot: r.group for r in plan.requests if r.group is not None}
    wanted = {group_of[slot] for slot in plan.desired if slot in group_of}
    # A group is never surged (it would need a second set of nodes for one replica), so
    # maxUnavailable 0 (a surge-only strategy) still lets one group at a time through.
    allowed = max(1, plan.md.spec.updateStrategy.maxUnavailable)
    budget = max(0, allowed - sum(not up(g) for g in wanted))
    by_group: dict[str, list[Update]] = {}
    for update in plan.updates:
        by_group.setdefault(group_of.get(update.action.slot, ""), []).append(update)
    for group, updates in sorted(by_group.items(), key=lambda item: _index(item[0])):
        fate = fates.get((plan.deployment, group))
        actions = [u.action for u in updates]
        if fate is not None and fate.restart:
            why = f"group restart: {fate.restart}"
            plan.actions.extend(replace(a, reason=why) for a in actions)
        elif not up(group):
            plan.actions.extend(actions)
        elif budget > 0:
            plan.actions.extend(actions)
            budget -= 1
        else:
            plan.deferred.extend(actions)
    plan.updates = []


def _index(group: str) -> tuple[int, str]:
    return (int(group), group) if group.isdigit() else (1 << 30, group)
