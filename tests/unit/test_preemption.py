"""Priority, preemption and namespace NPU quotas (issue 21 item 4), over the real pass against
an in-memory Swarm, and the pure steps alone."""

from __future__ import annotations

from typing import Any

from npuswarm import metrics
from npuswarm.api import labels
from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.autoscale import headroom
from npuswarm.core.pipeline import Desired
from npuswarm.core.quota import Quotas
from npuswarm.gateway.push import Gateways
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.settings import Settings

from .builders import NOW, deployment
from .memswarm import MemorySwarm
from .test_gateway import CREDENTIALS, Recorder, gateway, overlay_swarm, run_with_addresses, settle


def md(name: str, *, npus: int, replicas: int = 1, priority: int = 0, minute: int = 0,
       namespace: str = "default", **spec: Any) -> ModelDeployment:
    return deployment(name, namespace, created=f"2026-01-01T00:{minute:02d}:00Z", npusPerReplica=npus,
                      replicas=replicas, priority=priority, **spec)


def reconciler(swarm: MemorySwarm, **settings: Any) -> Reconciler:
    return Reconciler(swarm, Settings(lost_node_grace_seconds=60, **settings), clock=lambda: NOW)


def run(r: Reconciler, deployments: list[ModelDeployment], **desired: Any) -> PassResult:
    return r.run_pass(Desired(deployments=deployments, **desired))


def services_of(swarm: MemorySwarm, owner: str) -> list[str]:
    return sorted(s["Spec"]["Name"] for s in swarm.services.values()
                  if s["Spec"]["Labels"].get(labels.OWNER_NAME) == owner)


def held_twice(swarm: MemorySwarm) -> list[tuple[str, str]]:
    """(node, NPU) held by two live tasks, stopping ones included."""
    seen: dict[tuple[str, str], int] = {}
    for task in swarm.tasks:
        npus = task["Spec"]["ContainerSpec"]["Labels"].get(labels.NPUS, "")
        for npu in filter(None, npus.split(",")):
            seen[(task["NodeID"], npu)] = seen.get((task["NodeID"], npu), 0) + 1
    return [k for k, n in seen.items() if n > 1]


# --- priority orders placement -----------------------------------------------------------


def test_higher_priority_is_placed_first_and_age_breaks_ties() -> None:
    swarm = MemorySwarm(nodes=1, npus=8)
    old_low = md("old-low", npus=4, minute=0)
    young_high = md("young-high", npus=4, minute=5, priority=10)
    young_low = md("young-low", npus=4, minute=6)
    result = run(reconciler(swarm), [old_low, young_low, young_high])
    placed = {key[0] for key in result.plan.placement.assignments}
    assert placed == {young_high.key, old_low.key}, "priority first, then the older one"


# --- preemption ----------------------------------------------------------------------------


def full_fleet() -> tuple[MemorySwarm, Reconciler, list[ModelDeployment]]:
    """Two 8-NPU nodes full of priority-0 replicas: 4+4 on node1, 2+2+2+2 on node2."""
    swarm = MemorySwarm(nodes=2, npus=8)
    swarm.stop_grace = True
    r = reconciler(swarm)
    big = md("big", npus=4, replicas=2, minute=0, nodeSelector={"kind": "a"})
    small = md("small", npus=2, replicas=4, minute=1, nodeSelector={"kind": "b"})
    swarm.nodes[0]["Spec"]["Labels"] = {"kind": "a", "all": "y"}
    swarm.nodes[1]["Spec"]["Labels"] = {"kind": "b", "all": "y"}
    run(r, [big, small])
    swarm.run_all()
    return swarm, r, [big, small]


