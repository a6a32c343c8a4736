"""A ModelGateway serving a multi-node replica on the lab (issue 20 items 5 and 6): the gateway
(on an overlay network) routes to the group's leader only, at its node address on the host
network; when a member's node is killed the group is taken out of the gateway before anything
else happens, the gateway sends it no request from then on, and once npuswarm has restarted
the group on the remaining nodes it is served again. The real gateway image and the fake
vLLM; no NPU is held twice at any pass (tests/invariants.py)."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator

import pytest

import swarmlab
from npuswarm.api.gateway import ModelGateway
from npuswarm.core.pipeline import Desired
from npuswarm.gateway.credentials import Credentials
from npuswarm.gateway.push import Gateways
from npuswarm.reconcile import PassResult, Reconciler
from npuswarm.swarm import Swarm
from tests.helpers import wait_for
from tests.invariants import npu_conflicts

from .conftest import lab_settings
from .test_gateway import Load, chat
from .test_multinode_lifecycle import group_model, index_of, members

pytestmark = pytest.mark.lab

NETWORK = "npuswarm-gw-net"
ROOT_KEY = "lab-group-gateway-root-key-0123456789"
PORT, ADMIN_PORT = 18110, 18111
MODEL = "ds-chat"
# Swarm refuses a constraint on a label key with a "/" ("key ... is invalid").
GATEWAY_NODE_LABEL = "npuswarm-test-gateway"
# After the gateway dropped the group: this many client requests that the old leader, still
# running, must not see (the lost-node grace below keeps npuswarm from restarting it sooner).
QUIET_REQUESTS = 20
LOST_NODE_GRACE = 20.0


@pytest.fixture
def gateway_node(swarm_lab: swarmlab.Lab) -> Iterator[dict[str, str]]:
    """The gateway runs on the manager (never killed here): its node gets a label for it."""
    client = swarm_lab.client(1)
    node = client.nodes.get(swarm_lab.node_id(1))
    spec = node.attrs["Spec"]
    spec["Labels"] = {**spec.get("Labels", {}), GATEWAY_NODE_LABEL: "here"}
    node.update(spec)
    yield {GATEWAY_NODE_LABEL: "here"}
    node.reload()
    spec = node.attrs["Spec"]
    spec["Labels"].pop(GATEWAY_NODE_LABEL, None)
    node.update(spec)


def served(metrics_text: str) -> float:
    """vllm:request_success_total, summed over its labels, as the fake vLLM reports it."""
    return sum(float(m) for m in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", metrics_text, re.M))


def read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read().decode()


def test_a_gateway_serves_a_group_through_its_leader_and_drops_it_before_a_lost_member_is_replaced(
    swarm_lab: swarmlab.Lab, gateway_image: str, gateway_node: dict[str, str],
) -> None:
    api = swarm_lab.client(1).api
    if not api.networks(names=[NETWORK]):
        api.create_network(NETWORK, driver="overlay", attachable=True)
    settings = lab_settings(gateway_root_key=ROOT_KEY, lost_node_grace_seconds=LOST_NODE_GRACE,
                            stop_grace_seconds=5)
    reconciler = Reconciler(
        Swarm(base_url=swarm_lab.endpoint), settings,
        gateways=Gateways(settings.instance, Credentials(ROOT_KEY, settings.instance),
                          policy=settings.tenant_policy()))
    md = group_model("ds-gw", servedModelName=MODEL)
    gw = ModelGateway.model_validate({
        "metadata": {"name": "gw-group", "namespace": "lab", "generation": 1, "uid": "uid-gw-group"},
        "spec": {"image": gateway_image, "port": PORT, "adminPort": ADMIN_PORT, "replicas": 1,
                 "policy": "round_robin", "network": {"name": NETWORK}, "nodeSelector": gateway_node,
                 "healthCheck": {"intervalSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 1}},
    })
    conflicts: list[str] = []
    victim: int | None = None

    def run() -> PassResult:
        result = reconciler.run_pass(Desired(deployments=[md], gateways=[gw]))
        conflicts.extend(npu_conflicts(api))
        return result

    def until(check, what: str, timeout: float = 180) -> PassResult:  # type: ignore[no-untyped-def]
        return wait_for(lambda: (r := run()) and (r if check(r) else None), what, timeout=timeout, interval=0.5)

    def backends(result: PassResult) -> list[str]:
        status = result.gateways["lab/gw-group"]
        return next((m.backends for m in status.models if m.model == MODEL), [])

    try:
        first = until(lambda r: r.views[md.key].status.phase == "Ready" and len(backends(r)) == 1
                      and r.gateways["lab/gw-group"].readyReplicas == 1,
                      "the group and its gateway to be ready")
        view = first.views[md.key]
        rows = members(view)
        leader = swarm_lab.node(index_of(swarm_lab, rows["0-m0"].hostname))
        old_url = backends(first)[0]
        # The leader only, at its node address and the group's API port (host network).
        assert old_url == f"http://{leader.address}:{view.status.endpoint.rsplit(':', 1)[1]}"
        # The gateway, on an overlay, reaches the node address (through docker_gwbridge).
        gateway_url = "http://" + (first.gateways["lab/gw-group"].endpoint or "").split(", ")[0]
        answer = wait_for(lambda: (reply := chat(gateway_url, MODEL, max_tokens=3)).status == 200 and reply,
                          "a completion through the gateway", timeout=60)
        assert answer.json()["model"] == MODEL
        assert served(read(f"{old_url}/metrics")) >= 1

        # A worker node of the group dies (its dockerd: its containers, host network and all,
        # go on running, as on a node whose daemon crashed).
        victim = next(index_of(swarm_lab, r.hostname) for _, r in sorted(rows.items(), reverse=True)
                      if index_of(swarm_lab, r.hostname) != 1)
        with Load(gateway_url, MODEL, workers=2) as load:
            swarm_lab.kill_dockerd(victim)
            out = until(lambda r: backends(r) == [], "the gateway to drop the group", timeout=60)
            # Taken out once the gateway accepted the push that the pass handed over.
            pusher = reconciler.gateways.pusher if reconciler.gateways is not None else None
            assert pusher is not None and pusher.settle(10), "the gateway's push did not end"
            assert out.views[md.key].status.groupStatuses[0].generation == 0, "not restarted yet"
            # The old group keeps running until npuswarm restarts it (the lost-node grace)...
            before = served(read(f"{old_url}/metrics"))
            dropped_at = time.monotonic()

            def quiet() -> list:  # type: ignore[type-arg]
                return [r for r in load.replies if r.started >= dropped_at + 2]

            wait_for(lambda: len(quiet()) >= QUIET_REQUESTS, "client requests after the group left", timeout=30)
            assert out.views[md.key].status.groupStatuses[0].generation == run().views[md.key].status.groupStatuses[0].generation
            # ...and the gateway sent it nothing since it was taken out: its clients got 503s.
            assert served(read(f"{old_url}/metrics")) == before
            assert all(r.status != 200 for r in quiet()), [r.status for r in quiet()][:10]
            back = until(lambda r: r.views[md.key].status.phase == "Ready" and len(backends(r)) == 1,
                         "the group to be restarted on the remaining nodes and served again", timeout=240)
            group = back.views[md.key].status.groupStatuses[0]
            assert group.generation >= 1 and victim not in {index_of(swarm_lab, m.hostname) for m in group.members}
            wait_for(lambda: (reply := chat(gateway_url, MODEL, max_tokens=3)).status == 200 and reply,
                     "a completion from the restarted group", timeout=60)
        assert conflicts == []
    finally:
        if victim is not None:
            swarm_lab.start_dockerd(victim)
            swarm_lab.wait_node_state(victim, "ready", timeout=60)
        reconciler.finalize(md.metadata.namespace, md.metadata.name, md.metadata.uid)
        reconciler.finalize_gateway("lab", "gw-group")
        reconciler.close()
