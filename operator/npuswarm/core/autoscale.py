"""Built-in autoscaling: how many replicas a deployment wants from its engines' load. Pure.

The autoscaler loop (runtime/autoscaler.py) reads each model's load from the ModelGateways
serving it and calls ``decide`` once per autoscaled deployment; the pass then takes the
decided count as plain input (``with_replicas``) instead of spec.replicas. The rule follows
Kubernetes' HPA so that its users meet no surprise:

- a recommendation: ceil(total / target) for the per-replica request counts, and
  ceil(replicas x usage / target) for the KV cache usage, within a tolerance of 10%;
- clamped to [minReplicas, maxReplicas];
- stabilized: the count never rises above the lowest recommendation of the scale-up window
  nor falls below the highest one of the scale-down window, so a short burst or a short lull
  changes nothing and a scale-up is not undone before the scale-down window has passed;
- capped by what placement can give: a scale-up never asks for a replica the fleet has no
  NPUs for (``headroom``: the last pass's free NPUs, shared in priority order, then what the
  next pass's preemption would take from lower priorities) nor past its namespace's NPU
  quota (core/quota.py), so the count stays where it can be served and the status says
  "waiting for NPUs" instead.

Scale to zero (minReplicas 0) is a rule of its own, not the formula's: an engine with one
request running and none waiting recommends 0 replicas by the formula, but it is busy. So the
formula's floor is 1, and a deployment goes to 0 only when the gateways saw no request for
it for its scale-down window (and its engines run and queue none); at 0 a request held at a
gateway starts one replica at once, with no window (the client is waiting for it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from npuswarm.api.deployment import Autoscaling, ModelDeployment
from npuswarm.core import preemption, topology
from npuswarm.core.nodes import NodeInfo
from npuswarm.core.placement import Assignment, PlacementResult, ReplicaRequest, replica_requests
from npuswarm.core.quota import QuotaRoom

# As HPA's --horizontal-pod-autoscaler-tolerance: a ratio this close to 1 changes nothing.
TOLERANCE = 0.1
# "No limit" for a placement cap (more than any deployment may have).
MAX_PLACEABLE = 10**6
# How far before the first reading the count held until then is recorded (out of a
# window of 0 s: such a window reads the newest recommendation only).
FIRST_READING_AGE = 1e-3
# Recommendations older than the longest window allowed are never read again.
MAX_WINDOW_SECONDS = 3600


@dataclass(frozen=True)
class Load:
    """One model's engine load, summed over the replicas that reported it (vLLM's gauges)."""

    replicas: int  # backends whose /metrics answered
    waiting: float = 0.0  # vllm:num_requests_waiting, summed
    running: float = 0.0  # vllm:num_requests_running, summed
    kv_cache: float | None = None  # vllm:kv_cache_usage_perc, the mean (0..1); None: unread
    held: int = 0  # requests the gateways hold for it (it has no ready replica)
    idle_seconds: float | None = None  # since the gateways last saw a request; None: unknown


@dataclass(frozen=True)
class Inputs:
    current: int  # the count the pass serves now (the last decision)
    load: Load | None  # None: no gateway reading for this model
    placeable: int  # replicas the fleet could hold now: placed + what free NPUs fit
    now: float  # seconds (monotonic)


@dataclass
class History:
    """The recommendations of one deployment, (when, count), oldest first."""

    recommendations: list[tuple[float, int]] = field(default_factory=list)

    def keep(self, now: float, recommendation: int) -> None:
        cutoff = now - MAX_WINDOW_SECONDS
        self.recommendations = [r for r in self.recommendations if r[0] >= cutoff]
        self.recommendations.append((now, recommendation))


@dataclass(frozen=True)
class Decision:
    replicas: int
    # Steady, ScaledUp, ScaledDown, ScaledToZero, ScaledFromZero, Idle (at zero),
    # NoLoadReading, WaitingForNPUs
    reason: str
    message: str
    observed: float | None = None  # the metric as the target reads it
    recommendation: int | None = None  # before stabilization and the placement cap
    wanted: int | None = None  # after stabilization, before the placement cap

    @property
    def unmet(self) -> int:
        """Replicas the load asks for that the fleet has no NPUs for."""
        return max(0, (self.wanted or 0) - self.replicas)

    @property
    def changed(self) -> bool:
        return self.reason in CHANGES


CHANGES = frozenset({"ScaledUp", "ScaledDown", "ScaledToZero", "ScaledFromZero"})


def observed_value(policy: Autoscaling, load: Load) -> float | None:
    """The metric as the target reads it: per replica for request counts, the mean usage
    for the KV cache; None when nothing reported it."""
    metric = policy.target.metric
    if metric == "kvCacheUsage":
        return load.kv_cache
    if load.replicas <= 0:
        return None
    total = load.waiting if metric == "requestsWaitingPerReplica" else load.running
    return total / load.replicas


def recommend(policy: Autoscaling, current: int, load: Load) -> tuple[int, float] | None:
    """HPA's raw recommendation and the value it read, or None without a reading."""
    value = observed_value(policy, load)
    if value is None:
        return None
    target = policy.target.value
    ratio = value / target
    if abs(ratio - 1.0) <= TOLERANCE:
        wanted = current
    elif policy.target.metric == "kvCacheUsage":
        wanted = math.ceil(load.replicas * ratio)
    else:
        total = value * load.replicas
        wanted = math.ceil(total / target - 1e-9)
    return _clamp(policy, wanted), value


