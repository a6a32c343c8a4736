"""A ModelGateway through a real API server and the operator image: its Swarm service, its
status following the deployments' ready replicas, its finalizer. The gateway runs no task
here (replicas: 0, so no port is taken on the shared Swarm); tests/lab/test_gateway.py runs it."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.helpers import NETWORK, wait_for

from .conftest import GATEWAY_ROOT_KEY, INSTANCE, Cluster, is_ready, manifest, wait_md

pytestmark = pytest.mark.e2e


def gateway_manifest(name: str, **spec: Any) -> str:
    body = {"network": {"name": NETWORK}, "replicas": 0, "port": 18480, "adminPort": 18481, **spec}
    return yaml.safe_dump(
        {"apiVersion": "npuswarm.io/v1alpha1", "kind": "ModelGateway", "metadata": {"name": name},
         "spec": body}
    )


def get_gateway(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("-n", namespace, "get", "mgw", name, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def gateway_services(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return cluster.docker.services(
        filters={"label": [f"npuswarm.io/gateway-namespace={namespace}", f"npuswarm.io/instance={INSTANCE}"]}
    )


def test_gateway_service_status_and_finalizer(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("chat", servedModelName="chat-1"))
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=gateway_manifest("gw"))
    try:
        (service,) = wait_for(lambda: gateway_services(cluster, namespace), "the gateway's service")
        spec = service["Spec"]
        assert spec["Name"] == f"{namespace}-gw-gateway"
        assert spec["Mode"] == {"Replicated": {"Replicas": 0}}
        assert spec["TaskTemplate"]["Placement"]["MaxReplicas"] == 1
        container = spec["TaskTemplate"]["ContainerSpec"]
        # Its own credential and TLS key come as Swarm secrets; the root key is nowhere.
        assert "Env" not in container and GATEWAY_ROOT_KEY not in json.dumps(service)
        assert sorted(s["File"]["Name"] for s in container["Secrets"]) == [
            "npuswarm-gateway-credential", "npuswarm-gateway-tls.pem"]
        ports = [(p["PublishedPort"], p["PublishMode"]) for p in spec["EndpointSpec"]["Ports"]]
        assert ports == [(18480, "host"), (18481, "host")]
        wait_md(cluster, namespace, "chat", is_ready, "Ready")

        def backend_listed() -> dict[str, Any] | None:
            obj = get_gateway(cluster, namespace, "gw")
            models = (obj or {}).get("status", {}).get("models", [])
            return obj if models and models[0].get("backends") else None

        obj = wait_for(backend_listed, "the ready replica as the model's backend", timeout=60)
        (entry,) = obj["status"]["models"]
        assert entry["model"] == "chat-1" and entry["deployment"] == f"{namespace}/chat"
        assert entry["backends"][0].startswith("http://") and entry["backends"][0].endswith(":8000")
        assert obj["status"]["phase"] == "Ready" and obj["status"]["observedGeneration"] == 1
        assert obj["metadata"]["finalizers"] == ["npuswarm.io/finalizer"]
        printed = cluster.kubectl("-n", namespace, "get", "mgw").stdout
        assert printed.split()[:5] == ["NAME", "READY", "REPLICAS", "ENDPOINT", "PHASE"]

        # No ready replica any more: the gateway is Degraded, naming the model.
        cluster.kubectl("-n", namespace, "patch", "md", "chat", "--type", "merge", "-p",
                        json.dumps({"spec": {"replicas": 0}}))

        def degraded() -> dict[str, Any] | None:
            found = get_gateway(cluster, namespace, "gw") or {}
            return found if found.get("status", {}).get("phase") == "Degraded" else None

        obj = wait_for(degraded, "the gateway to report the model without backend", timeout=60)
        reasons = {c["type"]: (c["status"], c["reason"]) for c in obj["status"]["conditions"]}
        assert reasons["Degraded"] == ("True", "ModelWithoutBackend")
        assert reasons["Stalled"][0] == "True"
    finally:
        cluster.kubectl("-n", namespace, "delete", "mgw", "gw", "--timeout=60s", check=False)
    assert gateway_services(cluster, namespace) == []
    assert cluster.docker.secrets(filters={"label": [f"npuswarm.io/gateway-namespace={namespace}"]}) == []


def test_schema_refuses_an_admin_port_equal_to_the_port(cluster: Cluster, namespace: str) -> None:
    refused = cluster.kubectl("-n", namespace, "apply", "-f", "-",
                              input=gateway_manifest("bad", adminPort=18480), check=False)
    assert refused.returncode != 0 and "adminPort must differ from port" in refused.stderr


def test_schema_refuses_a_node_selector_key_swarm_cannot_constrain_on(
    cluster: Cluster, namespace: str
) -> None:
    """A '/' in a key (a Kubernetes-style label) made Swarm refuse the gateway's service,
    which was reported as an outage; now `kubectl apply` says what is wrong."""
    refused = cluster.kubectl("-n", namespace, "apply", "-f", "-", check=False,
                              input=gateway_manifest("bad", nodeSelector={"example.com/pool": "a"}))
    assert refused.returncode != 0 and "keys must match ^[-A-Za-z0-9_.]+$" in refused.stderr