def test_a_higher_priority_replica_stops_the_fewest_lower_ones_then_waits_for_their_npus() -> None:
    swarm, r, low = full_fleet()
    urgent = md("urgent", npus=4, priority=100, minute=9, nodeSelector={"all": "y"})
    counted = metrics.REGISTRY.get_sample_value("npuswarm_preemptions_total", {"namespace": "default"}) or 0
    first = run(r, [*low, urgent])
    assert metrics.REGISTRY.get_sample_value("npuswarm_preemptions_total", {"namespace": "default"}) == counted + 1
    # One 4-NPU replica on node1 beats two 2-NPU replicas on node2.
    (preemption,) = first.plan.preemptions
    assert [v.name for v in preemption.victims] == ["default/big[0]"]
    assert services_of(swarm, "big") == ["default-big-1"]
    assert services_of(swarm, "urgent") == [], "not placed while the victim still stops"
    victim = first.views["default/big"]
    message = victim.status.replicaStatuses[0].message or ""
    assert "preempted by default/urgent[0] (priority 100 > 0)" in message
    assert any(e.reason == "Preempted" and "default/urgent[0]" in e.message for e in victim.events)
    assert any(e.reason == "Preempting" and "default/big[0]" in e.message
               for e in first.views["default/urgent"].events)
    assert first.views["default/urgent"].status.phase != "Degraded"

    # The victim's task is still in its stop grace: nothing is given its NPUs, nobody else
    # is preempted, and the victim is not placed back by stopping the preemptor.
    previous = {"default/big": first.views["default/big"].status.model_dump()}
    waiting = run(r, [*low, urgent], previous=previous)
    said = waiting.views["default/big"].status.replicaStatuses[0].message or ""
    assert said.startswith("preempted by default/urgent[0] (priority 100 > 0); needs 4 free NPUs"), said
    assert waiting.plan.preemptions == [] and services_of(swarm, "urgent") == []
    (held,) = [u for u in waiting.plan.placement.unplaced.values() if u.deployment == urgent.key]
    assert held.reason == "NPUsReleasing" and "host1" in held.message
    assert waiting.views["default/urgent"].status.phase != "Degraded"
    assert services_of(swarm, "small") == [f"default-small-{i}" for i in range(4)]
    assert held_twice(swarm) == []

    swarm.finish_stopping()
    placed = run(r, [*low, urgent])
    assert services_of(swarm, "urgent") == ["default-urgent-0"]
    swarm.run_all()
    steady = run(r, [*low, urgent])
    assert steady.writes == 0 and held_twice(swarm) == []
    big = steady.views["default/big"].status
    assert big.placedReplicas == 1 and big.phase == "Progressing", "serving, waiting for NPUs"
    assert placed.plan.preemptions == [] and steady.plan.preemptions == []


def test_two_preemptors_on_one_node_stop_a_victim_each() -> None:
    """Found by the autoscaler's headroom: the second replica of a pass was promised the
    NPUs the first one's victim frees, and both waited for the same one."""
    swarm = MemorySwarm(nodes=1, npus=8)
    r = reconciler(swarm)
    low = md("low", npus=2, replicas=4)
    run(r, [low])
    swarm.run_all()
    urgent = md("urgent", npus=2, replicas=2, priority=100, minute=9)
    result = run(r, [low, urgent])
    victims = [v.name for p in result.plan.preemptions for v in p.victims]
    assert len(victims) == 2 and len(set(victims)) == 2, victims
    assert len(services_of(swarm, "low")) == 2


def test_equal_priority_never_preempts() -> None:
    swarm, r, low = full_fleet()
    same = md("same", npus=4, priority=0, minute=9, nodeSelector={"all": "y"})
    result = run(r, [*low, same])
    assert result.plan.preemptions == [] and services_of(swarm, "same") == []
    assert services_of(swarm, "big") == ["default-big-0", "default-big-1"]


def test_a_victim_keeps_its_autoscaling_min_replicas() -> None:
    swarm = MemorySwarm(nodes=1, npus=8)
    r = reconciler(swarm)
    scaled = md("scaled", npus=4, replicas=2, autoscaling={
        "minReplicas": 2, "maxReplicas": 2, "target": {"metric": "requestsWaitingPerReplica", "value": 1}})
    run(r, [scaled])
    swarm.run_all()
    urgent = md("urgent", npus=4, priority=5, minute=9)
    result = run(r, [scaled, urgent])
    assert result.plan.preemptions == [] and len(services_of(swarm, "scaled")) == 2


def test_foreign_npus_are_never_counted_as_room() -> None:
    swarm = MemorySwarm(nodes=1, npus=8)
    swarm.add_service({"Name": "stack_train", "Labels": {}, "TaskTemplate": {"ContainerSpec": {
        "Env": ["ASCEND_VISIBLE_DEVICES=0,1,2,3,4,5"]}}}, node_id="node1")
    r = reconciler(swarm)
    low = md("low", npus=2)
    run(r, [low])
    swarm.run_all()
    urgent = md("urgent", npus=4, priority=9, minute=9)
    result = run(r, [low, urgent])
    assert result.plan.preemptions == [], "2 freed NPUs + 0 free cannot make 4 without the foreign ones"
    assert services_of(swarm, "low") == ["default-low-0"]