def decide(policy: Autoscaling, inputs: Inputs, history: History) -> Decision:
    """One deployment's count now (``history`` gains this recommendation)."""
    if policy.minReplicas == 0:
        zero = _to_or_from_zero(policy, inputs, history)
        if zero is not None:
            return zero
    current = _clamp(policy, inputs.current)
    if inputs.load is None or inputs.load.replicas == 0:
        return Decision(
            current,
            "NoLoadReading",
            f"no load reading from a ModelGateway serving this model: keeping {current}",
        )
    found = recommend(policy, current, inputs.load)
    if found is None:
        return Decision(current, "NoLoadReading", f"the engines report no {policy.target.metric}")
    raw, value = found
    if not history.recommendations:
        # A first reading (a new deployment, an operator restart): the count held until now
        # stands for the time before it, so a scale-down still waits a full window.
        history.keep(inputs.now - FIRST_READING_AGE, current)
    history.keep(inputs.now, raw)
    up_floor = _lowest(history.recommendations, inputs.now - policy.scaleUpStabilizationSeconds)
    down_ceiling = _highest(
        history.recommendations, inputs.now - policy.scaleDownStabilizationSeconds
    )
    wanted = current
    wanted = max(wanted, up_floor)
    wanted = min(wanted, down_ceiling)
    wanted = _clamp(policy, wanted)
    reading = f"{policy.target.metric} {value:.3g} (target {policy.target.value:g})"
    if wanted > current and wanted > inputs.placeable:
        capped = max(current, inputs.placeable)
        if capped == current:
            return Decision(
                current,
                "WaitingForNPUs",
                f"{reading} wants {wanted} replicas; the fleet has NPUs for "
                f"{inputs.placeable}: keeping {current}",
                value,
                raw,
                wanted,
            )
        return Decision(
            capped,
            "ScaledUp",
            f"{reading}: {current} -> {capped} replicas (wanted {wanted}; the fleet has NPUs "
            f"for {inputs.placeable})",
            value,
            raw,
            wanted,
        )
    if wanted > current:
        return Decision(wanted, "ScaledUp", f"{reading}: {current} -> {wanted}", value, raw, wanted)
    if wanted < current:
        return Decision(
            wanted, "ScaledDown", f"{reading}: {current} -> {wanted}", value, raw, wanted
        )
    return Decision(current, "Steady", f"{reading}: {current} replicas", value, raw, wanted)


def _to_or_from_zero(policy: Autoscaling, inputs: Inputs, history: History) -> Decision | None:
    """The scale-to-zero rule (minReplicas 0), or None to decide by the formula."""
    load, window = inputs.load, policy.scaleDownStabilizationSeconds
    if inputs.current <= 0:
        if load is None:
            return Decision(
                0,
                "NoLoadReading",
                "no load reading from a ModelGateway serving this model: keeping 0 (a request "
                "held there starts a replica)",
            )
        if load.held <= 0:
            return Decision(0, "Idle", "no requests: 0 replicas (a request starts one)")
        history.keep(inputs.now, 1)
        reading = f"{load.held} request{'s' if load.held != 1 else ''} held at the gateway"
        if inputs.placeable < 1:
            return Decision(
                0,
                "WaitingForNPUs",
                f"{reading} wants 1 replica; the fleet has no NPUs for it: keeping 0",
                wanted=1,
            )
        return Decision(1, "ScaledFromZero", f"{reading}: 0 -> 1", recommendation=1, wanted=1)
    idle = load is not None and _idle(load, window)
    if not idle:
        return None
    assert load is not None and load.idle_seconds is not None
    history.keep(inputs.now, 0)
    return Decision(
        0,
        "ScaledToZero",
        f"no request for {load.idle_seconds:.0f} s (scale-down window {window} s): "
        f"{inputs.current} -> 0",
        recommendation=0,
        wanted=0,
    )


