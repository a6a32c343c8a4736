"""One endpoint per model: replicas (one service each) share a network alias on an overlay,
with endpoint mode dnsrr (the lab kernel has no IPVS for VIPs)."""

import pytest

from .conftest import ask_from_client_container

pytestmark = pytest.mark.lab

REQUESTS = 30


def test_alias_spreads_requests_over_both_replicas(swarm_lab, manager, services):
    net = services.network("alias-test-net")
    replicas = [
        services.fake_vllm(
            f"alias-r{i}",
            swarm_lab.node_id(node),
            ["org/qwen", "--served-model-name", "qwen"],
            env={"ASCEND_VISIBLE_DEVICES": str(i)},
            network=net,
            aliases=["qwen"],
        )
        for i, node in ((0, 2), (1, 3))
    ]
    for service in replicas:
        services.wait_task_state(service, {"running"})
    lines = ask_from_client_container(manager, net.name, "http://qwen:8000/npus", REQUESTS)
    summary = lines[-1]["summary"]
    assert summary["ok"] == REQUESTS
    replies = [line["body"] for line in lines[:-1] if line.get("status") == 200]
    assert {r["ASCEND_VISIBLE_DEVICES"] for r in replies} == {"0", "1"}
    assert len(summary["hostnames"]) == 2
    assert len(lines[-2]["addresses"]) == 2  # the alias resolves to both task addresses
