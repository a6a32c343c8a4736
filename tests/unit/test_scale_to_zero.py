"""Scale to zero and back (docs/autoscaling.md, "Scale to zero"): the pure rule, the gateways'
demand merged, the loop with the real pass over an in-memory Swarm (the replica's service goes
and comes back, status and Events say so), the fast reads of the gateways serving a model at
zero, and the status left alone while a steady load only wobbles."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from npuswarm import metrics
from npuswarm.api.gateway import ModelGateway
from npuswarm.core import autoscale
from npuswarm.core.autoscale import History, Inputs, Load, decide, headroom, wake_templates
from npuswarm.gateway import load
from npuswarm.gateway.backends import GatewayWork, waking_models
from npuswarm.gateway.load import ModelLoad
from tests.helpers import wait_for

from .builders import deployment, node
from .test_autoscale import allocations_of, place, policy
from .test_autoscaler_loop import Setup, conditions_of

WINDOW = 60


def zero_policy(**overrides: Any):
    return policy(minReplicas=0, maxReplicas=4, scaleDownStabilizationSeconds=WINDOW, **overrides)


def at(current: int, load: Load | None, placeable: int = 4, now: float = 1000.0) -> Inputs:
    return Inputs(current=current, load=load, placeable=placeable, now=now)


# --- the rule ---------------------------------------------------------------------------------


def test_one_request_running_is_not_idle_although_the_formula_says_zero() -> None:
    busy = Load(replicas=1, waiting=0, running=1, idle_seconds=0.0)
    decision = decide(zero_policy(), at(1, busy), History())
    assert decision.replicas == 1 and decision.reason == "Steady"


def test_no_request_for_the_window_scales_to_zero() -> None:
    quiet = Load(replicas=1, waiting=0, running=0, idle_seconds=WINDOW + 1)
    decision = decide(zero_policy(), at(2, quiet), History())
    assert (decision.replicas, decision.reason) == (0, "ScaledToZero")
    assert decision.changed and "no request for 61 s (scale-down window 60 s): 2 -> 0" in decision.message


@pytest.mark.parametrize(
    "load",
    [
        Load(replicas=1, idle_seconds=WINDOW - 1),  # not long enough
        Load(replicas=1, idle_seconds=None),  # a gateway did not say (old front, no answer)
        Load(replicas=1, running=1, idle_seconds=WINDOW + 1),  # a client calling the replica
        Load(replicas=1, held=1, idle_seconds=WINDOW + 1),
        None,  # no gateway reading at all
    ],
)
def test_anything_short_of_idle_keeps_a_replica(load: Load | None) -> None:
    decision = decide(zero_policy(), at(1, load), History())
    assert decision.replicas == 1


def test_at_zero_a_held_request_starts_one_replica_at_once_without_a_window() -> None:
    scaling = zero_policy(scaleUpStabilizationSeconds=600)
    waiting = Load(replicas=0, held=3, idle_seconds=0.0)
    decision = decide(scaling, at(0, waiting), History())
    assert (decision.replicas, decision.reason) == (1, "ScaledFromZero")
    assert decision.message == "3 requests held at the gateway: 0 -> 1"


def test_at_zero_without_npus_nothing_is_asked_for_and_status_says_why() -> None:
    waiting = Load(replicas=0, held=1, idle_seconds=0.0)
    decision = decide(zero_policy(), at(0, waiting, placeable=0), History())
    assert (decision.replicas, decision.reason, decision.unmet) == (0, "WaitingForNPUs", 1)
    assert "no NPUs" in decision.message


def test_at_zero_without_requests_or_reading_it_stays_at_zero() -> None:
    assert decide(zero_policy(), at(0, Load(replicas=0, idle_seconds=5.0)), History()).reason == "Idle"
    assert decide(zero_policy(), at(0, None), History()).replicas == 0


def test_a_replica_woken_is_not_sent_back_to_zero_by_the_formula() -> None:
    history = History()
    decide(zero_policy(), at(0, Load(replicas=0, held=1, idle_seconds=0.0)), history)
    # Started, no request waiting: the formula recommends 0; the floor of the formula is 1.
    later = decide(zero_policy(), at(1, Load(replicas=1, idle_seconds=3.0), now=1010), history)
    assert later.replicas == 1


def test_min_zero_needs_a_network() -> None:
    scaling = {"minReplicas": 0, "maxReplicas": 2, "target": {"metric": "requestsWaitingPerReplica", "value": 1}}
    with pytest.raises(ValidationError, match="minReplicas=0 needs network"):
        deployment("chat", autoscaling=scaling)
    assert deployment("chat", autoscaling=scaling, network={"name": "net"}).spec.autoscaling.minReplicas == 0


# --- the gateways' demand -----------------------------------------------------------------------


def answer(demand: dict[str, Any], models: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"models": models or {}, "demand": demand, "errors": {}, "ageSeconds": 0.1}


def test_held_requests_add_up_and_the_least_idle_replica_decides() -> None:
    merged = load.merge([
        answer({"chat": {"held": 2, "idleSeconds": 0}}),
        answer({"chat": {"held": 1, "idleSeconds": 40}}),
    ])
    assert merged["chat"] == ModelLoad(replicas=0, waiting=0, running=0, kv_cache=None, held=3,
                                       idle_seconds=0)


def test_a_front_that_does_not_report_demand_makes_its_models_never_idle() -> None:
    reading = {"http://r:8000": {"waiting": 0, "running": 0, "kvCache": 0}}
    old = {"models": {"chat": reading}, "errors": {}, "ageSeconds": 0.1}
    merged = load.merge([answer({"chat": {"held": 0, "idleSeconds": 900}}, {"chat": reading}), old])
    assert merged["chat"].idle_seconds is None and merged["chat"].replicas == 1


def test_malformed_demand_is_skipped() -> None:
    merged = load.merge([answer({"chat": {"held": -1, "idleSeconds": 3}, "x": "y", "z": {"held": 1}})])
    assert merged == {}


# --- the push -----------------------------------------------------------------------------------


def gateway(**spec: Any) -> ModelGateway:
    return ModelGateway.model_validate({
        "metadata": {"name": "gw", "namespace": "default", "uid": "uid-gw", "generation": 1},
        "spec": {"network": {"name": "net"}, **spec},
    })


def test_the_push_marks_the_models_that_scale_from_zero_with_the_hold_settings() -> None:
    scaling = {"minReplicas": 0, "maxReplicas": 2, "target": {"metric": "requestsWaitingPerReplica", "value": 1}}
    zero = deployment("zero", autoscaling=scaling, network={"name": "net"}, servedModelName="z")
    fixed = deployment("fixed", network={"name": "net"}, servedModelName="f")
    gw = gateway(scaleFromZero={"maxWaitSeconds": 90})
    work = GatewayWork(gateway=gw, backends={"z": [], "f": []}, replicas=[],
                       from_zero=waking_models(gw, [zero, fixed]))
    assert work.state["scaleFromZero"] == {
        "models": ["z"], "maxWaitSeconds": 90, "maxQueuedRequests": 100, "retryAfterSeconds": 30}
    # The old keys are as they were: a front from before reads them and ignores the new one.
    assert work.state["models"] == {"z": [], "f": []}


# --- the loop, with the real pass -----------------------------------------------------------------


def zero_deployment():
    return deployment(
        "chat",
        network={"name": "net"},
        autoscaling={
            "minReplicas": 0,
            "maxReplicas": 3,
            "target": {"metric": "requestsWaitingPerReplica", "value": 1},
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": WINDOW,
        },
    )


def test_idle_releases_every_npu_and_a_held_request_brings_a_replica_back() -> None:
    s = Setup(zero_deployment())
    first = s.run_pass()
    assert s.services() == 1 and first.views[s.md.key].status.replicas == 1  # starts with one

    s.loads = {s.md.key: ModelLoad(replicas=1, waiting=0, running=0, kv_cache=0.0, idle_seconds=WINDOW)}
    s.scaler.tick()
    gone = s.run_pass()
    view = gone.views[s.md.key]
    assert s.services() == 0 and view.status.replicas == 0 and view.status.npus == 0
    assert view.status.autoscaler.reason == "ScaledToZero"
    (event,) = [e for e in view.events if e.reason == "ScaledToZero"]
    assert "-> 0" in event.message
    assert s.scaler.at_zero() == {s.md.key}

    # At zero, later rounds say Idle and write nothing new about the last scale.
    s.loads = {s.md.key: ModelLoad(replicas=0, waiting=0, running=0, kv_cache=None, idle_seconds=WINDOW + 5)}
    s.scaler.tick(only=s.scaler.at_zero())
    idle = s.run_pass().views[s.md.key]
    assert idle.status.autoscaler.reason == "Idle" and s.services() == 0
    assert (conditions_of(idle)["Ready"].status, conditions_of(idle)["Ready"].reason) == ("True", "ScaledToZero")
    assert idle.status.phase == "Ready"
    assert not [e for e in idle.events if e.reason in ("ScaledToZero", "Autoscaled")]

    s.loads = {s.md.key: ModelLoad(replicas=0, waiting=0, running=0, kv_cache=None, held=2, idle_seconds=0)}
    s.requested.clear()
    s.scaler.tick(only=s.scaler.at_zero())
    assert s.requested == [s.md.key]
    back = s.run_pass().views[s.md.key]
    assert s.services() == 1 and back.status.replicas == 1
    assert back.status.autoscaler.lastScaleReason == "ScaledFromZero"
    (event,) = [e for e in back.events if e.reason == "ScaledFromZero"]
    assert event.message == "2 requests held at the gateway: 0 -> 1"
    assert s.scaler.at_zero() == frozenset()


def test_a_restarted_operator_keeps_a_deployment_at_zero() -> None:
    s = Setup(zero_deployment())
    s.previous = {s.md.key: {"replicas": 0, "autoscaler": {"lastScaleReason": "ScaledToZero"}}}
    s.run_pass()
    assert s.services() == 0 and s.scaler.at_zero() == {s.md.key}


def test_between_rounds_only_the_gateways_of_models_at_zero_are_read() -> None:
    s = Setup(zero_deployment())
    other = deployment("busy", network={"name": "net"}, autoscaling={
        "maxReplicas": 2, "target": {"metric": "requestsWaitingPerReplica", "value": 1}})
    s.previous = {s.md.key: {"replicas": 0}}
    from npuswarm.core.pipeline import Desired

    s.scaler.saw_pass(s.reconciler.run_pass(s.scaler.serve(Desired(deployments=[s.md, other],
                                                                     previous=s.previous))).plan)
    asked: list[list[str]] = []

    def reader(gateways: Any, mds: Any, snapshot: Any) -> dict[str, ModelLoad]:
        asked.append(sorted(md.key for md in mds))
        if len(asked) >= 4:
            stop.set()
        return {}

    s.scaler.read_load = reader
    stop = threading.Event()
    # The clock stands still: the first round is the full one, every later one a wake round.
    thread = threading.Thread(target=s.scaler.run, args=(stop, 3600, lambda: True, 0.01), daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert asked[0] == ["default/busy", "default/chat"]
    assert all(keys == ["default/chat"] for keys in asked[1:]), asked


def test_a_steady_load_that_only_wobbles_writes_no_status() -> None:
    s = Setup(deployment("steady", autoscaling={
        "maxReplicas": 4, "target": {"metric": "requestsWaitingPerReplica", "value": 2},
        "scaleUpStabilizationSeconds": 0}))
    s.run_pass()
    s.loads = {s.md.key: ModelLoad(replicas=1, waiting=2.0, running=1, kv_cache=None)}
    s.scaler.tick()
    first = s.scaler.statuses[s.md.key]
    for wobble in (2.1, 1.9, 2.15):
        s.loads = {s.md.key: ModelLoad(replicas=1, waiting=wobble, running=1, kv_cache=None)}
        s.scaler.tick()
        assert s.scaler.statuses[s.md.key] is first, wobble  # the same object: nothing to write
    labels = {"namespace": "default", "name": "steady", "metric": "requestsWaitingPerReplica"}
    assert metrics.REGISTRY.get_sample_value("npuswarm_autoscaler_observed_value", labels) == 2.15
    s.loads = {s.md.key: ModelLoad(replicas=1, waiting=2.5, running=1, kv_cache=None)}
    s.scaler.tick()
    assert s.scaler.statuses[s.md.key].observedValue == 2.5  # moved by more than the tolerance


# --- never wake what cannot be placed ------------------------------------------------------------

fleets = st.lists(st.tuples(st.sampled_from([0, 1, 2, 4, 8]), st.sampled_from(["any", "rings-of-4"])),
                  min_size=1, max_size=5)
# (NPUs per replica, replicas now, held requests): 0 replicas with held requests wakes.
demands = st.lists(st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(0, 3), st.integers(0, 3)),
                   min_size=1, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet=fleets, demand=demands)
def test_a_model_is_woken_only_where_the_next_placement_places_its_replica(fleet, demand) -> None:
    nodes = [node(f"n{i}", npus, topology=kind) for i, (npus, kind) in enumerate(fleet)]
    scaling = {"minReplicas": 0, "maxReplicas": 4, "scaleUpStabilizationSeconds": 0,
               "target": {"metric": "requestsWaitingPerReplica", "value": 1}}
    deployments = [
        deployment(f"d{i}", created=f"2026-01-{i + 1:02d}T00:00:00Z", replicas=count,
                   npusPerReplica=npus, network={"name": "net"}, autoscaling=scaling)
        for i, (npus, count, _) in enumerate(demand)
    ]
    first = place(deployments, nodes)
    loads = {md.key: Load(replicas=0, held=held, idle_seconds=0.0)
             for md, (_, count, held) in zip(deployments, demand, strict=True) if count == 0}
    current = {md.key: md.spec.replicas for md in deployments}
    wanted = {key: 1 if load.held else 0 for key, load in loads.items()}
    room = headroom(first, nodes, wanted, wake_templates(deployments, nodes, current, wanted))
    counts = {}
    for md in deployments:
        if md.key not in loads:
            continue
        found = decide(md.spec.autoscaling, Inputs(0, loads[md.key], room.get(md.key, 0), 0), History())
        counts[md.key] = found.replicas
        assert found.replicas <= 1 and (found.replicas == 0 or loads[md.key].held > 0)
    second = place(autoscale.with_replicas(deployments, counts), nodes, allocations_of(first))
    for key, count in counts.items():
        if count:
            assert not [k for k in second.unplaced if k[0] == key], f"{key} woken but not placed"
    # Nothing placed before loses its place to a woken model.
    assert set(first.assignments) <= set(second.assignments)


def test_a_gateway_is_not_degraded_by_a_model_at_zero_but_is_by_another_without_backend() -> None:
    from npuswarm.gateway.backends import gateway_status
    from .builders import NOW as now

    gw = gateway()
    at_zero = GatewayWork(gateway=gw, backends={"z": [], "f": ["http://10.0.0.1:8000"]}, replicas=[],
                          from_zero=["z"])
    degraded = {c.type: c for c in gateway_status(at_zero, {}, [], now).conditions}["Degraded"]
    assert degraded.status == "False"
    broken = GatewayWork(gateway=gw, backends={"z": [], "f": []}, replicas=[], from_zero=["z"])
    degraded = {c.type: c for c in gateway_status(broken, {}, [], now).conditions}["Degraded"]
    assert (degraded.status, degraded.reason, degraded.message) == ("True", "ModelWithoutBackend", "no ready replica of f")


# --- waking fast: the long poll and the woken replica's own task ----------------------------------


def at_zero_setup() -> Setup:
    s = Setup(zero_deployment())
    s.previous = {s.md.key: {"replicas": 0}}
    s.run_pass()
    assert s.scaler.at_zero() == {s.md.key}
    return s


def test_a_request_held_at_a_gateway_wakes_its_model_at_once_not_at_the_next_read() -> None:
    """The wake reads are an hour apart here: only the long poll answering (a request held)
    can make the loop read and wake the model."""
    s = at_zero_setup()
    held = threading.Event()
    asked: list[tuple[list[str], float]] = []

    def wait_held(gateways: Any, mds: Any, snapshot: Any, seconds: float) -> bool:
        asked.append((sorted(md.key for md in mds), seconds))
        return held.wait(seconds)

    s.scaler.wait_held = wait_held
    s.scaler.read_load = lambda gateways, mds, snapshot: (
        {s.md.key: ModelLoad(replicas=0, waiting=0, running=0, kv_cache=None, held=1, idle_seconds=0)}
        if held.is_set() else {}
    )
    stop = threading.Event()
    thread = threading.Thread(target=s.scaler.run, args=(stop, 3600, lambda: True, 3600), daemon=True)
    thread.start()
    try:
        wait_for(lambda: asked, "the loop to long-poll the gateways of the model at zero", timeout=10)
        assert s.scaler.at_zero() == {s.md.key}
        s.requested.clear()  # the first round's (its first status)
        held.set()
        wait_for(lambda: s.requested == [s.md.key], "the model woken", timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)
    # Asked for the model at zero only, until the next full round (the clock stands still).
    assert asked[0] == ([s.md.key], 3600)
    assert s.scaler.counts[s.md.key] == 1


class RecordingStop(threading.Event):
    """A stop event that records each wait and ends the loop at the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        self.set()
        return True