def _idle(load: Load, window: int) -> bool:
    """No request at any gateway for the window, none held, and none in the engines (a
    client calling a replica directly shows only there)."""
    return (
        load.idle_seconds is not None
        and load.idle_seconds >= window
        and load.held == 0
        and load.waiting == 0
        and load.running == 0
    )


def _clamp(policy: Autoscaling, count: int) -> int:
    """Within the bounds; at least 1, since the formula never scales to zero (the
    scale-to-zero rule above does)."""
    return max(policy.minReplicas, 1, min(policy.maxReplicas, count))


def _lowest(recommendations: Iterable[tuple[float, int]], since: float) -> int:
    """The lowest recommendation at or after ``since`` (the newest one is always in)."""
    found = [count for when, count in recommendations if when >= since]
    return min(found) if found else 0


def _highest(recommendations: Iterable[tuple[float, int]], since: float) -> int:
    found = [count for when, count in recommendations if when >= since]
    return max(found) if found else 0


def headroom(
    placement: PlacementResult,
    nodes: Sequence[NodeInfo],
    wanted: Mapping[str, int],
    templates: Mapping[str, ReplicaRequest] | None = None,
    ranks: Mapping[str, preemption.Rank] | None = None,
) -> dict[str, int]:
    """How many replicas each deployment in ``wanted`` could hold now: those placed (or
    already making room by preemption), plus those the free NPUs fit of the ones it wants
    more, plus those the next pass's preemption would make room for. The free NPUs are
    handed out as the next placement would hand them out: in its order (by priority then
    age, each earlier deployment's unplaced replicas before a younger one's new ones), best
    fit, so that no two deployments count the same NPUs and what is counted here is what the
    pass places. What they do not fit, preemption answers (``preemption.room_for``, with
    ``ranks``: the pass's own search on a scratch copy). ``templates``: what one replica of
    a deployment at zero asks for (it has no request in the placement to copy)."""
    pool = {node_id: set(npus) for node_id, npus in placement.free.items()}
    accepting = sorted(
        (n for n in nodes if n.accepts_new_replicas and n.usable_npus and n.id in pool),
        key=lambda n: (n.hostname, n.id),
    )
    found: dict[str, int] = {}
    quotas = QuotaRoom(placement)  # nor past its namespace's NPU quota
    lowest = preemption.lowest_placed(placement, ranks) if ranks else None
    fitted: list[Assignment] = []
    known: Matching = {}
    short: dict[str, list[ReplicaRequest]] = {}
    placed_of: dict[str, int] = {}
    for key, requests in placement.requests.items():
        unplaced = [r for r in requests if r.key not in placement.assignments]
        # Those waiting for NPUs being released to them ask for no more; the next placement
        # still gives them free NPUs first where they fit.
        releasing = [r for r in unplaced if _awaits_release(placement, r)]
        waiting = [r for r in unplaced if not _awaits_release(placement, r)]
        placed = len(requests) - len(waiting)
        used = set(placement.nodes_used.get(key, set()))
        if releasing:
            early = _fit(releasing, accepting, pool, used, known)
            if releasing[0].group is None:
                fitted.extend(early)
        if key in wanted:
            more = max(0, wanted[key] - placed)
            template = requests[0] if requests else (templates or {}).get(key)
        else:
            more, template = len(waiting), (waiting[0] if waiting else None)
        count = 0
        if template is not None and more:
            # The quota's room counts those waiting for release as given already.
            released_to = {r.key for r in releasing}
            counted = [r for r in requests if r.key not in released_to]
            more = quotas.cap(key, counted, more)
            asked = _asked(template, waiting, requests, more)
            placed_here = _fit(asked, accepting, pool, used, known)
            count = len(placed_here)
            if template.group is None:
                fitted.extend(placed_here)
            rest = asked[count:]
            # A replica the free NPUs do not hold may take lower-priority ones' (its quota
            # kept for it, so that a younger deployment is not counted the same quota).
            may_preempt = (
                key in wanted
                and rest
                and ranks is not None
                and lowest is not None
                and key in ranks
                and ranks[key].priority > lowest
                and template.group is None
                and template.pinned_node is None
            )
            if may_preempt:
                short[key] = rest
            quotas.spend(key, counted, more if may_preempt else count)
        if key in wanted:
            found[key] = placed + count
            placed_of[key] = placed
    if short and ranks is not None:
        room = preemption.room_for(placement, ranks, pool, fitted, short)
        for key in found:
            if room.stopped.get(key):
                # Losing replicas to a higher priority: it grows into no NPUs meanwhile,
                # which it would only lose again (docs/priority.md).
                found[key] = placed_of[key] - room.stopped[key]
            else:
                found[key] += room.made.get(key, 0)
    return found


