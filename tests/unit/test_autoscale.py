"""The built-in autoscaler's pure parts: the spec, the decision, the placement cap, reading
vLLM's gauges and merging gateways' answers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from npuswarm.api.deployment import Autoscaling
from npuswarm.core import autoscale
from npuswarm.core.autoscale import Decision, History, Inputs, Load, decide, headroom
from npuswarm.core.placement import Allocation, by_priority, place_all
from npuswarm.gateway import load

from .builders import NOW, deployment, node


def policy(**overrides: Any) -> Autoscaling:
    body: dict[str, Any] = {
        "minReplicas": 1,
        "maxReplicas": 8,
        "target": {"metric": "requestsWaitingPerReplica", "value": 2},
        "scaleUpStabilizationSeconds": 30,
        "scaleDownStabilizationSeconds": 300,
    }
    body.update(overrides)
    return Autoscaling.model_validate(body)


def waiting(total: float, replicas: int = 1) -> Load:
    return Load(replicas=replicas, waiting=total, running=0)


# --- the spec ---------------------------------------------------------------------------------


def test_spec_refuses_min_above_max_negative_min_and_kv_targets_above_one() -> None:
    with pytest.raises(ValidationError, match="minReplicas=5 exceeds maxReplicas=2"):
        policy(minReplicas=5, maxReplicas=2)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        policy(minReplicas=-1)
    assert policy(minReplicas=0).minReplicas == 0  # scale to zero
    with pytest.raises(ValidationError, match="at most 1"):
        policy(target={"metric": "kvCacheUsage", "value": 2})
    assert policy(target={"metric": "kvCacheUsage", "value": 0.8}).target.value == 0.8


def test_spec_refuses_autoscaling_in_pernode_mode_and_with_an_ingress_port() -> None:
    scaling = {"maxReplicas": 3, "target": {"metric": "requestsRunningPerReplica", "value": 8}}
    with pytest.raises(ValidationError, match="PerNode"):
        deployment(mode="PerNode", autoscaling=scaling)
    with pytest.raises(ValidationError, match="maxReplicas must be 1"):
        deployment(
            publish={"port": 9000, "mode": "ingress"},
            network={"name": "net", "endpointMode": "vip"},
            autoscaling=scaling,
        )
    assert deployment(autoscaling=scaling).spec.autoscaling is not None


def test_crd_carries_the_cross_field_rules() -> None:
    from npuswarm.api.crd import crd_manifest

    spec = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("self.mode != 'PerNode'" in r and "autoscaling" in r for r in rules)
    scaling = spec["properties"]["autoscaling"]
    assert "self.minReplicas <= self.maxReplicas" in scaling["x-kubernetes-validations"][0]["rule"]
    assert scaling["properties"]["minReplicas"]["minimum"] == 0  # scale to zero


# --- the decision -----------------------------------------------------------------------------


def test_recommendation_is_hpas_average_value_rule() -> None:
    rule = policy(scaleUpStabilizationSeconds=0)
    # 9 waiting over 2 replicas, 2 per replica wanted: ceil(9 / 2) = 5.
    found = decide(rule, Inputs(2, waiting(9, 2), placeable=100, now=0), History())
    assert (found.replicas, found.reason, found.observed) == (5, "ScaledUp", 4.5)
    # Within the 10% tolerance: no change.
    steady = decide(rule, Inputs(2, waiting(4.2, 2), placeable=100, now=1), History())
    assert (steady.replicas, steady.reason) == (2, "Steady")


def test_kv_cache_usage_scales_the_replicas_that_report() -> None:
    rule = policy(target={"metric": "kvCacheUsage", "value": 0.5}, scaleUpStabilizationSeconds=0)
    reading = Load(replicas=3, kv_cache=0.9)
    found = decide(rule, Inputs(3, reading, placeable=100, now=0), History())
    assert found.replicas == 6  # ceil(3 x 0.9 / 0.5)


def test_bounds_clamp_the_recommendation() -> None:
    rule = policy(maxReplicas=4, minReplicas=2, scaleUpStabilizationSeconds=0)
    assert decide(rule, Inputs(2, waiting(100), 100, 0), History()).replicas == 4
    rule = policy(minReplicas=2, scaleDownStabilizationSeconds=0)
    assert decide(rule, Inputs(3, waiting(0, 3), 100, 0), History()).replicas == 2


def test_a_burst_shorter_than_the_scale_up_window_changes_nothing() -> None:
    rule = policy(scaleUpStabilizationSeconds=30)
    history = History()
    assert decide(rule, Inputs(1, waiting(0), 100, 0), history).replicas == 1
    burst = decide(rule, Inputs(1, waiting(20), 100, 10), history)
    assert (burst.replicas, burst.reason, burst.recommendation) == (1, "Steady", 8)
    # Load stays high past the window: every recommendation in it agrees, so it scales.
    decide(rule, Inputs(1, waiting(20), 100, 35), history)
    assert decide(rule, Inputs(1, waiting(20), 100, 41), history).replicas == 8


def test_a_scale_up_is_not_undone_before_the_scale_down_window() -> None:
    rule = policy(scaleUpStabilizationSeconds=0, scaleDownStabilizationSeconds=300)
    history = History()
    assert decide(rule, Inputs(1, waiting(8), 100, 0), history).replicas == 4
    for t in (10, 100, 299):
        assert decide(rule, Inputs(4, waiting(0, 4), 100, t), history).replicas == 4
    late = decide(rule, Inputs(4, waiting(0, 4), 100, 301), history)
    assert (late.replicas, late.reason) == (1, "ScaledDown")


def test_no_reading_keeps_the_count() -> None:
    found = decide(policy(), Inputs(3, None, 100, 0), History())
    assert (found.replicas, found.reason) == (3, "NoLoadReading")
    assert "ModelGateway" in found.message


def test_a_scale_up_is_capped_by_what_placement_can_give() -> None:
    rule = policy(scaleUpStabilizationSeconds=0)
    capped = decide(rule, Inputs(2, waiting(16, 2), placeable=3, now=0), History())
    assert (capped.replicas, capped.reason) == (3, "ScaledUp")
    assert "wanted 8" in capped.message
    full = decide(rule, Inputs(3, waiting(16, 3), placeable=3, now=1), History())
    assert (full.replicas, full.reason) == (3, "WaitingForNPUs")
    assert "the fleet has NPUs for 3" in full.message


# --- the placement cap ------------------------------------------------------------------------


def scaled(name: str, replicas: int, npus: int = 1, created: str = "2026-01-01T00:00:00Z", **spec: Any):
    return deployment(
        name,
        created=created,
        replicas=replicas,
        npusPerReplica=npus,
        autoscaling={"maxReplicas": 64, "target": {"metric": "requestsWaitingPerReplica", "value": 1}},
        **spec,
    )


def place(deployments, nodes, allocations=()):
    return place_all(by_priority(deployments), nodes, list(allocations), now=NOW, lost_node_grace_seconds=60)


def allocations_of(result) -> list[Allocation]:
    return [
        Allocation(deployment=a.deployment, slot=a.slot, node_id=a.node_id, npus=a.npus, service=f"{a.deployment}-{a.slot}")
        for a in result.assignments.values()
    ]


def test_headroom_shares_free_npus_oldest_first() -> None:
    nodes = [node("n1", 8), node("n2", 4)]
    old = scaled("old", 1, npus=4, created="2026-01-01T00:00:00Z")
    young = scaled("young", 1, npus=4, created="2026-02-01T00:00:00Z")
    first = place([old, young], nodes)
    # 12 NPUs, 8 placed: room for one more 4-NPU replica, which the older one gets.
    room = headroom(first, nodes, {old.key: 5, young.key: 5})
    assert room == {old.key: 2, young.key: 1}


def test_headroom_counts_older_unplaced_replicas_first() -> None:
    nodes = [node("n1", 4)]
    stuck = deployment("stuck", created="2026-01-01T00:00:00Z", replicas=3, npusPerReplica=2)
    young = scaled("young", 0, npus=2, created="2026-02-01T00:00:00Z")
    first = place([stuck, young], nodes)
    assert len(first.unplaced) == 1  # stuck's third replica: the older one waits first
    assert headroom(first, nodes, {young.key: 2}) == {young.key: 0}


fleet = st.lists(
    st.tuples(st.sampled_from([0, 1, 2, 4, 8]), st.sampled_from(["any", "rings-of-4"])), min_size=1, max_size=6
)
demand = st.lists(
    st.tuples(st.sampled_from([1, 2, 4]), st.integers(0, 4), st.integers(0, 12), st.booleans()),
    min_size=1,
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet=fleet, demand=demand)
def test_no_scale_up_the_next_placement_cannot_place_is_ever_asked_for(fleet, demand) -> None:
    """Over random fleets and demand: every deployment the autoscaler scales up gets every
    one of its replicas placed by the next pass's placement (the real one, sticky)."""
    nodes = [node(f"n{i}", npus, topology=kind) for i, (npus, kind) in enumerate(fleet)]
    deployments = []
    for i, (npus, current, _, autoscaled) in enumerate(demand):
        created = f"2026-01-{i + 1:02d}T00:00:00Z"
        if autoscaled:
            deployments.append(scaled(f"d{i}", max(current, 1), npus=npus, created=created))
        else:
            deployments.append(deployment(f"d{i}", created=created, replicas=current, npusPerReplica=npus))
    first = place(deployments, nodes)
    wanted = {
        md.key: max(1, demand[i][2]) for i, md in enumerate(deployments) if md.spec.autoscaling is not None
    }
    room = headroom(first, nodes, wanted)
    rule = policy(maxReplicas=64, scaleUpStabilizationSeconds=0, target={"metric": "requestsWaitingPerReplica", "value": 1})
    counts = {}
    for md in deployments:
        if md.key not in wanted:
            continue
        found = decide(rule, Inputs(md.spec.replicas, waiting(wanted[md.key]), room[md.key], 0), History())
        counts[md.key] = found.replicas
        if found.replicas > md.spec.replicas:
            assert found.replicas <= room[md.key]
    second = place(autoscale.with_replicas(deployments, counts), nodes, allocations_of(first))
    for md in deployments:
        if counts.get(md.key, 0) > md.spec.replicas:
            lost = [k for k in second.unplaced if k[0] == md.key]
            assert not lost, f"{md.key} scaled {md.spec.replicas} -> {counts[md.key]} but {lost} unplaced"
    # Nothing that was placed loses its place to a scale-up (scaled-down replicas go).
    shrunk = {k for k, count in counts.items() if count < next(md for md in deployments if md.key == k).spec.replicas}
    kept = {key for key in first.assignments if key[0] not in shrunk}
    assert kept <= set(second.assignments)


