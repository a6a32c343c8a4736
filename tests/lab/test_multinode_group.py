"""A multi-node replica on the lab (issue 20 item 3): a 2-node group of the fake vLLM, rendered
and placed by npuswarm, forms over the nodes' host network (the leader waits for its headless
member at the rendezvous, as vLLM V1 does), becomes Ready and answers through its leader;
each member saw only its own NPUs. The Reconciler runs here exactly as the operator runs it."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

import swarmlab
from npuswarm.api.deployment import ModelDeployment
from npuswarm.core import gang
from npuswarm.reconcile import Reconciler
from npuswarm.settings import Settings
from npuswarm.swarm import Swarm
from tests.swarm.conftest import converge

pytestmark = pytest.mark.lab


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_a_two_node_group_forms_becomes_ready_and_serves_through_its_leader(
    swarm_lab: swarmlab.Lab,
) -> None:
    reconciler = Reconciler(Swarm(base_url=swarm_lab.endpoint), Settings(lost_node_grace_seconds=3))
    md = ModelDeployment.model_validate({
        "metadata": {"name": "ds", "namespace": "lab", "uid": "uid-ds", "generation": 1,
                     "creationTimestamp": "2026-01-05T00:00:00Z"},
        "spec": {"image": swarmlab.IMAGE, "model": "/models/ds", "nodesPerReplica": 2,
                 "npusPerReplica": 8, "engine": {"tensorParallelSize": 4, "dataParallelSize": 4},
                 # Two 8-NPU "any" nodes: the rings-of-4 node (node3) would also do.
                 "healthCheck": {"startPeriodSeconds": 30, "intervalSeconds": 1, "timeoutSeconds": 2},
                 "restartPolicy": {"delaySeconds": 1}},
    })
    try:
        status = converge(reconciler, md, [md], timeout=180).status
        members = {r.replica: r for r in status.replicaStatuses}
        assert set(members) == {"0-m0", "0-m1"}
        assert members["0-m0"].hostname != members["0-m1"].hostname
        assert all(r.npus == list(range(8)) for r in members.values())
        by_hostname = {swarm_lab.node(i).hostname: swarm_lab.node(i) for i in (1, 2, 3)}
        leader = by_hostname[members["0-m0"].hostname]
        # Block 0 unless an earlier test's members still stop there (they keep their ports).
        api = int((status.endpoint or "").rsplit(":", 1)[1])
        assert (api - gang.GROUP_PORT_BASE) % gang.PORT_BLOCK_SIZE == 0
        # The leader serves on its node's address, on the host network.
        group = get(f"http://{leader.address}:{api}/fake/group")
        assert group["complete"] is True
        assert group["data_parallel_size"] == 4 and group["data_parallel_address"] == leader.address
        joined = group["members"]
        assert [m["start_rank"] for m in joined] == [0, 2]
        assert {m["address"] for m in joined} == {by_hostname[r.hostname].address for r in members.values()}
        for member in joined:
            assert member["env"]["HCCL_IF_IP"] == member["address"]
            assert member["ASCEND_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
            assert member["devices"] == [f"davinci{i}" for i in range(8)]
        headless = joined[1]
        assert "--headless" in headless["args"]
        assert status.endpoint == f"{leader.address}:{api}"
        answer = get(f"http://{leader.address}:{api}/v1/models")
        assert [m["id"] for m in answer["data"]] == ["/models/ds"]
        print(f"\ngroup on {sorted(members[r].hostname for r in members)}: {json.dumps(group)[:600]}")
    finally:
        reconciler.finalize(md.metadata.namespace, md.metadata.name, md.metadata.uid)
