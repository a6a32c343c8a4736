"""Preemption: NPUs for a replica that cannot be placed, taken from lower-priority ones. Pure.

Step 2b of the pass (core/pipeline.py), right after placement. For each replica (or
multi-node group) that found no NPUs, highest priority first, it looks for the cheapest set of
running replicas of strictly lower-priority deployments whose NPUs, with the free ones, make
room on one node (for a group: on as many nodes as it has members). Cheapest: the fewest
replicas stopped, then the fewest NPUs, then the lowest priorities, then the node by hostname.
The rules (docs/priority.md):

- equal or higher priority is never taken, in any namespace, so two deployments never take
  NPUs from each other in turn;
- a deployment never loses replicas below its floor: autoscaling.minReplicas when it is
  autoscaled, else 0;
- foreign and reserved NPUs, nodes that take no new replica and NPUs node checks withhold are
  never counted (placement never gave them out);
- the victims are only unassigned here: their services still run, so their NPUs stay taken in
  this pass; the diff removes them (the gateways drop them first, like every removal), and the
  preemptor is placed by a later pass, once Swarm no longer lists their tasks (a removed
  service's task stays listed with desired state "remove" while it stops, within its stop
  grace period: placement counts its NPUs as taken, ``PlacementResult.releasing``);
- NPUs being released already count as room: a preemptor that waits for them takes nobody
  else, and NPUs promised to one preemptor are not promised to another in the same pass.

The autoscaler asks the same search what a scale-up would get (``room_for``, on a scratch copy
of the last placement), so an autoscaled replica preempts by these rules too.

Cost: nothing when no unplaced replica outranks a placed one (every deployment at the default
priority); else, per unplaced replica, one look at each candidate node's lower-priority
replicas (a node holds at most a few), with a bounded search over their subsets.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Any

from npuswarm.api.deployment import ModelDeployment, ModelDeploymentStatus
from npuswarm.core import topology
from npuswarm.core.nodes import NodeInfo
from npuswarm.core.placement import (
    Assignment,
    PlacementResult,
    ReplicaKey,
    ReplicaRequest,
    Unplaced,
    UnplacedReason,
)

# Subsets of one node's victims tried at most, per replica and node (a node holds few).
MAX_SUBSETS = 4096


@dataclass(frozen=True)
class Rank:
    """What preemption needs to know of one deployment."""

    priority: int
    floor: int = 0  # replicas it keeps whatever outranks it (autoscaling.minReplicas)


@dataclass(frozen=True)
class Victim:
    """One replica to stop: a single-node replica, or every member of a group."""

    deployment: str
    replica: str  # the slot, or the group's index
    keys: tuple[ReplicaKey, ...]
    npus: int  # NPUs over all its nodes
    priority: int
    # NPUs it frees, per node.
    frees: tuple[tuple[str, frozenset[int]], ...]

    @property
    def name(self) -> str:
        return f"{self.deployment}[{self.replica}]"


@dataclass(frozen=True)
class Preemption:
    """One replica of a higher-priority deployment and the replicas stopped for it."""

    deployment: str
    replica: str
    priority: int
    nodes: tuple[str, ...]  # hostnames it will go to
    victims: tuple[Victim, ...]


@dataclass
class PreemptionResult:
    preemptions: list[Preemption] = field(default_factory=list)
    # Preemptors that wait for NPUs already being released (no new victim): replica -> node.
    waiting: dict[ReplicaKey, str] = field(default_factory=dict)

    def victims(self) -> list[Victim]:
        return [v for p in self.preemptions for v in p.victims]


@dataclass(frozen=True)
class _Choice:
    cost: tuple[int, int, int, str]
    nodes: tuple[NodeInfo, ...]
    victims: tuple[Victim, ...]


def ranks(deployments: Iterable[ModelDeployment]) -> dict[str, Rank]:
    """Each deployment's priority and the replicas preemption leaves it."""
    return {
        md.key: Rank(
            md.spec.priority, md.spec.autoscaling.minReplicas if md.spec.autoscaling else 0
        )
        for md in deployments
    }


