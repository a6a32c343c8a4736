"""The namespace NPU quota through a real API server: the operator reads the annotation an
admin puts on the Namespace (with the RBAC of manifests/), places no replica beyond it, says
so in the status, and follows a change of the annotation without a restart."""

from __future__ import annotations

import pytest

from .conftest import Cluster, condition, is_ready, manifest, wait_md

pytestmark = pytest.mark.e2e

ANNOTATION = "npuswarm.io/npu-quota"


def test_replicas_beyond_the_namespace_quota_wait_and_the_status_says_so(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("annotate", "namespace", namespace, f"{ANNOTATION}=1")
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("capped", replicas=2, npusPerReplica=1))
    obj = wait_md(
        cluster, namespace, "capped",
        lambda o: o.get("status", {}).get("readyReplicas") == 1
        and condition(o, "Progressing").get("reason") == "QuotaExceeded",
        "1 of 2 replicas ready, the other beyond the quota",
    )
    progressing = condition(obj, "Progressing")["message"]
    assert f"namespace {namespace} has an NPU quota of 1 ({ANNOTATION})" in progressing
    assert obj["status"]["placedReplicas"] == 1 and obj["status"]["npus"] == 1
    unplaced = [r for r in obj["status"]["replicaStatuses"] if not r.get("nodeId")]
    assert len(unplaced) == 1 and "NPU quota of 1" in unplaced[0]["message"]
    owned = cluster.docker.services(filters={"label": [
        f"npuswarm.io/owner-namespace={namespace}", "npuswarm.io/owner-name=capped"]})
    assert len(owned) == 1
    events = cluster.kubectl("-n", namespace, "get", "events", "--field-selector",
                             "involvedObject.name=capped", "-o", "jsonpath={.items[*].reason}").stdout
    assert "QuotaExceeded" in events.split()

    # The admin raises the quota: the Namespace event alone brings the second replica.
    cluster.kubectl("annotate", "--overwrite", "namespace", namespace, f"{ANNOTATION}=2")
    wait_md(cluster, namespace, "capped", lambda o: is_ready(o) and o["status"]["readyReplicas"] == 2,
            "both replicas ready once the quota allows them")