def test_a_front_without_the_long_poll_is_read_at_the_old_pace_not_in_a_spin() -> None:
    s = at_zero_setup()
    s.scaler.wait_held = lambda gateways, mds, snapshot, seconds: False  # answered at once
    reads: list[int] = []
    s.scaler.read_load = lambda gateways, mds, snapshot: reads.append(1) or {}
    stop = RecordingStop()
    s.scaler.run(stop, 3600, lambda: True, 1.0)
    assert stop.waits == [1.0] and len(reads) == 2  # the round, one wake read, then 1 s


def test_a_woken_replica_is_watched_until_its_task_runs_then_a_pass_is_asked_for() -> None:
    s = at_zero_setup()
    states = iter([["starting"], ["starting"], ["running"]])
    watched: list[str] = []

    def task_states(service: str) -> list[str]:
        watched.append(service)
        return next(states, ["running"])

    s.scaler.task_states = task_states
    s.loads = {s.md.key: ModelLoad(replicas=0, waiting=0, running=0, kv_cache=None, held=1, idle_seconds=0)}
    s.scaler.tick(only=s.scaler.at_zero())
    assert s.requested == [s.md.key] and s.md.key in s.scaler.starting
    s.run_pass()  # creates the replica's service: the watch learns its name
    (service,) = s.swarm.by_name()
    assert s.scaler.starting[s.md.key].service == service
    s.requested.clear()
    for _ in range(2):
        s.scaler.watch_starting()
    assert s.requested == [] and watched == [service, service]
    s.scaler.watch_starting()
    assert s.requested == [s.md.key] and s.md.key not in s.scaler.starting
    s.scaler.watch_starting()
    assert len(watched) == 3, "nothing is watched once it runs"


