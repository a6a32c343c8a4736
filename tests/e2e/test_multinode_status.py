"""A multi-node replica's status through the real API server, written by the operator as a real
process (issue 20 item 6): the local Swarm has one node, so a group of two nodes cannot be
placed, and its status says so as one replica with its group and both members."""

from __future__ import annotations

import pytest
import yaml

from .conftest import Cluster, condition, manifest, wait_md

pytestmark = pytest.mark.e2e


def test_a_group_is_one_replica_with_its_members_in_the_status(cluster: Cluster, namespace: str) -> None:
    body = yaml.safe_load(manifest("big", nodesPerReplica=2, npusPerReplica=2, network=None,
                                   engine={"tensorParallelSize": 1, "port": 8000}))
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(body))
    obj = wait_md(cluster, namespace, "big", lambda o: bool(o.get("status", {}).get("groupStatuses")),
                  "the operator to write the group's status")
    status = obj["status"]
    assert (status["replicas"], status.get("readyReplicas", 0), status.get("placedReplicas", 0)) == (1, 0, 0)
    (group,) = status["groupStatuses"]
    assert (group["group"], group["state"], group.get("ready", False)) == ("0", "Pending", False)
    assert [m["replica"] for m in group["members"]] == ["0-m0", "0-m1"]
    assert all(not m.get("nodeId") for m in group["members"])
    assert "needs 2 of 2 node(s) with 2 free NPUs each; 1 fit" in group["message"]
    # One replica short, and why, in the conditions kstatus and Argo CD read.
    degraded = condition(obj, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InsufficientNPUs")
    assert condition(obj, "Ready")["message"] == "0/1 replicas ready (groups of 2 nodes)"
    # kubectl get's READY column counts groups.
    columns = cluster.kubectl("-n", namespace, "get", "md", "big", "--no-headers").stdout.split()
    assert columns[1] in ("0", "<none>") and columns[2] == "1", columns
