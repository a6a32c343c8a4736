from __future__ import annotations

import pytest
from pydantic import ValidationError

from npuswarm.api.deployment import ModelDeploymentSpec, quantity_to_bytes
from npuswarm.api.meta import validation_message

BASE = {"image": "img", "model": "/models/m"}


def spec(**fields: object) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({**BASE, **fields})


def test_npus_per_replica_defaults_to_tensor_parallel_size() -> None:
    assert spec(engine={"tensorParallelSize": 4}).npus_per_replica == 4
    assert spec(engine={"tensorParallelSize": 2}, npusPerReplica=4).npus_per_replica == 4


def test_served_model_name_defaults_to_model_path() -> None:
    assert spec().served_model_name == "/models/m"
    assert spec(servedModelName="qwen").served_model_name == "qwen"


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"npusPerReplica": 3}, "npusPerReplica"),
        ({"engine": {"tensorParallelSize": 3}}, "tensorParallelSize"),
        ({"npusPerReplica": 2, "engine": {"tensorParallelSize": 4}}, "less than"),
        ({"replicas": -1}, "replicas"),
        ({"engine": {"port": 70000}}, "port"),
        ({"engine": {"extraArgs": ["--port", "9"]}}, "must not set --port"),
        ({"engine": {"extraArgs": ["--tensor-parallel-size=2"]}}, "--tensor-parallel-size"),
        ({"engine": {"env": {"ASCEND_VISIBLE_DEVICES": "0"}}}, "ASCEND_VISIBLE_DEVICES"),
        ({"engine": {"env": {"1BAD": "x"}}}, "not a valid variable name"),
        ({"shmSize": "lots"}, "shmSize"),
        ({"volumes": [{"hostPath": "relative", "mountPath": "/m"}]}, "hostPath"),
        ({"npuPerReplica": 4}, "npuPerReplica"),  # typo: unknown fields are errors
        ({"publish": {"port": 80, "mode": "ingress"}, "replicas": 2}, "single replica"),
        ({"updateStrategy": {"maxUnavailable": 0, "maxSurge": 0}}, "both be 0"),
        ({"network": {"name": "net", "alias": "Not_DNS"}}, "alias"),
        ({"image": ""}, "image"),
        ({"npusPerReplica": 2, "npuIds": [0, 1, 2]}, "npuIds names 3 NPUs"),
        ({"npusPerReplica": 2, "npuIds": [1, 1]}, "repeats an NPU"),
        ({"npusPerReplica": 1, "npuIds": [64]}, "npuIds"),
        ({"engine": {"extraArgs": ["--max_model_len", "4096"]}}, "--max-model-len"),
        ({"healthCheck": {"path": "/health'); import os; ('"}}, "path"),
        ({"volumes": [{"hostPath": "/big", "mountPath": "/dev/shm"}]}, "shmSize"),
        (
            {"publish": {"port": 80, "mode": "ingress"}, "network": {"name": "n"}},
            "endpointMode=vip",
        ),
        # Bounds a user would expect, and paths that mean what they say.
        ({"replicas": 1001}, "replicas"),
        ({"replicas": 2.5}, "replicas"),
        ({"engine": {"port": 0}}, "port"),
        ({"publish": {"port": 65536}}, "publish.port"),
        ({"engine": {"maxModelLen": 2**40}}, "maxModelLen"),
        ({"healthCheck": {"intervalSeconds": 10**12}}, "intervalSeconds"),
        ({"restartPolicy": {"delaySeconds": -1}}, "delaySeconds"),
        ({"image": "img; rm -rf /"}, "image"),
        ({"image": "x" * 1025}, "image"),
        ({"model": "--trust-remote-code"}, "model"),
        ({"servedModelName": "-x"}, "servedModelName"),
        ({"engine": {"extraArgs": ["a\x00b"]}}, "extraArgs"),
        ({"engine": {"extraArgs": ["x"] * 129}}, "extraArgs"),
        ({"engine": {"env": {"A B": "x"}}}, "not a valid variable name"),
        ({"engine": {"env": {"A=B": "x"}}}, "not a valid variable name"),
        ({"engine": {"env": {"ÄÖ": "x"}}}, "not a valid variable name"),
        ({"engine": {"env": {"X" * 257: "x"}}}, "not a valid variable name"),
        ({"engine": {"env": {"A": "nul\x00"}}}, "env"),
        ({"volumes": [{"hostPath": "/models/../etc", "mountPath": "/m"}]}, "hostPath"),
        ({"volumes": [{"hostPath": "/models//x", "mountPath": "/m"}]}, "hostPath"),
        ({"volumes": [{"hostPath": "/models/./x", "mountPath": "/m"}]}, "hostPath"),
        ({"volumes": [{"hostPath": "/models", "mountPath": "/"}]}, "mountPath"),
        ({"volumes": [{"hostPath": "/models", "mountPath": "/a/.."}]}, "mountPath"),
        (
            {"volumes": [{"hostPath": "/a", "mountPath": "/m"}, {"hostPath": "/b", "mountPath": "/m/"}]},
            "same mountPath",
        ),
        ({"volumes": [{"hostPath": "/m", "mountPath": f"/m{i}"} for i in range(33)]}, "volumes"),
        ({"shmSize": "0"}, "more than 0"),
        ({"shmSize": "2Ti"}, "at most 1Ti"),
        ({"network": {"name": "host"}}, "not 'host'"),
        ({"network": {"name": "-x"}}, "network.name"),
        ({"npusPerReplica": 8, "npuIds": list(range(9))}, "npuIds"),
        ({"privileged": True}, "privileged"),
        ({"capAdd": ["SYS_ADMIN"]}, "capAdd"),
        ({"devices": ["/dev/mem"]}, "devices"),
        ({"engine": {"hostNetwork": True}}, "hostNetwork"),
    ],
)
def test_invalid_specs_are_rejected_with_a_pointed_message(
    fields: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        spec(**fields)
    assert fragment in validation_message(caught.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1Gi", 2**30), ("512Mi", 512 * 2**20), ("16G", 16 * 10**9), ("100", 100)],
)
def test_quantities(text: str, size: int) -> None:
    assert quantity_to_bytes(text) == size


def test_bad_quantity() -> None:
    with pytest.raises(ValueError, match="not a size"):
        quantity_to_bytes("1 GB")


def test_identical_events_are_let_through_once_per_window() -> None:
    from npuswarm.core.kube_events import Event, EventFilter

    events = EventFilter(window_seconds=60)
    placed = Event("Normal", "Placed", "replica 0 placed on node a NPUs 0")
    assert events.admit("ns/m", placed, now=0)
    assert not events.admit("ns/m", placed, now=30)
    assert events.admit("ns/other", placed, now=30)
    assert events.admit("ns/m", Event("Normal", "Placed", "replica 1 placed"), now=30)
    assert events.admit("ns/m", placed, now=61)
    events.forget("ns/m")
    assert events.admit("ns/m", placed, now=62)


def test_paths_with_dots_in_names_and_one_trailing_slash_are_fine() -> None:
    ok = spec(
        volumes=[
            {"hostPath": "/models/.cache/...x", "mountPath": "/root/.cache/"},
            {"hostPath": "/data/lib64/", "mountPath": "/usr/local/lib64"},
        ],
        image="registry.example:5000/ascend/vllm-ascend:v0.9.2rc1@sha256:" + "a" * 64,
        model="Qwen/Qwen3-30B-A3B",
        engine={"env": {"_X1": "$(rm -rf /); `id` | && ; \n 'quoted'"}},
    )
    assert ok.volumes[1].hostPath == "/data/lib64/"


def test_event_filter_prunes_expired_keys_of_a_living_deployment() -> None:
    from npuswarm.core.kube_events import Event, EventFilter

    events = EventFilter(window_seconds=60)
    # A deployment that is never deleted, whose messages keep changing.
    for second in range(0, 600, 10):
        assert events.admit("ns/m", Event("Warning", "Unplaced", f"need {second} NPUs"), now=second)
    # Only the keys of the last window or two remain, not all 60.
    assert len(events) <= 12
    # A key still inside its window is kept and still filtered.
    assert not events.admit("ns/m", Event("Warning", "Unplaced", "need 590 NPUs"), now=595)
