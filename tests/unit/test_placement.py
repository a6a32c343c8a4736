from __future__ import annotations

import random
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from npuswarm.core.nodes import NodeInfo
from npuswarm.core.placement import Allocation, PlacementResult, ReplicaRequest, place
from npuswarm.core.topology import choose, is_valid_set

from .builders import NOW, node

GRACE = 60.0


def request(deployment: str, slot: str, npus: int, **kw: object) -> ReplicaRequest:
    return ReplicaRequest(deployment=deployment, slot=slot, npus=npus, **kw)  # type: ignore[arg-type]


def run(
    nodes: list[NodeInfo], requests: list[ReplicaRequest], allocations: list[Allocation] = ()  # type: ignore[assignment]
) -> PlacementResult:
    return place(nodes, requests, list(allocations), now=NOW, lost_node_grace_seconds=GRACE)


def as_allocations(result: PlacementResult) -> list[Allocation]:
    return [
        Allocation(
            deployment=a.deployment,
            slot=a.slot,
            node_id=a.node_id,
            npus=a.npus,
            service=f"{a.deployment}-{a.slot}",
        )
        for a in result.assignments.values()
    ]


def test_seed_setup_two_models_of_four_share_one_node_without_overlap() -> None:
    result = run([node("n1")], [request("ns/qwen3", "0", 4), request("ns/coder", "0", 4)])
    first = result.assignments[("ns/qwen3", "0")].npus
    second = result.assignments[("ns/coder", "0")].npus
    assert first == {0, 1, 2, 3}
    assert second == {4, 5, 6, 7}
    assert not result.unplaced


def test_best_fit_prefers_the_fuller_node() -> None:
    nodes = [node("a"), node("b")]
    existing = [Allocation(deployment="x/old", slot="0", node_id="b", npus=frozenset(range(6)), service="s")]
    result = run(nodes, [request("x/old", "0", 6), request("x/new", "0", 2)], existing)
    assert result.assignments[("x/new", "0")].node_id == "b"
    assert result.assignments[("x/new", "0")].npus == {6, 7}


def test_short_of_npus_places_what_fits_and_names_the_reason() -> None:
    result = run([node("a")], [request("x/big", "0", 8), request("x/late", "0", 4)])
    assert result.assignments[("x/big", "0")].npus == frozenset(range(8))
    unplaced = result.unplaced[("x/late", "0")]
    assert unplaced.reason == "InsufficientNPUs"
    assert "needs 4" in unplaced.message and "most free on a matching node is 0" in unplaced.message


def test_newcomer_never_moves_running_replicas() -> None:
    # The newcomer is older (placed first by priority) but the allocation is sticky.
    existing = [Allocation(deployment="x/run", slot="0", node_id="a", npus=frozenset({2, 3, 4, 5}), service="s")]
    result = run([node("a")], [request("x/new", "0", 8), request("x/run", "0", 4)], existing)
    assert result.assignments[("x/run", "0")].kept
    assert ("x/new", "0") in result.unplaced


def test_reserved_npus_are_never_used() -> None:
    result = run([node("a", reserved=frozenset({0, 1}))], [request("x/m", "0", 4)])
    assert result.assignments[("x/m", "0")].npus == {2, 3, 4, 5}


def test_down_and_drained_nodes_get_no_new_replicas() -> None:
    nodes = [node("a", state="down"), node("b", availability="drain"), node("c", availability="pause")]
    result = run(nodes, [request("x/m", "0", 1)])
    assert result.unplaced[("x/m", "0")].reason == "NodesUnavailable"


def test_node_selector() -> None:
    nodes = [node("a"), node("b", labels={"pool": "big"})]
    result = run(nodes, [request("x/m", "0", 1, node_selector={"pool": "big"})])
    assert result.assignments[("x/m", "0")].node_id == "b"
    none = run(nodes, [request("x/m", "0", 1, node_selector={"pool": "gpu"})])
    assert none.unplaced[("x/m", "0")].reason == "NoMatchingNode"


def test_replica_on_a_lost_node_is_replaced_after_the_grace_only() -> None:
    allocation = Allocation(deployment="x/m", slot="0", node_id="a", npus=frozenset({0}), service="s")
    just_down = [node("a", state="down", since=NOW - timedelta(seconds=10)), node("b")]
    result = run(just_down, [request("x/m", "0", 1)], [allocation])
    assert result.assignments[("x/m", "0")].node_id == "a"
    long_down = [node("a", state="down", since=NOW - timedelta(seconds=600)), node("b")]
    result = run(long_down, [request("x/m", "0", 1)], [allocation])
    assert result.assignments[("x/m", "0")].node_id == "b"
    assert "down" in result.moved[("x/m", "0")]