def preempt(result: PlacementResult, ranks: Mapping[str, Rank]) -> PreemptionResult:
    """Choose victims for the unplaced replicas that outrank placed ones, and mark them in
    ``result``: victims become unplaced (reason Preempted) and ``result.evicted`` (their
    services are removed); the preemptor's message names them (reason Preempting)."""
    outcome = PreemptionResult()
    placed_priorities = {ranks[d].priority for d in _placed_deployments(result) if d in ranks}
    if not placed_priorities:
        return outcome
    lowest = min(placed_priorities)
    pending = _pending(result, ranks, lowest)
    if not pending:
        return outcome
    state = _PassState(
        result=result,
        victims_by_node=_victims_by_node(result, ranks),
        left={d: _placed_replicas(result, d) - ranks[d].floor for d in ranks},
    )
    # Searches that found nothing: victims only go and promises only grow within a pass, so
    # a replica asking the same finds nothing either (many replicas of one deployment).
    hopeless: set[Ask] = set()
    for members in pending:
        leader = members[0]
        rank = ranks[leader.deployment]
        asked: Ask = (
            rank.priority,
            leader.deployment if leader.one_per_node or leader.group is not None else "",
            tuple(sorted(leader.node_selector.items())),
            leader.npus,
            leader.npu_ids,
            len(members),
        )
        if asked in hopeless:
            continue
        choice = _cheapest(members, rank.priority, asked, state)
        if choice is None:
            hopeless.add(asked)
            continue
        _commit(members, rank, choice, state, outcome)
    return outcome


def lowest_placed(result: PlacementResult, ranks: Mapping[str, Rank]) -> int | None:
    """The lowest priority among placed deployments: only a replica above it may preempt."""
    placed = [ranks[d].priority for d in _placed_deployments(result) if d in ranks]
    return min(placed) if placed else None


@dataclass(frozen=True)
class Room:
    """What the next pass's preemption would do for the autoscaler's headroom, per
    deployment (core/autoscale.py)."""

    made: dict[str, int] = field(default_factory=dict)  # short replicas it makes room for
    stopped: dict[str, int] = field(default_factory=dict)  # replicas it stops


def room_for(
    result: PlacementResult,
    ranks: Mapping[str, Rank],
    free: Mapping[str, set[int]],
    fitted: Sequence[Assignment],
    short: Mapping[str, Sequence[ReplicaRequest]],
) -> Room:
    """The autoscaler's question "if these deployments asked for more, what would the next
    pass's preemption give them", answered by ``preempt`` itself on a scratch copy of the
    last pass's ``result`` (not changed): ``free``, the NPUs left free once ``fitted`` (the
    single-node replicas the free NPUs hold, placed as the next placement would place them)
    and any multi-node ones were counted; ``short``, the replicas that found no NPUs,
    unplaced. So the victims, rules and floors are the pass's own, and a lower-priority
    replica the headroom fitted may be the one stopped, as in the pass."""
    room = Room()
    if not short:
        return room
    scratch = result.scratch()
    scratch.free = {node: set(npus) for node, npus in free.items()}
    # A replica counted here but not asked for yet (a scale-up the answer may grant) does not
    # make its deployment's existing replicas preemptible: the floor protects what exists.
    # Otherwise a higher priority would be promised room that only the growth of the very
    # deployment it preempts makes, growth the answer then withholds from it (it loses replicas).
    asked = {r.key for requests in result.requests.values() for r in requests}
    growth: dict[str, int] = {}
    for assignment in fitted:
        if assignment.key not in asked:
            growth[assignment.deployment] = growth.get(assignment.deployment, 0) + 1
    ranks = {
        d: replace(rank, floor=rank.floor + growth[d]) if d in growth else rank
        for d, rank in ranks.items()
    }
    for assignment in fitted:
        scratch.assign(assignment)
        scratch.unplaced.pop(assignment.key, None)
        scratch.evicted.pop(assignment.key, None)  # the slot of a replica stopped before
    for key, why in list(scratch.unplaced.items()):
        if why.reason == "Preempted":  # stopped last pass: the next pass seeks NPUs for it
            scratch.unplaced[key] = why.model_copy(update={"reason": "InsufficientNPUs"})
    for deployment, requests in short.items():
        known = {r.slot for r in scratch.requests.get(deployment, [])}
        scratch.requests[deployment] = [
            *scratch.requests.get(deployment, []),
            *(r for r in requests if r.slot not in known),
        ]
        for request in requests:
            scratch.unplaced[request.key] = Unplaced(
                deployment=deployment,
                slot=request.slot,
                reason="InsufficientNPUs",
                message="",
            )
    preempt(scratch, ranks)
    for deployment, requests in short.items():
        made = sum(
            1
            for r in requests
            if r.key in scratch.unplaced and scratch.unplaced[r.key].reason == "Preempting"
        )
        if made:
            room.made[deployment] = made
    for key in scratch.evicted:
        if key not in result.evicted:
            room.stopped[key[0]] = room.stopped.get(key[0], 0) + 1
    return room