def test_a_woken_replica_sent_back_to_zero_is_no_longer_watched() -> None:
    s = at_zero_setup()
    s.scaler.task_states = lambda service: ["starting"]
    s.loads = {s.md.key: ModelLoad(replicas=0, waiting=0, running=0, kv_cache=None, held=1, idle_seconds=0)}
    s.scaler.tick(only=s.scaler.at_zero())
    s.run_pass()
    s.scaler.counts[s.md.key] = 0  # as a later decision would
    s.scaler.watch_starting()
    assert s.md.key not in s.scaler.starting


def test_a_request_held_with_no_npus_to_wake_on_is_read_at_the_old_pace_not_in_a_spin() -> None:
    s = at_zero_setup()
    stop = RecordingStop()
    polls: list[float] = []

    def wait_held(gateways: Any, mds: Any, snapshot: Any, seconds: float) -> bool:
        polls.append(seconds)
        if len(polls) > 3:
            stop.set()  # a spin: end it, and fail below
        return True  # held, answered at once

    s.scaler.wait_held = wait_held
    s.scaler.read_load = lambda gateways, mds, snapshot: {
        s.md.key: ModelLoad(replicas=0, waiting=0, running=0, kv_cache=None, held=1, idle_seconds=0)}
    s.swarm.nodes[0]["Description"]["Resources"]["GenericResources"] = []  # no NPUs at all
    s.run_pass()
    s.scaler.run(stop, 3600, lambda: True, 1.0)
    assert stop.waits == [1.0] and len(polls) == 1
    assert s.scaler.statuses[s.md.key].reason == "WaitingForNPUs"
