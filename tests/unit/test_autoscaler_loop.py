"""The autoscaler loop (runtime/autoscaler.py) with the real pass over an in-memory Swarm: the
pass takes the decided count, status and Events say why, the one-owner rule, the cap by the
fleet, and the loop surviving a failing read."""

from __future__ import annotations

import threading
from typing import Any

from npuswarm import metrics
from npuswarm.core.pipeline import Desired
from npuswarm.gateway.load import ModelLoad
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.runtime.autoscaler import Autoscaler
from npuswarm.runtime.triggers import survive
from npuswarm.settings import Settings
from tests.helpers import sample, wait_for

from .builders import NOW, deployment
from .memswarm import MemorySwarm


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def autoscaled(npus: int = 1, max_replicas: int = 4, **spec: Any):
    return deployment(
        "chat",
        npusPerReplica=npus,
        autoscaling={
            "maxReplicas": max_replicas,
            "target": {"metric": "requestsWaitingPerReplica", "value": 1},
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": 60,
        },
        **spec,
    )


class Setup:
    def __init__(self, md, nodes: int = 1, npus: int = 8, others: tuple[Any, ...] = ()) -> None:
        self.md = md
        self.others = others  # more deployments in the same passes
        self.swarm = MemorySwarm(nodes=nodes, npus=npus)
        self.reconciler = Reconciler(self.swarm, Settings(lost_node_grace_seconds=60), clock=lambda: NOW)
        self.loads: dict[str, ModelLoad] = {}
        self.requested: list[str] = []
        self.clock = Clock()
        self.scaler = Autoscaler(lambda gateways, mds, snapshot: self.loads, self.requested.append, self.clock)
        self.previous: dict[str, dict[str, Any]] = {}

    def run_pass(self) -> PassResult:
        desired = self.scaler.serve(Desired(deployments=[self.md, *self.others], previous=self.previous))
        result = self.reconciler.run_pass(desired)
        self.scaler.saw_pass(result.plan)
        self.swarm.run_all()
        self.previous = {k: v.status.model_dump(mode="json") for k, v in result.views.items()}
        return result

    def services(self) -> int:
        return len(self.swarm.services)


def test_a_decision_reaches_the_pass_with_status_metrics_and_one_event() -> None:
    s = Setup(autoscaled())
    first = s.run_pass()
    assert s.services() == 1
    status = first.views[s.md.key].status
    assert status.autoscaler is not None and status.autoscaler.reason == "NoLoadReading"
    # As HPA says it: no metrics, no scaling (and the count kept).
    scaling = conditions_of(first.views[s.md.key])["ScalingActive"]
    assert (scaling.status, scaling.reason) == ("False", "NoLoadReading")

    s.loads = {s.md.key: ModelLoad(replicas=1, waiting=3, running=1, kv_cache=0.2)}
    s.scaler.tick()
    assert s.requested == [s.md.key]
    second = s.run_pass()
    assert s.services() == 3
    view = second.views[s.md.key]
    assert view.status.replicas == 3 and view.status.autoscaler is not None
    assert view.status.autoscaler.reason == "ScaledUp"
    assert view.status.autoscaler.observedValue == 3.0
    assert (conditions_of(view)["ScalingActive"].status, conditions_of(view)["ScalingActive"].reason) == (
        "True", "ScaledUp")
    assert "1 -> 3" in (view.status.autoscaler.lastScaleMessage or "")
    assert [e.reason for e in view.events if e.reason == "Autoscaled"] == ["Autoscaled"]
    get = metrics.REGISTRY.get_sample_value
    assert get("npuswarm_autoscaler_desired_replicas", {"namespace": "default", "name": "chat"}) == 3
    observed = {"namespace": "default", "name": "chat", "metric": "requestsWaitingPerReplica"}
    assert get("npuswarm_autoscaler_observed_value", observed) == 3.0
    # The same decision again: no second Event, no change.
    third = s.run_pass()
    assert not [e for e in third.views[s.md.key].events if e.reason == "Autoscaled"]