# What a replica asks of preemption: priority, the deployment (when its own replicas'
# nodes are excluded), selector, NPUs, pinned NPUs, members. Equal asks share node results.
Ask = tuple[int, str, tuple[tuple[str, str], ...], int, frozenset[int] | None, int]


@dataclass
class _Search:
    """One ask's candidate nodes and, per node, its cheapest victims (None: no room), each
    with the node's epoch when computed. A node's answer stays right while nothing on it
    changed and its victims are still there within their floors: victims only go, floors
    only tighten and promises only grow in a pass, so no other subset got cheaper."""

    nodes: list[NodeInfo]
    per_node: dict[str, tuple[int, tuple[Victim, ...] | None]] = field(default_factory=dict)
    # Single replicas: (cost, node id) of every node with room, cheapest first; entries
    # whose node changed are recomputed when met.
    heap: list[tuple[tuple[int, int, int, str], str]] = field(default_factory=list)


@dataclass
class _PassState:
    result: PlacementResult
    victims_by_node: dict[str, list[Victim]]
    left: dict[str, int]  # replicas each deployment may still lose
    promised: dict[str, set[int]] = field(default_factory=dict)
    evicted: set[str] = field(default_factory=set)  # victims' names
    epoch: dict[str, int] = field(default_factory=dict)  # node -> changes made on it
    searches: dict[Ask, _Search] = field(default_factory=dict)

    def touch(self, node_id: str) -> None:
        self.epoch[node_id] = self.epoch.get(node_id, 0) + 1


def _placed_deployments(result: PlacementResult) -> set[str]:
    return {key[0] for key in result.assignments}


def _placed_replicas(result: PlacementResult, deployment: str) -> int:
    """Replicas placed in this pass (a group counts once)."""
    return len({_replica_of(a) for a in result.for_deployment(deployment)})


def _replica_of(assignment: Assignment) -> str:
    return assignment.slot.split("-m", 1)[0] if assignment.group is not None else assignment.slot


def _pending(
    result: PlacementResult, ranks: Mapping[str, Rank], lowest: int
) -> list[list[ReplicaRequest]]:
    """Unplaced replicas (whole groups) that outrank some placed deployment, in placement
    order. Only NPU shortage is preempted for: a replica without a matching node, or waiting
    for node checks or its quota, would gain nothing."""
    pending: list[list[ReplicaRequest]] = []
    for deployment, requests in result.requests.items():
        rank = ranks.get(deployment)
        if rank is None or rank.priority <= lowest:
            continue
        groups: dict[str, list[ReplicaRequest]] = {}
        for request in requests:
            unplaced = result.unplaced.get(request.key)
            if unplaced is None or unplaced.reason != "InsufficientNPUs":
                continue
            if request.pinned_node is not None:
                continue  # PerNode replicas wait for their node
            if request.group is None:
                pending.append([request])
            else:
                groups.setdefault(request.group, []).append(request)
        pending.extend(members for members in groups.values() if len(members) == members[0].members)
    return pending


