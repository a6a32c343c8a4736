"""Replicas failing over and over where they are: the streak from task history, the decision
(threshold, backoff, cool-down, give up), and a pass that moves the replica to another node."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from npuswarm.core import relocation
from npuswarm.core.relocation import FailureTracker, History
from npuswarm.core.snapshot import ObservedService, ObservedTask
from npuswarm.reconcile import Reconciler
from npuswarm.core.pipeline import Desired
from npuswarm.settings import Settings

from .builders import NOW, deployment
from .memswarm import MemorySwarm

KW: dict[str, Any] = {
    "threshold": 3,
    "backoff_seconds": 60,
    "cooldown_seconds": 600,
    "max_moves": 2,
}


def task(
    n: int, state: str, node: str = "node1", spec: str | None = "h1", error: str | None = None
) -> ObservedTask:
    at = NOW + timedelta(seconds=n)
    return ObservedTask(f"t{n}", "s", node, state, "shutdown", error, at, at, spec)


def service(*tasks: ObservedTask, node: str = "node1") -> ObservedService:
    labels = {
        "npuswarm.io/managed-by": "npuswarm",
        "npuswarm.io/owner-namespace": "default",
        "npuswarm.io/owner-name": "m",
        "npuswarm.io/replica": "0",
        "npuswarm.io/node": node,
        "npuswarm.io/npus": "0,1",
        "npuswarm.io/spec-hash": "h1",
    }
    return ObservedService("s", "default-m-0", 1, labels, {}, list(tasks))


def test_the_streak_counts_failures_in_a_row_of_the_current_spec_on_the_current_node() -> None:
    crashed = "task: non-zero exit (1)"
    assert relocation.failure_streak(
        service(task(1, "failed", error="a"), task(2, "failed", error=crashed), task(3, "starting"))
    ) == relocation.Streak(2, crashed)
    # A task that ran breaks it; older specs and other nodes do not count.
    assert (
        relocation.failure_streak(
            service(task(1, "failed"), task(2, "running"), task(3, "failed"))
        ).failures
        == 1
    )
    assert (
        relocation.failure_streak(service(task(1, "failed", spec="old"), task(2, "rejected"))).failures
        == 1
    )
    assert (
        relocation.failure_streak(service(task(1, "failed", node="node2"), task(2, "failed"))).failures
        == 1
    )


def three_failures(node: str = "node1") -> ObservedService:
    return service(*(task(i, "failed", node=node, error="boom") for i in range(3)), node=node)


def test_k_failures_move_the_replica_and_its_node_is_avoided_for_the_cooldown() -> None:
    decision = relocation.decide([three_failures()], {}, NOW, hostnames={"node1": "atlas-1"}, **KW)
    key = ("default/m", "0")
    assert decision.move[key] == "failed 3 times in a row on node atlas-1: boom"
    assert decision.avoid[key] == frozenset({"node1"})
    assert relocation.decide([three_failures()], {}, NOW, **{**KW, "threshold": 4}).move == {}
    assert relocation.decide([three_failures()], {}, NOW, **{**KW, "threshold": 0}).move == {}
    later = relocation.decide([], decision.histories, NOW + timedelta(seconds=601), **KW)
    assert later.avoid == {}


def test_further_moves_back_off_and_a_replica_failing_everywhere_stays_reported() -> None:
    key = ("default/m", "0")
    moved_once = {key: History(moves=1, last_move=NOW)}
    assert (
        relocation.decide(
            [three_failures("node2")], moved_once, NOW + timedelta(seconds=59), **KW
        ).move
        == {}
    )
    second = relocation.decide(
        [three_failures("node2")], moved_once, NOW + timedelta(seconds=60), **KW
    )
    assert key in second.move and second.histories[key].moves == 2
    third = relocation.decide(
        [three_failures("node3")], second.histories, NOW + timedelta(hours=1), **KW
    )
    assert third.move == {}
    assert (
        third.failing[key]
        == "failed 3 times in a row on node node3: boom; not moved again after 2 moves"
    )


def test_a_pass_moves_a_failing_replica_to_another_node() -> None:
    swarm = MemorySwarm(nodes=2, npus=8)
    settings = Settings(failing_replica_threshold=2)
    reconciler = Reconciler(swarm, settings, clock=lambda: NOW)
    tracker = FailureTracker(settings.relocation_rules(), lambda: NOW)
    md = deployment("m", replicas=1, npusPerReplica=4)
    desired = Desired(deployments=[md])
    reconciler.run_pass(desired, tracker.checks(None))
    ((service_id, spec),) = ((i, s["Spec"]) for i, s in swarm.services.items())
    first_node = spec["Labels"]["npuswarm.io/node"]
    for n in range(2):
        swarm.tasks.append(
            {
                "ID": f"f{n}",
                "ServiceID": service_id,
                "NodeID": first_node,
                "DesiredState": "shutdown",
                "CreatedAt": f"2026-11-30T11:00:0{n}Z",
                "Status": {
                    "State": "failed",
                    "Err": "task: non-zero exit (1)",
                    "Timestamp": f"2026-11-30T11:00:0{n}Z",
                },
                "Spec": {
                    "ContainerSpec": {"Labels": spec["TaskTemplate"]["ContainerSpec"]["Labels"]}
                },
            }
        )
    result = reconciler.run_pass(desired, tracker.checks(None))
    moved = swarm.services[service_id]["Spec"]["Labels"]
    assert moved["npuswarm.io/node"] != first_node, "another node is preferred"
    events = [e.message for e in result.views[md.key].events]
    assert any(
        "re-placed: failed 2 times in a row on node host1: task: non-zero exit (1)" in m
        for m in events
    ), events


def test_a_replica_left_failing_gets_a_warning_event_with_why() -> None:
    settings = Settings(failing_replica_threshold=3, failing_replica_max_moves=1)
    tracker = FailureTracker(settings.relocation_rules(), lambda: NOW)
    tracker.histories[("default/m", "0")] = History(moves=1, last_move=NOW - timedelta(hours=1))
    swarm = MemorySwarm(nodes=1)
    snapshot = swarm.observe()
    snapshot.services.append(three_failures())
    tracker.decide(snapshot)
    (event,) = tracker.events()["default/m"]
    assert (event.type, event.reason) == ("Warning", "ReplicaFailing")
    assert (
        event.message
        == "replica 0: failed 3 times in a row on node host1: boom; not moved again after 1 moves"
    )
