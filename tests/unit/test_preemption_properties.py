"""Properties of priority, preemption and quotas over random fleets (hypothesis):

- through whole passes against the in-memory Swarm, removed services' tasks stopping for a
  while: no NPU is held by two live tasks, no victim has a priority equal to or above its
  preemptor's, no namespace holds more NPUs than its quota, no deployment is preempted below
  its floor;
- on one node: the victims chosen are as few as brute force over every subset finds
  (then as few NPUs).
"""

from __future__ import annotations

from itertools import combinations

from hypothesis import event, given, settings
from hypothesis import strategies as st

from npuswarm.api import labels
from npuswarm.api.deployment import ModelDeployment
from npuswarm.core import topology
from npuswarm.core.nodes import TOPOLOGIES, Topology
from npuswarm.core.pipeline import Desired
from npuswarm.core.placement import Allocation, ReplicaRequest, place
from npuswarm.core.preemption import Rank, preempt
from npuswarm.core.quota import Quotas

from .builders import NOW, deployment, node
from .memswarm import MemorySwarm
from .test_preemption import held_twice, reconciler

NAMESPACES = ("team-a", "team-b")

deployment_strategy = st.tuples(
    st.sampled_from(NAMESPACES),
    st.integers(0, 3),  # priority
    st.sampled_from([1, 2, 4]),  # NPUs per replica
    st.integers(1, 3),  # replicas
    st.booleans(),  # autoscaled with minReplicas 1
)


def build(index: int, item: tuple[str, int, int, int, bool], minute: int) -> ModelDeployment:
    namespace, priority, npus, replicas, autoscaled = item
    spec: dict[str, object] = {"npusPerReplica": npus, "replicas": replicas, "priority": priority}
    if autoscaled:
        spec["autoscaling"] = {"minReplicas": 1, "maxReplicas": 3,
                               "target": {"metric": "requestsWaitingPerReplica", "value": 1}}
    return deployment(f"d{index}", namespace, created=f"2026-01-01T00:{minute:02d}:00Z", **spec)


def service_npus(swarm: MemorySwarm) -> dict[str, int]:
    """NPUs each namespace's services claim now."""
    held: dict[str, int] = {}
    for service in swarm.services.values():
        found = service["Spec"]["Labels"]
        if labels.NPUS in found:
            namespace = found[labels.OWNER_NAMESPACE]
            held[namespace] = held.get(namespace, 0) + len(found[labels.NPUS].split(","))
    return held


@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.sampled_from([4, 8]), min_size=1, max_size=3),
    st.lists(deployment_strategy, min_size=1, max_size=5),
    st.lists(deployment_strategy, min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(NAMESPACES), st.integers(0, 12), max_size=2),
    st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_passes_never_double_book_never_take_from_equals_never_exceed_a_quota(
    sizes: list[int],
    first: list[tuple[str, int, int, int, bool]],
    later: list[tuple[str, int, int, int, bool]],
    quota: dict[str, int],
    exits: list[bool],
) -> None:
    swarm = MemorySwarm(nodes=len(sizes), npus=8)
    for engine_node, size in zip(swarm.nodes, sizes):
        engine_node["Description"]["Resources"]["GenericResources"] = engine_node["Description"]["Resources"][
            "GenericResources"][:size]
    swarm.stop_grace = True
    r = reconciler(swarm)
    quotas = Quotas(quota)
    deployments = [build(i, item, i) for i, item in enumerate(first)]
    ranks = {md.key: md for md in deployments}
    for step, stops in enumerate(exits):
        if step == 2:  # newcomers arrive on a running fleet
            deployments += [build(len(first) + i, item, 30 + i) for i, item in enumerate(later)]
            ranks = {md.key: md for md in deployments}
        result = r.run_pass(Desired(deployments=deployments, quotas=quotas))
        placement = result.plan.placement
        event(f"preemptions: {bool(result.plan.preemptions)}")
        event(f"quota refused: {any(u.reason == 'QuotaExceeded' for u in placement.unplaced.values())}")
        for preemption in result.plan.preemptions:
            for victim in preemption.victims:
                assert victim.priority < preemption.priority, "equal or higher priority taken"
                assert ranks[victim.deployment].spec.priority == victim.priority
                scaling = ranks[victim.deployment].spec.autoscaling
                floor = scaling.minReplicas if scaling else 0
                assert len(placement.for_deployment(victim.deployment)) >= floor, "below its floor"
        for namespace, npus in service_npus(swarm).items():
            assert npus <= quota.get(namespace, 10**6), f"{namespace} above its quota"
        assert held_twice(swarm) == [], "an NPU held by two live tasks"
        swarm.run_all()
        assert held_twice(swarm) == []
        if stops:
            swarm.finish_stopping()


# --- minimal victims on one node, against brute force -----------------------------------------


def one_node_case(
    draw: st.DrawFn,
) -> tuple[Topology, list[Allocation], dict[str, Rank], ReplicaRequest]:
    topo = draw(st.sampled_from(TOPOLOGIES))
    free = list(range(8))
    allocations: list[Allocation] = []
    ranks: dict[str, Rank] = {}
    for index in range(draw(st.integers(1, 6))):
        size = draw(st.sampled_from([1, 2, 4]))
        chosen = topology.choose(frozenset(free), size, topo)
        if chosen is None:
            continue
        free = [n for n in free if n not in chosen]
        key = f"ns/v{index}"
        ranks[key] = Rank(draw(st.integers(0, 4)))
        allocations.append(Allocation(deployment=key, slot="0", node_id="n1", npus=chosen, service=f"svc{index}"))
    ranks["ns/hi"] = Rank(draw(st.integers(1, 5)))
    request = ReplicaRequest(deployment="ns/hi", slot="0", npus=draw(st.sampled_from([1, 2, 4, 8])))
    return topo, allocations, ranks, request


@settings(max_examples=300, deadline=None)
@given(st.composite(one_node_case)())
def test_the_victims_on_one_node_are_the_fewest_then_the_fewest_npus(
    case: tuple[Topology, list[Allocation], dict[str, Rank], ReplicaRequest],
) -> None:
    topo, allocations, ranks, request = case
    nodes = [node("n1", 8, topology=topo)]
    requests = [ReplicaRequest(deployment=a.deployment, slot="0", npus=len(a.npus)) for a in allocations]
    result = place(nodes, [*requests, request], allocations, now=NOW, lost_node_grace_seconds=60)
    if request.key in result.assignments:
        return
    result.requests = {r.deployment: [r] for r in [*requests, request]}  # as place_all keeps them
    outcome = preempt(result, ranks)
    eligible = [a for a in allocations if ranks[a.deployment].priority < ranks["ns/hi"].priority]
    free = set(range(8)) - {n for a in allocations for n in a.npus}
    best = None
    for count in range(len(eligible) + 1):
        for subset in combinations(eligible, count):
            room = free | {n for a in subset for n in a.npus}
            if topology.choose(frozenset(room), request.npus, topo) is not None:
                cost = (count, sum(len(a.npus) for a in subset))
                best = cost if best is None or cost < best else best
        if best is not None:
            break
    if best is None:
        assert outcome.preemptions == []
        return
    (chosen,) = outcome.preemptions
    assert all(v.priority < ranks["ns/hi"].priority for v in chosen.victims)
    assert (len(chosen.victims), sum(v.npus for v in chosen.victims)) == best
    room = free | {n for v in chosen.victims for _, npus in v.frees for n in npus}
    assert topology.choose(frozenset(room), request.npus, topo) is not None