def _victims_by_node(result: PlacementResult, ranks: Mapping[str, Rank]) -> dict[str, list[Victim]]:
    """Every placed replica that may be preempted at all (a floor above 0 is applied while
    choosing), by each node it holds NPUs on."""
    by_replica: dict[tuple[str, str], list[Assignment]] = {}
    for assignment in result.assignments.values():
        if assignment.deployment in ranks:
            by_replica.setdefault((assignment.deployment, _replica_of(assignment)), []).append(
                assignment
            )
    by_node: dict[str, list[Victim]] = {}
    for (deployment, replica), held in sorted(by_replica.items()):
        victim = Victim(
            deployment=deployment,
            replica=replica,
            keys=tuple(sorted(a.key for a in held)),
            npus=sum(len(a.npus) for a in held),
            priority=ranks[deployment].priority,
            frees=tuple(sorted((a.node_id, a.npus) for a in held)),
        )
        for assignment in held:
            by_node.setdefault(assignment.node_id, []).append(victim)
    return by_node


def _cheapest(
    members: list[ReplicaRequest], priority: int, asked: Ask, state: _PassState
) -> _Choice | None:
    """The cheapest room for the replica: one node for a single replica, distinct nodes for
    each missing member of a group. Each node's answer is computed once per ask and again
    only when something changed on it; single replicas take the cheapest from a heap."""
    leader = members[0]
    result = state.result
    search = state.searches.get(asked)
    if search is None:
        used = result.nodes_used.get(leader.deployment, set())
        exclusive = leader.one_per_node or leader.group is not None
        nodes = [n for n in _candidates(leader, result) if not (exclusive and n.id in used)]
        search = state.searches[asked] = _Search(nodes)
        for node in nodes:
            found = _node_answer(node, leader, priority, search, state)
            if found is not None:
                search.heap.append((_cost(found, node), node.id))
        heapq.heapify(search.heap)
    if leader.group is not None:
        per_node = []
        for node in search.nodes:
            found = _node_answer(node, leader, priority, search, state)
            if found is not None:
                per_node.append(_Choice(_cost(found, node), (node,), found))
        return _group_choice(per_node, len(members), state.left)
    by_id = {node.id: node for node in search.nodes} if search.heap else {}
    while search.heap:
        cost, node_id = search.heap[0]
        node = by_id[node_id]
        found = _node_answer(node, leader, priority, search, state)
        if found is not None and _cost(found, node) == cost:
            return _Choice(cost, (node,), found)
        heapq.heappop(search.heap)  # stale: something changed on that node
        if found is not None:
            heapq.heappush(search.heap, (_cost(found, node), node_id))
    return None


def _node_answer(
    node: NodeInfo, request: ReplicaRequest, priority: int, search: _Search, state: _PassState
) -> tuple[Victim, ...] | None:
    """This node's cheapest victims for the ask, from the cache while still right."""
    epoch = state.epoch.get(node.id, 0)
    cached = search.per_node.get(node.id)
    if cached is not None and cached[0] == epoch:
        found = cached[1]
        if not found or (
            not any(v.name in state.evicted for v in found) and _within_floors(found, state.left)
        ):
            return found
    victims = [
        v
        for v in state.victims_by_node.get(node.id, ())
        if v.priority < priority
        and v.deployment != request.deployment
        and state.left[v.deployment]
        and v.name not in state.evicted
    ]
    found = _room_on(node, request, state.result, victims, state.promised, state.left)
    search.per_node[node.id] = (epoch, found)
    return found