def test_a_deployment_without_autoscaling_has_no_scaling_condition() -> None:
    s = Setup(deployment("fixed", replicas=1))
    view = s.run_pass().views[s.md.key]
    assert "ScalingActive" not in conditions_of(view) and view.status.autoscaler is None


def test_a_restarted_operator_starts_from_the_status_count() -> None:
    s = Setup(autoscaled())
    s.previous = {s.md.key: {"replicas": 3, "autoscaler": {"lastScaleTime": "2026-11-30T11:00:00Z"}}}
    result = s.run_pass()
    assert s.services() == 3 and result.views[s.md.key].status.replicas == 3
    # The last scale event the status had is kept, and no Event is sent again for it.
    assert result.views[s.md.key].status.autoscaler.lastScaleTime == "2026-11-30T11:00:00Z"
    assert not [e for e in result.views[s.md.key].events if e.reason == "Autoscaled"]


def test_spec_replicas_written_by_someone_else_is_reported_not_obeyed() -> None:
    s = Setup(autoscaled(replicas=5))
    result = s.run_pass()
    view = result.views[s.md.key]
    assert s.services() == 1 and view.status.replicas == 1
    assert "spec.replicas=5 is not obeyed" in view.status.autoscaler.message
    (warning,) = [e for e in view.events if e.reason == "ReplicasNotOwned"]
    assert warning.type == "Warning" and warning.message.startswith("spec.replicas=5 is not obeyed")


def test_the_fleet_caps_a_scale_up_and_status_says_waiting_for_npus() -> None:
    s = Setup(autoscaled(npus=4, max_replicas=4), nodes=1, npus=8)
    s.run_pass()
    s.loads = {s.md.key: ModelLoad(replicas=1, waiting=10, running=0, kv_cache=None)}
    s.scaler.tick()
    result = s.run_pass()
    assert s.services() == 2  # 8 NPUs: two replicas of 4, not the 4 the load asks for
    assert result.views[s.md.key].status.replicas == 2
    assert not result.plan.placement.unplaced
    s.clock.now += 5
    s.scaler.tick()
    again = s.run_pass()
    scaler = again.views[s.md.key].status.autoscaler
    assert scaler.reason == "WaitingForNPUs" and scaler.desiredReplicas == 2
    assert "wants 4 replicas; the fleet has NPUs for 2" in scaler.message


def test_the_loop_survives_a_failing_read_and_counts_it() -> None:
    s = Setup(autoscaled())
    s.run_pass()
    attempts = []

    def failing(*_: Any) -> dict[str, ModelLoad]:
        attempts.append(1)
        raise RuntimeError("gateway on fire")

    s.scaler.read_load = failing
    before = sample(metrics.REGISTRY, "npuswarm_background_errors_total", loop="autoscaler")
    stop = threading.Event()
    body = survive("autoscaler", lambda: s.scaler.run(stop, 0.01, lambda: True), stop)
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(attempts) >= 2, "the loop to try again after a failure", timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert sample(metrics.REGISTRY, "npuswarm_background_errors_total", loop="autoscaler") >= before + 1
    assert s.scaler.counts[s.md.key] == 1  # nothing decided from a failed read


def test_a_follower_does_not_decide() -> None:
    s = Setup(autoscaled())
    s.run_pass()
    s.loads = {s.md.key: ModelLoad(replicas=1, waiting=3, running=0, kv_cache=None)}
    stop = threading.Event()
    looks = []

    def follower() -> bool:
        looks.append(1)
        if len(looks) == 3:
            stop.set()
        return False

    s.scaler.run(stop, 0.01, follower)
    assert len(looks) == 3
    assert s.requested == [] and s.scaler.counts[s.md.key] == 1


def conditions_of(view) -> dict[str, Any]:
    return {c.type: c for c in view.status.conditions}