@settings(max_examples=200, deadline=None)
@given(
    loads=st.lists(st.integers(0, 40), min_size=2, max_size=60),
    step=st.integers(1, 30),
    up=st.integers(0, 120),
    down=st.integers(0, 600),
)
def test_the_count_does_not_flap(loads, step, up, down) -> None:
    """A scale-up is never followed by a scale-down within the scale-down window, nor a
    scale-down by a scale-up within the scale-up window."""
    rule = policy(maxReplicas=16, scaleUpStabilizationSeconds=up, scaleDownStabilizationSeconds=down)
    history, current = History(), 1
    changes: list[tuple[float, str]] = []
    for i, total in enumerate(loads):
        now = float(i * step)
        found: Decision = decide(rule, Inputs(current, waiting(total, current), 1000, now), history)
        if found.changed:
            changes.append((now, found.reason))
            current = found.replicas
    for (t1, first), (t2, second) in zip(changes, changes[1:], strict=False):
        if first == "ScaledUp" and second == "ScaledDown":
            assert t2 - t1 > down or down == 0
        if first == "ScaledDown" and second == "ScaledUp":
            assert t2 - t1 > up or up == 0


def test_with_replicas_serves_the_decided_count_and_leaves_others() -> None:
    auto, fixed = scaled("auto", 1), deployment("fixed", replicas=2)
    served = autoscale.with_replicas([auto, fixed], {auto.key: 4, fixed.key: 9})
    assert [md.spec.replicas for md in served] == [4, 2]
    assert auto.spec.replicas == 1  # the parsed object is not changed