def _candidates(request: ReplicaRequest, result: PlacementResult) -> list[NodeInfo]:
    return [
        node
        for node in result.nodes()
        if node.usable_npus
        and node.accepts_new_replicas
        and not node.roce_problem
        and node.matches(request.node_selector)
        and len(node.usable_npus) >= request.npus
    ]


def _room_on(
    node: NodeInfo,
    request: ReplicaRequest,
    result: PlacementResult,
    victims: Sequence[Victim],
    promised: Mapping[str, set[int]],
    left: Mapping[str, int],
) -> tuple[Victim, ...] | None:
    """The fewest victims on this node (then the fewest NPUs) whose NPUs, with the free and
    released ones nobody was promised, fit the request; () when those alone fit; None when
    nothing does."""
    base = _releasing_room(result, node.id) - promised.get(node.id, set())
    if _fits(base, request, node):
        return ()
    if not victims:
        return None
    every = base | _freed(node.id, victims)
    if not _fits(every, request, node):
        return None
    needed = request.npus - len(base)
    sizes = sorted((len(_freed(node.id, [v])) for v in victims), reverse=True)
    smallest = next(k for k in range(1, len(victims) + 1) if sum(sizes[:k]) >= needed)
    tried = 0
    for count in range(smallest, len(victims) + 1):
        best: tuple[tuple[int, int, str], tuple[Victim, ...]] | None = None
        for subset in combinations(victims, count):
            tried += 1
            if tried > MAX_SUBSETS:
                return best[1] if best is not None else None
            if _within_floors(subset, left) and _fits(
                base | _freed(node.id, subset), request, node
            ):
                key = (
                    sum(v.npus for v in subset),
                    sum(v.priority for v in subset),
                    ",".join(v.name for v in subset),
                )
                if best is None or key < best[0]:
                    best = (key, subset)
        if best is not None:
            return best[1]
    return None


def _releasing_room(result: PlacementResult, node_id: str) -> set[int]:
    """Free NPUs and those being released that no waiting replica was given."""
    releasing = result.releasing.get(node_id, set()) - result.awaited.get(node_id, set())
    return result.free.get(node_id, set()) | releasing


def _within_floors(victims: Iterable[Victim], left: Mapping[str, int]) -> bool:
    taken: dict[str, int] = {}
    for victim in victims:
        taken[victim.deployment] = taken.get(victim.deployment, 0) + 1
    return all(n <= left[d] for d, n in taken.items())


def _freed(node_id: str, victims: Iterable[Victim]) -> set[int]:
    return {npu for v in victims for held_on, npus in v.frees if held_on == node_id for npu in npus}


def _fits(free: set[int], request: ReplicaRequest, node: NodeInfo) -> bool:
    if request.npu_ids is not None:
        return request.npu_ids <= free and topology.is_valid_set(request.npu_ids, node.topology)
    return topology.choose(frozenset(free), request.npus, node.topology) is not None


def _cost(victims: Sequence[Victim], node: NodeInfo) -> tuple[int, int, int, str]:
    return (
        len(victims),
        sum(v.npus for v in victims),
        sum(v.priority for v in victims),
        node.hostname,
    )


def _group_choice(per_node: list[_Choice], members: int, left: Mapping[str, int]) -> _Choice | None:
    """The cheapest ``members`` distinct nodes; a victim met on two of them is stopped once.
    Within the floors of the victims' deployments."""
    per_node.sort(key=lambda c: c.cost)
    chosen: list[_Choice] = []
    victims: dict[str, Victim] = {}
    taken: dict[str, int] = {}
    for choice in per_node:
        new = [v for v in choice.victims if v.name not in victims]
        extra: dict[str, int] = {}
        for v in new:
            extra[v.deployment] = extra.get(v.deployment, 0) + 1
        if any(taken.get(d, 0) + n > left[d] for d, n in extra.items()):
            continue
        chosen.append(choice)
        victims.update((v.name, v) for v in new)
        for d, n in extra.items():
            taken[d] = taken.get(d, 0) + n
        if len(chosen) == members:
            stopped = tuple(victims.values())
            nodes = tuple(c.nodes[0] for c in chosen)
            return _Choice(
                (len(stopped), sum(v.npus for v in stopped), 0, nodes[0].hostname),
                nodes,
                stopped,
            )
    return None


