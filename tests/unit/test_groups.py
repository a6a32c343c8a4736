"""A multi-node replica lives and dies together (issue 20 item 4): one member ending or moving
restarts every member, a group that keeps failing backs off, a rolling update replaces one
group at a time, and the status reads a group as one replica. Through the Reconciler over the
in-memory Swarm, so the pass runs as the operator runs it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from npuswarm.api import labels
from npuswarm.core.pipeline import Desired
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.settings import Settings

from .builders import NOW, deployment
from .memswarm import MemorySwarm

GROUP = {"nodesPerReplica": 2, "npusPerReplica": 8,
         "engine": {"tensorParallelSize": 4, "dataParallelSize": 4}}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self):  # type: ignore[no-untyped-def]
        return self.now


def setup(nodes: int = 3, **settings: Any) -> tuple[MemorySwarm, Reconciler, Clock]:
    swarm = MemorySwarm(nodes=nodes)
    clock = Clock()
    options = {"host_network_namespaces": "*", "failing_replica_backoff_seconds": 60,
               "failing_replica_cooldown_seconds": 600} | settings
    return swarm, Reconciler(swarm, Settings(**options), clock=clock), clock


def members(swarm: MemorySwarm) -> dict[str, dict[str, Any]]:
    return {s["Spec"]["Labels"][labels.REPLICA]: s for s in swarm.services.values()
            if labels.REPLICA in s["Spec"]["Labels"]}


def generations(swarm: MemorySwarm) -> dict[str, str]:
    return {slot: s["Spec"]["Labels"].get(labels.GROUP_GENERATION, "0") for slot, s in members(swarm).items()}


def end_task(swarm: MemorySwarm, slot: str, state: str = "failed", error: str = "exit 1") -> None:
    """The member's task of its current spec stops, as Swarm reports it (restart condition none:
    nothing starts again)."""
    service = members(swarm)[slot]
    spec = service["Spec"]
    swarm.tasks = [t for t in swarm.tasks if t["ServiceID"] != service["ID"]]
    swarm.tasks.append({
        "ID": f"ended-{service['ID']}", "ServiceID": service["ID"], "NodeID": spec["Labels"][labels.NODE],
        "DesiredState": "shutdown", "CreatedAt": "2026-11-30T11:30:00Z",
        "Status": {"State": state, "Timestamp": "2026-11-30T11:31:00Z", "Err": error},
        "Spec": {"ContainerSpec": {"Labels": spec["TaskTemplate"]["ContainerSpec"]["Labels"]}},
    })


def ready_pass(reconciler: Reconciler, swarm: MemorySwarm, *mds: Any) -> PassResult:
    reconciler.run_pass(Desired(deployments=list(mds)))
    swarm.run_all()
    result = reconciler.run_pass(Desired(deployments=list(mds)))
    assert result.writes == 0
    return result


def test_a_group_is_one_replica_in_the_status() -> None:
    swarm, reconciler, _ = setup()
    ds = deployment("ds", **GROUP)
    status = ready_pass(reconciler, swarm, ds).views[ds.key].status
    assert (status.replicas, status.readyReplicas, status.placedReplicas, status.npus) == (1, 1, 1, 16)
    assert status.phase == "Ready"
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert ready.status == "True" and ready.message.startswith("1/1 replicas ready")
    (group,) = status.groupStatuses
    assert (group.group, group.state, group.ready, group.generation) == ("0", "Ready", True, 0)
    assert [m.replica for m in group.members] == ["0-m0", "0-m1"]
    assert all(m.nodeId and len(m.npus) == 8 and m.service and m.taskState == "running" for m in group.members)
    # Rows of replicaStatuses stay per member (services, drift), groups are counted once.
    assert [r.replica for r in status.replicaStatuses] == ["0-m0", "0-m1"]
    # Restart condition none: Swarm never restarts one member alone.
    assert {s["Spec"]["TaskTemplate"]["RestartPolicy"]["Condition"] for s in swarm.services.values()} == {"none"}
    # Generation 0 writes no label: groups made before this existed are not rewritten.
    assert all(labels.GROUP_GENERATION not in s["Spec"]["Labels"] for s in swarm.services.values())


def test_a_member_that_ends_restarts_every_member_of_its_group() -> None:
    swarm, reconciler, _ = setup()
    ds = deployment("ds", **GROUP)
    ready_pass(reconciler, swarm, ds)
    end_task(swarm, "0-m1", error="task: non-zero exit (1)")
    result = reconciler.run_pass(Desired(deployments=[ds]))
    done = result.views[ds.key].applied
    assert sorted((a.kind, a.slot) for a in done) == [("update", "0-m0"), ("update", "0-m1")]
    assert all(a.reason.startswith("group restart: member 0-m1 ended (failed: task: non-zero exit (1))")
               for a in done)
    assert generations(swarm) == {"0-m0": "1", "0-m1": "1"}
    # Both members' containers change, so Swarm replaces both tasks.
    assert {s["Spec"]["TaskTemplate"]["ContainerSpec"]["Labels"][labels.GROUP_GENERATION]
            for s in swarm.services.values()} == {"1"}
    status = result.views[ds.key].status
    assert status.groupStatuses[0].state == "Restarting" and status.readyReplicas == 0
    restarted = [e for e in result.views[ds.key].events if e.reason == "GroupRestarted"]
    assert [e.message for e in restarted] == [
        "group 0 restarts whole (generation 1): member 0-m1 ended (failed: task: non-zero exit (1))"]
    assert next(c for c in status.conditions if c.type == "Progressing").reason in ("GroupRestarting", "RollingOut")
    swarm.run_all()
    again = reconciler.run_pass(Desired(deployments=[ds]))
    assert again.writes == 0
    assert again.views[ds.key].status.groupStatuses[0].state == "Ready"
    assert again.views[ds.key].status.groupStatuses[0].generation == 1


def test_a_group_that_keeps_failing_backs_off_doubling() -> None:
    swarm, reconciler, clock = setup()
    ds = deployment("ds", **GROUP)
    ready_pass(reconciler, swarm, ds)
    end_task(swarm, "0-m0")
    assert reconciler.run_pass(Desired(deployments=[ds])).writes == 2  # the first restart: at once
    swarm.run_all()
    clock.now += timedelta(seconds=5)
    end_task(swarm, "0-m1")
    waiting = reconciler.run_pass(Desired(deployments=[ds]))
    assert waiting.writes == 0
    group = waiting.views[ds.key].status.groupStatuses[0]
    assert group.state == "BackingOff" and group.restarts == 1
    assert "member 0-m1 ended" in (group.message or "") and "restarts at" in (group.message or "")
    degraded = next(c for c in waiting.views[ds.key].status.conditions if c.type == "Degraded")
    assert degraded.status == "True"
    assert [e.reason for e in waiting.views[ds.key].events if e.reason.startswith("Group")] == ["GroupBackingOff"]
    clock.now += timedelta(seconds=56)  # 60 s after the first restart
    assert reconciler.run_pass(Desired(deployments=[ds])).writes == 2
    assert generations(swarm) == {"0-m0": "2", "0-m1": "2"}
    swarm.run_all()
    clock.now += timedelta(seconds=1)
    end_task(swarm, "0-m0")
    clock.now += timedelta(seconds=100)  # the third restart waits 120 s
    assert reconciler.run_pass(Desired(deployments=[ds])).writes == 0
    clock.now += timedelta(seconds=21)
    assert reconciler.run_pass(Desired(deployments=[ds])).writes == 2
    # A group that ran for the cool-down since its last restart starts from scratch.
    swarm.run_all()
    clock.now += timedelta(seconds=601)
    assert reconciler.run_pass(Desired(deployments=[ds])).views[ds.key].status.groupStatuses[0].restarts == 0
    end_task(swarm, "0-m1")
    assert reconciler.run_pass(Desired(deployments=[ds])).writes == 2


def test_a_member_whose_node_is_lost_moves_and_the_whole_group_restarts() -> None:
    swarm, reconciler, clock = setup(lost_node_grace_seconds=30)
    ds = deployment("ds", **GROUP)
    ready_pass(reconciler, swarm, ds)
    before = {slot: s["Spec"]["Labels"][labels.NODE] for slot, s in members(swarm).items()}
    lost = before["0-m1"]
    node = next(n for n in swarm.nodes if n["ID"] == lost)
    node["Status"]["State"] = "down"
    node["UpdatedAt"] = "2026-11-30T11:59:00Z"
    clock.now += timedelta(seconds=120)
    result = reconciler.run_pass(Desired(deployments=[ds]))
    after = {slot: s["Spec"]["Labels"][labels.NODE] for slot, s in members(swarm).items()}
    assert after["0-m0"] == before["0-m0"] and after["0-m1"] not in (lost, before["0-m0"])
    assert generations(swarm) == {"0-m0": "1", "0-m1": "1"}
    leader = next(a for a in result.views[ds.key].applied if a.slot == "0-m0")
    assert leader.reason.startswith("group restart: member 0-m1 placed anew (node")
    swarm.run_all()
    assert reconciler.run_pass(Desired(deployments=[ds])).views[ds.key].status.readyReplicas == 1


def test_a_rolling_update_replaces_one_group_at_a_time() -> None:
    swarm, reconciler, _ = setup(nodes=4)
    ds = deployment("ds", replicas=2, **GROUP)
    ready_pass(reconciler, swarm, ds)
    new = deployment("ds", generation=2, replicas=2, **(GROUP | {"image": "vllm-ascend:new"}))
    first = reconciler.run_pass(Desired(deployments=[new]))
    assert sorted(a.slot for a in first.views[ds.key].applied) == ["0-m0", "0-m1"]
    assert sorted(a.slot for a in reconciler.last_plan.plans[ds.key].deferred) == ["1-m0", "1-m1"]  # type: ignore[union-attr]
    # Group 0 not back yet: group 1 waits (maxUnavailable 1 counts groups).
    assert reconciler.run_pass(Desired(deployments=[new])).writes == 0
    swarm.run_all()
    second = reconciler.run_pass(Desired(deployments=[new]))
    assert sorted(a.slot for a in second.views[ds.key].applied) == ["1-m0", "1-m1"]
    swarm.run_all()
    done = reconciler.run_pass(Desired(deployments=[new]))
    assert done.writes == 0 and done.views[ds.key].status.readyReplicas == 2
    images = {s["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] for s in swarm.services.values()}
    assert images == {"vllm-ascend:new"}


def test_an_unplaceable_group_counts_once_among_unplaced_replicas() -> None:
    swarm, reconciler, _ = setup(nodes=1)
    ds = deployment("ds", **GROUP)
    view = reconciler.run_pass(Desired(deployments=[ds])).views[ds.key]
    assert view.unplaced_reasons == {"InsufficientNPUs": 1}
    assert [e.reason for e in view.events] == ["InsufficientNPUs"]  # one event for the group
    assert (view.status.replicas, view.status.placedReplicas) == (1, 0)
    assert view.status.groupStatuses[0].state == "Pending"
    assert "needs 2 of 2 node(s)" in (view.status.groupStatuses[0].message or "")


def test_single_node_replicas_have_no_group_rows() -> None:
    swarm, reconciler, _ = setup()
    single = deployment("single", npusPerReplica=2)
    status = ready_pass(reconciler, swarm, single).views[single.key].status
    assert status.groupStatuses == [] and status.readyReplicas == 1


def test_a_group_placed_where_removed_members_still_stop_takes_another_port_block() -> None:
    """The stop grace keeps a removed member's task (its NPUs and its host ports) alive for up
    to 120 s: a group placed again on those nodes, on their other NPUs, must not take that
    block there."""
    swarm, reconciler, _ = setup(nodes=2)
    half = {"nodesPerReplica": 2, "npusPerReplica": 4,
            "engine": {"tensorParallelSize": 4, "dataParallelSize": 2}}
    ds = deployment("ds", **half)
    ready_pass(reconciler, swarm, ds)
    old = {s["ID"]: s["Spec"] for s in swarm.services.values()}
    assert {s["Labels"][labels.PORT_BLOCK] for s in old.values()} == {"0"}
    # The deployment is deleted: its services go, their tasks still stop (desired "remove").
    for service_id in list(old):
        swarm.remove_service(service_id)
    for service_id, spec in old.items():
        swarm.tasks.append({
            "ID": f"stopping-{service_id}", "ServiceID": service_id, "NodeID": spec["Labels"][labels.NODE],
            "DesiredState": "remove", "CreatedAt": "2026-11-30T11:00:00Z",
            "Status": {"State": "running", "Timestamp": "2026-11-30T11:00:00Z"},
            "Spec": {"ContainerSpec": {"Labels": spec["TaskTemplate"]["ContainerSpec"]["Labels"]}},
        })
    again = deployment("ds2", **half)
    reconciler.run_pass(Desired(deployments=[again]))
    assert {s["Spec"]["Labels"][labels.PORT_BLOCK] for s in swarm.services.values()} == {"1"}
    assert {s["Spec"]["Labels"][labels.NPUS] for s in swarm.services.values()} == {"4,5,6,7"}
    # Stopped tasks (Swarm keeps them as history, state "shutdown") hold nothing.
    for task in swarm.tasks:
        if task["ID"].startswith("stopping-"):
            task["Status"]["State"] = "shutdown"
    snapshot = swarm.observe()
    assert snapshot.stopping == []


def test_the_port_range_is_a_setting() -> None:
    swarm, reconciler, _ = setup(group_port_range="40000-40063")
    ds = deployment("ds", replicas=1, **GROUP)
    reconciler.run_pass(Desired(deployments=[ds]))
    leader = members(swarm)["0-m0"]["Spec"]["TaskTemplate"]["ContainerSpec"]
    assert leader["Args"][leader["Args"].index("--port") + 1] == "40000"
    assert "HCCL_IF_BASE_PORT=40016" in leader["Env"]
    assert Settings(group_port_range="40000-40063").port_range().blocks == 2
    for bad in ("40000", "40000-40010", "80-1000", "50000-40000"):
        with pytest.raises(ValueError, match="NPUSWARM_GROUP_PORT_RANGE|group_port_range|first"):
            Settings(group_port_range=bad)


# --- serving: a gateway routes to a group's leader only (issue 20 item 5) ------------------


def test_a_gateway_routes_to_each_ready_groups_leader_and_drops_a_group_before_any_member_stops() -> None:
    from npuswarm.gateway.push import Gateways

    from .test_gateway import CREDENTIALS, Recorder, gateway, overlay_swarm, settle

    swarm = overlay_swarm(nodes=4)
    for index, node in enumerate(swarm.nodes, start=1):
        node["Status"]["Addr"] = f"10.123.0.{index}"
    recorder = Recorder()
    updates = swarm.update_service

    def recorded_update(service_id: str, version: int, spec: dict[str, Any]) -> None:
        recorder.log.append(("update", spec["Name"]))
        updates(service_id, version, spec)

    swarm.update_service = recorded_update  # type: ignore[method-assign]
    gateways = Gateways("default", CREDENTIALS, send=recorder.send)
    reconciler = Reconciler(swarm, Settings(host_network_namespaces="*"), clock=lambda: NOW,
                            gateways=gateways)
    ds = deployment("ds", replicas=2, servedModelName="ds", **GROUP)
    gw = gateway()
    desired = Desired(deployments=[ds], gateways=[gw])
    reconciler.run_pass(desired)
    swarm.run_all()
    (gw_service,) = [s for s in swarm.services.values() if labels.GATEWAY_NAME in s["Spec"]["Labels"]]
    swarm.tasks.append({"ID": "task-gw", "ServiceID": gw_service["ID"], "NodeID": "node1",
                        "DesiredState": "running", "CreatedAt": "2026-11-30T11:00:00Z",
                        "Status": {"State": "running", "Timestamp": "2026-11-30T11:00:00Z"},
                        "Spec": {"ContainerSpec": {"Labels": {}}}})
    reconciler.run_pass(desired)
    settle(gateways)
    ready = reconciler.run_pass(desired)
    address = {n["ID"]: n["Status"]["Addr"] for n in swarm.nodes}

    def leader_url(group: str) -> str:
        spec = members(swarm)[f"{group}-m0"]["Spec"]
        args = spec["TaskTemplate"]["ContainerSpec"]["Args"]
        return f"http://{address[spec['Labels'][labels.NODE]]}:{args[args.index('--port') + 1]}"

    # One URL per group: its leader's node address and the group's API port; no member's.
    urls = recorder.states[-1]["models"]["ds"]
    assert urls == sorted([leader_url("0"), leader_url("1")]) and len(set(urls)) == 2
    assert ready.gateways["default/gw"].models[0].backends == urls
    # A member of group 1 ends: the gateway drops the group, and the writes that restart it
    # wait for the pass after the gateway accepted that (the restart is decided again then,
    # not counted as a second failure).
    recorder.log.clear()
    end_task(swarm, "1-m1")
    held = reconciler.run_pass(desired)
    assert held.views["default/ds"].applied == []
    settle(gateways)
    reconciler.run_pass(desired)
    assert recorder.log[0] == ("push", {"ds": 1})
    assert sorted(recorder.log[1:]) == [("update", "default-ds-1-m0"), ("update", "default-ds-1-m1")]
    # The group is back only once every member runs its new spec.
    recorder.log.clear()
    swarm.run_all()
    reconciler.run_pass(desired)
    settle(gateways)
    assert recorder.log == [("push", {"ds": 2})]


# --- the examples (issue 20 item 7) ---------------------------------------------------------


def test_the_deepseek_example_renders_the_tutorials_flags_over_four_nodes() -> None:
    from pathlib import Path

    import yaml

    from npuswarm.api.deployment import ModelDeployment

    examples = Path(__file__).resolve().parents[2] / "examples"
    body = yaml.safe_load((examples / "deepseek-v3-w8a8-4node.yaml").read_text())
    body["metadata"] |= {"namespace": "default", "uid": "uid-ds", "creationTimestamp": "2026-01-01T00:00:00Z"}
    md = ModelDeployment.model_validate(body)
    swarm, reconciler, _ = setup(nodes=4)
    for index, node in enumerate(swarm.nodes, start=1):
        node["Status"]["Addr"] = f"192.168.1.{index}"
    reconciler.run_pass(Desired(deployments=[md]))
    specs = {slot: s["Spec"]["TaskTemplate"]["ContainerSpec"] for slot, s in members(swarm).items()}
    assert sorted(specs) == ["0-m0", "0-m1", "0-m2", "0-m3"]
    leader_args = specs["0-m0"]["Args"]
    leader = next(n for n in swarm.nodes if n["ID"] == members(swarm)["0-m0"]["Spec"]["Labels"][labels.NODE])
    tutorial = ["--tensor-parallel-size", "4", "--data-parallel-size", "8", "--data-parallel-size-local", "2",
                "--data-parallel-address", leader["Status"]["Addr"]]
    for slot, container in specs.items():
        args = " ".join(container["Args"])
        assert " ".join(tutorial[2:]) in args and "--tensor-parallel-size 4" in args
        assert all(flag in container["Args"] for flag in (
            "--enable-expert-parallel", "--quantization=ascend", "--seed=1024", "--trust-remote-code",
            "--no-enable-prefix-caching", "--max-num-seqs=16", "--max-num-batched-tokens=4096"))
        assert "ASCEND_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in container["Env"] and "HCCL_BUFFSIZE=1024" in container["Env"]
        member = int(slot.rsplit("m", 1)[1])
        if member:
            assert f"--headless --data-parallel-start-rank {2 * member}" in args
        else:
            assert "--headless" not in args and "--served-model-name deepseek_v3" in args
    assert "--data-parallel-start-rank" not in " ".join(leader_args)


def test_a_swarm_outage_keeps_the_last_group_rows() -> None:
    from npuswarm.core.status import unavailable_status

    swarm, reconciler, _ = setup()
    ds = deployment("ds", **GROUP)
    before = ready_pass(reconciler, swarm, ds).views[ds.key].status.model_dump(mode="json")
    held = unavailable_status(1, "list_nodes: connection refused", before, NOW)
    assert [g.model_dump(mode="json") for g in held.groupStatuses] == before["groupStatuses"]
    assert held.readyReplicas == 1 and held.phase == "Progressing"


def test_a_member_whose_npus_turn_unhealthy_moves_and_the_whole_group_restarts() -> None:
    from npuswarm.core.nodes import NodeLimits

    swarm, reconciler, _ = setup()
    ds = deployment("ds", **GROUP)
    ready_pass(reconciler, swarm, ds)
    node_of = {slot: s["Spec"]["Labels"][labels.NODE] for slot, s in members(swarm).items()}
    sick = NodeLimits(npus={node_of["0-m1"]: {3: "npu-smi: NPU 3 health Critical"}})
    result = reconciler.run_pass(Desired(deployments=[ds]), checks=lambda _: sick)
    moved = {slot: s["Spec"]["Labels"][labels.NODE] for slot, s in members(swarm).items()}
    assert moved["0-m0"] == node_of["0-m0"] and moved["0-m1"] not in node_of.values()
    assert generations(swarm) == {"0-m0": "1", "0-m1": "1"}
    reasons = {a.slot: a.reason for a in result.views[ds.key].applied}
    assert reasons["0-m0"].startswith("group restart: member 0-m1 placed anew")
    assert "NPU 3 health Critical" in reasons["0-m0"]