def _awaits_release(placement: PlacementResult, request: ReplicaRequest) -> bool:
    """Unplaced while NPUs are released to it: by its preemption's victims, or by stopping
    tasks (placement's NPUsReleasing)."""
    unplaced = placement.unplaced.get(request.key)
    return unplaced is not None and unplaced.reason in ("Preempting", "NPUsReleasing")


def _asked(
    template: ReplicaRequest,
    waiting: Sequence[ReplicaRequest],
    requests: Sequence[ReplicaRequest],
    more: int,
) -> list[ReplicaRequest]:
    """``more`` replicas: the unplaced ones first, then new ones in the lowest free slots
    (as a scale-up fills them, core/scaledown.py)."""
    asked = list(waiting[:more])
    taken = {r.slot for r in requests}
    slot = 0
    while len(asked) < more:
        if str(slot) not in taken:
            asked.append(template.model_copy(update={"slot": str(slot)}))
        slot += 1
    return asked


def wake_templates(
    deployments: Iterable[ModelDeployment],
    nodes: Sequence[NodeInfo],
    current: Mapping[str, int],
    wanted: Mapping[str, int],
) -> dict[str, ReplicaRequest]:
    """For ``headroom``: what one replica asks for, for each deployment at zero that wants
    one (the placement holds no request of it to copy)."""
    found = {}
    for md in deployments:
        if current.get(md.key) == 0 and wanted.get(md.key, 0) > 0:
            one = md.spec.model_copy(update={"replicas": 1})
            found[md.key] = replica_requests(md.model_copy(update={"spec": one}), nodes)[0]
    return found


# Nodes a request may go to, by (selector, pinned node): computed once per headroom, since
# deployments share few selectors (a scan of every node per deployment was most of its time).
Matching = dict[tuple[tuple[tuple[str, str], ...], str | None], list[NodeInfo]]


def _fit(
    asked: Sequence[ReplicaRequest],
    nodes: Sequence[NodeInfo],
    pool: dict[str, set[int]],
    used: set[str],
    known: Matching,
) -> list[Assignment]:
    """Take NPUs for as many of ``asked`` as fit (in order) out of ``pool``, each on the
    node it fills most (the placement's best fit); where they went."""
    if not asked:
        return []
    request = asked[0]
    one_per_node = request.one_per_node or request.npu_ids is not None
    key = (tuple(sorted(request.node_selector.items())), request.pinned_node)
    matching = known.get(key)
    if matching is None:
        matching = known[key] = [
            n
            for n in nodes
            if n.matches(request.node_selector)
            and (request.pinned_node is None or n.id == request.pinned_node)
        ]
    placed: list[Assignment] = []
    while len(placed) < len(asked):
        best: tuple[int, NodeInfo, frozenset[int]] | None = None
        for node in matching:
            free = pool[node.id]
            slack = len(free) - request.npus
            if slack < 0 or (one_per_node and node.id in used):
                continue
            if best is not None and slack >= best[0]:
                continue
            if request.npu_ids is not None:
                fits = request.npu_ids <= free and topology.is_valid_set(
                    request.npu_ids, node.topology
                )
                chosen = request.npu_ids if fits else None
            else:
                chosen = topology.choose(frozenset(free), request.npus, node.topology)
            if chosen is not None:
                best = (slack, node, chosen)
        if best is None:
            break
        _, node, chosen = best
        pool[node.id] -= chosen
        used.add(node.id)
        one = asked[len(placed)]
        placed.append(
            Assignment(
                deployment=one.deployment, slot=one.slot, node_id=node.id, npus=chosen, kept=False
            )
        )
    return placed


def with_replicas(
    deployments: Sequence[ModelDeployment], counts: Mapping[str, int]
) -> list[ModelDeployment]:
    """The deployments as the pass serves them: an autoscaled one with its decided count in
    place of spec.replicas (the stored object is never written: npuswarm does not own it)."""
    served = []
    for md in deployments:
        count = counts.get(md.key)
        if count is None or md.spec.autoscaling is None or count == md.spec.replicas:
            served.append(md)
            continue
        spec = md.spec.model_copy(update={"replicas": count})
        served.append(md.model_copy(update={"spec": spec}))
    return served