def test_a_scale_up_beyond_the_fleet_waits_for_npus_without_being_degraded() -> None:
    s = Setup(deployment("chat", replicas=1, npusPerReplica=4), nodes=1, npus=8)
    s.run_pass()
    s.run_pass()  # the replica runs: the deployment serves
    s.md = deployment("chat", replicas=3, npusPerReplica=4, generation=2)  # kubectl scale / HPA
    s.run_pass()
    view = s.run_pass().views[s.md.key]  # the second replica runs, the third has no NPUs
    found = conditions_of(view)
    assert found["Degraded"].status == "False"
    assert (found["Progressing"].status, found["Progressing"].reason) == ("True", "InsufficientNPUs")
    assert found["Progressing"].message.startswith("wanted 3, placed 2: waiting for NPUs; replica 2: needs 4")
    assert found["Stalled"].status == "False" and found["Reconciling"].status == "True"
    assert view.status.phase == "Progressing" and view.status.readyReplicas == 2
    assert view.unplaced_reasons == {"InsufficientNPUs": 1}


def test_nothing_running_for_want_of_npus_is_still_degraded() -> None:
    s = Setup(deployment("chat", replicas=1, npusPerReplica=8), nodes=1, npus=4)
    view = s.run_pass().views[s.md.key]
    found = conditions_of(view)
    assert (found["Degraded"].status, found["Degraded"].reason) == ("True", "InsufficientNPUs")
    assert view.status.phase == "Degraded"


def test_a_higher_priority_scale_up_preempts_and_neither_side_flaps() -> None:
    """A full node of a priority-0 autoscaled deployment; a priority-100 one under load
    scales up by preempting two of its replicas; both keep wanting more (the victim's own
    autoscaler too) and nothing moves again: the victim waits for NPUs, the preemptor keeps
    its count, no further replica is stopped."""
    chat = deployment(
        "chat",
        created="2026-02-01T00:00:00Z",
        npusPerReplica=2,
        priority=100,
        autoscaling={
            "maxReplicas": 3,
            "target": {"metric": "requestsWaitingPerReplica", "value": 1},
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": 60,
        },
    )
    batch = deployment(
        "batch",
        created="2026-01-01T00:00:00Z",
        npusPerReplica=2,
        autoscaling={
            "minReplicas": 1,
            "maxReplicas": 6,
            "target": {"metric": "requestsWaitingPerReplica", "value": 1},
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": 60,
        },
    )
    s = Setup(chat, nodes=1, npus=8, others=(batch,))
    s.previous = {batch.key: {"replicas": 3}}  # batch runs 3, chat 1: the node is full
    s.run_pass()
    s.run_pass()
    assert s.services() == 4
    s.loads = {
        chat.key: ModelLoad(replicas=1, waiting=3, running=0, kv_cache=None),
        batch.key: ModelLoad(replicas=3, waiting=9, running=0, kv_cache=None),
    }
    s.scaler.tick()
    assert s.scaler.counts == {chat.key: 3, batch.key: 3}
    assert s.scaler.statuses[batch.key].reason == "WaitingForNPUs"
    preempting = s.run_pass()
    victims = [v for p in preempting.plan.preemptions for v in p.victims]
    assert len(victims) == 2 and {v.deployment for v in victims} == {batch.key}
    s.swarm.finish_stopping()
    s.run_pass()
    stopped = {name for name in s.swarm.by_name() if "batch" in name}
    for _ in range(5):  # rounds and passes with the same load: nobody takes anything back
        s.clock.now += 5
        s.scaler.tick()
        result = s.run_pass()
        assert not result.plan.preemptions
        assert s.scaler.counts == {chat.key: 3, batch.key: 3}
    assert {name for name in s.swarm.by_name() if "batch" in name} == stopped and len(stopped) == 1
    assert result.views[chat.key].status.replicas == 3
    scaler = result.views[batch.key].status.autoscaler
    assert scaler.reason == "WaitingForNPUs" and "the fleet has NPUs for 1" in scaler.message