def _commit(
    members: list[ReplicaRequest],
    rank: Rank,
    choice: _Choice,
    state: _PassState,
    outcome: PreemptionResult,
) -> None:
    """Mark the victims (within their floors: a deployment may appear twice on one node) and
    promise the room on each chosen node to this replica."""
    result, left, promised = state.result, state.left, state.promised
    per_deployment: dict[str, int] = {}
    for victim in choice.victims:
        per_deployment[victim.deployment] = per_deployment.get(victim.deployment, 0) + 1
    if any(n > left[d] for d, n in per_deployment.items()):
        return
    leader = members[0]
    replica = leader.group if leader.group is not None else leader.slot
    name = f"{leader.deployment}[{replica}]"
    for node in choice.nodes:
        room = _releasing_room(result, node.id) | _freed(node.id, choice.victims)
        room -= promised.get(node.id, set())
        chosen = (
            leader.npu_ids
            if leader.npu_ids is not None
            else topology.choose(frozenset(room), leader.npus, node.topology)
        )
        promised.setdefault(node.id, set()).update(chosen or ())
        state.touch(node.id)
        # Free NPUs promised here are not spare for this pass's surge copies either.
        result.claim(node.id, frozenset(chosen or ()) & frozenset(result.free.get(node.id, ())))
    hosts = tuple(node.hostname for node in choice.nodes)
    where = ", ".join(hosts)
    if not choice.victims:
        for member in members:
            outcome.waiting[member.key] = where
            _mark(
                result,
                member,
                "Preempting",
                f"waiting for NPUs being released on {where} (replicas stopping)",
            )
        return
    for d, n in per_deployment.items():
        left[d] -= n
    # Its NPUs are promised now: the next preemptor of this pass needs other victims.
    state.evicted.update(v.name for v in choice.victims)
    named = ", ".join(f"{v.name} (priority {v.priority})" for v in choice.victims)
    for victim in choice.victims:
        why = f"{PREEMPTED}{name} (priority {rank.priority} > {victim.priority}); waiting for NPUs"
        for key in victim.keys:
            result.unassign(key)
            result.evicted[key] = why
            result.unplaced[key] = Unplaced(
                deployment=key[0], slot=key[1], reason="Preempted", message=why
            )
    for member in members:
        _mark(
            result,
            member,
            "Preempting",
            f"stopping {named} on {where} for its NPUs (priority {rank.priority}); placed "
            "once they are released",
        )
    outcome.preemptions.append(
        Preemption(leader.deployment, replica, rank.priority, hosts, choice.victims)
    )


def _mark(
    result: PlacementResult, request: ReplicaRequest, reason: UnplacedReason, message: str
) -> None:
    result.unplaced[request.key] = Unplaced(
        deployment=request.deployment,
        slot=request.slot,
        reason=reason,
        message=message,
    )


PREEMPTED = "preempted by "


def remember(status: ModelDeploymentStatus, previous: Mapping[str, Any]) -> None:
    """A replica preempted in an earlier pass and still unplaced keeps saying why it lost its
    place (the pass that stopped it said so first), followed by why it has none now."""
    before = {
        str(r.get("replica")): str(r.get("message") or "")
        for r in previous.get("replicaStatuses") or []
        if str(r.get("message") or "").startswith(PREEMPTED)
    }
    if not before:
        return
    for replica in status.replicaStatuses:
        said = before.get(replica.replica)
        if said is None or replica.nodeId is not None or not replica.message:
            continue
        if not replica.message.startswith(PREEMPTED):
            replica.message = f"{said.split(';', 1)[0]}; {replica.message}"