# --- vLLM's gauges and the gateways' answers ----------------------------------------------------

V1_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen3"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen3"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen3"} 4.0
vllm:num_requests_waiting{engine="1",model_name="qwen3"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen3"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="qwen3"} 0.7
vllm:gpu_cache_usage_perc{engine="0",model_name="qwen3"} 0.99
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="qwen3"} 7.0
"""
V0_METRICS = """\
vllm:num_requests_running{model_name="a \\"quoted\\" {name}"} 1
vllm:num_requests_waiting{model_name="m"} 2
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
"""


def test_parse_reads_v1_gauges_summing_engines_and_preferring_the_new_cache_name() -> None:
    reading = load.parse_metrics(V1_METRICS)
    assert reading == load.Reading(waiting=5.0, running=5.0, kv_cache=pytest.approx(0.6))


def test_parse_falls_back_to_the_v0_cache_gauge_and_survives_odd_labels() -> None:
    assert load.parse_metrics(V0_METRICS) == load.Reading(waiting=2.0, running=1.0, kv_cache=0.25)


def test_parse_refuses_a_page_without_vllm_gauges_and_skips_bad_values() -> None:
    assert load.parse_metrics("process_cpu_seconds_total 3\n") is None
    text = "vllm:num_requests_waiting NaN\nvllm:num_requests_waiting 2\nvllm:num_requests_running x\n"
    assert load.parse_metrics(text) == load.Reading(waiting=2.0, running=0.0, kv_cache=None)


def test_merge_counts_each_backend_once_and_ignores_malformed_parts() -> None:
    one = {"models": {"m": {"http://a:8000": {"waiting": 4, "running": 1, "kvCache": 0.5}}}}
    two = {"models": {"m": {
        "http://a:8000": {"waiting": 99, "running": 99, "kvCache": 0.9},  # the same backend
        "http://b:8000": {"waiting": 2, "running": 3, "kvCache": None},
        "http://c:8000": {"waiting": -1, "running": 0},  # negative: not trusted
        "http://d:8000": {"waiting": True, "running": 0},  # not a number
    }}}
    merged = load.merge([one, two, {"models": "junk"}, "junk"])  # type: ignore[list-item]
    assert merged == {"m": load.ModelLoad(replicas=2, waiting=6.0, running=4.0, kv_cache=0.5)}


def test_load_body_round_trips_through_merge() -> None:
    body = load.load_body({"m": {"http://a:8000": load.Reading(1, 2, 0.3)}}, {"http://b:8000": "timeout"}, 1.5)
    assert body["errors"] == {"http://b:8000": "timeout"} and body["ageSeconds"] == 1.5
    assert load.merge([body]) == {"m": load.ModelLoad(1, 1.0, 2.0, 0.3)}


def test_after_a_restart_a_scale_down_still_waits_a_full_window() -> None:
    """The history starts empty (a new operator): the count it found stands for the time
    before its first reading, so a low first reading does not scale down at once."""
    rule = policy(scaleDownStabilizationSeconds=300)
    history = History()
    first = decide(rule, Inputs(current=3, load=waiting(0, replicas=3), placeable=8, now=1000), history)
    assert first.replicas == 3 and first.recommendation == 1
    later = decide(rule, Inputs(current=3, load=waiting(0, replicas=3), placeable=8, now=1301), history)
    assert later.replicas == 1 and later.reason == "ScaledDown"
