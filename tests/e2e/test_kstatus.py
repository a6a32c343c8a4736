"""One verdict everywhere, on live objects: kstatus (Flux, kpt, cli-utils) and Argo CD's
health.lua read the ModelDeployments npuswarm reports on the same way, and `kubectl wait`
works. kstatus is sigs.k8s.io/cli-utils' own, built by hack/build-kstatus."""

from __future__ import annotations

import pytest
import yaml

from tests import kstatus
from tests.packaging.test_argocd_health import run_health

from .conftest import Cluster, condition, is_ready, manifest, wait_md

pytestmark = pytest.mark.e2e


def stalled(obj: dict) -> bool:
    return condition(obj, "Stalled").get("status") == "True"


def test_kstatus_and_argocd_agree_on_live_objects_and_kubectl_wait_works(
    cluster: Cluster, namespace: str
) -> None:
    # Served before npuswarm has written anything (a server-side dry run is never stored, so
    # the operator cannot race this read): not observed yet, not Current.
    fresh = cluster.kubectl("-n", namespace, "create", "--dry-run=server", "-o", "yaml", "-f", "-",
                            input=manifest("fresh")).stdout
    assert yaml.safe_load(fresh)["status"]["observedGeneration"] == 0
    assert [v["status"] for v in kstatus.verdicts(stdin=fresh)] == ["InProgress"]
    assert run_health(yaml.safe_load(fresh))["status"] == "Progressing"

    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("ready"))
    # Passes the schema (every rule kubectl can check), refused by the operator's host policy.
    cluster.kubectl("-n", namespace, "apply", "-f", "-",
                    input=manifest("invalid", volumes=[{"hostPath": "/etc", "mountPath": "/etc"}]))
    # An NPU no node has (davinci63): unplaceable, and it holds none of the shared Swarm's NPUs.
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("no-npus", npuIds=[63]))

    wait_md(cluster, namespace, "ready", is_ready, "Ready")
    for name in ("invalid", "no-npus"):
        wait_md(cluster, namespace, name, stalled, "Stalled")
    # What docs/gitops.md tells people to run; the conditions are already there, so any wait
    # here would be kubectl's, not the operator's.
    for condition_type, names in (("Ready", ["md/ready"]), ("Stalled", ["md/invalid", "md/no-npus"])):
        waited = cluster.kubectl("-n", namespace, "wait", f"--for=condition={condition_type}", *names,
                                 "--timeout=10s", timeout=20)
        assert waited.stdout.count("condition met") == len(names)

    listing = cluster.kubectl("-n", namespace, "get", "md", "ready", "invalid", "no-npus", "-o", "yaml").stdout
    found = {v["name"]: v for v in kstatus.verdicts(stdin=listing)}
    assert {name: v["status"] for name, v in found.items()} == {
        "ready": "Current", "invalid": "Failed", "no-npus": "Failed"}
    assert "hostPath /etc" in found["invalid"]["message"]
    assert found["no-npus"]["conditions"][0]["reason"] == "InsufficientNPUs"
    assert "pinned NPUs [63]" in found["no-npus"]["message"]

    argocd = {o["metadata"]["name"]: run_health(o)["status"] for o in yaml.safe_load(listing)["items"]}
    assert argocd == {"ready": "Healthy", "invalid": "Degraded", "no-npus": "Degraded"}
