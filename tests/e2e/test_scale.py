"""The scale subresource through a real API server: `kubectl scale` and an HPA object.

No kube-controller-manager runs here, so HPA and KEDA themselves never act; what is tested
is what they depend on: the /scale endpoint reads and writes spec.replicas, reports
status.replicas and a selector string, and the operator follows a write made through it."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import Cluster, is_ready, manifest, wait_md

pytestmark = pytest.mark.e2e


def scale_of(cluster: Cluster, namespace: str, name: str) -> dict:
    path = f"/apis/npuswarm.io/v1alpha1/namespaces/{namespace}/modeldeployments/{name}/scale"
    return json.loads(cluster.kubectl("get", "--raw", path).stdout)


def test_kubectl_scale_places_the_replicas_and_scale_reports_them(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("scaled", replicas=1))
    wait_md(cluster, namespace, "scaled", is_ready, "Ready with 1 replica")

    cluster.kubectl("-n", namespace, "scale", "md/scaled", "--replicas=3")
    obj = wait_md(
        cluster, namespace, "scaled",
        lambda o: is_ready(o) and o["status"]["readyReplicas"] == 3, "3 replicas ready after kubectl scale",
    )
    assert obj["spec"]["replicas"] == 3
    assert len({r["service"] for r in obj["status"]["replicaStatuses"]}) == 3
    owned = cluster.docker.services(filters={"label": [
        f"npuswarm.io/owner-namespace={namespace}", "npuswarm.io/owner-name=scaled"]})
    assert len(owned) == 3

    scale = scale_of(cluster, namespace, "scaled")
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 3
    assert scale["status"]["replicas"] == 3
    # The selector names the labels every replica's Swarm service carries.
    assert scale["status"]["selector"] == "npuswarm.io/managed-by=npuswarm,npuswarm.io/owner-name=scaled"
    for service in owned:
        service_labels = service["Spec"]["Labels"]
        for term in scale["status"]["selector"].split(","):
            key, value = term.split("=")
            assert service_labels[key] == value

    cluster.kubectl("-n", namespace, "scale", "md/scaled", "--replicas=1")
    wait_md(
        cluster, namespace, "scaled",
        lambda o: is_ready(o) and o["status"]["replicas"] == 1 and len(o["status"]["replicaStatuses"]) == 1,
        "back to 1 replica",
    )


def test_an_hpa_targeting_a_modeldeployment_is_accepted_and_read_back(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("hpa-target", replicas=1))
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "hpa-target"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "npuswarm.io/v1alpha1", "kind": "ModelDeployment", "name": "hpa-target"},
            "minReplicas": 1,
            "maxReplicas": 4,
            "metrics": [{
                "type": "External",
                "external": {
                    "metric": {"name": "vllm:num_requests_waiting", "selector": {"matchLabels": {"model_name": "hpa-target"}}},
                    "target": {"type": "AverageValue", "averageValue": "5"},
                },
            }],
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(hpa))
    stored = json.loads(cluster.kubectl("-n", namespace, "get", "hpa", "hpa-target", "-o", "json").stdout)
    assert stored["spec"]["scaleTargetRef"]["kind"] == "ModelDeployment"
    assert stored["spec"]["maxReplicas"] == 4
    # What HPA's controller would read through the target's scale subresource once it runs.
    wait_md(cluster, namespace, "hpa-target", is_ready, "Ready")
    scale = scale_of(cluster, namespace, "hpa-target")
    assert scale["status"]["replicas"] == 1 and scale["status"]["selector"]
    cluster.kubectl("-n", namespace, "delete", "hpa", "hpa-target")


AUTOSCALING = {"minReplicas": 1, "maxReplicas": 3, "target": {"metric": "requestsWaitingPerReplica", "value": 4}}


def test_autoscaling_rules_refuse_bad_specs_at_apply(cluster: Cluster, namespace: str) -> None:
    cases = {
        "min-above-max": ({"autoscaling": {**AUTOSCALING, "minReplicas": 5}}, "minReplicas must not exceed maxReplicas"),
        "kv-above-one": ({"autoscaling": {**AUTOSCALING, "target": {"metric": "kvCacheUsage", "value": 2}}},
                         "a kvCacheUsage target is a fraction"),
        "pernode": ({"mode": "PerNode", "autoscaling": AUTOSCALING}, "PerNode runs one on every matching node"),
        "negative-min": ({"autoscaling": {**AUTOSCALING, "minReplicas": -1}}, "minReplicas"),
    }
    for name, (spec, message) in cases.items():
        refused = cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest(name, **spec), check=False)
        assert refused.returncode != 0 and message in refused.stderr, (name, refused.stderr)
    # An integer target of a number field is read as one by the rule (no "no such overload").
    fine = {**AUTOSCALING, "target": {"metric": "kvCacheUsage", "value": 1}}
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("kv-one", autoscaling=fine))
    # Scale to zero wakes through a ModelGateway, which reaches replicas on their network.
    zero = yaml.safe_load(manifest("zero-no-network", autoscaling={**AUTOSCALING, "minReplicas": 0}))
    del zero["spec"]["network"]
    refused = cluster.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(zero), check=False)
    assert refused.returncode != 0 and "autoscaling.minReplicas=0 needs network" in refused.stderr, refused.stderr
    cluster.kubectl("-n", namespace, "apply", "-f", "-",
                    input=manifest("zero", autoscaling={**AUTOSCALING, "minReplicas": 0}))


def test_with_autoscaling_npuswarm_owns_the_count_and_reports_a_scale_it_does_not_obey(
        cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("owned", autoscaling=AUTOSCALING))
    obj = wait_md(cluster, namespace, "owned",
                  lambda o: is_ready(o) and "ModelGateway" in (o["status"].get("autoscaler") or {}).get("message", ""),
                  "Ready at minReplicas, saying no gateway serves it")
    assert obj["status"]["replicas"] == 1
    assert obj["status"]["autoscaler"]["reason"] == "NoLoadReading"

    # HPA, KEDA or a person writing spec.replicas: the write lands, npuswarm does not obey it.
    cluster.kubectl("-n", namespace, "scale", "md/owned", "--replicas=3")
    obj = wait_md(cluster, namespace, "owned",
                  lambda o: "is not obeyed" in (o["status"].get("autoscaler") or {}).get("message", "")
                  and o["status"].get("observedGeneration") == o["metadata"]["generation"],
                  "the scale reported, not obeyed")
    assert obj["spec"]["replicas"] == 3 and obj["status"]["replicas"] == 1
    assert len(obj["status"]["replicaStatuses"]) == 1
    assert scale_of(cluster, namespace, "owned")["status"]["replicas"] == 1
    events = json.loads(cluster.kubectl("-n", namespace, "get", "events", "-o", "json").stdout)["items"]
    assert any(e["reason"] == "ReplicasNotOwned" and e["type"] == "Warning" for e in events)
