"""ModelDeployments through a real API server and the operator as a real process."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import IMAGE, wait_for

from .conftest import INSTANCE, Cluster, condition, is_ready, manifest, wait_md

pytestmark = pytest.mark.e2e

REPO_EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples"


def services(cluster: Cluster, namespace: str, name: str | None = None) -> dict[str, dict]:
    labels = [f"npuswarm.io/owner-namespace={namespace}"]
    if name:
        labels.append(f"npuswarm.io/owner-name={name}")
    return {s["Spec"]["Name"]: s for s in cluster.docker.services(filters={"label": labels})}


def env_of(service: dict) -> dict[str, str]:
    return dict(e.split("=", 1) for e in service["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"])


def test_crd_is_established_with_printer_columns(cluster: Cluster) -> None:
    crd = json.loads(cluster.kubectl("get", "crd", "modeldeployments.npuswarm.io", "-o", "json").stdout)
    established = next(c for c in crd["status"]["conditions"] if c["type"] == "Established")
    assert established["status"] == "True"
    assert crd["spec"]["names"]["shortNames"] == ["md"]


def test_examples_run_with_the_right_npus_and_show_in_kubectl_get(cluster: Cluster, namespace: str) -> None:
    for example in ("vllm-qwen3.yaml", "vllm-coder.yaml"):
        text = (REPO_EXAMPLES / example).read_text()
        # Same manifests as the docs, but the tiny local image and no host volumes.
        text = text.replace("quay.io/ascend/vllm-ascend:v0.9.2rc1", IMAGE)
        text = re.sub(r"  volumes:\n(    - .*\n)+", "", text)
        text += "  healthCheck: {startPeriodSeconds: 10, intervalSeconds: 1}\n"
        cluster.kubectl("-n", namespace, "apply", "-f", "-", input=text)
    for name in ("vllm-qwen3", "vllm-coder"):
        wait_md(cluster, namespace, name, is_ready, "Ready")
    found = services(cluster, namespace)
    npus = [env_of(s)["ASCEND_VISIBLE_DEVICES"].split(",") for s in found.values()]
    # 4 NPUs each, none shared: the node's 8. (Which 4 depends on earlier tests' replicas
    # still stopping: their NPUs are given out only once they have exited.)
    assert [len(ids) for ids in npus] == [4, 4]
    assert sorted(int(n) for ids in npus for n in ids) == list(range(8))
    table = cluster.kubectl("-n", namespace, "get", "md").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "REPLICAS", "NPUS", "PHASE", "AGE"]
    rows = {line.split()[0]: line.split()[1:5] for line in table[1:]}
    assert rows["vllm-qwen3"] == ["1", "1", "4", "Ready"]
    assert rows["vllm-coder"] == ["1", "1", "4", "Ready"]
    events = cluster.kubectl("-n", namespace, "get", "events", "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert "Placed" in reasons


def test_status_follows_swarm_and_edits_update_only_what_changed(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("a", replicas=2))
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("b", replicas=1))
    obj = wait_md(cluster, namespace, "a", is_ready, "Ready")
    wait_md(cluster, namespace, "b", is_ready, "Ready")
    assert obj["status"]["readyReplicas"] == 2
    assert all(r.get("hostname") for r in obj["status"]["replicaStatuses"]), obj["status"]
    for replica in obj["status"]["replicaStatuses"]:
        assert replica["taskState"] == "running" and len(replica["npus"]) == 1
    before = services(cluster, namespace)

    edited = manifest("a", replicas=2, engine={"port": 8000, "env": {"EDITED": "yes"}})
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=edited)
    obj = wait_md(
        cluster, namespace, "a",
        lambda o: is_ready(o) and o["metadata"]["generation"] == 2, "Ready at generation 2",
    )
    assert condition(obj, "Ready")["observedGeneration"] == 2
    after = services(cluster, namespace)
    # Not Version.Index: Swarm's own allocator bumps it. An update through the API keeps
    # the spec it replaced as PreviousSpec; b must have none, and the same spec.
    untouched = after[f"{namespace}-b-0"]
    assert "PreviousSpec" not in untouched
    assert untouched["Spec"] == before[f"{namespace}-b-0"]["Spec"]
    assert "PreviousSpec" in after[f"{namespace}-a-0"], "the edit did update a"
    for slot in ("0", "1"):
        assert env_of(after[f"{namespace}-a-{slot}"])["EDITED"] == "yes"


def test_failing_task_is_degraded_with_the_swarm_error(cluster: Cluster, namespace: str) -> None:
    broken = manifest("broken", engine={"port": 8000, "env": {"FAKE_REQUIRE_NPUS": "1"}})
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=broken)
    obj = wait_md(
        cluster, namespace, "broken",
        lambda o: condition(o, "Degraded").get("reason") == "TaskFailed", "Degraded/TaskFailed",
    )
    assert condition(obj, "Ready")["status"] == "False"
    assert "non-zero exit (1)" in condition(obj, "Degraded")["message"]
    assert obj["status"]["phase"] == "Degraded"
    assert obj["status"]["replicaStatuses"][0]["lastError"] == "task: non-zero exit (1)"

    # Two more resyncs of a still-failing task, each of which could post the event again.
    def reconciles() -> int:
        return sum(
            1 for line in cluster.operator_log().splitlines()
            if '"event": "reconciled"' in line and f'"deployment": "{namespace}/broken"' in line
        )

    seen = reconciles()
    wait_for(lambda: reconciles() >= seen + 2, "two more resyncs of the failing deployment", timeout=60)
    events = json.loads(cluster.kubectl("-n", namespace, "get", "events", "-o", "json").stdout)["items"]
    failed = [e for e in events if e["reason"] == "TaskFailed"]
    assert failed and "task: non-zero exit (1)" in failed[0]["message"]
    # The status was rewritten on every 2 s resync while the task kept failing; the event not.
    messages = [e["message"] for e in failed]
    assert len(messages) == len(set(messages)), f"identical events were repeated: {messages}"


def test_delete_removes_services_through_the_finalizer(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("doomed", replicas=2))
    obj = wait_md(cluster, namespace, "doomed", is_ready, "Ready")
    assert obj["metadata"]["finalizers"] == ["npuswarm.io/finalizer"]
    annotations = obj["metadata"].get("annotations", {})
    assert "npuswarm.io/last-handled-configuration" in annotations
    assert not [k for k in annotations if k.startswith("kopf.zalando.org")]
    assert len(services(cluster, namespace, "doomed")) == 2
    cluster.kubectl("-n", namespace, "delete", "md", "doomed", "--timeout=60s")
    assert services(cluster, namespace, "doomed") == {}
    gone = cluster.kubectl("-n", namespace, "get", "md", "doomed", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_schema_rejects_and_operator_reports_invalid_specs(cluster: Cluster, namespace: str) -> None:
    rejected = cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("bad", npusPerReplica=3), check=False)
    assert rejected.returncode != 0 and "npusPerReplica" in rejected.stderr
    # Cross-field rules are CEL in the schema: `kubectl apply` fails fast with the models' words,
    # and nothing is stored for the operator to act on. (The operator's InvalidSpec condition
    # remains for objects stored under an older CRD; PolicyViolation goes the same way, see
    # test_hostile_input.py.)
    invalid = manifest("invalid", npusPerReplica=2, engine={"port": 8000, "tensorParallelSize": 4})
    refused = cluster.kubectl("-n", namespace, "apply", "-f", "-", input=invalid, check=False)
    assert refused.returncode != 0
    assert "npusPerReplica is less than engine.tensorParallelSize" in refused.stderr
    assert cluster.kubectl("-n", namespace, "get", "md", "invalid", check=False).returncode != 0
    assert services(cluster, namespace, "invalid") == {}


def test_swarm_outage_is_reported_nothing_is_removed_and_metrics_count_errors(
    cluster: Cluster, namespace: str
) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("steady"))
    wait_md(cluster, namespace, "steady", is_ready, "Ready")
    before = scrape(cluster)
    cluster.relay.stop()
    try:
        obj = wait_md(
            cluster, namespace, "steady",
            lambda o: condition(o, "Degraded").get("reason") == "SwarmUnavailable", "SwarmUnavailable",
        )
        assert condition(obj, "Ready")["status"] == "Unknown"
        wait_for(lambda: scrape(cluster)["npuswarm_swarm_manager_reachable"] == 0, "reachable gauge to drop")
        during = scrape(cluster)
        errors = 'controller_runtime_reconcile_errors_total{controller="modeldeployment"}'
        assert during[errors] > before.get(errors, 0)
    finally:
        cluster.relay.start()
    assert f"{namespace}-steady-0" in services(cluster, namespace)
    wait_md(cluster, namespace, "steady", lambda o: is_ready(o) and condition(o, "Degraded")["status"] == "False",
            "Ready again")
    success = 'controller_runtime_reconcile_total{controller="modeldeployment",result="success"}'
    assert scrape(cluster)[success] > during.get(success, 0)


def test_npu_gauges_match_the_placement(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("gauge", replicas=1, npusPerReplica=4,
                                                                          engine={"port": 8000, "tensorParallelSize": 4}))
    wait_md(cluster, namespace, "gauge", is_ready, "Ready")
    claimed = sum(
        len(s["Spec"]["Labels"]["npuswarm.io/npus"].split(","))
        for s in cluster.docker.services(filters={"label": f"npuswarm.io/instance={INSTANCE}"})
    )
    hostname = cluster.docker.info()["Name"]

    def matches() -> bool:
        values = scrape(cluster)
        allocated = values.get(f'npuswarm_npus{{node="{hostname}",state="allocated"}}')
        free = values.get(f'npuswarm_npus{{node="{hostname}",state="free"}}')
        # Another session sharing this dockerd holds NPUs too: foreign to this installation.
        foreign = values.get(f'npuswarm_npus{{node="{hostname}",state="foreign"}}', 0)
        return allocated == claimed and free == 8 - claimed - foreign

    wait_for(matches, "npuswarm_npus to match the services' NPU labels", timeout=30)


def scrape(cluster: Cluster) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in cluster.metrics().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def test_logs_are_json_with_deployment_reconcile_id_and_duration(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=manifest("logged"))
    wait_md(cluster, namespace, "logged", is_ready, "Ready")
    lines = [json.loads(line) for line in cluster.operator_log().splitlines() if line.startswith("{")]
    assert lines and all("event" in line and "level" in line for line in lines)
    mine = [line for line in lines if line.get("deployment") == f"{namespace}/logged"]
    reconciled = [line for line in mine if line["event"] == "reconciled"]
    assert reconciled and all(line["reconcile_id"] and "duration_seconds" in line for line in reconciled)
    decided = [line for line in mine if line["event"] == "placement decided"]
    assert len(decided) == 1 and decided[0]["reason"] == "new replica"
    # The placement line shares the reconcile id of the pass that made the decision.
    assert decided[0]["reconcile_id"] in {line["reconcile_id"] for line in reconciled}
    assert any(line.get("logger", "").startswith("kopf") for line in lines), "kopf's lines go through structlog"
