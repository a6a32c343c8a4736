"""The one-pass reconcile against an in-memory Swarm behind the real interface."""

from __future__ import annotations

from typing import Any

import pytest

from npuswarm.api.deployment import ModelDeployment
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.core.pipeline import Desired
from npuswarm.settings import Settings
from npuswarm.swarm import SwarmUnavailable

from .builders import NOW, deployment
from .memswarm import MemorySwarm


class Catalog:
    """The complete read of ModelDeployments that confirms orphans; None: the read failed."""

    def __init__(self, existing: set[str] | None) -> None:
        self.found = existing
        self.asked: list[set[str]] = []

    def existing(self, owners: set[str], plural: str = "modeldeployments") -> set[str] | None:
        self.asked.append(set(owners))
        return None if self.found is None else owners & self.found


def reconciler(swarm: MemorySwarm, owners: Catalog | None = None) -> Reconciler:
    return Reconciler(swarm, Settings(lost_node_grace_seconds=60), clock=lambda: NOW, owners=owners)


def run(r: Reconciler, deployments: list[ModelDeployment], **desired: Any) -> PassResult:
    return r.run_pass(Desired(deployments=deployments, **desired))


def models(count: int, npus: int = 1) -> list[ModelDeployment]:
    return [
        deployment(f"m{i}", created=f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z", npusPerReplica=npus)
        for i in range(count)
    ]


def test_one_observation_serves_every_deployment_and_a_no_op_pass_writes_nothing() -> None:
    for count in (1, 12):
        swarm = MemorySwarm(nodes=2)
        r = reconciler(swarm)
        first = run(r, models(count))
        assert swarm.calls["create_service"] == count == first.writes
        swarm.run_all()
        listed = {k: v for k, v in swarm.calls.items() if k.startswith("list_")}
        again = run(r, models(count))
        assert again.writes == 0 and swarm.writes() == count
        # One list call of each kind per pass, however many deployments.
        assert {k: swarm.calls[k] - listed[k] for k in listed} == dict.fromkeys(listed, 1)
        assert all(v.status.phase == "Ready" for v in again.views.values())


def test_k_changed_deployments_cost_k_writes() -> None:
    swarm = MemorySwarm(nodes=2)
    r = reconciler(swarm)
    everyone = models(10)
    run(r, everyone)
    swarm.run_all()
    before = swarm.writes()
    changed = [
        deployment(md.metadata.name, created=md.metadata.creationTimestamp or "", npusPerReplica=1,
                   engine={"env": {"NEW": "1"}}) if i < 3 else md
        for i, md in enumerate(everyone)
    ]
    result = run(r, changed)
    assert swarm.writes() - before == 3 == result.writes
    assert {k for k, v in result.views.items() if v.applied} == {"default/m0", "default/m1", "default/m2"}


def test_orphans_go_only_after_a_complete_read_says_their_owner_is_gone() -> None:
    swarm = MemorySwarm()
    everyone = models(2)
    run(reconciler(swarm), everyone)
    assert len(swarm.services) == 2

    # The index no longer has m1, but the API server's list failed: nothing is removed.
    failed = Catalog(None)
    result = run(reconciler(swarm, failed), everyone[:1])
    assert failed.asked == [{"default/m1"}] and result.orphans_removed == []
    assert len(swarm.services) == 2
    # ...and the pass says so, so that the runtime asks again soon, not at the resync.
    assert result.plan.unconfirmed_orphans == {"default/m1"}

    # The list says m1 still exists (the index lags): kept.
    result = run(reconciler(swarm, Catalog({"default/m0", "default/m1"})), everyone[:1])
    assert result.orphans_removed == [] and len(swarm.services) == 2
    assert result.plan.unconfirmed_orphans == frozenset()  # decided: it exists

    # Outside the watched namespaces: never judged, not even asked about.
    elsewhere = Catalog(set())
    run(reconciler(swarm, elsewhere), everyone[:1], namespaces=frozenset({"team-a"}))
    assert elsewhere.asked == [] and len(swarm.services) == 2

    # Confirmed gone: removed, and only that owner's service.
    result = run(reconciler(swarm, Catalog({"default/m0"})), everyone[:1])
    assert [a.service_name for a in result.orphans_removed] == ["default-m1-0"]
    assert sorted(swarm.by_name()) == ["default-m0-0"]


def test_a_deleted_deployment_is_never_recreated_by_a_pass_that_read_it_before() -> None:
    swarm = MemorySwarm()
    r = reconciler(swarm)
    md = models(1)[0]
    run(r, [md])
    assert r.finalize("default", md.metadata.name, md.metadata.uid) == 1
    stale = run(r, [md])  # desired state read before the deletion
    assert swarm.services == {} and stale.writes == 0


def test_services_of_deleting_and_invalid_deployments_are_left_alone() -> None:
    swarm = MemorySwarm()
    r = reconciler(swarm, Catalog(set()))
    a, b = models(2)
    run(r, [a, b])
    result = run(r, [], deleting=frozenset({a.key}), invalid={b.key: (2, "InvalidSpec", "spec.image: required")})
    assert len(swarm.services) == 2 and result.writes == 0
    invalid = result.views[b.key].status
    assert invalid.phase == "Invalid" and invalid.observedGeneration == 2


def foreign_spec(name: str, npus: str, node: str) -> dict[str, Any]:
    return {
        "Name": name,
        "Labels": {"com.docker.stack.namespace": "vllm_cluster"},
        "TaskTemplate": {
            "ContainerSpec": {"Image": "vllm-ascend", "Env": [f"ASCEND_VISIBLE_DEVICES={npus}"]},
            "Placement": {"Constraints": [f"node.hostname=={node}"]},
        },
    }


def test_npus_of_services_npuswarm_does_not_own_are_never_given_out() -> None:
    swarm = MemorySwarm(nodes=1)
    swarm.add_service(foreign_spec("vllm_cluster_vllm-qwen3", "0-3", "host1"), node_id="node1")
    r = reconciler(swarm, Catalog(set()))
    result = run(r, [deployment("big", npusPerReplica=4), deployment("more", npusPerReplica=4,
                                                                     created="2026-01-02T00:00:00Z")])
    placed = {v.key: v.status.replicaStatuses[0].npus for v in result.views.values()}
    assert placed["default/big"] == [4, 5, 6, 7] and placed["default/more"] == []
    assert result.views["default/more"].status.conditions[2].reason == "InsufficientNPUs"
    assert "vllm_cluster_vllm-qwen3" in swarm.by_name()  # never touched
    states = result.npu_states()
    assert (states[("host1", "foreign")], states[("host1", "allocated")], states[("host1", "free")]) == (4, 4, 0)


def test_a_foreign_service_on_held_npus_leaves_both_running_and_names_it() -> None:
    swarm = MemorySwarm(nodes=1)
    r = reconciler(swarm, Catalog(set()))
    md = deployment("held", npusPerReplica=4)
    run(r, [md])
    swarm.run_all()
    swarm.add_service(foreign_spec("intruder", "0-1", "host1"), node_id="node1")
    result = run(r, [md])
    view = result.views[md.key]
    assert result.writes == 0 and len(swarm.services) == 2
    degraded = next(c for c in view.status.conditions if c.type == "Degraded")
    assert degraded.reason == "NPUConflict" and "intruder" in degraded.message
    assert any(e.reason == "NPUConflict" and "intruder" in e.message for e in view.events)


def test_another_installations_services_are_foreign() -> None:
    swarm = MemorySwarm(nodes=1, instance="staging")  # both installations share this Swarm
    staging = Reconciler(swarm, Settings(instance="staging"), clock=lambda: NOW)
    run(staging, [deployment("s", npusPerReplica=8)])
    assert swarm.by_name()["default-s-0"]["Spec"]["Labels"]["npuswarm.io/instance"] == "staging"
    swarm.instance = "default"  # now read as the default installation reads it
    prod = reconciler(swarm, Catalog(set()))
    result = run(prod, [deployment("p", npusPerReplica=4)])
    assert result.orphans_removed == [] and "default-s-0" in swarm.by_name()
    assert result.views["default/p"].status.placedReplicas == 0


def test_a_refused_write_is_reported_for_its_replica_only() -> None:
    swarm = MemorySwarm()
    swarm.refuse["default-m1-0"] = "name conflicts with an existing object"
    result = run(reconciler(swarm), models(3))
    assert sorted(swarm.by_name()) == ["default-m0-0", "default-m2-0"]
    refused = result.views["default/m1"]
    assert refused.status.phase == "Degraded"
    assert "name conflicts" in (refused.status.replicaStatuses[0].message or "")
    assert result.views["default/m0"].status.phase != "Degraded"


def test_an_unreachable_swarm_raises_and_removes_nothing() -> None:
    swarm = MemorySwarm()
    r = reconciler(swarm, Catalog(set()))
    run(r, models(2))
    swarm.down = True
    with pytest.raises(SwarmUnavailable):
        run(r, [])
    swarm.down = False
    assert len(swarm.services) == 2


def test_a_missing_network_is_created_first_and_removed_when_nothing_uses_it() -> None:
    swarm = MemorySwarm()
    swarm.networks.append({"Id": "theirs", "Name": "shared", "Labels": {}})
    r = reconciler(swarm, Catalog(set()))
    md = deployment("netted", network={"name": "models-net"})
    on_shared = deployment("other", network={"name": "shared"}, created="2026-01-02T00:00:00Z")
    run(r, [md, on_shared])
    created = {n["Name"]: n for n in swarm.networks}
    assert created["models-net"]["Labels"] == {
        "npuswarm.io/managed-by": "npuswarm", "npuswarm.io/namespace": "default"}
    assert swarm.calls["create_network"] == 1  # "shared" exists: never created, never owned
    service = swarm.by_name()["default-netted-0"]["Spec"]["TaskTemplate"]["Networks"]
    assert service[0]["Target"] == "models-net"
    assert run(r, [md, on_shared]).writes == 0 and swarm.calls["create_network"] == 1

    # Gone from every spec: the services go, then the network npuswarm made; never "shared".
    run(r, [])
    assert {n["Name"] for n in swarm.networks} == {"vllm-net", "shared"}
    assert swarm.services == {}


def test_a_network_that_is_not_swarm_scoped_is_refused_by_policy_and_writes_nothing() -> None:
    swarm = MemorySwarm()
    swarm.networks.append({"Id": "b1", "Name": "my-bridge", "Scope": "local", "Labels": {}})
    result = run(reconciler(swarm), [deployment("bridged", network={"name": "my-bridge"})])
    view = result.views["default/bridged"]
    assert swarm.services == {} and result.writes == 0
    assert view.status.phase == "Invalid"
    degraded = next(c for c in view.status.conditions if c.type == "Degraded")
    assert degraded.reason == "PolicyViolation" and "local network" in degraded.message


def test_a_replica_on_a_node_that_went_down_is_not_ready_and_degraded_names_the_node() -> None:
    swarm = MemorySwarm()
    (md,) = models(1)
    first = run(reconciler(swarm), [md])
    swarm.run_all()
    assert run(reconciler(swarm), [md]).views[md.key].status.phase == "Ready"
    node_id = first.views[md.key].status.replicaStatuses[0].nodeId
    (node,) = [n for n in swarm.nodes if n["ID"] == node_id]
    node["Status"]["State"] = "down"
    node["UpdatedAt"] = "2026-11-30T11:59:50Z"  # 10 s before NOW: within the 60 s grace

    writes = swarm.writes()
    status = run(reconciler(swarm), [md]).views[md.key].status
    assert swarm.writes() == writes  # within the grace nothing moves
    (replica,) = status.replicaStatuses
    assert not replica.ready and replica.nodeId == node_id
    assert "host" in (replica.message or "") and "is down since 2026-11-30T11:59:50Z" in replica.message
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "NodeUnavailable")
    assert node["Description"]["Hostname"] in degraded.message and "60s" in degraded.message
    assert status.readyReplicas == 0 and status.phase == "Degraded"
