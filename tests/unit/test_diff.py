from __future__ import annotations

import copy
from typing import Any

from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.snapshot import SwarmSnapshot, snapshot_from_engine
from npuswarm.core.diff import Applied, DeploymentPlan
from npuswarm.core.pipeline import plan_pass
from npuswarm.core.status import deployment_status

from .builders import NOW, deployment, engine_node, engine_service, engine_task

NODES = [engine_node("node-a", "a", npus=[f"davinci{i}" for i in range(8)])]


def plan_for(
    md: ModelDeployment,
    services: list[dict[str, Any]] = (),  # type: ignore[assignment]
    tasks: list[dict[str, Any]] = (),  # type: ignore[assignment]
    others: list[ModelDeployment] = (),  # type: ignore[assignment]
    known: frozenset[str] = frozenset(),
    nodes: list[dict[str, Any]] = NODES,
) -> tuple[DeploymentPlan, SwarmSnapshot]:
    # An overlay npuswarm made for the namespace (the tenants' rule: docs/security.md).
    network = {"Id": "net-id", "Name": "vllm-net", "Scope": "swarm",
               "Labels": {"npuswarm.io/managed-by": "npuswarm", "npuswarm.io/namespace": "default"}}
    snapshot = snapshot_from_engine(nodes, list(services), list(tasks), [network])
    whole = plan_pass([*others, md], snapshot, now=NOW, lost_node_grace_seconds=60, known_services={md.key: known})
    return whole.plans[md.key], snapshot


