"""Builders for pure-unit inputs: nodes, deployments and Engine API JSON like Swarm returns."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from npuswarm.api.deployment import ModelDeployment
from npuswarm.core.nodes import NodeInfo, Topology

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def node(
    node_id: str,
    npus: int = 8,
    *,
    hostname: str | None = None,
    state: str = "ready",
    availability: str = "active",
    labels: dict[str, str] | None = None,
    reserved: frozenset[int] = frozenset(),
    topology: Topology = "any",
    since: datetime = NOW,
) -> NodeInfo:
    return NodeInfo(
        id=node_id,
        hostname=hostname or f"host-{node_id}",
        state=state,
        availability=availability,
        labels=labels or {},
        npus=frozenset(range(npus)),
        reserved=reserved,
        topology=topology,
        status_since=since,
    )


def deployment(
    name: str = "qwen3",
    namespace: str = "default",
    *,
    created: str = "2026-01-01T00:00:00Z",
    generation: int = 1,
    **spec: Any,
) -> ModelDeployment:
    body: dict[str, Any] = {"image": "vllm-ascend:test", "model": f"/models/{name}"}
    body.update(spec)
    return ModelDeployment.model_validate(
        {
            "apiVersion": "npuswarm.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"uid-{name}",
                "generation": generation,
                "creationTimestamp": created,
            },
            "spec": body,
        }
    )


def engine_node(
    node_id: str,
    hostname: str,
    *,
    npus: list[str] | None = None,
    labels: dict[str, str] | None = None,
    state: str = "ready",
    availability: str = "active",
) -> dict[str, Any]:
    """A node as ``GET /nodes`` returns it."""
    resources = [{"NamedResourceSpec": {"Kind": "NPU", "Value": v}} for v in npus or []]
    return {
        "ID": node_id,
        "UpdatedAt": "2026-11-30T11:59:00.123456789Z",
        "Spec": {"Labels": labels or {}, "Role": "worker", "Availability": availability},
        "Description": {"Hostname": hostname, "Resources": {"GenericResources": resources}},
        "Status": {"State": state},
    }


def engine_service(
    spec: dict[str, Any], service_id: str, *, version: int = 10, network_ids: dict[str, str] | None = None
) -> dict[str, Any]:
    """A service as ``GET /services`` returns it: network names replaced by ids, as Swarm does."""
    import copy

    stored = copy.deepcopy(spec)
    for network in stored.get("TaskTemplate", {}).get("Networks", []):
        network["Target"] = (network_ids or {}).get(network["Target"], network["Target"])
    return {"ID": service_id, "Version": {"Index": version}, "Spec": stored}


def engine_task(
    service_id: str,
    spec: dict[str, Any],
    *,
    state: str = "running",
    desired: str = "running",
    error: str | None = None,
    created: str = "2026-11-30T11:00:00Z",
    task_id: str = "t1",
) -> dict[str, Any]:
    status: dict[str, Any] = {"State": state, "Timestamp": created}
    if error:
        status["Err"] = error
    return {
        "ID": task_id,
        "ServiceID": service_id,
        "NodeID": spec["Labels"]["npuswarm.io/node"],
        "DesiredState": desired,
        "CreatedAt": created,
        "Status": status,
        "Spec": {"ContainerSpec": {"Labels": spec["TaskTemplate"]["ContainerSpec"]["Labels"]}},
    }
