"""The operator's ServiceAccount, as installed by `kubectl apply -k manifests/`, may do exactly
what npuswarm and kopf need. The e2e operator already runs with this account's token, so a
missing verb also breaks the other e2e tests; this file names each grant, and each denial."""

from __future__ import annotations

import json

import pytest

from .conftest import SERVICE_ACCOUNT, Cluster

pytestmark = pytest.mark.e2e

NEEDED = [
    ("get", "modeldeployments.npuswarm.io", "-A"),
    ("list", "modeldeployments.npuswarm.io", "-A"),
    ("watch", "modeldeployments.npuswarm.io", "-A"),
    ("patch", "modeldeployments.npuswarm.io", "-A"),  # finalizer and kopf's annotations
    ("get", "modeldeployments.npuswarm.io --subresource=status", "-A"),
    ("patch", "modeldeployments.npuswarm.io --subresource=status", "-A"),
    ("create", "events", "-n models"),
    ("get", "secrets", "-n models"),  # a ModelGateway's API keys Secret, by its name
    # The root key Secret, made once when NPUSWARM_ROOT_KEY is empty (handlers.with_root_key).
    ("create", "secrets", "-n npuswarm-system"),
    ("get", "secrets/npuswarm-root-key", "-n npuswarm-system"),
    ("get", "namespaces", ""),  # the NPU quota annotation (docs/priority.md)
    ("list", "namespaces", ""),
    ("watch", "namespaces", ""),
    ("get", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", ""),
]
DENIED = [
    ("update", "modeldeployments.npuswarm.io", "-A"),
    ("create", "modeldeployments.npuswarm.io", "-A"),
    ("delete", "modeldeployments.npuswarm.io", "-A"),
    ("list", "secrets", "-A"),
    ("create", "secrets", "-n models"),
    ("update", "secrets/npuswarm-root-key", "-n npuswarm-system"),
    ("patch", "secrets/npuswarm-root-key", "-n npuswarm-system"),
    ("delete", "secrets/npuswarm-root-key", "-n npuswarm-system"),
    ("watch", "secrets", "-A"),
    ("patch", "namespaces", ""),  # quotas are the admin's: read, never written
    ("update", "namespaces", ""),
    ("create", "pods", "-n default"),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("delete", "events", "-n models"),
    ("*", "*", "-A"),
]


def can_i(cluster: Cluster, verb: str, resource: str, scope: str) -> bool:
    args = ["auth", "can-i", verb, *resource.split(), *scope.split(), f"--as={SERVICE_ACCOUNT}"]
    result = cluster.kubectl(*args, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {result.stderr}"
    return answer == "yes"


@pytest.mark.parametrize(("verb", "resource", "scope"), NEEDED)
def test_operator_may(cluster: Cluster, verb: str, resource: str, scope: str) -> None:
    assert can_i(cluster, verb, resource, scope), f"the operator needs: {verb} {resource} {scope}"


@pytest.mark.parametrize(("verb", "resource", "scope"), DENIED)
def test_operator_may_not(cluster: Cluster, verb: str, resource: str, scope: str) -> None:
    assert not can_i(cluster, verb, resource, scope), f"too broad: {verb} {resource} {scope}"


def test_no_wildcards_in_the_installed_rbac(cluster: Cluster) -> None:
    roles = json.loads(cluster.kubectl("get", "clusterroles,roles", "-A", "-l",
                                       "app.kubernetes.io/name=npuswarm", "-o", "json").stdout)
    assert roles["items"], "no npuswarm roles found by label"
    for role in roles["items"]:
        for rule in role.get("rules", []):
            for key in ("verbs", "resources", "apiGroups", "resourceNames"):
                assert "*" not in rule.get(key, []), f"{role['metadata']['name']}: wildcard in {key}"