def converge(md: ModelDeployment, ready: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The services and tasks Swarm would hold after applying md's first plan."""
    plan, _ = plan_for(md)
    services, tasks = [], []
    for index, action in enumerate(plan.actions):
        assert action.kind == "create" and action.spec is not None
        services.append(engine_service(action.spec, f"id{index}", network_ids={"vllm-net": "net-id"}))
        tasks.append(engine_task(f"id{index}", action.spec, state="running" if ready else "starting", task_id=f"t{index}"))
    return services, tasks


def kinds(plan: DeploymentPlan) -> list[tuple[str, str]]:
    return [(a.kind, a.slot) for a in plan.actions]


def test_new_deployment_creates_one_service_per_replica() -> None:
    plan, _ = plan_for(deployment(replicas=2, engine={"tensorParallelSize": 2}))
    assert kinds(plan) == [("create", "0"), ("create", "1")]


def test_converged_deployment_needs_no_write() -> None:
    md = deployment(replicas=2, engine={"tensorParallelSize": 2}, network={"name": "vllm-net"})
    services, tasks = converge(md)
    plan, _ = plan_for(md, services, tasks)
    assert plan.actions == [] and plan.deferred == []


def test_scale_down_removes_exactly_the_highest_replicas() -> None:
    services, tasks = converge(deployment(replicas=3))
    plan, _ = plan_for(deployment(replicas=1), services, tasks)
    assert sorted(kinds(plan)) == [("remove", "1"), ("remove", "2")]


def test_spec_edit_updates_one_replica_at_a_time_by_default() -> None:
    services, tasks = converge(deployment(replicas=3))
    edited = deployment(replicas=3, image="vllm-ascend:new", generation=2)
    plan, _ = plan_for(edited, services, tasks)
    assert kinds(plan) == [("update", "0")]
    assert [a.slot for a in plan.deferred] == ["1", "2"]
    assert plan.actions[0].reason == "spec changed" and plan.actions[0].drift is None


def test_max_unavailable_counts_replicas_already_down() -> None:
    services, tasks = converge(deployment(replicas=3))
    tasks[2] = dict(tasks[2], Status={"State": "failed", "Err": "boom", "Timestamp": "2026-11-30T11:00:00Z"})
    edited = deployment(replicas=3, image="vllm-ascend:new", updateStrategy={"maxUnavailable": 1})
    plan, _ = plan_for(edited, services, tasks)
    # Replica 2 is down anyway, so it is updated; nothing else may go down.
    assert kinds(plan) == [("update", "2")]
    assert [a.slot for a in plan.deferred] == ["0", "1"]


def test_hand_edit_is_drift_and_is_reverted() -> None:
    md = deployment(replicas=1)
    services, tasks = converge(md)
    services[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"].append("EXTRA=1")
    plan, _ = plan_for(md, services, tasks)
    assert kinds(plan) == [("update", "0")]
    assert plan.actions[0].drift == "service_updated"


def test_service_removed_by_hand_is_recreated_as_drift() -> None:
    md = deployment(replicas=2)
    services, tasks = converge(md)
    known = frozenset(s["Spec"]["Name"] for s in services)
    plan, _ = plan_for(md, services[:1], tasks[:1], known=known)
    assert kinds(plan) == [("create", "1")]
    assert plan.actions[0].drift == "service_recreated"


def test_surge_starts_a_copy_on_spare_npus_then_drops_the_old_one() -> None:
    md = deployment(replicas=1, engine={"tensorParallelSize": 4}, updateStrategy={"maxSurge": 1, "maxUnavailable": 0})
    services, tasks = converge(md)
    edited = deployment(replicas=1, engine={"tensorParallelSize": 4}, image="vllm-ascend:new",
                        updateStrategy={"maxSurge": 1, "maxUnavailable": 0})
    plan, _ = plan_for(edited, services, tasks)
    assert kinds(plan) == [("create", "0")]
    surge = plan.actions[0]
    assert surge.service_name.endswith("-surge")
    assert surge.spec is not None and surge.spec["Labels"]["npuswarm.io/npus"] == "4,5,6,7"

    # While the copy starts, both stay; once it runs, the old one goes.
    surge_service = engine_service(surge.spec, "surge-id")
    starting = engine_task("surge-id", surge.spec, state="starting", task_id="ts")
    plan, _ = plan_for(edited, [*services, surge_service], [*tasks, starting])
    assert plan.actions == []
    running = engine_task("surge-id", surge.spec, state="running", task_id="ts")
    plan, _ = plan_for(edited, [*services, surge_service], [*tasks, running])
    assert kinds(plan) == [("remove", "0")]
    assert plan.actions[0].service_name == services[0]["Spec"]["Name"]

    # And with only the copy left, nothing more happens: its name is kept.
    plan, _ = plan_for(edited, [surge_service], [running])
    assert plan.actions == []


def test_surge_without_spare_npus_falls_back_to_waiting() -> None:
    md = deployment(replicas=2, engine={"tensorParallelSize": 4}, updateStrategy={"maxSurge": 1, "maxUnavailable": 0})
    services, tasks = converge(md)
    edited = deployment(replicas=2, engine={"tensorParallelSize": 4}, image="new",
                        updateStrategy={"maxSurge": 1, "maxUnavailable": 0})
    plan, _ = plan_for(edited, services, tasks)
    assert plan.actions == []
    assert len(plan.deferred) == 2


def test_other_deployments_claims_are_respected() -> None:
    first = deployment("first", engine={"tensorParallelSize": 8}, created="2026-01-01T00:00:00Z")
    services, tasks = converge(first)
    second = deployment("second", engine={"tensorParallelSize": 4}, created="2026-01-02T00:00:00Z")
    plan, snapshot = plan_for(second, services, tasks, others=[first])
    assert plan.actions == []
    whole = plan_pass([first, second], snapshot, now=NOW, lost_node_grace_seconds=60)
    status = deployment_status(second, whole, Applied(), [], NOW)
    assert status.phase == "Degraded"
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert degraded.reason == "InsufficientNPUs"
    assert "needs 4" in degraded.message


def test_status_ready_only_when_tasks_run_and_degraded_with_the_task_error() -> None:
    md = deployment(replicas=2)
    services, tasks = converge(md)
    plan, snapshot = plan_for(md, services, tasks)
    status = deployment_status(md, plan_pass([md], snapshot, now=NOW, lost_node_grace_seconds=60), Applied(), [], NOW)
    assert (status.phase, status.readyReplicas, status.replicas, status.npus) == ("Ready", 2, 2, 2)

    error = "starting container failed: no NPU devices"
    tasks[1] = engine_task("id1", plan.desired["1"], state="failed", desired="running", error=error, task_id="t1")
    plan, snapshot = plan_for(md, services, tasks)
    status = deployment_status(md, plan_pass([md], snapshot, now=NOW, lost_node_grace_seconds=60), Applied(), [], NOW)
    ready = next(c for c in status.conditions if c.type == "Ready")
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert ready.status == "False"
    assert degraded.status == "True" and degraded.reason == "TaskFailed" and error in degraded.message
    assert status.replicaStatuses[1].lastError == error


def test_unowned_services_are_never_npuswarms_but_their_npus_are_taken() -> None:
    md = deployment(replicas=1)
    services, tasks = converge(md)
    foreign = engine_service(services[0]["Spec"], "foreign")
    foreign["Spec"] = dict(foreign["Spec"], Name="someone-elses", Labels={})
    snapshot = snapshot_from_engine(NODES, [*services, foreign], tasks, [])
    assert [s.id for s in snapshot.services] == ["id0"]
    held = services[0]["Spec"]["Labels"]["npuswarm.io/npus"]
    assert [(c.service, c.node_id, sorted(c.npus)) for c in snapshot.foreign] == [
        ("someone-elses", "node-a", [int(held)])
    ]


def test_recreated_object_adopts_its_running_replicas() -> None:
    services, tasks = converge(deployment(replicas=2))
    recreated = deployment(replicas=2)
    recreated.metadata.uid = "a-new-uid"
    plan, _ = plan_for(recreated, services, tasks)
    assert plan.actions == [] and plan.deferred == []


def test_outage_status_keeps_replicas_but_is_never_ready() -> None:
    from npuswarm.core.status import unavailable_status

    previous = {"phase": "Ready", "readyReplicas": 2, "replicas": 2,
                "replicaStatuses": [{"replica": "0", "ready": True}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "AllReplicasReady",
                                "lastTransitionTime": "2026-11-30T11:00:00Z"}]}
    status = unavailable_status(3, "list_nodes: connection refused", previous, NOW)
    assert status.phase != "Ready" and status.observedGeneration == 3
    assert status.replicaStatuses[0].replica == "0" and status.readyReplicas == 2
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("Unknown", "SwarmUnavailable")
    assert ready.lastTransitionTime != "2026-11-30T11:00:00Z"


def test_a_moved_replicas_old_task_keeps_its_npus_until_it_has_stopped() -> None:
    """An update moved replica 0 of `a` from NPUs 4-7 to 0-3 (a re-placement); its old task
    runs on through its stop grace on 4-7. A new deployment needing 4 NPUs waits for them
    instead of starting its container on NPUs a running container still uses."""
    a = deployment(name="a", replicas=1, npusPerReplica=4, created="2026-01-01T00:00:00Z")
    services, tasks = converge(a)
    old_spec = copy.deepcopy(services[0]["Spec"])
    old_spec["TaskTemplate"]["ContainerSpec"]["Labels"]["npuswarm.io/npus"] = "4-7"
    stopping = engine_task("id0", old_spec, state="running", desired="shutdown", task_id="old")
    b = deployment(name="b", replicas=1, npusPerReplica=4, created="2026-01-02T00:00:00Z")

    waits, snapshot = plan_for(b, services, [*tasks, stopping], others=[a])
    assert [(c.node_id, sorted(c.npus)) for c in snapshot.stopping] == [("node-a", [4, 5, 6, 7])]
    assert [action.kind for action in waits.actions] == [], "nothing starts on NPUs still in use"

    exited = dict(stopping, Status={"State": "shutdown", "Timestamp": "2026-11-30T11:01:00Z"})
    placed, _ = plan_for(b, services, [*tasks, exited], others=[a])
    assert [action.kind for action in placed.actions] == ["create"], "placed once the old task exited"
