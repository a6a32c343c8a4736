"""One endpoint per model: replicas (one service each) share a network alias on an overlay,
with endpoint mode dnsrr (the lab kernel has no IPVS for VIPs)."""

import json

import pytest

import swarmlab

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
    client_cmd = [
        "fakevllm-client",
        "--count",
        str(REQUESTS),
        "--timeout",
        "60",
        "http://qwen:8000/npus",
    ]
    client = manager.containers.run(swarmlab.IMAGE, client_cmd, network=net.name, detach=True)
    try:
        exit_code = client.wait(timeout=90)["StatusCode"]
        output = client.logs(stdout=True, stderr=False).decode()
    finally:
        client.remove(force=True)
    assert exit_code == 0, output
    lines = [json.loads(line) for line in output.splitlines()]
    summary = lines[-1]["summary"]
    assert summary["ok"] == REQUESTS
    replies = [line["body"] for line in lines[:-1] if line.get("status") == 200]
    assert {r["ASCEND_VISIBLE_DEVICES"] for r in replies} == {"0", "1"}
    assert len(summary["hostnames"]) == 2
    assert len(lines[-2]["addresses"]) == 2  # the alias resolves to both task addresses
