"""npuswarm on the multi-node lab: NPUs reach tasks only through the runtime shim and the env
npuswarm renders, replicas leave a lost node for another node's free NPUs, and a model's
alias spreads over its replicas. The Reconciler runs here exactly as the operator runs it."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

import swarmlab
from npuswarm.api.deployment import ModelDeployment
from npuswarm.reconcile import Reconciler
from npuswarm.swarm import Swarm
from tests.helpers import wait_for
from tests.swarm.conftest import converge

from .conftest import ask_from_client_container, lab_settings

pytestmark = pytest.mark.lab

NETWORK = "npuswarm-lab-net"
GRACE_SECONDS = 3.0


@pytest.fixture(scope="module")
def lab_reconciler(swarm_lab: swarmlab.Lab) -> Reconciler:
    return Reconciler(Swarm(base_url=swarm_lab.endpoint), lab_settings(lost_node_grace_seconds=GRACE_SECONDS))


@pytest.fixture(scope="module")
def lab_network(swarm_lab: swarmlab.Lab) -> str:
    api = swarm_lab.client(1).api
    if not api.networks(names=[NETWORK]):
        api.create_network(NETWORK, driver="overlay", attachable=True)
    return NETWORK


@pytest.fixture
def cleanup(swarm_lab: swarmlab.Lab, lab_reconciler: Reconciler) -> Any:
    created: list[ModelDeployment] = []
    yield created
    for md in created:
        lab_reconciler.finalize(md.metadata.namespace, md.metadata.name, md.metadata.uid)


def lab_model(
    name: str, created: str, network: str, alias: dict[str, str] | None = None, **spec: Any
) -> ModelDeployment:
    body: dict[str, Any] = {
        "image": swarmlab.IMAGE,
        "model": f"/models/{name}",
        "healthCheck": {"startPeriodSeconds": 20, "intervalSeconds": 1, "timeoutSeconds": 2},
        "network": alias or {"name": network},
        "restartPolicy": {"delaySeconds": 1},
        **spec,
    }
    return ModelDeployment.model_validate(
        {"metadata": {"name": name, "namespace": "lab", "uid": f"uid-{name}", "generation": 1,
                      "creationTimestamp": created}, "spec": body}
    )


def npus_report(address: str, port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/npus", timeout=3) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def test_lost_worker_replicas_move_to_another_nodes_free_npus(
    swarm_lab: swarmlab.Lab, lab_reconciler: Reconciler, lab_network: str, cleanup: list[ModelDeployment]
) -> None:
    api = swarm_lab.client(1).api
    for index in (2, 3):  # keep the manager out of it: losing it would lose the Swarm
        node = swarm_lab.swarm_node(index)
        spec = dict(node["Spec"], Labels={**node["Spec"].get("Labels", {}), "npuswarm.test/pool": "workers"})
        api.update_node(node["ID"], node["Version"]["Index"], spec)
    selector = {"nodeSelector": {"npuswarm.test/pool": "workers"}}
    # The filler holds NPUs 0-3 of node3 (a rings-of-4 node); best fit then puts the mover on
    # node3's other ring, and losing node3 must move it to node2's free NPUs.
    filler = lab_model("filler", "2026-01-01T00:00:00Z", lab_network, npusPerReplica=4,
                       engine={"tensorParallelSize": 4},
                       nodeSelector={"npuswarm.io/topology": "rings-of-4"})
    mover = lab_model("mover", "2026-01-02T00:00:00Z", lab_network, npusPerReplica=4,
                      engine={"tensorParallelSize": 4, "port": 8000},
                      publish={"port": 18000, "mode": "host"}, **selector)
    cleanup += [filler, mover]
    everyone = [filler, mover]
    converge(lab_reconciler, filler, everyone, timeout=120)
    before = converge(lab_reconciler, mover, everyone, timeout=120).status.replicaStatuses[0]
    assert before.hostname == swarm_lab.node(3).hostname and before.npus == [4, 5, 6, 7]
    report = wait_for(lambda: npus_report(swarm_lab.node(3).address, 18000), "the fake vLLM on node3")
    assert report["ASCEND_VISIBLE_DEVICES"] == "4,5,6,7"

    swarm_lab.kill_dockerd(3)
    try:
        swarm_lab.wait_node_state(3, "down", timeout=30)
        after = converge(lab_reconciler, mover, everyone, timeout=120).status.replicaStatuses[0]
        assert after.hostname == swarm_lab.node(2).hostname
        assert after.npus == [0, 1, 2, 3]
        moved = wait_for(lambda: npus_report(swarm_lab.node(2).address, 18000), "the fake vLLM on node2")
        assert moved["ASCEND_VISIBLE_DEVICES"] == "0,1,2,3"
        assert moved["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3"
        assert sorted(moved["devices"]) == [f"davinci{i}" for i in range(4)]
        print(f"\nre-placed: {before.hostname} {before.npus} -> {after.hostname} {after.npus}; "
              f"fake vLLM on the new node reports {json.dumps(moved)}")
    finally:
        swarm_lab.start_dockerd(3)
        swarm_lab.wait_node_state(3, "ready", timeout=60)


def test_alias_spreads_over_every_replica(
    swarm_lab: swarmlab.Lab, lab_reconciler: Reconciler, lab_network: str, cleanup: list[ModelDeployment]
) -> None:
    md = lab_model("spread", "2026-01-03T00:00:00Z", lab_network, replicas=2,
                   alias={"name": lab_network, "alias": "spread", "endpointMode": "dnsrr"})
    cleanup.append(md)
    status = converge(lab_reconciler, md, [md], timeout=120).status
    assert status.endpoint == "spread:8000"
    requests = 12
    lines = ask_from_client_container(
        swarm_lab.client(1), lab_network, "http://spread:8000/npus", requests
    )
    summary = lines[-1]["summary"]
    assert summary["ok"] == requests
    replies = [line["body"] for line in lines[:-1] if line.get("status") == 200]
    devices = {r["ASCEND_VISIBLE_DEVICES"] for r in replies}
    assert devices == {",".join(map(str, r.npus)) for r in status.replicaStatuses}
    assert len(devices) == 2