def test_double_booked_claims_are_reported_and_the_later_one_moves() -> None:
    claims = [
        Allocation(deployment="x/a", slot="0", node_id="n", npus=frozenset({0, 1}), service="svc-a"),
        Allocation(deployment="x/b", slot="0", node_id="n", npus=frozenset({1, 2}), service="svc-b"),
    ]
    result = run([node("n")], [request("x/a", "0", 2), request("x/b", "0", 2)], claims)
    assert result.assignments[("x/a", "0")].npus == {0, 1}
    assert not result.assignments[("x/b", "0")].npus & {0, 1}
    assert result.conflicts and result.conflicts[0][0] == "x/b"
    assert "svc-a" in result.conflicts[0][1]


def test_rings_of_four_keep_small_jobs_inside_one_ring() -> None:
    ring_node = node("r", topology="rings-of-4")
    existing = [Allocation(deployment="x/one", slot="0", node_id="r", npus=frozenset({0}), service="s")]
    result = run([ring_node], [request("x/one", "0", 1), request("x/four", "0", 4), request("x/two", "0", 2)], existing)
    assert result.assignments[("x/four", "0")].npus == {4, 5, 6, 7}
    assert result.assignments[("x/two", "0")].npus == {1, 2}
    crossing = Allocation(deployment="x/bad", slot="0", node_id="r", npus=frozenset({3, 4}), service="t")
    moved = run([node("r", topology="rings-of-4")], [request("x/bad", "0", 2)], [crossing])
    assert moved.assignments[("x/bad", "0")].npus == {0, 1}
    assert "rings-of-4" in moved.moved[("x/bad", "0")]


def test_topology_choose() -> None:
    assert choose(frozenset({0, 1, 2, 5, 6}), 2, "rings-of-4") == {5, 6}  # fuller ring first
    assert choose(frozenset({1, 2, 3, 4, 5, 6}), 4, "rings-of-4") is None
    assert choose(frozenset(range(8)), 8, "rings-of-4") == frozenset(range(8))
    assert choose(frozenset({1, 2, 3, 4, 5, 6}), 4, "any") == {1, 2, 3, 4}
    assert is_valid_set(frozenset({3, 4}), "any")
    assert not is_valid_set(frozenset({3, 4}), "rings-of-4")


def test_one_replica_per_node_for_host_ports() -> None:
    requests = [request("x/m", str(i), 1, one_per_node=True) for i in range(3)]
    result = run([node("a"), node("b")], requests)
    nodes_used = [result.assignments[("x/m", str(i))].node_id for i in range(2)]
    assert sorted(nodes_used) == ["a", "b"]
    assert result.unplaced[("x/m", "2")].reason == "NodesUnavailable"


def test_pinned_per_node_replica_waits_for_its_down_node() -> None:
    allocation = Allocation(deployment="x/m", slot="a", node_id="a", npus=frozenset({0}), service="s")
    nodes = [node("a", state="down", since=NOW - timedelta(hours=1)), node("b")]
    result = run(nodes, [request("x/m", "a", 1, pinned_node="a")], [allocation])
    assert result.assignments[("x/m", "a")].node_id == "a"


# --- properties -----------------------------------------------------------------------------

node_strategy = st.builds(
    lambda i, topology, reserved, state: node(
        f"n{i}", topology=topology, reserved=frozenset(reserved), state=state
    ),
    st.integers(0, 3),
    st.sampled_from(["any", "rings-of-4"]),
    st.sets(st.integers(0, 7), max_size=2),
    st.sampled_from(["ready", "ready", "ready", "down"]),
)
nodes_strategy = st.lists(node_strategy, min_size=1, max_size=4, unique_by=lambda n: n.id)
requests_strategy = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from([1, 2, 4, 8])),
    max_size=12,
    unique_by=lambda t: (t[0], t[1]),
).map(lambda items: [request(f"ns/d{d}", str(s), n) for d, s, n in items])
claims_strategy = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.sets(st.integers(0, 7), min_size=1, max_size=8)),
    max_size=8,
).map(
    lambda items: [
        Allocation(deployment=f"ns/d{d}", slot=str(s), node_id=f"n{n}", npus=frozenset(ids), service=f"svc{k}")
        for k, (d, s, n, ids) in enumerate(items)
    ]
)


def assert_sound(nodes: list[NodeInfo], requests: list[ReplicaRequest], result: PlacementResult) -> None:
    by_id = {n.id: n for n in nodes}
    seen: set[tuple[str, int]] = set()
    wanted = {r.key: r for r in requests}
    for key, assignment in result.assignments.items():
        request = wanted[key]
        assert len(assignment.npus) == request.npus
        target = by_id[assignment.node_id]
        assert assignment.npus <= target.usable_npus, "over capacity or reserved"
        if not assignment.kept:
            assert target.accepts_new_replicas
            assert is_valid_set(assignment.npus, target.topology)
        for npu in assignment.npus:
            assert (assignment.node_id, npu) not in seen, "NPU double-booked"
            seen.add((assignment.node_id, npu))
    assert set(result.assignments) | set(result.unplaced) == set(wanted)
    assert not set(result.assignments) & set(result.unplaced)