def test_a_victim_leaves_every_gateway_before_its_service_is_removed() -> None:
    swarm = overlay_swarm(nodes=1)
    swarm.nodes[0]["Status"]["Addr"] = "10.123.0.1"
    recorder = Recorder()
    removes = swarm.remove_service

    def recorded_remove(service_id: str) -> None:
        recorder.log.append(("remove", swarm.services[service_id]["Spec"]["Name"]))
        removes(service_id)

    swarm.remove_service = recorded_remove  # type: ignore[method-assign]
    gateways = Gateways("default", CREDENTIALS, send=recorder.send)
    r = Reconciler(swarm, Settings(), clock=lambda: NOW, gateways=gateways)
    low = md("low", npus=4, replicas=2, servedModelName="served-low", network={"name": "vllm-net"})
    gw = gateway()
    r.run_pass(Desired(deployments=[low], gateways=[gw]))
    run_with_addresses(swarm)
    (gw_service,) = [s for s in swarm.services.values() if labels.GATEWAY_NAME in s["Spec"]["Labels"]]
    swarm.tasks.append({"ID": "gw-task", "ServiceID": gw_service["ID"], "NodeID": "node1",
                        "DesiredState": "running", "CreatedAt": "2026-11-30T11:00:00Z",
                        "Status": {"State": "running", "Timestamp": "2026-11-30T11:00:00Z"},
                        "Spec": {"ContainerSpec": {"Labels": {}}}})
    r.run_pass(Desired(deployments=[low], gateways=[gw]))
    settle(gateways)
    assert recorder.log == [("push", {"served-low": 2})]
    recorder.log.clear()
    urgent = md("urgent", npus=4, priority=50, minute=9, servedModelName="served-urgent",
                network={"name": "vllm-net"})
    both = Desired(deployments=[low, urgent], gateways=[gw])
    result = r.run_pass(both)
    assert len(result.plan.preemptions) == 1
    # The push that drops the victim goes out, and the write that removes its service waits
    # for the pass after the gateway accepted it.
    settle(gateways)
    assert len(r.run_pass(both).plan.preemptions) == 1
    assert recorder.log == [("push", {"served-low": 1, "served-urgent": 0}), ("remove", "default-low-0")]


# --- namespace quotas ------------------------------------------------------------------------


def test_replicas_beyond_the_namespace_quota_are_not_placed_and_say_so() -> None:
    swarm = MemorySwarm(nodes=2, npus=8)
    r = reconciler(swarm)
    team = md("team", npus=4, replicas=3, namespace="team-a")
    other = md("other", npus=4, replicas=2, namespace="team-b")
    quotas = Quotas.from_annotations({"team-a": {"npuswarm.io/npu-quota": "8"}, "team-b": {}})
    result = run(r, [team, other], quotas=quotas)
    assert len(services_of(swarm, "team")) == 2 and len(services_of(swarm, "other")) == 2
    (refused,) = [u for u in result.plan.placement.unplaced.values()]
    assert refused.reason == "QuotaExceeded"
    assert "namespace team-a has an NPU quota of 8" in refused.message
    assert result.plan.placement.quota_room == {"team-a": 0}
    # The autoscaler's headroom does not ask past it, though 0 NPUs are free anyway: free two.
    swarm.run_all()
    smaller = md("other", npus=4, replicas=1, namespace="team-b")
    spare = run(r, [team, smaller], quotas=quotas)
    swarm.run_all()
    again = run(r, [team, smaller], quotas=quotas)
    assert spare.writes == 1 and again.writes == 0
    room = headroom(again.plan.placement, again.plan.snapshot.nodes, {team.key: 3, smaller.key: 2})
    assert room == {team.key: 2, smaller.key: 2}, "4 NPUs are free, but team-a's quota is used up"


def test_a_lowered_quota_stops_the_replicas_beyond_it_lowest_priority_first() -> None:
    swarm = MemorySwarm(nodes=1, npus=8)
    r = reconciler(swarm)
    keep = md("keep", npus=4, priority=5, namespace="t")
    drop = md("drop", npus=4, priority=1, namespace="t")
    run(r, [keep, drop])
    swarm.run_all()
    result = run(r, [keep, drop], quotas=Quotas({"t": 4}))
    assert services_of(swarm, "keep") == ["t-keep-0"] and services_of(swarm, "drop") == []
    assert result.views["t/drop"].status.replicaStatuses[0].message.startswith("namespace t has an NPU quota of 4")


def test_an_unreadable_quota_is_ignored_and_reported() -> None:
    quotas = Quotas.from_annotations({"a": {"npuswarm.io/npu-quota": "lots"}, "b": {"npuswarm.io/npu-quota": "3"}})
    assert quotas.npus == {"b": 3} and quotas.problems == {"a": "lots"}


