"""Gang placement of multi-node replicas (issue 20 item 2): all members or none, distinct
nodes, whole NPU sets, node limits respected, a preferred label, and a shortfall that names
the nodes that came closest."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from npuswarm.core.nodes import NodeInfo, NodeLimits
from npuswarm.core.placement import (
    Allocation,
    PlacementResult,
    ReplicaRequest,
    member_slot,
    place,
    place_all,
    replica_requests,
)
from npuswarm.core.topology import is_valid_set

from .builders import NOW, deployment, node

GRACE = 60.0


def group(deployment_key: str, index: int, members: int, npus: int, **kw: object) -> list[ReplicaRequest]:
    return [
        ReplicaRequest(deployment=deployment_key, slot=member_slot(index, m), npus=npus, group=str(index),
                       member=m, members=members, **kw)  # type: ignore[arg-type]
        for m in range(members)
    ]


def run(nodes: list[NodeInfo], requests: list[ReplicaRequest],
        allocations: list[Allocation] | None = None) -> PlacementResult:
    return place(nodes, requests, list(allocations or []), now=NOW, lost_node_grace_seconds=GRACE)


def claims_of(result: PlacementResult) -> list[Allocation]:
    return [Allocation(deployment=a.deployment, slot=a.slot, node_id=a.node_id, npus=a.npus,
                       service=f"{a.deployment}-{a.slot}",
                       port_block=a.group.ports.block if a.group else None)
            for a in result.assignments.values()]


def test_a_spec_with_nodes_per_replica_asks_for_one_request_per_member() -> None:
    md = deployment(replicas=2, nodesPerReplica=2, npusPerReplica=8, engine={"tensorParallelSize": 4})
    requests = replica_requests(md, [])
    assert [(r.slot, r.group, r.member, r.members, r.npus) for r in requests] == [
        ("0-m0", "0", 0, 2, 8), ("0-m1", "0", 1, 2, 8), ("1-m0", "1", 0, 2, 8), ("1-m1", "1", 1, 2, 8)]


def test_members_go_on_distinct_nodes_with_whole_npu_sets() -> None:
    nodes = [node("a"), node("b"), node("c")]
    result = run(nodes, group("ns/ds", 0, 2, 8))
    placed = [result.assignments[(("ns/ds"), member_slot(0, m))] for m in range(2)]
    assert {a.node_id for a in placed} == {"a", "b"}
    assert all(a.npus == frozenset(range(8)) for a in placed)


def test_a_group_that_does_not_fit_holds_nothing_and_a_single_replica_after_it_gets_its_place() -> None:
    nodes = [node("a"), node("b", reserved=frozenset({0})), node("c", state="down")]
    single = ReplicaRequest(deployment="ns/small", slot="0", npus=4)
    result = run(nodes, [*group("ns/ds", 0, 3, 8), single])
    assert not [k for k in result.assignments if k[0] == "ns/ds"]
    assert single.key in result.assignments
    assert sum(len(t) for t in result.taken.values()) == 4  # the single replica's, nothing else
    unplaced = result.unplaced[("ns/ds", "0-m0")]
    assert unplaced.reason == "InsufficientNPUs"
    # Which nodes came closest and what each lacked.
    assert "needs 3 of 3 node(s) with 8 free NPUs each; 1 fit (host-a)" in unplaced.message
    assert "host-b: 7 of 8 NPUs free" in unplaced.message
    assert "host-c is down/active" in unplaced.message


def test_failed_validation_unhealthy_npus_and_roce_down_keep_members_away() -> None:
    nodes = [node("a"), node("b"), node("c"), node("d")]
    limits = NodeLimits(nodes={"a": "host-a failed validation: no runtime"},
                        npus={"b": {3: "NPU 3 unhealthy"}}, roce={"c": "eth1 down"})
    md = deployment("ds", nodesPerReplica=2, npusPerReplica=8)
    result = place_all([md], nodes, [], now=NOW, lost_node_grace_seconds=GRACE, limits=limits)
    unplaced = result.unplaced[(md.key, "0-m0")]
    assert unplaced.reason == "NodeValidationFailed"
    assert "host-a failed validation: no runtime" in unplaced.message
    assert "host-b: 7 of 8 NPUs free" in unplaced.message
    assert "host-c: RoCE links down (eth1 down)" in unplaced.message
    assert not result.assignments


def test_topology_rule_applies_to_each_member() -> None:
    nodes = [node("a", topology="rings-of-4"), node("b", topology="rings-of-4")]
    claims = [Allocation(deployment="ns/x", slot="0", node_id="b", npus=frozenset({0, 4}), service="x")]
    result = run(nodes, group("ns/ds", 0, 2, 4), claims)
    assert "host-b: 6 NPUs free, not 4 under its rings-of-4 rule" in result.unplaced[("ns/ds", "0-m0")].message


def test_preferred_label_keeps_a_group_under_one_switch_and_says_when_it_cannot() -> None:
    nodes = [node("a", labels={"sw": "1"}), node("b", labels={"sw": "2"}), node("c", labels={"sw": "2"})]
    result = run(nodes, group("ns/ds", 0, 2, 8, topology_key="sw"))
    assert {result.assignments[("ns/ds", member_slot(0, m))].node_id for m in range(2)} == {"b", "c"}
    assert ("ns/ds", "0") not in result.group_notes
    spread = run(nodes, group("ns/ds", 0, 3, 8, topology_key="sw"))
    assert len([k for k in spread.assignments if k[0] == "ns/ds"]) == 3
    assert spread.group_notes[("ns/ds", "0")].startswith("groupTopologyKey not met")


def test_a_running_group_keeps_its_members() -> None:
    nodes = [node("a"), node("b"), node("c")]
    first = run(nodes, group("ns/ds", 0, 2, 4))
    second = run(nodes, [ReplicaRequest(deployment="ns/new", slot="0", npus=4), *group("ns/ds", 0, 2, 4)],
                 claims_of(first))
    for key, assignment in first.assignments.items():
        assert second.assignments[key].kept and second.assignments[key].node_id == assignment.node_id


def test_a_member_whose_node_is_lost_is_re_placed_with_its_group_or_the_group_lets_go() -> None:
    nodes = [node("a"), node("b"), node("c")]
    first = run(nodes, group("ns/ds", 0, 2, 8))
    lost = first.assignments[("ns/ds", "0-m1")].node_id
    gone = [n if n.id != lost else node(n.id, state="down", since=NOW.replace(hour=10)) for n in nodes]
    second = run(gone, group("ns/ds", 0, 2, 8), claims_of(first))
    assert {a.node_id for k, a in second.assignments.items() if k[0] == "ns/ds"} == {"a", "c"} - {lost} | {
        first.assignments[("ns/ds", "0-m0")].node_id}
    # No third node: the survivor is let go rather than holding its NPUs while it waits.
    two = [n for n in gone if n.id != "c"] if lost != "c" else gone[:2]
    third = run(two, group("ns/ds", 0, 2, 8), claims_of(first))
    assert not [k for k in third.assignments if k[0] == "ns/ds"]
    assert "its group cannot be placed whole" in third.moved[("ns/ds", "0-m0")]


def test_pinned_npu_ids_hold_on_every_member() -> None:
    nodes = [node("a"), node("b")]
    claims = [Allocation(deployment="ns/x", slot="0", node_id="b", npus=frozenset({1}), service="x")]
    ok = run(nodes, group("ns/ds", 0, 2, 2, npu_ids=frozenset({2, 3}), one_per_node=True), claims)
    assert {a.npus for a in ok.assignments.values() if a.deployment == "ns/ds"} == {frozenset({2, 3})}
    refused = run(nodes, group("ns/ds", 0, 2, 2, npu_ids=frozenset({0, 1}), one_per_node=True), claims)
    assert "host-b: pinned NPUs [1] are not free" in refused.unplaced[("ns/ds", "0-m0")].message


# --- properties over random mixes of groups and single replicas ------------------------------

nodes_strategy = st.lists(
    st.tuples(st.sampled_from([4, 8]), st.sampled_from(["any", "rings-of-4"]), st.booleans(),
              st.sampled_from(["1", "2"])),
    min_size=1, max_size=6,
).map(lambda specs: [
    node(f"n{i}", npus, topology=topo, state="ready" if up else "down", labels={"sw": sw})  # type: ignore[arg-type]
    for i, (npus, topo, up, sw) in enumerate(specs)
])
work_strategy = st.lists(
    st.tuples(st.sampled_from([1, 1, 2, 3]), st.sampled_from([1, 2, 4, 8]), st.booleans()),
    min_size=1, max_size=8,
).map(lambda items: [
    request
    for d, (members, npus, keyed) in enumerate(items)
    for request in (
        group(f"ns/g{d}", 0, members, npus, topology_key="sw" if keyed else None) if members > 1
        else [ReplicaRequest(deployment=f"ns/r{d}", slot="0", npus=npus)]
    )
])


def assert_whole_groups(nodes: list[NodeInfo], requests: list[ReplicaRequest], result: PlacementResult) -> None:
    by_id = {n.id: n for n in nodes}
    seen: set[tuple[str, int]] = set()
    for assignment in result.assignments.values():
        for npu in assignment.npus:
            assert (assignment.node_id, npu) not in seen, "an NPU given twice"
            seen.add((assignment.node_id, npu))
        target = by_id[assignment.node_id]
        assert assignment.npus <= target.usable_npus
        if not assignment.kept:
            assert target.accepts_new_replicas and is_valid_set(assignment.npus, target.topology)
    groups: dict[tuple[str, str], list[ReplicaRequest]] = {}
    for request in requests:
        if request.group_key is not None:
            groups.setdefault(request.group_key, []).append(request)
    ports: dict[tuple[str, int], tuple[str, str]] = {}
    for members in groups.values():
        placed = [result.assignments[m.key] for m in members if m.key in result.assignments]
        assert len(placed) in (0, len(members)), "a half-placed group"
        assert len({a.node_id for a in placed}) == len(placed), "two members on one node"
        for member, assignment in zip(members, placed):
            assert assignment.group is not None and assignment.group.member == member.member
            owner = ports.setdefault((assignment.node_id, assignment.group.ports.block), member.group_key)
            assert owner == member.group_key, "a host port block given twice on one node"
        assert len({a.group.ports.block for a in placed if a.group}) <= 1, "one group, one block"


@settings(max_examples=300, deadline=None)
@given(nodes_strategy, work_strategy)
def test_never_a_half_placed_group_an_npu_given_twice_or_two_members_on_one_node(
    nodes: list[NodeInfo], requests: list[ReplicaRequest]
) -> None:
    first = run(nodes, requests)
    assert_whole_groups(nodes, requests, first)
    # Again with what runs, after some nodes went down for longer than the grace.
    later = [n if i % 2 else node(n.id, len(n.npus), topology=n.topology, labels=n.labels, state="down",
                                  since=NOW.replace(hour=10)) for i, n in enumerate(nodes)]
    second = run(later, list(reversed(requests)), claims_of(first))
    assert_whole_groups(later, list(reversed(requests)), second)


def test_status_says_when_the_preferred_label_could_not_be_met() -> None:
    from npuswarm.core.pipeline import plan_pass
    from npuswarm.core.status import deployment_status
    from npuswarm.core.diff import Applied
    from npuswarm.core.snapshot import SwarmSnapshot

    nodes = [node(n, labels={"sw": sw}).model_copy(update={"addr": f"10.0.0.{sw}"})
             for n, sw in (("a", "1"), ("b", "2"))]
    md = deployment("ds", nodesPerReplica=2, npusPerReplica=8, groupTopologyKey="sw")
    whole = plan_pass([md], SwarmSnapshot(nodes=nodes, services=[]), now=NOW, lost_node_grace_seconds=GRACE)
    status = deployment_status(md, whole, Applied(), [], NOW)
    messages = [r.message or "" for r in status.replicaStatuses]
    assert len(messages) == 2 and all("groupTopologyKey not met" in m for m in messages)
    # The host network has no alias: the leader's node address and the group's API port.
    assert status.endpoint == "10.0.0.1:30000"


@settings(max_examples=200, deadline=None)
@given(nodes_strategy, work_strategy, st.lists(st.tuples(st.integers(0, 7), st.integers(0, 3)), max_size=8))
def test_no_group_gets_a_port_block_that_a_stopping_member_still_holds_on_its_nodes(
    nodes: list[NodeInfo], requests: list[ReplicaRequest], stopping: list[tuple[int, int]]
) -> None:
    """Tasks of removed members in their stop grace (core/snapshot.py stopping) keep
    their block on their node: nothing new is given that block there."""
    held = {(nodes[i % len(nodes)].id, block) for i, block in stopping}
    claims = [Allocation(deployment="", slot="", node_id=node_id, npus=frozenset(), foreign=True,
                         service=f"task {node_id}-{block} (stopping)", port_block=block)
              for node_id, block in sorted(held)]
    result = run(nodes, requests, claims)
    assert_whole_groups(nodes, requests, result)
    for assignment in result.assignments.values():
        if assignment.group is not None:
            assert (assignment.node_id, assignment.group.ports.block) not in held