@settings(max_examples=300, deadline=None)
@given(nodes_strategy, requests_strategy, claims_strategy)
def test_never_double_books_never_exceeds_capacity(
    nodes: list[NodeInfo], requests: list[ReplicaRequest], claims: list[Allocation]
) -> None:
    result = run(nodes, requests, claims)
    assert_sound(nodes, requests, result)
    # New placements never land on NPUs that a surviving claim still holds.
    kept_services = {(a.deployment, a.slot) for a in result.assignments.values() if a.kept}
    for assignment in result.assignments.values():
        if assignment.kept:
            continue
        for claim in claims:
            if claim.node_id == assignment.node_id and claim.key not in kept_services:
                lost = by_lost(nodes, claim.node_id)
                overlapping = [c for c in claims if c is not claim and c.node_id == claim.node_id and c.npus & claim.npus]
                if not lost and not overlapping:
                    assert not claim.npus & assignment.npus


def by_lost(nodes: list[NodeInfo], node_id: str) -> bool:
    target = next((n for n in nodes if n.id == node_id), None)
    return target is None or target.is_lost(NOW, GRACE)


@settings(max_examples=200, deadline=None)
@given(nodes_strategy, requests_strategy, claims_strategy, st.randoms(use_true_random=False))
def test_deterministic_whatever_the_listing_order(
    nodes: list[NodeInfo], requests: list[ReplicaRequest], claims: list[Allocation], rnd: random.Random
) -> None:
    shuffled_claims = list(claims)
    rnd.shuffle(shuffled_claims)
    shuffled_nodes = list(nodes)
    rnd.shuffle(shuffled_nodes)
    first = run(nodes, requests, claims)
    second = run(shuffled_nodes, requests, shuffled_claims)
    assert first.assignments == second.assignments
    assert first.unplaced == second.unplaced


@settings(max_examples=200, deadline=None)
@given(nodes_strategy, requests_strategy, requests_strategy)
def test_sticky_running_replicas_keep_their_npus_when_others_arrive(
    nodes: list[NodeInfo], existing: list[ReplicaRequest], newcomers: list[ReplicaRequest]
) -> None:
    first = run(nodes, existing)
    claims = as_allocations(first)
    # Newcomers come first in priority on purpose: stickiness must still win.
    newcomers = [r for r in newcomers if r.key not in {e.key for e in existing}]
    second = run(nodes, newcomers + existing, claims)
    for claim in claims:
        kept = second.assignments[claim.key]
        assert kept.kept and kept.node_id == claim.node_id and kept.npus == claim.npus
    assert_sound(nodes, newcomers + existing, second)


@settings(max_examples=200, deadline=None)
@given(nodes_strategy, claims_strategy, st.sampled_from([1, 2, 4, 8]), st.lists(st.sampled_from([1, 2, 4]), max_size=6))
def test_bucket_index_picks_what_a_full_scan_picks(
    nodes: list[NodeInfo], claims: list[Allocation], npus: int, earlier: list[int]
) -> None:
    from npuswarm.core.placement import _best_fit, _scan

    # Place a few replicas first so the index has seen claims after it was built.
    requests = [request("ns/first", str(i), n) for i, n in enumerate(earlier)]
    result = run(nodes, requests, claims)
    ordered = sorted(nodes, key=lambda n: (n.hostname, n.id))
    probe = request("ns/probe", "0", npus)
    indexed = _best_fit(probe, result)
    accepting = [n for n in ordered if n.usable_npus and n.accepts_new_replicas]
    scanned = _scan(probe, accepting, result)
    if scanned is None:
        assert not hasattr(indexed, "node_id")
    else:
        assert (indexed.node_id, indexed.npus) == (scanned[0].id, scanned[1])  # type: ignore[union-attr]


def test_pinned_npus_one_replica_per_node_and_only_those_npus() -> None:
    pinned = frozenset({4, 5})
    existing = [Allocation(deployment="x/other", slot="0", node_id="a", npus=frozenset({4}), service="s")]
    requests = [request("x/other", "0", 1)] + [
        request("x/pin", str(i), 2, npu_ids=pinned, one_per_node=True) for i in range(3)
    ]
    result = run([node("a"), node("b"), node("c")], requests, existing)
    # Node a holds davinci4 for someone else, so the pinned replicas go to b and c, on 4-5.
    assert {result.assignments[("x/pin", str(i))].node_id for i in range(2)} == {"b", "c"}
    assert all(result.assignments[("x/pin", str(i))].npus == pinned for i in range(2))
    unplaced = result.unplaced[("x/pin", "2")]
    assert unplaced.reason == "InsufficientNPUs" and "pinned NPUs [4, 5]" in unplaced.message


def test_a_replica_off_its_pinned_npus_is_moved_onto_them() -> None:
    off = Allocation(deployment="x/pin", slot="0", node_id="a", npus=frozenset({0, 1}), service="s")
    result = run([node("a")], [request("x/pin", "0", 2, npu_ids=frozenset({6, 7}), one_per_node=True)], [off])
    assert result.assignments[("x/pin", "0")].npus == {6, 7}
    assert "pinned to [6, 7]" in result.moved[("x/pin", "0")]