def test_quotas_come_from_the_namespace_index_and_the_gate_waits_for_them() -> None:
    from npuswarm.core.hostpolicy import TenantPolicy
    from npuswarm.runtime.index import IndexGate, IndexReader

    quota_index: dict[Any, Any] = {"team-a": ["8"], "plain": []}
    reader = IndexReader(TenantPolicy(), None, {}, {}, quota_index)
    assert reader.desired({}, {}).quotas.npus == {"team-a": 8}
    assert reader.quota_changed("team-a", "8") and not reader.quota_changed("team-a", "8")
    assert reader.quota_changed("team-a", None), "a removed quota asks for a pass"
    gate = IndexGate(lambda plural: set(), lambda: {"team-a", "team-b"})
    assert not gate.check(reader, gate.list_all()), "team-b's quota is not indexed yet"
    quota_index["team-b"] = ["4"]
    assert gate.check(reader, gate.list_all())
    assert not IndexGate(lambda plural: set(), lambda: None).check(reader, None)


def test_a_multi_node_group_preempts_on_enough_nodes_and_a_group_victim_goes_whole() -> None:
    from npuswarm.core.placement import Allocation, by_priority, place_all
    from npuswarm.core.preemption import preempt, ranks

    from .builders import node

    nodes = [node("a"), node("b"), node("c")]
    low = md("low", npus=8, replicas=3)  # one 8-NPU replica on every node
    first = place_all([low], nodes, [], now=NOW, lost_node_grace_seconds=60)
    running = [Allocation(deployment=a.deployment, slot=a.slot, node_id=a.node_id, npus=a.npus, service=f"s{a.slot}")
               for a in first.assignments.values()]
    group = md("group", npus=8, nodesPerReplica=2, priority=7, minute=5,
               engine={"tensorParallelSize": 4, "dataParallelSize": 4})
    ranked = by_priority([low, group])
    second = place_all(ranked, nodes, running, now=NOW, lost_node_grace_seconds=60)
    assert not any(k[0] == group.key for k in second.assignments)
    outcome = preempt(second, ranks(ranked))
    (preemption,) = outcome.preemptions
    assert len(preemption.victims) == 2 and len(set(preemption.nodes)) == 2
    assert {k for k in second.evicted} == {k for v in preemption.victims for k in v.keys}

    # The other way round: a single replica of higher priority stops a whole group (all its
    # members, on both nodes), never half of it.
    big = md("big", npus=8, priority=9, minute=9)
    placed_group = place_all([group], nodes, [], now=NOW, lost_node_grace_seconds=60)
    members = [Allocation(deployment=a.deployment, slot=a.slot, node_id=a.node_id, npus=a.npus, service=f"m{a.slot}")
               for a in placed_group.assignments.values()]
    filler = md("filler", npus=8, priority=9, minute=1)
    taken = [n.id for n in nodes if n.id not in {m.node_id for m in members}]
    members.append(Allocation(deployment=filler.key, slot="0", node_id=taken[0], npus=frozenset(range(8)), service="f0"))
    ranked = by_priority([group, filler, big])
    third = place_all(ranked, nodes, members, now=NOW, lost_node_grace_seconds=60)
    (preemption,) = preempt(third, ranks(ranked)).preemptions
    (victim,) = preemption.victims
    assert victim.deployment == group.key and len(victim.keys) == 2 and victim.npus == 16


def test_a_replica_waiting_for_npus_being_released_is_not_overtaken_by_a_younger_one() -> None:
    swarm = MemorySwarm(nodes=1, npus=8)
    swarm.stop_grace = True
    r = reconciler(swarm)
    going = md("going", npus=4)
    run(r, [going])
    swarm.run_all()
    old_big = md("old-big", npus=8, minute=1)
    young = md("young", npus=4, minute=2)
    # "going" deleted: its replica's task still stops, and 4 NPUs are free.
    r.finalize("default", "going", going.metadata.uid)
    result = run(r, [old_big, young])
    # The older replica waits for all 8; the younger does not take the 4 free ones meanwhile
    # (it would have kept them for good).
    assert services_of(swarm, "young") == [] and services_of(swarm, "old-big") == []
    waiting = result.plan.placement.unplaced[(old_big.key, "0")]
    assert waiting.reason == "NPUsReleasing" and "NPUs [0, 1, 2, 3] on host1" in waiting.message
    assert result.views[old_big.key].status.phase != "Degraded"
    swarm.finish_stopping()
    run(r, [old_big, young])
    assert services_of(swarm, "old-big") == ["default-old-big-0"] and held_twice(swarm) == []
